"""Position-keyed seeds (ZIPAR.md §5): the random draw for a cell depends only on (request seed, position).

Keying draws by position rather than by a per-request stream is what makes a seeded image independent of
batch composition, of preemption, and of which engine step decoded the cell; NTP and ZipAR then differ only
through the context each cell saw. The mix is splitmix64's finaliser over seed·φ + position + 1, so nearby
seeds and positions give unrelated generator seeds.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def cell_seed(seed: int, position: int) -> int:
    """A 63-bit torch.Generator seed for the cell at raster `position` of a request seeded with `seed`."""
    x = (seed * _GOLDEN + position + 1) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)
