"""Attention with the ZipAR mask, inside vLLM's CPU attention backend.

`ZipARCPUAttentionBackend` is vLLM's CPU backend (same name, metadata builder and paged KV layout) whose
implementation first runs the stock kernel for the whole batch — exact for prefill, NTP and every request
still in causal order — and then recomputes the rows of requests that need the mask (`attention_mask.py`).
The model selects it per layer through `Attention(..., attn_backend=...)`; nothing in vLLM is patched.

The masked rows of every request of a step are recomputed by one call per layer of a compiled kernel
(`masked_kernel.py`, `csrc/masked_paged_attention.cpp`) that reads keys and values straight from vLLM's
paged cache. The CPU cache stores K transposed per (block, head) under the `vec` ISAs; the layout is probed
through vLLM's own cache-write op rather than assumed, and a layout the kernel does not know (AMX) or a
machine where it cannot be built falls back to the PyTorch path below.

The PyTorch path keeps, per ZipAR request and layer, its keys and values in feed order in one contiguous
buffer (`RequestKV`), appended from the step's own k/v, and runs a few tensor ops per request. This
duplicates the KV of ZipAR images in flight (LlamaGen-B, 24x24: ~46 MB per image), which vLLM's KV
accounting does not see. When a buffer lacks tokens (a request that became ZipAR-masked, or whose earlier
tokens came from the prefix cache) they are gathered once from vLLM's paged cache.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    _get_attn_isa,
)

from vllm_zipar.engine.attention_mask import ImageAttentionRows, ZipARAttentionInputs
from vllm_zipar.engine.masked_kernel import kernel_enabled, load_masked_kernel, masked_paged_attention


@functools.cache
def cache_key_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> str | None:
    """How vLLM's CPU cache stores one (block, head): "plain" keys ([token][dim]) or "transposed" keys
    ([dim][token]), values plain either way; None for anything else. Found by writing known keys and values
    through vLLM's own cache op and seeing where they land."""
    cache = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    keys = torch.arange(block_size * head_dim, dtype=dtype).view(block_size, 1, head_dim)
    ops.cpu_attn_reshape_and_cache(
        keys,
        -keys,
        key_cache,
        value_cache,
        torch.arange(block_size),
        isa,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )
    stored_keys, stored_values = cache[0, 0, :block_size], cache[0, 0, block_size:]
    if not torch.equal(stored_values, -keys[:, 0]):
        return None
    if torch.equal(stored_keys, keys[:, 0]):
        return "plain"
    if torch.equal(stored_keys.reshape(-1), keys[:, 0].t().reshape(-1)):
        return "transposed"
    return None


