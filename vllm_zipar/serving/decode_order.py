"""Which engine pass samples each grid cell of an image: the decoding order that partial images show.

The plan is deterministic (positions never depend on sampled values), so a dry run of it, as
`engine.request_config.plan_shape` does, tells for every raster cell the pass (0: the prefill) whose logits
sampled it. The stream uses it to say how many passes a partial image took; `vllm-zipar animate` to draw one
frame per pass.
"""

from __future__ import annotations

from functools import lru_cache

from vllm_zipar.zipar.guidance import UNCONDITIONAL, image_plan
from vllm_zipar.zipar.layout import GridLayout


@lru_cache(maxsize=64)
def sampled_at(
    layout: GridLayout, window: int | None, uncond_prompt_len: int | None = None
) -> tuple[int, ...]:
    """For each raster cell (H*W, row-major), the index of the pass that sampled it."""
    plan = image_plan(layout, window, uncond_prompt_len)
    prompt_len = layout.prompt_len + (uncond_prompt_len or 0)
    passes: dict[int, int] = {}
    inputs = plan.prefill_inputs([0] * prompt_len)
    while inputs:
        predicted = [f for f in inputs if f.predicts is not None and f.stream != UNCONDITIONAL]
        for f in predicted:
            passes[layout.image_index(f.predicts)] = f.step
        plan.record([0] * len(predicted))
        inputs = plan.next_inputs()
    return tuple(passes[cell] for cell in range(layout.height * layout.width))


def passes_for(order: tuple[int, ...], decoded: list[bool] | None = None) -> int:
    """Passes the engine has run when the `decoded` cells (all when None) are known: the last one's + 1."""
    if decoded is None:
        return max(order) + 1
    return max((step for step, done in zip(order, decoded, strict=True) if done), default=-1) + 1
