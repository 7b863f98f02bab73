"""Smoke run of `benchmarks/exact_drafts.py --quick` on the shipped digits model: it runs end to end, asserts
in-script that every L gives the tokens of L = 0, and reports plain ZipAR's exact pass counts and no more
with drafts. Timings are printed, never asserted."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.test_quick_benchmarks import run

pytestmark = pytest.mark.engine


def test_exact_drafts_quick_keeps_the_tokens_in_no_more_passes(tmp_path):
    out = run(tmp_path, "exact_drafts.py", "--quick")
    assert "tokens = L=0's" in out
    result = json.loads((tmp_path / "exact_drafts_quick.json").read_text())
    passes = {(row["mode"], row["drafts"]): row["passes_per_image"] for row in result["rows"]}
    # 16x16 LlamaGen layout: NTP H·W; ZipAR-8 2W + (H-2)·w (ZIPAR.md §4); drafts never add a pass.
    assert passes[("NTP", 0)] == 256 and passes[("ZipAR-8", 0)] == 144
    assert passes[("NTP", 2)] <= 256 and passes[("ZipAR-8", 2)] <= 144
    assert all(row["tokens_equal_to_l0"] for row in result["rows"])
    assert (tmp_path / "exact_drafts_quick.png").stat().st_size > 10_000
