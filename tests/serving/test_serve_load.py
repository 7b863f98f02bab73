"""Smoke run of `benchmarks/serve_load.py --quick`: a real server under bounded concurrent load, no errors,
JSON and plot written. Latencies are printed by the benchmark, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.serving


def test_serve_load_quick_completes_without_errors(tmp_path):
    env = {**os.environ, "ZIPAR_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "p50" in done.stdout and "images/s" in done.stdout
    result = json.loads((tmp_path / "serve_load_quick.json").read_text())
    assert (result["requests"], result["clients"], result["errors"]) == (8, 4, 0)
    assert len(result["latencies_s"]) == 8 and result["kv_cache_usage_after"] == 0.0
    assert (tmp_path / "serve_load_quick.png").stat().st_size > 10_000
