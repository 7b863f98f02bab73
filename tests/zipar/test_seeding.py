"""Position-keyed seeds: a pure function of (seed, position), equal to the oracle's independent copy."""

from __future__ import annotations

from tests.reference.sampling import cell_seed as oracle_cell_seed
from vllm_zipar.zipar.seeding import cell_seed


def test_cell_seed_matches_the_oracle_and_separates_neighbours():
    seen = set()
    for seed in (0, 1, 2, 12345, 2**40 + 7):
        for position in range(600):
            value = cell_seed(seed, position)
            assert value == oracle_cell_seed(seed, position)
            assert 0 <= value < 2**63
            seen.add(value)
    assert len(seen) == 5 * 600  # no collisions among neighbouring seeds and positions
