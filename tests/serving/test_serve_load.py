"""Smoke run of `benchmarks/serve_load.py --quick`: a real server under bounded concurrent load, no errors,
JSON and plot written. Latencies are printed by the benchmark, never asserted here."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.test_quick_benchmarks import run

pytestmark = pytest.mark.serving


def test_serve_load_quick_completes_without_errors(tmp_path):
    # The server child drops the runner's VLLM_ENABLE_V1_MULTIPROCESSING=0 (see serving/served_model.py).
    stdout = run(tmp_path, "serve_load.py", "--quick")
    assert "p50" in stdout and "images/s" in stdout
    result = json.loads((tmp_path / "serve_load_quick.json").read_text())
    assert (result["requests"], result["clients"], result["errors"]) == (8, 4, 0)
    assert len(result["latencies_s"]) == 8 and result["kv_cache_usage_after"] == 0.0
    assert (tmp_path / "serve_load_quick.png").stat().st_size > 10_000
