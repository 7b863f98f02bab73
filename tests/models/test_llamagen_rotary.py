"""The model's fused 2D RoPE (vLLM's rotary op on the q/k views of the fused projection) is bit-identical
to the authors' formula, `apply_llamagen_rope`, including the class-token rows (zeros) and a padded head."""

from __future__ import annotations

import pytest
import torch

from vllm_zipar.models.llamagen import LlamaGenRotaryEmbedding, apply_llamagen_rope, llamagen_rope_table
from vllm_zipar.models.llamagen_config import LlamaGenConfig


@pytest.mark.parametrize(("dim", "n_head", "n_kv_head"), [(768, 12, 12), (256, 8, 2), (300, 3, 3)])
def test_fused_rotary_equals_the_authors_formula(dim, n_head, n_kv_head):
    config = LlamaGenConfig(
        dim=dim, n_layer=1, n_head=n_head, n_kv_head=n_kv_head, grid_size=8, num_classes=10, codebook_size=64
    )
    head_dim = config.rope_head_dim
    table = llamagen_rope_table(config)
    rotary = LlamaGenRotaryEmbedding(config)
    assert torch.equal(rotary.table, table)
    positions = torch.tensor([0, 1, 5, 17, 40, 64])  # 0: the class token (zero rows)
    tokens = len(positions)
    qkv = torch.randn(tokens, (n_head + 2 * n_kv_head) * head_dim, generator=torch.Generator().manual_seed(0))
    q, k, _ = qkv.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    expected_q = apply_llamagen_rope(q.reshape(tokens, n_head, head_dim), table[positions])
    expected_k = apply_llamagen_rope(k.reshape(tokens, n_kv_head, head_dim), table[positions])

    assert rotary.uses_fused_op(torch.float32)
    got_q, got_k = rotary(positions, q, k)  # in place on views of qkv, as in the model
    got_q, got_k = got_q.view(tokens, n_head, head_dim), got_k.view(tokens, n_kv_head, head_dim)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    assert torch.equal(got_q[0], torch.zeros_like(got_q[0]))  # class-token rows rotate to zero

    assert not rotary.uses_fused_op(torch.bfloat16)
    q16, k16 = q.to(torch.bfloat16), k.to(torch.bfloat16)
    got_q16, _ = rotary(positions, q16, k16)
    got_q16 = got_q16.view(tokens, n_head, head_dim)
    assert torch.equal(got_q16, apply_llamagen_rope(q16.reshape(tokens, n_head, head_dim), table[positions]))
