"""ZipAR attention through vLLM's FlexAttention backend (the CUDA route; also runs on the CPU for CI).

vLLM's FlexAttention backend attends over the paged cache with one `mask_mod` for the whole step, in logical
indices (a token's place in its request's KV sequence), but its layer hook `logical_mask_mod` is not told
which request a query belongs to, and the ZipAR rule needs the request's raster positions, feed steps,
streams and proxy flags. So the runner attaches the mask per step (`ZipARFlexMasks.attach`): when a step has
masked requests it writes the tokens it feeds into persistent device buffers (`flex_mask.py`), points each
batch row at its request's slot, and swaps the step's metadata to a paged mask that calls the ZipAR rule with
the request of every query. vLLM's causal block pruning stays valid: a key the rule lets a query see is never
later in the KV sequence than the query (a pass's inputs are in raster order per stream). Steps without
masked requests (prefill, NTP, rows still in raster order) keep vLLM's own causal mask.

Full CUDA graphs would replay the mask captured with the graph, so the builder declares no CUDA-graph
support for attention (vLLM then captures the rest of the model piecewise).
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flex_attention import (
    FlexAttentionBackend,
    FlexAttentionImpl,
    FlexAttentionMetadata,
    FlexAttentionMetadataBuilder,
)

from vllm_zipar.engine.attention_mask import ZipARAttentionInputs
from vllm_zipar.engine.flex_mask import CAUSAL, NEVER, ZipARMaskBuffers, zipar_visible


def _has_flash_cache_op() -> bool:
    try:
        torch.ops._C_cache_ops.reshape_and_cache_flash  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class ZipARFlexAttentionImpl(FlexAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._flash_cache_op = _has_flash_cache_op()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self._flash_cache_op:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        # vLLM's CPU build has no `reshape_and_cache_flash`: the same write as an indexed store into the
        # [blocks, block_size, kv_heads, head_dim] views the backend reads (slot -1: padding, not written).
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        count = slot_mapping.shape[0]
        slots = slot_mapping.to(torch.long)
        keep = slots >= 0
        block_size = key_cache.shape[1]
        blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
        key_cache[blocks, offsets] = key[:count][keep].to(key_cache.dtype)
        value_cache[blocks, offsets] = value[:count][keep].to(value_cache.dtype)


class ZipARFlexMetadataBuilder(FlexAttentionMetadataBuilder):
    # The ZipAR mask is attached after `build`, per step; a full CUDA graph would replay a stale one.
    _cudagraph_support = AttentionCGSupport.NEVER


class ZipARFlexAttentionBackend(FlexAttentionBackend):
    # get_name() stays "FLEX_ATTENTION": vLLM looks backends up by that name and groups layers by it.

    @staticmethod
    def get_impl_cls() -> type[ZipARFlexAttentionImpl]:
        return ZipARFlexAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[ZipARFlexMetadataBuilder]:
        return ZipARFlexMetadataBuilder


def zipar_paged_mask_mod(metadata: FlexAttentionMetadata, buffers: ZipARMaskBuffers):
    """vLLM's paged mask (`FlexAttentionMetadata.get_paged_mask_mod`, vLLM 0.32) with the ZipAR rule in
    place of its logical mask, told the request of each query (vLLM's drops it)."""
    doc_ids = metadata.doc_ids

    def mask_mod(b, h, q_idx, kv_idx):
        is_valid, logical_q, logical_kv = metadata._convert_physical_to_logical(doc_ids, q_idx, kv_idx)
        return is_valid & zipar_visible(buffers, doc_ids[q_idx], logical_q, logical_kv)

    return mask_mod


class ZipARFlexMasks:
    """One runner's mask state: the device buffers, and which slot each masked image request holds."""

    def __init__(self, max_requests: int, max_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.buffers: ZipARMaskBuffers | None = None
        self.slots: dict[str, int] = {}
        self.written: dict[str, int] = {}  # tokens of each slot's request already in the buffers

    def attach(self, metadata: FlexAttentionMetadata, attention: ZipARAttentionInputs) -> None:
        for req_id in attention.finished:
            self.slots.pop(req_id, None)
            self.written.pop(req_id, None)
        masked = attention.masked
        if not masked:
            return  # vLLM's causal mask is exact for this step
        if self.buffers is None:
            self.buffers = ZipARMaskBuffers.allocate(
                self.max_requests, self.max_tokens, self.max_requests, metadata.block_table.device
            )
        self._write(attention)
        batch_slots = torch.full((metadata.num_reqs,), CAUSAL, dtype=torch.int32)
        for rows in masked:
            batch_slots[rows.batch_index] = self.slots[rows.req_id]
        self.buffers.set_batch_slots(batch_slots)
        metadata.mask_mod = zipar_paged_mask_mod(metadata, self.buffers)
        if metadata.direct_build:
            metadata.block_mask = metadata._build_block_mask_direct()
        else:
            from vllm.v1.attention.backends import flex_attention

            metadata.block_mask = flex_attention.create_block_mask_compiled(
                metadata.mask_mod,
                None,
                None,
                metadata.num_actual_tokens,
                metadata.total_cache_tokens,
                device=metadata.block_table.device,
                BLOCK_SIZE=(metadata.q_block_size, metadata.kv_block_size),
            )

    def _write(self, attention: ZipARAttentionInputs) -> None:
        """Upload the per-token values of every masked request's tokens not yet in the buffers, and the
        `dead_from` of earlier tokens this step's tokens superseded (exact drafts)."""
        masked = attention.masked
        stepping = {rows.req_id for rows in masked}
        columns = []  # per request: slot, token index, position, step, stream, proxy
        drafts = []  # per request: slot, token index, context row and column, key row and column, dead_from
        for rows in masked:
            slot = self._slot(rows.req_id, stepping)
            start, end = min(rows.first_token, self.written[rows.req_id]), rows.seq_len
            if end > self.max_tokens:
                raise ValueError(f"request {rows.req_id} holds {end} tokens, more than max_model_len")
            keys = rows.keys
            streams = keys.streams[start:end] if keys.streams is not None else np.zeros(end - start, np.int8)
            tokens = np.arange(start, end)
            columns.append(
                (
                    np.full(end - start, slot),
                    tokens,
                    keys.positions[start:end],
                    keys.steps[start:end],
                    streams.astype(np.int64),
                    keys.proxy[start:end],
                )
            )
            fields = keys.drafts
            if fields is None:  # the feed-time rule: context "all before", never superseded
                count = end - start
                none = np.full(count, -1, np.int64)
                drafts.append(
                    (np.full(count, slot), tokens, none, none + 1, none, none + 1, np.full(count, NEVER))
                )
            else:
                self.buffers.set_slot_rule(slot, fields.width, fields.window, fields.row0_whole)
                earlier = np.array([t for t in fields.touched if t < start], dtype=np.int64)
                index = np.concatenate([earlier, tokens])
                drafts.append(
                    (
                        np.full(len(index), slot),
                        index,
                        fields.context_rows[index],
                        fields.context_cols[index],
                        fields.key_rows[index],
                        fields.key_cols[index],
                        fields.dead_from[index],
                    )
                )
            self.written[rows.req_id] = end
        fields_of = zip(*columns, strict=True)
        self.buffers.write_tokens(*(torch.from_numpy(np.concatenate(field)) for field in fields_of))
        draft_fields = zip(*drafts, strict=True)
        self.buffers.write_draft_fields(
            *(torch.from_numpy(np.concatenate(field).astype(np.int64)) for field in draft_fields)
        )

    def _slot(self, req_id: str, stepping: set[str]) -> int:
        slot = self.slots.get(req_id)
        if slot is not None:
            return slot
        used = set(self.slots.values())
        free = next((s for s in range(self.max_requests) if s not in used), None)
        if free is None:
            # Every slot is held, some by requests not in this step (preempted or waiting): they are
            # rewritten from their first token if they come back.
            evicted = next(r for r, s in self.slots.items() if r not in stepping)
            free = self.slots.pop(evicted)
            self.written.pop(evicted, None)
        self.slots[req_id] = free
        self.written[req_id] = 0
        return free
