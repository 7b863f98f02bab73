"""What one image's plan does, known before it runs: a dry run of the plan, once per grid and decoding.

The plan is deterministic (positions, kinds and passes never depend on the sampled values), so playing it
with dummy tokens tells in advance the raster cell each output token carries (how the engine's output reads
back into a grid, and how many tokens a request outputs), the largest pass (which must fit the engine's
token budget whole), and the pass that samples each cell (the order partial images and `vllm-zipar animate`
show). The engine's request config, the serving side's grid reader and the stream all ask this one dry run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .guidance import UNCONDITIONAL, image_plan
from .layout import GridLayout
from .plan import FeedKind


@dataclass(frozen=True)
class PlanShape:
    """What a dry run of one image's plan tells in advance (positions and kinds ignore sampled values)."""

    # Raster position (conditional stream) carried by each output token; None: a proxy or an unconditional
    # stream's copy, which a grid reader skips.
    output_cells: tuple[int | None, ...]
    max_pass_tokens: int  # the largest pass after the prefill, which must fit the engine's token budget whole
    # For each raster cell (H*W, row-major), the pass (0: the prefill) whose logits sampled it.
    sampled_at: tuple[int, ...]


@lru_cache(maxsize=256)
def plan_shape(layout: GridLayout, window: int | None, uncond_prompt_len: int | None = None) -> PlanShape:
    """Play the plan of one image (`guidance.image_plan`) to its end with dummy tokens.

    A request's output is every input fed after the prompt, plus the cells sampled in the last pass.
    """
    plan = image_plan(layout, window, uncond_prompt_len)
    prompt_len = layout.prompt_len + (uncond_prompt_len or 0)
    passes: dict[int, int] = {}
    inputs = plan.prefill_inputs([0] * prompt_len)
    largest = 1
    while True:
        predicted = [f for f in inputs if f.predicts is not None and f.stream != UNCONDITIONAL]
        for f in predicted:
            assert f.predicts is not None  # filtered above; for the type checker
            cell = layout.image_index(f.predicts)
            assert cell is not None  # a sampled cell is an image cell, never an EOL
            passes[cell] = f.step
        plan.record([0] * len(predicted))
        inputs = plan.next_inputs()
        if not inputs:
            break
        largest = max(largest, len(inputs))
    fed = plan.fed(prompt_len, plan.num_fed)
    cells = tuple(None if f.kind is FeedKind.PROXY or f.stream == UNCONDITIONAL else f.position for f in fed)
    last_pass = tuple(f.predicts for f in predicted)
    order = tuple(passes[cell] for cell in range(layout.height * layout.width))
    return PlanShape(cells + last_pass, largest, order)


def passes_for(order: tuple[int, ...], decoded: list[bool] | None = None) -> int:
    """Passes the engine has run when the `decoded` cells (all when None) are known: the last one's + 1.

    `order` is `PlanShape.sampled_at`."""
    if decoded is None:
        return max(order) + 1
    return max((step for step, done in zip(order, decoded, strict=True) if done), default=-1) + 1
