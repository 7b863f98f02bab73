"""The engine's batched cell sampler against the oracle's independent, one-cell-at-a-time implementation."""

from __future__ import annotations

import random

import pytest
import torch

from tests.reference.sampling import exp_noise as oracle_exp_noise
from tests.reference.sampling import sample_cell as oracle_sample_cell
from vllm_zipar.engine.noise import as_int64, exponential_noise
from vllm_zipar.engine.sampling import sample_cells

# (temperature, top_k, top_p) per row kind; temperature 0 is greedy.
KINDS = [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.8), (1.0, 20, 0.9), (0.0, 0, 1.0), (0.9, 3000, 0.95)]


def oracle_tokens(logits, cells):
    return [
        oracle_sample_cell(logits[i], temperature=t, top_k=k, top_p=p, seed=seed, pos=pos)
        for i, (t, k, p, seed, pos) in enumerate(cells)
    ]


def engine_tokens(logits, cells):
    t, k, p, seeds, positions = (list(column) for column in zip(*cells, strict=True))
    return sample_cells(logits, t, k, p, seeds, positions)


def test_batched_noise_equals_the_oracles_per_cell_noise_bit_for_bit():
    pairs = [(0, 0), (0, 1), (1, 0), (7, -1), (12345, 575), (2**63 - 1, 17), (2**64 + 9, 300)]
    seeds = torch.tensor([as_int64(seed) for seed, _ in pairs])
    positions = torch.tensor([position for _, position in pairs])
    noise = exponential_noise(seeds, positions, 16384)  # the LlamaGen codebook
    for row, (seed, position) in enumerate(pairs):
        expected = oracle_exp_noise(seed, position, 16384)
        assert torch.equal(noise[row].view(torch.int32), expected.view(torch.int32)), (seed, position)


@pytest.mark.parametrize("vocab", [256, 16384])
def test_engine_and_oracle_draw_the_same_tokens_in_a_mixed_batch(vocab):
    gen = torch.Generator().manual_seed(vocab)
    cells = [
        (*KINDS[i % len(KINDS)], seed, position)
        for i, (seed, position) in enumerate(
            (seed, position) for seed in (0, 7, 2**63 - 1) for position in range(1, 30 if vocab == 256 else 5)
        )
    ]
    logits = torch.randn(len(cells), vocab, generator=gen) * 3
    ours = engine_tokens(logits, cells)
    assert ours == oracle_tokens(logits, cells)
    random_rows = [token for token, cell in zip(ours, cells, strict=True) if cell[0] > 0]
    assert len(set(random_rows)) > len(random_rows) // 2  # the draws are not all the argmax


def test_a_cells_token_does_not_depend_on_the_other_rows_of_its_batch():
    gen = torch.Generator().manual_seed(3)
    vocab = 16384
    cells = [(*KINDS[i % len(KINDS)], 100 + i // 3, 256 + i) for i in range(12)]
    logits = torch.randn(len(cells), vocab, generator=gen) * 2
    alone = [engine_tokens(logits[i : i + 1], cells[i : i + 1])[0] for i in range(len(cells))]
    assert engine_tokens(logits, cells) == alone
    # Shuffled among 20 other rows of other kinds, seeds and positions: the same token per cell.
    padding = [(*KINDS[i % len(KINDS)], 5000 + i, i) for i in range(20)]
    mixed = list(enumerate(cells)) + [(None, cell) for cell in padding]
    random.Random(0).shuffle(mixed)
    batch_logits = torch.cat([logits, torch.randn(len(padding), vocab, generator=gen)])
    order = [i if i is not None else len(cells) + padding.index(cell) for i, cell in mixed]
    tokens = engine_tokens(batch_logits[order], [cell for _, cell in mixed])
    assert {i: token for (i, _), token in zip(mixed, tokens, strict=True) if i is not None} == dict(
        enumerate(alone)
    )


def test_sampled_frequencies_follow_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    cells = 20_000
    tokens = sample_cells(
        probs.log().expand(cells, 4),
        [1.0] * cells,
        [0] * cells,
        [1.0] * cells,
        [11] * cells,
        list(range(cells)),
    )
    frequencies = torch.bincount(torch.tensor(tokens), minlength=4) / cells
    assert torch.allclose(frequencies, probs, atol=0.015), frequencies


def test_greedy_rows_are_the_argmax_and_random_rows_need_a_seed():
    logits = torch.randn(6, 128, generator=torch.Generator().manual_seed(1))
    greedy = sample_cells(logits, [0.0] * 6, [0] * 6, [1.0] * 6, [None] * 6, list(range(6)))
    assert greedy == logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match="seed"):
        sample_cells(logits, [0.0, 1.0], [0, 0], [1.0, 1.0], [None, None], [0, 1])


@pytest.mark.parametrize("vocab,k", [(16384, 2000), (32768, 2048), (256, 64)])
def test_top_k_rows_race_over_their_candidates_and_draw_the_oracles_tokens(vocab, k):
    # Half the rows: their k candidates all share one logit, so the noise alone decides, and two candidates
    # of one cell often draw the same 24-bit uniform (a tie the full row's argmax gives to the lower code).
    # The other half: ties at the k-th value, where more than k entries are kept.
    gen = torch.Generator().manual_seed(k)
    rows = 48
    logits = torch.randn(rows, vocab, generator=gen) - 5.0
    for row in range(0, rows, 2):
        logits[row, torch.randperm(vocab, generator=gen)[:k]] = 1.0
    logits[1::2] = logits[1::2].mul(2.0).round()  # coarse values: many ties at the k-th
    cells = [(1.0, k, 1.0, 11 + row // 8, 3 * row) for row in range(rows)]
    assert engine_tokens(logits, cells) == oracle_tokens(logits, cells)


def test_the_candidate_race_breaks_ties_as_the_full_rows_argmax_does():
    # Two codes of one cell that draw the same uniform bits, given equal logits and made the only top-k
    # candidates: their p / E tie exactly, and the full row's argmax takes the lower code.
    from vllm_zipar.engine.noise import cell_keys, uniform_bits

    vocab, seed = 4096, 5
    for position in range(400):
        bits = uniform_bits(cell_keys(torch.tensor([seed]), torch.tensor([position])), vocab)[0]
        values, counts = bits.unique(return_counts=True)
        if (counts > 1).any():
            break
    pair = (bits == values[counts > 1][0]).nonzero().flatten()[:2].tolist()
    for order in (pair, pair[::-1]):
        logits = torch.full((2, vocab), -9.0)
        logits[:, order] = torch.tensor([0.0, 0.0])
        logits[1, order[0]] = 0.0
        cells = [(1.0, 2, 1.0, seed, position)] * 2
        assert engine_tokens(logits, cells) == oracle_tokens(logits, cells) == [min(pair)] * 2
