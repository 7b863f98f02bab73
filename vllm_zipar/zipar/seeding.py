"""Position-keyed seeds (ZIPAR.md §5): the random draw for a cell depends only on (request seed, position).

Keying draws by position rather than by a per-request stream is what makes a seeded image independent of
batch composition, of preemption, and of which engine step decoded the cell; NTP and ZipAR then differ only
through the context each cell saw. The cell's key is splitmix64's finaliser over seed·γ + position + 1, so
nearby seeds and positions give unrelated keys; the noise of vocabulary entry `c` is then splitmix64's output
number `c + 1` from that key (the counter stream `key + (c + 1)·γ`, mixed by the same finaliser), computed
for a whole step at once by `vllm_zipar.engine.noise`.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment, 2^64 / φ
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # splitmix64's finaliser
MIX_SHIFTS = (30, 27, 31)


def mix64(x: int) -> int:
    """splitmix64's finaliser of a 64-bit value."""
    x ^= x >> MIX_SHIFTS[0]
    x = (x * MIX_MULTIPLIERS[0]) & MASK64
    x ^= x >> MIX_SHIFTS[1]
    x = (x * MIX_MULTIPLIERS[1]) & MASK64
    x ^= x >> MIX_SHIFTS[2]
    return x


def cell_seed(seed: int, position: int) -> int:
    """The 63-bit key of the cell at raster `position` of a request seeded with `seed`."""
    return mix64((seed * GOLDEN_GAMMA + position + 1) & MASK64) & ((1 << 63) - 1)


# Per-image seeds of one request: image 0 keeps the request's seed; image i >= 1 takes a 64-bit seed with the
# top bit set (so never a request seed), from a bijection of (seed, i) (so never another image's).
MAX_REQUEST_SEED = (1 << 53) - 1  # JavaScript's largest exact integer: seeds survive any JSON client
MAX_IMAGE_INDEX = (1 << 10) - 1
_MASK63 = (1 << 63) - 1


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request seeded with `seed`: distinct across all (seed, index) pairs.

    `seed + index` made `seed=0, n=4` and `seed=1, n=4` share three images; here image i >= 1 of any request
    differs from every request seed and from every other request's images, by construction."""
    if not 0 <= seed <= MAX_REQUEST_SEED:
        raise ValueError(f"seed must be in [0, 2^53 - 1], got {seed}")
    if not 0 <= index <= MAX_IMAGE_INDEX:
        raise ValueError(f"image index must be in [0, {MAX_IMAGE_INDEX}], got {index}")
    if index == 0:
        return seed
    x = (seed << 10) | index  # < 2^63; each step below is a bijection of [0, 2^63)
    x = (x * 0xBF58476D1CE4E5B9) & _MASK63
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & _MASK63
    x ^= x >> 29
    return (1 << 63) | x
