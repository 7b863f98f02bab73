"""Position-keyed sampling for the reference decoders (ZIPAR.md §5), written from the project's spec text.

The random draw for a cell depends only on ``(seed, raster position)``: a splitmix64 hash of the pair keys a
splitmix64 stream whose output number ``c + 1`` gives the Exp(1) noise of vocabulary entry ``c``
(``-log U``, ``U`` from the output's top 24 bits), and the token is ``argmax(probs / q)`` (the
exponential-race form of sampling from ``probs`` that vLLM's sampler uses). So the same seed gives the same
image whatever the batch or the decode order, and NTP and ZipAR differ only through the context each cell
saw. CFG is combined before temperature, top-k and top-p. The oracle computes one cell at a time with numpy
uint64 arithmetic; the engine computes a whole step with int64 tensor ops.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def cell_seed(seed: int, pos: int) -> int:
    """63-bit generator seed for the cell at raster position ``pos`` of a request seeded with ``seed``."""
    x = (seed * _GAMMA + pos + 1) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def splitmix64_stream(key: int, count: int) -> np.ndarray:
    """Outputs 1..count of the splitmix64 generator whose state starts at ``key`` (uint64[count])."""
    u64 = np.uint64
    with np.errstate(over="ignore"):
        z = u64(key) + np.arange(1, count + 1, dtype=u64) * u64(_GAMMA)
        z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
        return z ^ (z >> u64(31))


def exp_noise(seed: int, pos: int, vocab: int) -> torch.Tensor:
    """Exp(1) noise ``float32[vocab]`` of the cell at ``pos``: entry ``c`` is ``-log U`` with
    ``U = (b + 0.5) / 2**24``, ``b`` the top 24 bits of stream output ``c + 1``; the log in float64."""
    top = splitmix64_stream(cell_seed(seed, pos), vocab) >> np.uint64(40)
    u = (top.astype(np.float64) + 0.5) / 2.0**24
    return torch.from_numpy((-np.log(u)).astype(np.float32))


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)``, in float32."""
    cond = cond.float()
    uncond = uncond.float()
    return uncond + scale * (cond - uncond)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p on 1-D logits, masking dropped entries to -inf (vLLM's convention).

    Top-k keeps every entry ``>=`` the k-th largest value (ties at the boundary survive). Top-p sorts the
    probabilities of what top-k left ascending and drops entries whose ascending cumulative sum is
    ``<= 1 - top_p``, always keeping the largest. The sort is stable, so among exactly tied values the lower
    vocabulary index is dropped first.
    """
    vocab = logits.numel()
    out = logits
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, stable=True)  # ascending
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - top_p
        drop[-1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        out = torch.empty_like(out).scatter_(0, order, sorted_logits)
    return out


def sample_cell(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    pos: int,
) -> int:
    """Token for one cell from its (already CFG-combined) logits ``[V]``.

    ``temperature == 0`` is greedy: ``torch.argmax`` of the logits (first index on ties); top-k/top-p are
    irrelevant then. Otherwise ``seed`` is required and the draw uses ``exp_noise(seed, pos, V)``.
    """
    if logits.dim() != 1:
        raise ValueError(f"logits must be 1-D [V], got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 disables it)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")
    logits = logits.float()
    if temperature == 0:
        return int(torch.argmax(logits))
    if seed is None:
        raise ValueError("the reference oracle samples only with a seed when temperature > 0")
    scaled = filter_top_k_top_p(logits / torch.tensor(temperature, dtype=torch.float32), top_k, top_p)
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    # U lies in (0, 1), so q is finite and positive: a masked entry (p = 0) can never win the race.
    q = exp_noise(seed, pos, logits.numel())
    return int(torch.argmax(probs / q))
