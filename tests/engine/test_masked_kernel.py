"""The compiled ZipAR-masked paged attention equals plain masked softmax attention.

Keys and values are written into a paged cache by vLLM's own cache op (the layout the engine really has),
or by hand for the plain layout no ISA on this machine uses; the kernel's rows are compared with
softmax(q k^T * scale + mask) v computed in float64.
"""

from __future__ import annotations

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_zipar.engine.attention import cache_key_layout
from vllm_zipar.engine.masked_kernel import load_masked_kernel, masked_paged_attention

pytestmark = pytest.mark.skipif(not load_masked_kernel(), reason="the kernel could not be built here")


def paged_case(*, heads, kv_heads, head_dim, block_size, dtype, seq_lens, counts, layout, seed=0):
    """Random requests in a shared paged cache (blocks shuffled), with random masks that keep the diagonal."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per) + 3
    cache = torch.full((num_blocks, kv_heads, 2 * block_size, head_dim), float("nan"), dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks_per), dtype=torch.int32)
    isa = _get_attn_isa(dtype, block_size, head_dim, "auto")
    total_queries = sum(counts)
    query = torch.randn(total_queries, heads, head_dim, generator=gen).to(dtype)
    rows, masks, expected = [], [], torch.zeros(total_queries, heads, head_dim, dtype=torch.float64)
    used, q0, mask_offset = 0, 0, 0
    for r, (seq_len, count) in enumerate(zip(seq_lens, counts, strict=True)):
        table[r, : blocks_per[r]] = order[used : used + blocks_per[r]]
        used += blocks_per[r]
        keys = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        slots = (
            table[r, torch.arange(seq_len) // block_size].long() * block_size
            + torch.arange(seq_len) % block_size
        )
        if layout == "vllm":
            ops.cpu_attn_reshape_and_cache(
                keys,
                values,
                key_cache,
                value_cache,
                slots,
                isa,
                k_scale=1.0,
                v_scale=1.0,
                kv_cache_dtype="auto",
            )
        else:  # plain [token][dim] keys, written by hand
            for t in range(seq_len):
                block, offset = divmod(int(slots[t]), block_size)
                key_cache[block, :, offset] = keys[t]
                value_cache[block, :, offset] = values[t]
        mask = torch.rand(count, seq_len, generator=gen) < 0.6
        mask[torch.arange(count), seq_len - count + torch.arange(count)] = True
        q = query[q0 : q0 + count].double().transpose(0, 1)  # [H, n, d]
        group = heads // kv_heads
        k = keys.double().transpose(0, 1).repeat_interleave(group, 0)
        v = values.double().transpose(0, 1).repeat_interleave(group, 0)
        scores = (q @ k.transpose(1, 2)) * head_dim**-0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        expected[q0 : q0 + count] = (scores.softmax(-1) @ v).transpose(0, 1)
        rows.append((r, q0, count, seq_len, mask_offset))
        masks.append(mask.reshape(-1))
        q0 += count
        mask_offset += mask.numel()
    transposed = layout == "vllm" and cache_key_layout(isa, dtype, block_size, head_dim) == "transposed"
    requests = torch.tensor(rows, dtype=torch.int64)
    mask = torch.cat(masks).to(torch.uint8)
    return query, cache, table, requests, mask, transposed, expected


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, block_size, seq_lens, counts",
    [
        (2, 2, 32, 16, [37], [3]),
        (4, 4, 64, 32, [1, 70, 129], [1, 4, 5]),
        (8, 2, 64, 128, [300, 45], [3, 2]),  # grouped-query attention
        (3, 3, 80, 32, [50], [6]),  # head dim of 5 register chunks
        (2, 1, 128, 16, [33, 16], [2, 1]),
    ],
)
@pytest.mark.parametrize("layout", ["vllm", "plain"])
def test_kernel_equals_masked_softmax_attention_in_float32(
    heads, kv_heads, head_dim, block_size, seq_lens, counts, layout
):
    query, cache, table, requests, mask, transposed, expected = paged_case(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=torch.float32,
        seq_lens=seq_lens,
        counts=counts,
        layout=layout,
    )
    output = torch.full((query.shape[0] + 2, heads * head_dim), -7.0)
    masked_paged_attention(query, cache, table, requests, mask, head_dim**-0.5, transposed, output)
    got = output[: query.shape[0]].view(-1, heads, head_dim).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Rows outside the masked requests are left alone, and NaN in unwritten cache slots never leaks in.
    assert torch.all(output[query.shape[0] :] == -7.0)


def test_kernel_in_bfloat16_stays_within_bfloat16_rounding():
    query, cache, table, requests, mask, transposed, expected = paged_case(
        heads=4,
        kv_heads=4,
        head_dim=64,
        block_size=16,  # vLLM's vec16 layout; bf16 blocks of 32 select AMX, whose layout the kernel refuses
        dtype=torch.bfloat16,
        seq_lens=[90, 33],
        counts=[3, 2],
        layout="vllm",
    )
    output = torch.zeros(query.shape[0], 4 * 64, dtype=torch.bfloat16)
    masked_paged_attention(query, cache, table, requests, mask, 64**-0.5, transposed, output)
    torch.testing.assert_close(output.view(-1, 4, 64).double(), expected, rtol=2e-2, atol=2e-2)


def test_the_engines_float32_cache_layout_is_one_the_kernel_reads():
    for block_size in (16, 32, 128):
        isa = _get_attn_isa(torch.float32, block_size, 64, "auto")
        assert cache_key_layout(isa, torch.float32, block_size, 64) in ("plain", "transposed")


def test_an_unknown_cache_layout_is_reported_not_guessed():
    isa = _get_attn_isa(torch.bfloat16, 32, 64, "auto")
    if isa != "amx":
        pytest.skip(f"this CPU selects {isa!r} for bf16, not AMX")
    assert cache_key_layout(isa, torch.bfloat16, 32, 64) is None
