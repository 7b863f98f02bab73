"""Every monkey patch of vLLM, one module each, applied only from here (see README.md).

`apply_cli_patches()` is called once by our `vllm` console command (`vllm_zipar.serving.vllm_command`)
before vLLM's own `main` runs; `apply_engine_patches()` by our general plugin (`vllm_zipar.plugin`), which
vLLM loads in every process it starts (front-end, engine core, workers) before it builds an executor;
`apply_flex_attention_cpu_patches()` by the FlexAttention backend when it is selected on the CPU platform
(`vllm_zipar.engine.attention_backends`); `take_over_shutdown_signals()` by the image route
(`vllm_zipar.serving.lifecycle`) once vLLM's server runs, in the API server process;
`apply_image_serving_patches()` by our `vllm` command when it serves the image route, before vLLM's `main`;
`apply_http_head_limits()` by the image route's `init_state` (`vllm_zipar.serving.images_route`), in each
API server process, before vLLM starts its HTTP server. Each patch checks the
vLLM version it was written for and refuses any other: a patch silently applied to code it was not written
against is worse than a clear error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

_applied: set[str] = set()


def installed_vllm_version() -> str:
    """vLLM's version without the build's local label (`0.32.0+cpu` -> `0.32.0`)."""
    import vllm
    from packaging.version import Version

    return Version(vllm.__version__).base_version


def check_vllm_version(patch: str, written_for: str) -> None:
    version = installed_vllm_version()
    if version != written_for:
        raise RuntimeError(
            f"vllm_zipar patch {patch!r} was written for vLLM {written_for}, but vLLM {version} is "
            "installed; "
            "re-check the patched function and update the patch (see vllm_zipar/patches/README.md)"
        )


def apply_once(name: str, apply) -> None:
    if name in _applied:
        return
    apply()
    _applied.add(name)


def apply_cli_patches() -> None:
    """The patches our `vllm` console command needs, before vLLM's CLI builds its parsers."""
    from vllm_zipar.patches import cli_version, serve_flags

    apply_once("cli_version", cli_version.apply)
    apply_once("serve_flags", serve_flags.apply)


def apply_image_serving_patches() -> None:
    """The API server's engine-output task yields between engine messages (`engine_output_yield`); before
    vLLM builds its engine client."""
    from vllm_zipar.patches import engine_output_yield

    apply_once("engine_output_yield", engine_output_yield.apply)


def apply_flex_attention_cpu_patches() -> None:
    """Eager FlexAttention inside vLLM's FlexAttention backend (CPU platform only)."""
    from vllm_zipar.patches import flex_attention_cpu

    apply_once("flex_attention_cpu", flex_attention_cpu.apply)


async def take_over_shutdown_signals(
    state: Any, on_sigterm: Callable[[], None], on_sigint: Callable[[], None]
) -> Any:
    """SIGTERM and SIGINT of vLLM's API server to the image route's handlers (`sigterm_drain`); returns
    uvicorn's server. Per server, not once per process: it waits for `serve_http` to install its own."""
    from vllm_zipar.patches import sigterm_drain

    return await sigterm_drain.take_over_shutdown_signals(state, on_sigterm, on_sigint)


def apply_http_head_limits() -> None:
    """vLLM's API server speaks HTTP through our bounded uvicorn protocols (`http_head_limits`)."""
    from vllm_zipar.patches import http_head_limits

    apply_once("http_head_limits", http_head_limits.apply)


def apply_engine_patches() -> None:
    """Tensor/pipeline parallel and Ray on vLLM's CPU platform (other platforms need none of these)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm_zipar.patches import pp_intermediate_buffer

    apply_once("pp_intermediate_buffer", pp_intermediate_buffer.apply)
    if importlib.util.find_spec("ray") is not None:
        from vllm_zipar.patches import ray_cpu_workers

        apply_once("ray_cpu_workers", ray_cpu_workers.apply)
