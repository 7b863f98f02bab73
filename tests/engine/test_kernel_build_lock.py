"""A build killed mid-way leaves PyTorch's `lock` file in the kernel's build directory; the next engine
start must not wait on it forever (masked_kernel.py serialises builds with an OS lock, removes the stale
file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from vllm_zipar.engine import masked_kernel

LOAD = "from vllm_zipar.engine.masked_kernel import load_masked_kernel as load; print('loaded', load())"


def load_in_a_new_process(extensions_root, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_root)}
    return subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_a_stale_build_lock_does_not_hang_the_next_start(tmp_path):
    if not masked_kernel.load_masked_kernel():
        pytest.skip("the masked kernel cannot be built here")
    name = f"vllm_zipar_masked_attention_{masked_kernel.cpu_tag()}"
    built = masked_kernel.extension_build_directory(name)
    copy = tmp_path / name
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "*.flock"))  # mtimes kept: no rebuild
    (copy / "lock").touch()  # what a build killed between PyTorch's acquire and release leaves

    try:
        done = load_in_a_new_process(tmp_path, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the engine start waited on the stale build lock")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded True" in done.stdout
    assert not (copy / "lock").exists()
    assert "stale kernel build lock" in done.stderr