def key_block_is_transposed(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    layout = cache_key_layout(isa, dtype, block_size, head_dim)
    if layout is None:
        raise NotImplementedError(f"unknown CPU key-cache layout for ISA {isa!r}")
    return layout == "transposed"


class RequestKV:
    """One request's keys and values for one layer, [kv_heads, tokens, head_dim], in feed order."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 256) -> None:
        self.k = torch.empty(kv_heads, capacity, head_dim, dtype=dtype)
        self.v = torch.empty(kv_heads, capacity, head_dim, dtype=dtype)
        self.length = 0

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens `[start, start + n)` from k, v of shape [n, kv_heads, head_dim]; later ones are dropped."""
        end = start + k.shape[0]
        if end > self.k.shape[1]:
            grow = max(end, 2 * self.k.shape[1])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.empty(old.shape[0], grow, old.shape[2], dtype=old.dtype)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self.k[:, start:end] = k.transpose(0, 1)
        self.v[:, start:end] = v.transpose(0, 1)
        self.length = end


class ZipARCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.request_kv: dict[str, RequestKV] = {}
        self._kernel_key_layout: str | None | bool = False  # False: not decided yet

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        zipar: ZipARAttentionInputs | None = getattr(attn_metadata, "zipar", None)
        if zipar is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        key_layout = self._kernel_layout(layer, query.dtype, kv_cache)
        masked = zipar.masked
        # A step whose every row is masked (ZipAR images past their causal start) skips the stock kernel.
        if key_layout is None or not zipar.covers(
            attn_metadata.seq_lens.shape[0], attn_metadata.num_actual_tokens
        ):
            stock_metadata = (
                self._stock_metadata(zipar, attn_metadata, layer, query.dtype) if masked else attn_metadata
            )
            output = super().forward(
                layer, query, key, value, kv_cache, stock_metadata, output, *args, **kwargs
            )
        if key_layout is None:
            return self._pytorch_masked_rows(zipar, layer, query, key, value, kv_cache, attn_metadata, output)
        if masked:
            # The compiled kernel reads the step's keys and values from vLLM's cache (written before this
            # call: the CPU backend updates the cache outside forward), so no per-request state is kept.
            requests, mask = zipar.kernel_inputs
            num_blocks, kv_heads, block_size, _ = kv_cache.shape
            masked_paged_attention(
                query,
                kv_cache.view(num_blocks, kv_heads, 2 * block_size, -1),
                attn_metadata.block_table,
                requests,
                mask,
                self.scale,
                key_layout == "transposed",
                output.view(output.shape[0], -1),
            )
        return output

    def _pytorch_masked_rows(self, zipar, layer, query, key, value, kv_cache, attn_metadata, output):
        """The fallback: per-request key/value buffers and a few tensor ops per masked request."""
        for req_id in zipar.finished:
            self.request_kv.pop(req_id, None)
        flat_out = output.view(output.shape[0], -1)
        for rows in zipar.requests:
            kv = self._request_kv(rows, layer, key, value, kv_cache, attn_metadata)
            if rows.is_masked:
                flat_out[rows.query_start : rows.query_start + rows.count] = self._masked(rows, query, kv)
        return output

    def _kernel_layout(self, layer, dtype: torch.dtype, kv_cache: torch.Tensor) -> str | None:
        """The cache's key layout if the compiled kernel serves this layer, else None (PyTorch path)."""
        if self._kernel_key_layout is False:
            _, _, block_size, _ = kv_cache.shape
            supported = (
                self.kv_cache_dtype == "auto"
                and self.alibi_slopes is None
                and self.logits_soft_cap in (None, 0)
                and self.sinks is None
                and self.sliding_window == -1
                and kernel_enabled()
                and load_masked_kernel()
            )
            self._kernel_key_layout = (
                cache_key_layout(layer.isa, kv_cache.dtype, block_size, self.head_size) if supported else None
            )
        return self._kernel_key_layout

    def _stock_metadata(self, zipar: ZipARAttentionInputs, metadata, layer, dtype: torch.dtype):
        """The step's metadata with each masked request's context cut to its own queries.

        The stock kernel still runs over the whole batch (its rows for masked requests are overwritten
        afterwards), but then reads almost none of those requests' keys and values. Built once per step.
        """
        if zipar.stock_metadata is None:
            seq_lens = metadata.seq_lens.clone()
            for rows in zipar.masked:
                seq_lens[rows.batch_index] = rows.count
            scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=seq_lens.shape[0],
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size,
                seq_lens=seq_lens,
                dtype=dtype,
                query_start_loc=metadata.query_start_loc,
                causal=metadata.causal,
                sliding_window_size=self.sliding_window,
                isa=layer.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=metadata.dynamic_causal,
                kv_cache_dtype=self.kv_cache_dtype,
            )
            zipar.stock_metadata = dataclasses.replace(
                metadata, seq_lens=seq_lens, scheduler_metadata=scheduler_metadata
            )
        return zipar.stock_metadata

    def _request_kv(self, rows: ImageAttentionRows, layer, key, value, kv_cache, attn_metadata) -> RequestKV:
        kv = self.request_kv.get(rows.req_id)
        if kv is None:
            kv = self.request_kv[rows.req_id] = RequestKV(key.shape[1], key.shape[2], key.dtype)
        if kv.length < rows.first_token:
            k_old, v_old = self._gather_paged(rows, layer, kv_cache, attn_metadata, key.dtype)
            kv.write(0, k_old, v_old)
        span = slice(rows.query_start, rows.query_start + rows.count)
        kv.write(rows.first_token, key[span], value[span])
        return kv

    def _masked(self, rows: ImageAttentionRows, query: torch.Tensor, kv: RequestKV) -> torch.Tensor:
        q = query[rows.query_start : rows.query_start + rows.count].transpose(0, 1)  # [H, n, d]
        keys, values = kv.k[:, : rows.seq_len], kv.v[:, : rows.seq_len]
        if keys.shape[0] != self.num_heads:  # grouped-query attention
            repeat = self.num_heads // keys.shape[0]
            keys, values = keys.repeat_interleave(repeat, 0), values.repeat_interleave(repeat, 0)
        # Explicit softmax attention: with a handful of queries per request it runs about twice as fast on
        # the CPU as SDPA with a mask, and reads the keys and values once either way.
        bias = rows.additive_mask(q.dtype).expand(self.num_heads, rows.count, rows.seq_len)
        scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=self.scale)
        out = torch.bmm(scores.softmax(dim=-1), values)  # [H, n, d]
        return out.transpose(0, 1).reshape(rows.count, -1)

    def _gather_paged(self, rows, layer, kv_cache, attn_metadata, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `[0, first_token)` of one request from vLLM's paged cache, as [n, kv_heads, head_dim]."""
        num_blocks, kv_heads, block_size, _ = kv_cache.shape
        cache = kv_cache.view(num_blocks, kv_heads, 2, block_size, -1)
        head_dim = cache.shape[-1]
        count = rows.first_token
        used = (count + block_size - 1) // block_size
        blocks = attn_metadata.block_table[rows.batch_index, :used].to(torch.long)
        gathered = cache[blocks]  # [nb, h, 2, bs, d]
        keys = gathered[:, :, 0]
        isa = getattr(layer, "isa", None) or _get_attn_isa(dtype, block_size, head_dim, self.kv_cache_dtype)
        if key_block_is_transposed(isa, cache.dtype, block_size, head_dim):
            keys = keys.reshape(used, kv_heads, head_dim, block_size).transpose(-1, -2)
        k = keys.permute(0, 2, 1, 3).reshape(used * block_size, kv_heads, head_dim)[:count]
        v = gathered[:, :, 1].permute(0, 2, 1, 3).reshape(used * block_size, kv_heads, head_dim)[:count]
        return k.to(dtype), v.to(dtype)


class ZipARCPUAttentionBackend(CPUAttentionBackend):
    # get_name() stays "CPU_ATTN": vLLM looks backends up by that name and groups layers by it.

    @staticmethod
    def get_impl_cls() -> type[ZipARCPUAttentionImpl]:
        return ZipARCPUAttentionImpl
