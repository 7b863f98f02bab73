"""Position-keyed seeds: a pure function of (seed, position), equal to the oracle's independent copy."""

from __future__ import annotations

import pytest

from tests.reference.sampling import cell_seed as oracle_cell_seed
from vllm_zipar.zipar.seeding import MAX_IMAGE_INDEX, MAX_REQUEST_SEED, cell_seed, image_seed


def test_cell_seed_matches_the_oracle_and_separates_neighbours():
    seen = set()
    for seed in (0, 1, 2, 12345, 2**40 + 7):
        for position in range(600):
            value = cell_seed(seed, position)
            assert value == oracle_cell_seed(seed, position)
            assert 0 <= value < 2**63
            seen.add(value)
    assert len(seen) == 5 * 600  # no collisions among neighbouring seeds and positions


def test_image_seeds_never_coincide_across_requests():
    """Image 0 keeps the request seed; image i >= 1 has the top bit set and comes from a bijection of
    (seed, i), so `seed=0, n=4` and `seed=1, n=4` (which shared three images with `seed + i`) share none."""
    seeds = [0, 1, 2, 3, 7, 2**32, MAX_REQUEST_SEED - 1, MAX_REQUEST_SEED]
    indices = [0, 1, 2, 3, 9, MAX_IMAGE_INDEX]
    derived = {(s, i): image_seed(s, i) for s in seeds for i in indices}
    assert len(set(derived.values())) == len(derived)
    for (s, i), value in derived.items():
        assert value == s if i == 0 else 2**63 <= value < 2**64
    assert not {image_seed(0, i) for i in range(4)} & {image_seed(1, i) for i in range(4)}
    # The spec (docs/reference_oracle.md), worked by hand for (1, 1): x = 1·2^10 + 1 = 1025, then
    # x·0xBF58476D1CE4E5B9, x ^= x>>31, x·0x94D049BB133111EB, x ^= x>>29 (mod 2^63), top bit set.
    x = (1025 * 0xBF58476D1CE4E5B9) % 2**63
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) % 2**63
    x ^= x >> 29
    assert image_seed(1, 1) == 2**63 + x


@pytest.mark.parametrize(
    "seed, index", [(-1, 0), (MAX_REQUEST_SEED + 1, 0), (0, -1), (0, MAX_IMAGE_INDEX + 1)]
)
def test_image_seed_refuses_values_outside_its_bijection(seed, index):
    with pytest.raises(ValueError):
        image_seed(seed, index)
