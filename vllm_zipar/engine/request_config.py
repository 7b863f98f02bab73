"""Which decoding an image request uses: engine defaults, overridden per request.

Engine default: `additional_config={"zipar": {"decoding": "zipar" | "ntp", "window": int}}` (default: NTP).
Per request: `SamplingParams(extra_args={"decoding": ..., "zipar_window": ...})`. A window must be an int
>= 1; a window >= the grid width is valid and decodes exactly as NTP does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import FeedKind, ZipARPlan, check_window

DECODINGS = ("zipar", "ntp")


@dataclass(frozen=True)
class ImageDecoding:
    decoding: str
    window: int | None  # None for NTP

    @classmethod
    def parse(cls, decoding: object, window: object) -> ImageDecoding:
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        if decoding == "ntp":
            return cls("ntp", None)
        if window is None:
            raise ValueError("decoding 'zipar' needs zipar_window (an integer >= 1)")
        try:
            return cls("zipar", check_window(window))
        except ValueError:
            raise ValueError(f"zipar_window must be an integer >= 1, got {window!r}") from None

    def layout(self, hf_config: Any, prompt_len: int) -> GridLayout:
        grid = int(hf_config.grid_size)
        return GridLayout(prompt_len=prompt_len, height=grid, width=grid)

    def num_output_tokens(self, layout: GridLayout) -> int:
        return len(output_cells(layout, self.window))

    def check_fits(self, layout: GridLayout, token_budget: int) -> None:
        """Refuse a decoding whose passes cannot run whole within the engine's token budget."""
        needed = plan_shape(layout, self.window).max_pass_tokens
        if needed > token_budget:
            raise ValueError(
                f"zipar_window={self.window} on a {layout.height}x{layout.width} grid feeds up to {needed} "
                f"tokens in one pass, more than max_num_batched_tokens={token_budget}; use a larger window "
                "or a larger max_num_batched_tokens"
            )

    @property
    def cache_salt(self) -> str:
        """Prefix-cache salt: KV computed under one decoding must never serve another (positions, masks)."""
        return f"zipar-w{self.window}" if self.window is not None else "ntp"


def engine_default(vllm_config: Any) -> tuple[str, int | None]:
    extra = (getattr(vllm_config, "additional_config", None) or {}).get("zipar", {})
    return extra.get("decoding", "ntp"), extra.get("window")


def image_decoding_for(sampling_params: Any, vllm_config: Any) -> ImageDecoding:
    decoding, window = engine_default(vllm_config)
    extra = getattr(sampling_params, "extra_args", None) or {}
    decoding = extra.get("decoding", decoding)
    window = extra.get("zipar_window", window)
    return ImageDecoding.parse(decoding, window)


@dataclass(frozen=True)
class PlanShape:
    """What a dry run of one image's plan tells in advance (positions and kinds ignore sampled values)."""

    output_cells: tuple[int | None, ...]  # raster position carried by each output token; None = proxy
    max_pass_tokens: int  # the largest pass, which must fit the engine's token budget whole


@lru_cache(maxsize=256)
def plan_shape(layout: GridLayout, window: int | None) -> PlanShape:
    """A request's output is every input fed after the prompt, plus the cells sampled in the last pass.

    Used for `max_tokens`, to check a pass fits the token budget, and to turn a request's output back
    into the raster grid.
    """
    plan = ZipARPlan(layout, window)
    inputs = plan.prefill_inputs([0] * layout.prompt_len)
    largest = 1
    while True:
        predicted = [fed.predicts for fed in inputs if fed.predicts is not None]
        plan.record([0] * len(predicted))
        inputs = plan.next_inputs()
        if not inputs:
            fed = plan.fed(layout.prompt_len, plan.num_fed)
            cells = tuple(None if f.kind is FeedKind.PROXY else f.position for f in fed) + tuple(predicted)
            return PlanShape(cells, largest)
        largest = max(largest, len(inputs))


def output_cells(layout: GridLayout, window: int | None) -> tuple[int | None, ...]:
    return plan_shape(layout, window).output_cells
