"""Which attention serves image models on which platform: the one place that decides, once per engine.

- vLLM's CPU platform: vLLM's CPU backend with the ZipAR mask (`attention.py`, compiled masked kernel).
- CUDA: vLLM's FlexAttention backend with the ZipAR rule as its mask (`flex_attention.py`).
- Anything else: the platform's own backend, causal only; front-ends refuse decodings that need the mask.

Model families build plain vLLM `Attention` layers. Our worker calls `install_zipar_attention` before the
model is built: it points the vLLM backend the platform selects (CPU: `CPU_ATTN`; CUDA: `FLEX_ATTENTION`,
which it also selects) at our subclass through vLLM's `register_backend`, so every attention layer of the
model gets the ZipAR mask and no family can forget it. The runner still checks every layer after loading
(`layers_without_zipar_attention`) and refuses a masked step if one slipped through.

`VLLM_ZIPAR_ATTENTION=flex` selects the FlexAttention backend on the CPU platform too (eager FlexAttention,
through the shims in `vllm_zipar/patches/flex_attention_cpu.py`): slow, but it runs the GPU backend's whole
logic in CI. The variable is read in every process that builds a model or a runner, so set it before the
engine starts (worker processes inherit it).
"""

from __future__ import annotations

import os
from typing import Any

ATTENTION_ENV = "VLLM_ZIPAR_ATTENTION"
CHOICES = ("auto", "cpu", "flex")


def attention_choice(platform: Any = None) -> str | None:
    """ "cpu" or "flex" for the ZipAR attention on this platform, None where neither runs."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    wanted = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise ValueError(f"{ATTENTION_ENV}={wanted!r}: expected one of {', '.join(CHOICES)}")
    if platform.is_cpu():
        return "flex" if wanted == "flex" else "cpu"
    if platform.is_cuda():
        if wanted == "cpu":
            raise ValueError(
                f"{ATTENTION_ENV}=cpu: vLLM's CPU attention backend runs on the CPU platform only"
            )
        return "flex"
    return None


def has_zipar_attention(platform: Any = None) -> bool:
    """Whether this platform can run decodings that need the ZipAR mask (ZipAR windows, guidance)."""
    return attention_choice(platform) is not None


def zipar_attention_backend() -> type | None:
    """The ZipAR attention backend class for this platform (None: the platform's default, no ZipAR mask)."""
    choice = attention_choice()
    if choice == "cpu":
        from vllm_zipar.engine.attention import ZipARCPUAttentionBackend

        return ZipARCPUAttentionBackend
    if choice == "flex":
        from vllm.platforms import current_platform

        from vllm_zipar.engine.flex_attention import ZipARFlexAttentionBackend

        if current_platform.is_cpu():
            from vllm_zipar.patches import apply_flex_attention_cpu_patches

            apply_flex_attention_cpu_patches()

        return ZipARFlexAttentionBackend
    return None


def install_zipar_attention(vllm_config: Any) -> type | None:
    """Make every attention layer built from now on in this process use the ZipAR backend (our worker calls
    this before loading the model); returns the backend class, or None where the platform has none."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    backend = zipar_attention_backend()
    if backend is None:
        return None
    # The enum member whose path the platform's selector returns: the CPU platform always answers CPU_ATTN
    # (so the FlexAttention route on the CPU overrides that name too); CUDA answers the configured backend.
    if current_platform.is_cpu():
        selected = AttentionBackendEnum.CPU_ATTN
    else:
        selected = AttentionBackendEnum.FLEX_ATTENTION
        vllm_config.attention_config.backend = selected
    register_backend(selected, f"{backend.__module__}.{backend.__qualname__}")
    # vLLM caches the selection per (backend, layer shape): forget choices made before the override.
    _cached_get_attn_backend.cache_clear()
    return backend


def is_zipar_attention_backend(backend: type) -> bool:
    """Whether an attention layer's backend class applies the ZipAR mask."""
    name = backend.get_name()
    if name == "CPU_ATTN":
        from vllm_zipar.engine.attention import ZipARCPUAttentionBackend

        return issubclass(backend, ZipARCPUAttentionBackend)
    if name == "FLEX_ATTENTION":
        from vllm_zipar.engine.flex_attention import ZipARFlexAttentionBackend

        return issubclass(backend, ZipARFlexAttentionBackend)
    return False


def layers_without_zipar_attention(vllm_config: Any) -> list[str]:
    """Names of this process's attention layers whose backend would decode a masked step causally."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    layers = get_layers_from_vllm_config(vllm_config, Attention)
    return sorted(
        name for name, layer in layers.items() if not is_zipar_attention_backend(layer.get_attn_backend())
    )
