"""The compiled ZipAR-masked paged attention (csrc/masked_paged_attention.cpp): build, load, call.

Built with PyTorch's own extension builder (`torch.utils.cpp_extension.load`, ninja) the first time an
engine needs it, for this machine's CPU (`-march=native`), into PyTorch's extension cache
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`, under a name that includes a digest of the CPU's
instruction-set flags); later starts load it in milliseconds.
`scripts/install.sh` builds it once so that no engine start pays for the compile. PyTorch's builder guards
a build with a plain `lock` file that a killed build leaves behind, and every later start then waits on it
forever; builds here are serialised by an OS file lock instead (the kernel drops it when its holder dies), so
a `lock` file found while holding it is stale and is removed. Where it cannot be
built (no compiler) or is switched off (`VLLM_ZIPAR_MASKED_KERNEL=0`), attention.py falls back to the
PyTorch path, which is exact too but slower: one warning says so.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "masked_paged_attention.cpp"
ENV_SWITCH = "VLLM_ZIPAR_MASKED_KERNEL"


def kernel_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") not in ("0", "false", "False", "")


def cpu_tag() -> str:
    """A short digest of this CPU's model and instruction-set flags. PyTorch's extension cache is keyed by
    name and sources, not by CPU: without it, a `-march=native` build in a home directory shared by several
    nodes (a Ray cluster on NFS) could be loaded on a node that lacks its instructions."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))][:2]
    return hashlib.sha256("\n".join(wanted or [platform.machine()]).encode()).hexdigest()[:10]


def extension_build_directory(name: str) -> Path:
    """Where the kernel is built: `TORCH_EXTENSIONS_DIR` (or PyTorch's default root) / name, created."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    directory = Path(root) / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def remove_stale_lock(build_directory: Path) -> None:
    """Remove PyTorch's build `lock` file; call only while holding the directory's OS lock."""
    stale = build_directory / "lock"
    if stale.exists():
        logger.warning("vllm-zipar: removing a stale kernel build lock left by a killed build: %s", stale)
        stale.unlink(missing_ok=True)


@functools.cache
def load_masked_kernel() -> bool:
    """Build (once per machine) and load the kernel; False, with one warning, if that is not possible."""
    if not kernel_enabled():
        return False
    from torch.utils import cpp_extension

    name = f"vllm_zipar_masked_attention_{cpu_tag()}"
    try:
        build_directory = extension_build_directory(name)
        with open(build_directory / "vllm_zipar.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # waits while another process builds; released at its death
            remove_stale_lock(build_directory)
            cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_directory),
                is_python_module=False,
                verbose=False,
            )
    except Exception as error:  # a missing compiler or headers: the PyTorch path still works
        logger.warning(
            "vllm-zipar: could not build the masked attention kernel (%s); using the slower PyTorch path",
            error,
        )
        return False
    return True


def masked_paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    requests: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    key_transposed: bool,
    output: torch.Tensor,
) -> None:
    """Overwrite the masked requests' rows of `output` ([tokens, heads * head_dim]).

    `kv_cache` is vLLM's CPU cache of one layer viewed as [blocks, kv_heads, 2 * block_size, head_dim];
    `requests` int64 [R, 5]: block-table row, first query row, query count, sequence length, offset of the
    request's [count, seq_len] visibility matrix in the flat uint8 `mask`.
    """
    torch.ops.vllm_zipar.masked_paged_attention(
        query, kv_cache, block_table, requests, mask, scale, key_transposed, output
    )
