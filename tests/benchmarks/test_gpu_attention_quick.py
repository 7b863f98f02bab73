"""`benchmarks/gpu_attention.py --quick` on CPU, with `vllm` unimportable (the GPU machine has no vLLM).

Checks the JSON's structure, the per-case correctness against the dense-mask reference and the compilation
count's presence; timings are printed by the benchmark, never asserted here.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_attention.py"
# `sys.modules["vllm"] = None` makes every `import vllm...` in the benchmark's import chain raise.
NO_VLLM = (
    "import runpy, sys; sys.modules['vllm'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_gpu_attention_quick_matches_the_reference_in_every_case_without_vllm(tmp_path):
    env = {**os.environ, "ZIPAR_BENCH_RESULTS": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", NO_VLLM, str(SCRIPT), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Z/SDPA" in done.stdout
    result = json.loads((tmp_path / "gpu_attention_quick.json").read_text())
    assert (result["device"], result["dtype"], result["flex_mode"]) == (
        "cpu",
        "torch.float32",
        "dynamo-eager",
    )
    assert result["skipped"] == []
    cases = {(r["shape"], r["images"], r["cfg"], r["context"]) for r in result["rows"]}
    assert cases == set(itertools.product(["tiny-MHA", "tiny-GQA"], [1, 3], [False, True], [120]))
    for row in result["rows"]:
        streams = 2 if row["cfg"] else 1
        assert row["causal_sequences"] == row["images"] * streams
        # Window 8: a few inputs per image and stream, both streams of a guided image feed the same count.
        assert 1 <= row["queries_per_image"] / streams <= 6
        assert row["zipar_tokens"] % streams == 0
        assert row["tolerance"] == 1e-4
        assert max(row["max_abs_delta"].values()) <= row["tolerance"] and row["correct"] is True
        # The check has teeth: a causal mask in place of the ZipAR rule would be off by this much.
        assert row["zipar_mask_effect"] > 100 * row["tolerance"]
        assert set(row["ms"]) >= {"zipar_flex", "causal_flex", "sdpa_decode", "zipar_step_setup"}
    (run,) = result["compile_runs"]
    assert run["steps"] == len(run["batch_sizes"]) == len(run["query_tokens"]) == 12
    assert 1 <= run["compilations"] <= run["recompile_limit"] == 16
    assert (tmp_path / "gpu_attention_quick.png").stat().st_size > 10_000
