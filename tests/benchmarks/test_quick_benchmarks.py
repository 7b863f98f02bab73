"""Smoke runs of the benchmarks in --quick mode: they run end to end and report the right pass counts.

Timings are printed by the benchmarks, never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


def run(results: Path, script: str, *args: str) -> str:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "ZIPAR_BENCH_RESULTS": str(results)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_zipar_vs_ntp_quick_writes_json_and_plot_with_exact_pass_counts(tmp_path):
    out = run(tmp_path, "zipar_vs_ntp.py", "--quick", "--in-flight", "2")
    assert "NTP/this" in out
    result = json.loads((tmp_path / "zipar_vs_ntp_quick.json").read_text())
    passes = {row["mode"]: row["passes_per_image"] for row in result["rows"]}
    # 16x16 grid, LlamaGen layout: NTP H·W; ZipAR 2W + (H-2)·w (ZIPAR.md §4).
    assert passes == {"NTP": 256, "ZipAR-8": 144, "ZipAR-4": 88}
    guided = {(row["mode"], row["cfg_scale"]): row["passes_per_image"] for row in result["cfg_rows"]}
    assert guided == {("NTP pair", 1.0): 256, ("NTP", 2.0): 256, ("ZipAR-4", 2.0): 88}
    assert (tmp_path / "zipar_vs_ntp_quick.png").stat().st_size > 10_000


def test_zipar_vs_ntp_janus_quick_guided_at_1_and_2_in_flight_with_exact_pass_counts(tmp_path):
    out = run(tmp_path, "zipar_vs_ntp.py", "--janus", "--quick")
    assert "NTP/this" in out
    result = json.loads((tmp_path / "zipar_vs_ntp_janus_quick.json").read_text())
    assert result["cfg_scale"] == 5.0 and result["in_flight"] == 2
    # 8x8 grid, Janus layout (no EOL column): NTP H·W; ZipAR 2W + (H-2)·w (ZIPAR.md §4).
    passes = {row["mode"]: row["passes_per_image"] for row in result["rows"]}
    assert passes == {"NTP": 64, "ZipAR-4": 40}
    for row in result["rows"]:
        assert row["grid"] == [8, 8]
        assert row["seconds_per_image_1_in_flight"] > 0 and row["seconds_per_image_2_in_flight"] > 0
    assert (tmp_path / "zipar_vs_ntp_janus_quick.png").stat().st_size > 10_000


def test_zipar_vs_ntp_lumina_quick_guided_with_exact_pass_counts_against_both_baselines(tmp_path):
    out = run(tmp_path, "zipar_vs_ntp.py", "--lumina", "--quick")
    assert "vs generate()" in out
    result = json.loads((tmp_path / "zipar_vs_ntp_lumina_quick.json").read_text())
    assert result["in_flight"] == 2
    # 8x8 grid with an EOL column: NTP H·W, ZipAR (H-1)·w + W; Lumina's generate H·(W+1) + 5 (ZIPAR.md §4).
    passes = {row["mode"]: row["passes_per_image"] for row in result["rows"]}
    assert passes == {"NTP": 64, "ZipAR-4": 36}
    for row in result["rows"]:
        assert row["grid"] == [8, 8] and row["cfg_scale"] == 4.0 and row["generate_loop_passes"] == 77
        assert row["seconds_per_image_1_in_flight"] > 0 and row["seconds_per_image_2_in_flight"] > 0
    assert (tmp_path / "zipar_vs_ntp_lumina_quick.png").stat().st_size > 10_000


def test_attention_cost_quick_measures_both_step_kinds(tmp_path):
    out = run(tmp_path, "attention_cost.py", "--quick")
    result = json.loads((tmp_path / "attention_cost_quick.json").read_text())
    assert [row["requests"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert min(row["samples"]) > 0 and row["ratio"] > 0
    assert "ratio" in out


def test_sampling_cost_quick_times_every_scenario_and_checks_the_noise(tmp_path):
    out = run(tmp_path, "sampling_cost.py", "--quick")
    result = json.loads((tmp_path / "sampling_cost_quick.json").read_text())
    assert [row["scenario"] for row in result["rows"]] == [
        "temperature 1.0",
        "top-k 2000",
        "top-p 0.9",
        "mixed + greedy",
    ]
    assert all(row["before_ms"] > 0 and row["after_ms"] > 0 for row in result["rows"])
    checks = result["checks"]
    assert checks["uniforms_checked"] == 1 << 16 and checks["cell_values_checked"] == 4 * 16384
    assert checks["log_mismatches_vs_numpy"] == 0 and checks["cell_mismatches_device_vs_host"] == 0
    assert "before/after" in out


def test_step_profile_quick_splits_every_step_into_all_phases(tmp_path):
    out = run(tmp_path, "step_profile.py", "--quick", "--out", str(tmp_path))
    assert "[profile]" in out
    result = json.loads((tmp_path / "step_profile_quick.json").read_text())
    phases = [
        "scheduling",
        "input_prep",
        "attention",
        "forward_rest",
        "logits",
        "sampling",
        "output",
        "other",
    ]
    assert result["phases"] == phases
    expected = [
        f"{model}/{decoding}/{guidance}/{n}"
        for model in ("small-16", "emu3-small-16")
        for decoding in ("ntp", "zipar4")
        for guidance in ("unguided", "guided")
        for n in (1, 2)
    ]
    assert [row["scenario"] for row in result["rows"]] == expected
    for row in result["rows"]:
        assert row["all_steps"]["steps"] == result["max_steps"]
        for summary in (row["all_steps"], row["steady_steps"]):
            assert list(summary["phases_ms_per_step"]) == phases
            assert all(ms >= 0 for ms in summary["phases_ms_per_step"].values())
            # Exclusive timers: the phases of a step add up to no more than the step (float rounding aside).
            assert sum(summary["phases_ms_per_step"].values()) <= summary["ms_per_step"] * (1 + 1e-9)
            assert summary["max_phase_sum_over_total"] <= 1 + 1e-9
            assert summary["tokens_per_step"] >= row["in_flight"] and summary["cells_per_step"] > 0
    assert (tmp_path / "step_profile_quick.png").stat().st_size > 10_000
