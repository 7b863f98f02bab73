"""The engine's cell sampler against the oracle's independent implementation of the same spec."""

from __future__ import annotations

import pytest
import torch

from tests.reference.sampling import sample_cell as oracle_sample_cell
from vllm_zipar.engine.sampling import sample_cell, sample_cells


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.8), (1.0, 20, 0.9)]
)
def test_engine_and_oracle_draw_the_same_token_for_every_seed_and_position(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    for position in range(1, 60):
        logits = torch.randn(256, generator=gen) * 3
        for seed in (0, 7, 99):
            ours = sample_cell(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, position=position
            )
            theirs = oracle_sample_cell(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, pos=position
            )
            assert ours == theirs, (position, seed)


def test_greedy_is_argmax_and_batching_does_not_change_draws():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 128, generator=gen)
    assert (
        sample_cells(logits, [0.0] * 6, [0] * 6, [1.0] * 6, [None] * 6, list(range(6)))
        == logits.argmax(-1).tolist()
    )
    batch = sample_cells(logits, [1.0] * 6, [0] * 6, [1.0] * 6, [5] * 6, list(range(10, 16)))
    singles = [
        sample_cell(logits[i], temperature=1.0, top_k=0, top_p=1.0, seed=5, position=10 + i) for i in range(6)
    ]
    assert batch == singles
    assert len(set(batch)) > 1
