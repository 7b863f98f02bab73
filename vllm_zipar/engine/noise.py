"""Counter-based Exp(1) noise for position-keyed sampling, as integer tensor ops on the logits' device.

The noise of vocabulary entry `c` for the cell at raster `position` of a request seeded with `seed` is a pure
function of `(seed, position, c)` (docs/design.md, "Position-keyed sampling"): the top 24 bits `b` of
splitmix64's output number `c + 1` from the key `cell_seed(seed, position)` give `U = (b + 0.5) / 2^24` in
(0, 1), and `E = -log U`, taken in float64 and rounded to float32. Integer ops are exact on every device,
and float64 logs rounded to float32 agree between libraries (all 2^24 values checked by
benchmarks/sampling_cost.py), so the CPU and a GPU draw the same bits, a whole step is one batch of tensor
ops, and no cell's noise depends on the rows beside it. int64 tensors stand in for uint64: products wrap
mod 2^64, and right shifts are masked because torch shifts negative values arithmetically.
"""

from __future__ import annotations

import torch

from vllm_zipar.zipar.seeding import GOLDEN_GAMMA, MASK64, MIX_MULTIPLIERS, MIX_SHIFTS

UNIFORM_BITS = 24  # the resolution of torch.rand's float32 uniforms, which the sampler drew before


def as_int64(value: int) -> int:
    """The int64 whose two's-complement bits are `value mod 2^64`."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = as_int64(GOLDEN_GAMMA)
_MULTIPLIERS = tuple(as_int64(m) for m in MIX_MULTIPLIERS)


def _xor_shift_right(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> torch.Tensor:
    """`x ^= x >> shift` with a logical shift, in place."""
    torch.bitwise_right_shift(x, shift, out=scratch)
    return x.bitwise_xor_(scratch.bitwise_and_((1 << (64 - shift)) - 1))


def cell_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`cell_seed(seed, position)` for int64 tensors of seeds (mod 2^64, see `as_int64`) and positions."""
    x = seeds.to(torch.int64) * _GAMMA + positions.to(torch.int64) + 1
    scratch = torch.empty_like(x)
    x = _xor_shift_right(x, MIX_SHIFTS[0], scratch).mul_(_MULTIPLIERS[0])
    x = _xor_shift_right(x, MIX_SHIFTS[1], scratch).mul_(_MULTIPLIERS[1])
    return _xor_shift_right(x, MIX_SHIFTS[2], scratch).bitwise_and_((1 << 63) - 1)


def uniform_bits(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[cells, vocab]` int64: the top UNIFORM_BITS of splitmix64's outputs 1..vocab from each key."""
    codes = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    return uniform_bits_at(keys, codes[None, :])


def uniform_bits_at(keys: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`uniform_bits` of only the given vocabulary entries: `codes` int64 `[cells, n]` (or `[1, n]`, shared),
    output number `code + 1` from each cell's key; equal bit for bit to those columns of `uniform_bits`."""
    x = keys.to(torch.int64)[:, None] + (codes + 1) * _GAMMA
    scratch = torch.empty_like(x)
    x = _xor_shift_right(x, MIX_SHIFTS[0], scratch).mul_(_MULTIPLIERS[0])
    x = _xor_shift_right(x, MIX_SHIFTS[1], scratch).mul_(_MULTIPLIERS[1])
    # The finaliser's last step, x ^= x >> 31, changes only bits 0..32: the top bits are already final.
    return x.bitwise_right_shift_(64 - UNIFORM_BITS).bitwise_and_((1 << UNIFORM_BITS) - 1)


def exponential_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise `-log((b + 0.5) / 2^UNIFORM_BITS)` in float32 (log in float64; U is exact there)."""
    scale = 2.0**-UNIFORM_BITS
    # One float64 pass: the 0-d float64 operand sets the result type; b·scale and the sum are exact.
    half_step = torch.full((), 0.5 * scale, dtype=torch.float64, device=bits.device)
    u = torch.add(half_step, bits, alpha=scale)
    return u.log_().to(torch.float32).neg_()


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[cells, vocab]` float32 Exp(1) noise of each cell's vocabulary entries, on the inputs' device."""
    return exponential_from_bits(uniform_bits(cell_keys(seeds, positions), vocab))


def exponential_noise_at(seeds: torch.Tensor, positions: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`[cells, n]` float32 Exp(1) noise of the vocabulary entries `codes` ([cells, n] int64) of each cell."""
    return exponential_from_bits(uniform_bits_at(cell_keys(seeds, positions), codes))
