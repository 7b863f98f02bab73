"""Which attention serves image models on which platform: the one place that decides.

- vLLM's CPU platform: vLLM's CPU backend with the ZipAR mask (`attention.py`, compiled masked kernel).
- CUDA: vLLM's FlexAttention backend with the ZipAR rule as its mask (`flex_attention.py`).
- Anything else: the platform's own backend, causal only; front-ends refuse decodings that need the mask.

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
    """"cpu" or "flex" for the ZipAR attention on this platform, None where neither runs."""
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
    """The attention backend class image models pass to `Attention(attn_backend=...)` (None: the
    platform's default, no ZipAR mask)."""
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
