"""Attention with the ZipAR mask over vLLM's paged KV cache.

`ZipARCPUAttentionBackend` is vLLM's CPU attention backend (same name, metadata builder and KV layout) whose
implementation first runs the stock kernel for the whole batch — exact for prefill, NTP and every request
still in causal order — and then recomputes the rows of requests that need the mask (`attention_mask.py`)
with one batched SDPA over their gathered keys and values. The model selects it per layer through
`Attention(..., attn_backend=...)`, so nothing in vLLM is patched.

The CPU cache stores each (block, head) as [block_size, head_dim] for V but, under the `vec` ISA, K
transposed as [head_dim, block_size]; the layout is probed once through vLLM's own cache-write op.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    _get_attn_isa,
)

from vllm_zipar.engine.attention_mask import ZipARAttentionInputs


@functools.lru_cache(maxsize=None)
def key_block_is_transposed(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    """Write known keys through vLLM's cache op and see where they land."""
    cache = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    keys = torch.arange(block_size * head_dim, dtype=dtype).view(block_size, 1, head_dim)
    ops.cpu_attn_reshape_and_cache(
        keys, keys.clone(), key_cache, value_cache, torch.arange(block_size), isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
    stored = cache[0, 0, :block_size]
    if torch.equal(stored, keys[:, 0]):
        return False
    if torch.equal(stored.reshape(-1), keys[:, 0].t().reshape(-1)):
        return True
    raise NotImplementedError(f"unknown CPU key-cache layout for ISA {isa!r}")


class ZipARCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        zipar: ZipARAttentionInputs | None = getattr(attn_metadata, "zipar", None)
        if zipar is not None and zipar.requests:
            self._masked_rows(layer, query, kv_cache, attn_metadata, zipar, output)
        return output

    def _masked_rows(self, layer, query, kv_cache, attn_metadata, zipar, output) -> None:
        num_blocks, kv_heads, block_size, _ = kv_cache.shape
        cache = kv_cache.view(num_blocks, kv_heads, 2, block_size, -1)
        head_dim = cache.shape[-1]
        t = zipar.tensors(block_size, attn_metadata.block_table)
        blocks = t["blocks"]  # [R, nb]
        num, max_blocks = blocks.shape
        isa = getattr(layer, "isa", None) or _get_attn_isa(query.dtype, block_size, head_dim, self.kv_cache_dtype)
        gathered = cache[blocks.reshape(-1)]  # [R*nb, kv_heads, 2, bs, d]
        keys = gathered[:, :, 0]
        if key_block_is_transposed(isa, cache.dtype, block_size, head_dim):
            keys = keys.reshape(num * max_blocks, kv_heads, head_dim, block_size).transpose(-1, -2)
        values = gathered[:, :, 1]
        # [R, nb, h, bs, d] -> [R, h, nb*bs, d]
        keys = keys.reshape(num, max_blocks, kv_heads, block_size, head_dim).permute(0, 2, 1, 3, 4)
        values = values.reshape(num, max_blocks, kv_heads, block_size, head_dim).permute(0, 2, 1, 3, 4)
        keys = keys.reshape(num, kv_heads, max_blocks * block_size, head_dim)
        values = values.reshape(num, kv_heads, max_blocks * block_size, head_dim)
        rows = t["query_rows"]  # [R, q]
        q = query[rows.reshape(-1)].view(num, rows.shape[1], self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=t["mask"][:, None], scale=self.scale,
            enable_gqa=self.num_heads != kv_heads,
        )  # [R, H, q, d]
        out = out.transpose(1, 2).reshape(num * rows.shape[1], self.num_heads * head_dim)
        valid = t["query_valid"].reshape(-1)
        flat_out = output.view(output.shape[0], -1)
        flat_out[rows.reshape(-1)[valid]] = out[valid].to(flat_out.dtype)


class ZipARCPUAttentionBackend(CPUAttentionBackend):
    # get_name() stays "CPU_ATTN": vLLM looks backends up by that name and groups layers by it.

    @staticmethod
    def get_impl_cls() -> type[ZipARCPUAttentionImpl]:
        return ZipARCPUAttentionImpl


def zipar_attention_backend():
    """The attention backend class for this platform (None: the platform's default, no ZipAR mask)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return ZipARCPUAttentionBackend
    return None
