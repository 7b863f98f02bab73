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


@lru_cache(maxsize=256)
def output_cells(layout: GridLayout, window: int | None) -> tuple[int | None, ...]:
    """For each output token of an image request, the raster position of the grid cell it carries.

    A request's output is every input fed after the prompt, plus the cells sampled in the last pass; None
    marks proxies (query-only copies of another cell's token). The plan's positions and kinds do not depend
    on the sampled values, so a dry run with dummy tokens gives them exactly. Used for `max_tokens` and to
    turn a request's output back into the raster grid.
    """
    plan = ZipARPlan(layout, window)
    inputs = plan.prefill_inputs([0] * layout.prompt_len)
    while True:
        predicted = [fed.predicts for fed in inputs if fed.predicts is not None]
        plan.record([0] * len(predicted))
        inputs = plan.next_inputs()
        if not inputs:
            fed = plan.fed(layout.prompt_len, plan.num_fed)
            return tuple(None if f.kind is FeedKind.PROXY else f.position for f in fed) + tuple(predicted)
