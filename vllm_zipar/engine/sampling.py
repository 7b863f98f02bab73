"""Sampling of predicted grid cells with position-keyed noise: one batch of tensor ops per engine step.

Each row of `logits` is one predicted cell (guided rows already combined upstream). Greedy rows take the
argmax. Random rows apply temperature, top-k and top-p as vLLM does, with per-row values, then the
exponential-race draw `argmax(p / E)` with Exp(1) noise `E` that is a pure function of (seed, raster position,
code) (`vllm_zipar.engine.noise`). vLLM's own sampler keys its noise by request stream, which would make an
image depend on how its cells were batched; this one does not, and it reads nothing back from the device
until the tokens are done. Per-row choices (which rows are greedy, which use top-k or top-p) come from the
host lists, so no branch waits on the device.

Under top-k (no top-p) on the CPU, the race is run over the k candidates only: every other entry has
probability 0, so `0 / E` can never win, and the noise (the costliest part: a hash and a float64 log per
entry) is drawn for k entries instead of the whole vocabulary. The probabilities are still the softmax of
the whole masked row, and ties go to the lowest code as `argmax` would: the same token, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_zipar.engine.noise import as_int64, exponential_noise, exponential_noise_at


def keep_top_k(scaled: torch.Tensor, top_ks: Sequence[int]) -> torch.Tensor:
    """Mask each row to the entries `>=` its k-th largest value (k = 0 or k >= vocab keeps the row)."""
    vocab = scaled.shape[-1]
    chosen = [j for j, k in enumerate(top_ks) if 0 < k < vocab]
    if not chosen:
        return scaled
    rows = torch.tensor(chosen, device=scaled.device)
    ks = torch.tensor([top_ks[j] for j in chosen], device=scaled.device)
    part = scaled[rows]
    kth = part.topk(max(top_ks[j] for j in chosen), dim=-1).values.gather(1, (ks - 1)[:, None])
    scaled[rows] = part.masked_fill(part < kth, float("-inf"))
    return scaled


def keep_top_p(scaled: torch.Tensor, top_ps: Sequence[float]) -> torch.Tensor:
    """vLLM's top-p per row: sort ascending (stable), drop entries whose cumulative probability is
    `<= 1 - p` (compared in float32, the threshold rounded from double), always keeping the largest."""
    chosen = [j for j, p in enumerate(top_ps) if p < 1.0]
    if not chosen:
        return scaled
    rows = torch.tensor(chosen, device=scaled.device)
    threshold = torch.tensor([1.0 - top_ps[j] for j in chosen], dtype=torch.float32, device=scaled.device)
    ordered, order = scaled[rows].sort(dim=-1, stable=True)
    drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= threshold[:, None]
    drop[:, -1] = False
    scaled[rows] = torch.empty_like(ordered).scatter_(1, order, ordered.masked_fill(drop, float("-inf")))
    return scaled


# On the CPU, blocks of about this many logits (8 rows of 16,384 codes) stay in cache: 2.7x less CPU time
# than one block of 64 such rows. Every op is row-wise, so blocking changes no bit; a GPU takes one block.
CPU_BLOCK_ELEMENTS = 1 << 17


def sample_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ks: Sequence[int],
    top_ps: Sequence[float],
    seeds: Sequence[int | None],
    positions: Sequence[int],
) -> torch.Tensor:
    """Tokens (int64, on the logits' device) for a batch of cells, one logits row each.

    Random rows need a seed: the scheduler gives every unseeded request one at admission.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    chosen = [i for i, t in enumerate(temperatures) if t > 0.0]
    if any(seeds[i] is None for i in chosen):
        raise ValueError("a randomly sampled cell needs its request's seed (the scheduler assigns one)")
    vocab = logits.shape[-1]
    block = max(1, CPU_BLOCK_ELEMENTS // vocab) if logits.device.type == "cpu" else max(1, len(chosen))
    for first in range(0, len(chosen), block):
        part = chosen[first : first + block]
        contiguous = part[-1] - part[0] == len(part) - 1  # the usual case: a view, not a copy
        rows = slice(part[0], part[-1] + 1) if contiguous else torch.tensor(part, device=logits.device)
        tokens[rows] = _race(
            logits[rows],
            [temperatures[i] for i in part],
            [top_ks[i] for i in part],
            [top_ps[i] for i in part],
            [as_int64(seeds[i]) for i in part],  # type: ignore[arg-type]
            [positions[i] for i in part],
        )
    return tokens


def _race(logits, temperatures, top_ks, top_ps, seeds, positions) -> torch.Tensor:
    """Temperature, top-k, top-p, then `argmax(p / E)` for rows that all sample at random."""
    device = logits.device
    temperature = torch.tensor(temperatures, dtype=torch.float32, device=device)
    keys = torch.tensor([seeds, positions], dtype=torch.int64, device=device)
    scaled = logits / temperature[:, None]
    vocab = logits.shape[-1]
    k = top_ks[0]
    if (
        device.type == "cpu"
        and 0 < k <= vocab // SPARSE_FRACTION
        and all(other == k for other in top_ks)
        and all(p >= 1.0 for p in top_ps)
    ):
        tokens = _race_top_k_candidates(scaled, k, keys)
        if tokens is not None:
            return tokens
    scaled = keep_top_k(scaled, top_ks)
    scaled = keep_top_p(scaled, top_ps)
    probs = scaled.softmax(dim=-1)
    return (probs / exponential_noise(keys[0], keys[1], vocab)).argmax(dim=-1)


# Top-k rows with k at most vocab / SPARSE_FRACTION race over their candidates only (see the module note).
SPARSE_FRACTION = 4


def _race_top_k_candidates(scaled: torch.Tensor, k: int, keys: torch.Tensor) -> torch.Tensor | None:
    """`_race` for rows that share top-k `k` and no top-p, drawing noise for the k candidates only; None
    when a row ties at its k-th value (more than k entries kept: the full race decides)."""
    values, codes = scaled.topk(k, dim=-1, sorted=False)
    kth = values.amin(dim=-1, keepdim=True)
    kept = scaled >= kth  # keep_top_k's mask
    if bool((kept.sum(dim=-1) != k).any()):
        return None
    probs = scaled.masked_fill_(~kept, float("-inf")).softmax(dim=-1)
    ratios = probs.gather(1, codes) / exponential_noise_at(keys[0], keys[1], codes)
    best = ratios.amax(dim=-1, keepdim=True)
    # argmax over the whole row returns the lowest code among equal maxima; topk's order is arbitrary.
    return torch.where(ratios == best, codes, scaled.shape[-1]).amin(dim=-1)


def sample_cells(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ks: Sequence[int],
    top_ps: Sequence[float],
    seeds: Sequence[int | None],
    positions: Sequence[int],
) -> list[int]:
    """`sample_tokens` read back to the host once, as a list."""
    return sample_tokens(logits, temperatures, top_ks, top_ps, seeds, positions).tolist()
