"""vLLM's paged FlexAttention layout and per-step block mask, in plain PyTorch, for the GPU benchmark.

Written after vLLM 0.32's `vllm/v1/attention/backends/flex_attention.py` (not imported: the GPU machine this
serves cannot install vLLM): the layer cache `[num_blocks, num_kv_heads, block_size, 2*head_dim]` as a view
of LBNHC storage, flattened to one token axis the way `FlexAttentionImpl.forward` does; the inverse block
table (`physical_to_logical_mapping`, block 0 reserved as vLLM's null block); the paged `mask_mod` that turns
physical query/KV indices into per-request logical ones (`_convert_physical_to_logical`,
`get_paged_mask_mod`); the direct block-mask build (`_build_block_mask_direct`: each 16-query group gets the
deduplicated pages of every request it holds, causal pruning, `BlockMask.from_kv_blocks`); persistent
full-capacity tensors that the mask closes over; and the compiled call with vLLM's kernel options. One
difference: the logical mask here also receives the query's request (batch row), which the ZipAR rule needs
and vLLM's `logical_mask_mod(b, h, q_idx, kv_idx)` does not pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 16  # vLLM's cache block size here, and flex's q/kv block sizes on the direct-build path
KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": BLOCK, "BLOCK_N": BLOCK}

# vLLM sets this limit at import of its FlexAttention backend; past it dynamo stops compiling the call.
RECOMPILE_LIMIT = 16
torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
flex_compiled = torch.compile(flex_attention, fullgraph=True)

LogicalMask = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (request, q, kv) -> bool


def cdiv(a, b):
    return -(a // -b)


@dataclass
class PagedCache:
    """One layer's KV cache: `storage` is LBNHC `[num_blocks, block_size, kv_heads, 2*head_dim]`."""

    storage: torch.Tensor

    @classmethod
    def random(
        cls, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> PagedCache:
        storage = torch.randn(num_blocks, BLOCK, kv_heads, 2 * head_dim, dtype=dtype, device=device)
        storage[0].zero_()  # vLLM's null block
        return cls(storage)

    @property
    def num_blocks(self) -> int:
        return self.storage.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.storage.shape[2]

    @property
    def head_dim(self) -> int:
        return self.storage.shape[3] // 2

    @property
    def layer_view(self) -> torch.Tensor:
        """The tensor vLLM hands the backend: `[num_blocks, num_kv_heads, block_size, 2*head_dim]`."""
        return self.storage.permute(0, 2, 1, 3)

    def flex_key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[1, kv_heads, num_blocks*block_size, head_dim]`, viewed as vLLM's forward does."""
        cache = self.layer_view.transpose(1, 2)
        key, value = cache.split(self.head_dim, dim=-1)
        key = key.view(-1, self.kv_heads, self.head_dim)
        value = value.view(-1, self.kv_heads, self.head_dim)
        return key[None].permute(0, 2, 1, 3), value[None].permute(0, 2, 1, 3)

    def dense(self, block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values gathered from its pages: `[kv_heads, length, head_dim]` each."""
        pages = self.storage[block_row[: cdiv(length, BLOCK)].long()]  # [pages, block, heads, 2D]
        tokens = pages.reshape(-1, self.kv_heads, 2 * self.head_dim)[:length].transpose(0, 1)
        key, value = tokens.split(self.head_dim, dim=-1)
        return key.contiguous(), value.contiguous()


def shuffled_block_table(
    seq_lens: list[int], num_blocks: int, generator: torch.Generator, width: int
) -> torch.Tensor:
    """`[len(seq_lens), width]` int32: each sequence's pages from a shuffle of blocks 1.. (0 is null)."""
    need = [cdiv(n, BLOCK) for n in seq_lens]
    if sum(need) > num_blocks - 1 or max(need) > width:
        raise ValueError(
            f"{sum(need)} pages (widest {max(need)}) do not fit {num_blocks - 1} blocks x {width}"
        )
    free = torch.randperm(num_blocks - 1, generator=generator)[: sum(need)] + 1
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    start = 0
    for row, count in enumerate(need):
        table[row, :count] = free[start : start + count]
        start += count
    return table


def physical_to_logical(block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """`[seqs, num_blocks]`: the logical page of each physical block per sequence, -1 where unused."""
    seqs, width = block_table.shape
    logical = torch.arange(width, device=block_table.device)[None, :]
    live = logical < cdiv(seq_lens, BLOCK)[:, None]
    inverse = torch.full((seqs, num_blocks), -1, dtype=torch.long, device=block_table.device)
    inverse.scatter_reduce_(
        -1, torch.where(live, block_table, 0).long(), torch.where(live, logical, 0).expand(seqs, -1), "amax"
    )
    inverse[:, 0] = -1  # the null block (also where dead table entries were routed)
    return inverse


def unique_pages(pages: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Each row's distinct nonzero pages in first-seen order, left-packed, -1 padded (no host sync)."""
    rows, n = pages.shape
    index = torch.arange(n, device=pages.device).expand(rows, n)
    first = torch.full((rows, num_blocks), n, device=pages.device, dtype=torch.long)
    first.scatter_reduce_(1, pages, index, "amin")
    keep = (pages != 0) & (index == first.gather(1, pages))
    dest = torch.where(keep, keep.long().cumsum(1) - 1, n)  # dropped entries go to a spare column
    packed = torch.full((rows, n + 1), -1, device=pages.device, dtype=pages.dtype)
    return packed.scatter_(1, dest, pages)[:, :n]


class PersistentTensors:
    """Full-capacity device tensors that each step's mask closes over (vLLM's `persistent_*` buffers)."""

    def __init__(self, max_seqs: int, max_tokens: int, num_blocks: int, max_pages: int, device) -> None:
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.decode_offset = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.physical_to_logical = torch.full((max_seqs, num_blocks), -1, dtype=torch.long, device=device)
        self.doc_ids = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        groups = cdiv(max_tokens, BLOCK)
        self.kv_indices = torch.zeros(groups, BLOCK * max_pages, dtype=torch.int32, device=device)
        self.kv_num_blocks = torch.zeros(groups, dtype=torch.int32, device=device)


def _into(persistent: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    view = persistent[tuple(slice(0, s) for s in value.shape)]
    view.copy_(value)
    return view


class PagedStep:
    """One step's paged metadata (vLLM's `FlexAttentionMetadata` on the direct-build, causal path)."""

    def __init__(
        self,
        cache: PagedCache,
        persistent: PersistentTensors,
        block_table: torch.Tensor,
        seq_lens: list[int],
        query_lens: list[int],
    ) -> None:
        device = cache.storage.device
        seqs = len(seq_lens)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        qlens = torch.tensor(query_lens, dtype=torch.int32)
        start_loc = torch.zeros(seqs + 1, dtype=torch.int32)
        start_loc[1:] = qlens.cumsum(0)
        self.num_tokens = int(start_loc[-1])
        self.max_seq_len = max(seq_lens)
        self.num_blocks = cache.num_blocks
        self.block_table = block_table.to(device)
        self.seq_lens_dev = lens.to(device)
        self.persistent = persistent
        _into(persistent.query_start_loc, start_loc.to(device))
        _into(persistent.seq_lens, self.seq_lens_dev)
        _into(persistent.decode_offset, (lens - qlens).to(device))
        _into(
            persistent.physical_to_logical,
            physical_to_logical(self.block_table, self.seq_lens_dev, cache.num_blocks),
        )
        doc_ids = torch.repeat_interleave(torch.arange(seqs, dtype=torch.int32), qlens)  # built on the host
        self.doc_ids = _into(persistent.doc_ids, doc_ids.to(device))

    def mask_mod(self, logical: LogicalMask):
        """The paged mask: physical indices -> (request, logical q, logical kv), then `logical`."""
        p = self.persistent
        doc_ids = self.doc_ids

        def paged_mask_mod(b, h, q_idx, physical_kv_idx):
            request = doc_ids[q_idx]
            logical_page = p.physical_to_logical[request, physical_kv_idx // BLOCK]
            logical_kv = logical_page * BLOCK + physical_kv_idx % BLOCK
            valid = (logical_page >= 0) & (logical_kv < p.seq_lens[request])
            logical_q = q_idx - p.query_start_loc[request] + p.decode_offset[request]
            return valid & logical(request, logical_q, logical_kv)

        return paged_mask_mod

    def block_mask(self, mask_mod) -> BlockMask:
        """vLLM's `_build_block_mask_direct` for a causal decoder: one page list per 16-query group."""
        p = self.persistent
        device = self.block_table.device
        width = cdiv(self.max_seq_len, BLOCK)
        logical_pages = torch.arange(width, device=device)
        pages = self.block_table[self.doc_ids.long(), :width].long()
        pages.masked_fill_(
            logical_pages[None, :] >= cdiv(self.seq_lens_dev, BLOCK)[self.doc_ids.long(), None], 0
        )
        token = torch.arange(self.num_tokens, device=device)
        request = self.doc_ids.long()
        logical_q = token - p.query_start_loc[request] + p.decode_offset[request]
        pages.masked_fill_(logical_pages[None, :] * BLOCK > logical_q[:, None], 0)  # causal pruning
        pad = (-self.num_tokens) % BLOCK
        pages = torch.nn.functional.pad(pages, (0, 0, 0, pad)).reshape(-1, BLOCK * width)
        kv_indices = _into(p.kv_indices, unique_pages(pages, self.num_blocks).to(torch.int32))
        kv_num_blocks = _into(p.kv_num_blocks, (kv_indices >= 0).sum(-1).to(torch.int32))
        return BlockMask.from_kv_blocks(
            kv_num_blocks[None, None],
            kv_indices[None, None],
            BLOCK_SIZE=(BLOCK, BLOCK),
            mask_mod=mask_mod,
            seq_lengths=(self.num_tokens, self.num_blocks * BLOCK),
            compute_q_blocks=False,
        )


def causal(request: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return kv <= q


def run_flex(
    attention, query: torch.Tensor, cache: PagedCache, block_mask: BlockMask, scale: float
) -> torch.Tensor:
    """`query` `[tokens, heads, dim]` -> `[tokens, heads, dim]`, called as vLLM's forward calls flex."""
    key, value = cache.flex_key_value()
    out = attention(
        query.permute(1, 0, 2)[None],
        key,
        value,
        None,
        block_mask,
        scale,
        enable_gqa=query.shape[1] != cache.kv_heads,
        kernel_options=KERNEL_OPTIONS,
    )
    return out[0].permute(1, 0, 2)
