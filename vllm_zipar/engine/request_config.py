"""Which decoding an image request uses: engine defaults, overridden per request.

Engine default: `additional_config={"zipar": {"decoding": "zipar" | "ntp", "window": int, "drafts": int}}`
(default: NTP, no drafts). Per request: `SamplingParams.extra_args`, written by `ImageDecoding.to_extra_args`
and read by `ImageDecoding.from_extra_args` (nothing else touches these keys): `{"decoding": ...,
"zipar_window": ..., "image_grid": [H, W], "zipar_drafts": L}`. A window must be an int >= 1; a window >= the
grid width is valid and decodes exactly as NTP does. The grid defaults to the model's
(`ImageGrid.default_grid`); which grids a model takes is its adapter's business.

Classifier-free guidance adds `{"cfg_scale": s, "cfg_uncond_prompt_len": U, "cfg_interval": i}`. With
`s > 1` the last `U` prompt tokens are the unconditional prompt and the image decodes as a `GuidedPlan`
(both sequences in this one request); `s == 1` (the default) means no unconditional sequence at all.

`zipar_drafts: L` (an int >= 0; 0, the default, is plain ZipAR) decodes the same tokens with exact drafts
(docs/exact_drafts.md): a `DraftPlan` feeds up to L guesses per chain per pass. Its output length depends on
how many guesses were right, so it has no `num_output_tokens`; the scheduler ends the request when the plan
is done and the grid travels in the image's stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_zipar.models.image_grid import ImageGrid
from vllm_zipar.models.registry import image_model_for_config
from vllm_zipar.zipar.draft_plan import DraftPlan
from vllm_zipar.zipar.guidance import GuidedPlan, image_plan
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import ZipARPlan, check_window
from vllm_zipar.zipar.shape import plan_shape

DECODINGS = ("zipar", "ntp")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of one image: `logits = u + scale * (c - u)` on the guided cells."""

    scale: float
    uncond_prompt_len: int
    interval: int = -1  # the authors' cfg_interval: -1 guides every cell

    @classmethod
    def parse(cls, scale: object, uncond_prompt_len: object, interval: object = -1) -> Guidance | None:
        """None for scale 1 (no unconditional sequence); ValueError for anything malformed."""
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ValueError(f"cfg_scale must be a number >= 1, got {scale!r}")
        scale = float(scale)
        if not scale >= 1.0 or scale == float("inf"):
            raise ValueError(f"cfg_scale must be a finite number >= 1 (1 disables guidance), got {scale!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < -1:
            raise ValueError(f"cfg_interval must be an int >= -1 (-1: every cell), got {interval!r}")
        if scale == 1.0:
            return None
        if (
            isinstance(uncond_prompt_len, bool)
            or not isinstance(uncond_prompt_len, int)
            or uncond_prompt_len < 1
        ):
            raise ValueError(
                f"cfg_scale={scale} needs cfg_uncond_prompt_len (an int >= 1), got {uncond_prompt_len!r}"
            )
        return cls(scale, uncond_prompt_len, interval)


def check_drafts(drafts: object) -> int:
    """`drafts` as an int >= 0 (0: plain ZipAR); ValueError naming `zipar_drafts` otherwise."""
    if isinstance(drafts, bool) or not isinstance(drafts, int) or drafts < 0:
        raise ValueError(f"zipar_drafts must be an integer >= 0 (0: no drafts), got {drafts!r}")
    return drafts


def check_grid(grid: object) -> tuple[int, int] | None:
    """`grid` as (rows, columns) of ints >= 1, or None (the model's default); ValueError otherwise."""
    if grid is None:
        return None
    if not isinstance(grid, list | tuple) or len(grid) != 2:
        raise ValueError(f"image_grid must be [rows, columns], got {grid!r}")
    for side in grid:
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= 4096:
            raise ValueError(f"image_grid sides must be ints in [1, 4096], got {grid!r}")
    return int(grid[0]), int(grid[1])


@dataclass(frozen=True)
class ImageDecoding:
    decoding: str
    window: int | None  # None for NTP
    guidance: Guidance | None = None
    grid: tuple[int, int] | None = None  # (rows, columns); None: the model's default grid
    drafts: int = 0  # exact drafts per chain per pass (0: plain ZipAR)

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

    @classmethod
    def from_extra_args(
        cls, extra: Mapping[str, Any] | None, default: tuple[str, int | None] | tuple[str, int | None, int]
    ) -> ImageDecoding:
        """The decoding a request's `SamplingParams.extra_args` asks for (`to_extra_args` wrote them); keys
        it lacks take the engine's `default` (decoding, window[, drafts]), no guidance, the model's grid."""
        extra = extra or {}
        drafts = check_drafts(extra.get("zipar_drafts", default[2] if len(default) > 2 else 0))
        decoding = extra.get("decoding", default[0])
        window = extra.get("zipar_window", default[1])
        guidance = Guidance.parse(
            extra.get("cfg_scale", 1.0), extra.get("cfg_uncond_prompt_len"), extra.get("cfg_interval", -1)
        )
        parsed = cls.parse(decoding, window).with_guidance(guidance).with_grid(extra.get("image_grid"))
        return parsed.with_drafts(drafts)

    def to_extra_args(self) -> dict[str, Any]:
        """This decoding as `SamplingParams.extra_args` (plain data: it crosses to the engine core)."""
        extra: dict[str, Any] = {"decoding": self.decoding, "zipar_window": self.window}
        if self.grid is not None:
            extra["image_grid"] = [self.grid[0], self.grid[1]]
        if self.guidance is not None:
            extra["cfg_scale"] = self.guidance.scale
            extra["cfg_uncond_prompt_len"] = self.guidance.uncond_prompt_len
            extra["cfg_interval"] = self.guidance.interval
        # Always written, 0 too: a missing key takes the engine's default, so an L = 0 request on a server
        # started with --zipar-drafts would otherwise be decoded with the server's drafts.
        extra["zipar_drafts"] = self.drafts
        return extra

    def with_guidance(self, guidance: Guidance | None) -> ImageDecoding:
        return ImageDecoding(self.decoding, self.window, guidance, self.grid, self.drafts)

    def with_grid(self, grid: tuple[int, int] | None) -> ImageDecoding:
        return ImageDecoding(self.decoding, self.window, self.guidance, check_grid(grid), self.drafts)

    def with_drafts(self, drafts: int) -> ImageDecoding:
        return ImageDecoding(self.decoding, self.window, self.guidance, self.grid, check_drafts(drafts))

    @property
    def uncond_prompt_len(self) -> int | None:
        return None if self.guidance is None else self.guidance.uncond_prompt_len

    def layout(self, model: ImageGrid, prompt_len: int) -> GridLayout:
        """The conditional sequence's grid; `prompt_len` is the whole request prompt (both prompts)."""
        cond_prompt_len = prompt_len - (self.uncond_prompt_len or 0)
        if cond_prompt_len < 1:
            raise ValueError(
                f"a prompt of {prompt_len} tokens leaves no conditional prompt before the "
                f"{self.uncond_prompt_len}-token unconditional one"
            )
        return model.layout(cond_prompt_len, self.grid)

    def plan(self, layout: GridLayout) -> ZipARPlan | GuidedPlan | DraftPlan:
        if self.drafts:
            return DraftPlan(layout, self.window, self.drafts, self.uncond_prompt_len)
        return image_plan(layout, self.window, self.uncond_prompt_len)

    def num_output_tokens(self, layout: GridLayout) -> int | None:
        """The exact output length, known in advance without drafts (None with them)."""
        if self.drafts:
            return None
        return len(plan_shape(layout, self.window, self.uncond_prompt_len).output_cells)

    def min_sequence_len(self, layout: GridLayout) -> int:
        """The longest KV sequence this decoding needs without drafts (prompts + plain ZipAR's feeds):
        drafts only use what an engine's `max_model_len` leaves beyond it."""
        shape = plan_shape(layout, self.window, self.uncond_prompt_len)
        return layout.prompt_len + (self.uncond_prompt_len or 0) + len(shape.output_cells)

    def needs_masked_attention(self, layout: GridLayout) -> bool:
        """Whether this decoding's passes need the ZipAR mask: rows started before the row above is complete,
        or two streams (guidance) in one KV sequence, or drafts (superseded tokens must be hidden)."""
        return (
            self.guidance is not None
            or bool(self.drafts)
            or (self.window is not None and self.window < layout.width)
        )

    def check_fits(self, layout: GridLayout, token_budget: int) -> None:
        """Refuse a decoding whose passes cannot run whole within the engine's token budget."""
        needed = plan_shape(layout, self.window, self.uncond_prompt_len).max_pass_tokens
        if self.drafts:  # a draft-free pass feeds one token per open chain (two on an NTP chain with EOLs)
            needed = max(
                needed, DraftPlan(layout, self.window, self.drafts, self.uncond_prompt_len).max_base_pass
            )
        if needed > token_budget:
            what = f"zipar_window={self.window}" if self.window is not None else "NTP"
            if self.drafts:
                what += f" with zipar_drafts={self.drafts}"
            if self.guidance is not None:
                what += f" with cfg_scale={self.guidance.scale}"
            raise ValueError(
                f"{what} on a {layout.height}x{layout.width} grid feeds up to {needed} "
                f"tokens in one pass, more than max_num_batched_tokens={token_budget}; use a larger window "
                "or a larger max_num_batched_tokens"
            )

    @property
    def cache_salt(self) -> str:
        """Prefix-cache salt: KV computed under one decoding must never serve another (positions, masks,
        and with guidance the unconditional prompt that must not see the conditional one)."""
        salt = f"zipar-w{self.window}" if self.window is not None else "ntp"
        if self.guidance is not None:
            salt += f"-cfg{self.guidance.uncond_prompt_len}"
        if self.grid is not None:
            salt += f"-g{self.grid[0]}x{self.grid[1]}"
        if self.drafts:
            # Which positions a draft image's tokens sit at depends on its sampled values, so the scheduler
            # also salts it with its sampling (ZipARScheduler._salt_drafts).
            salt += f"-d{self.drafts}"
        return salt


def engine_default(vllm_config: Any) -> tuple[str, int | None]:
    extra = (getattr(vllm_config, "additional_config", None) or {}).get("zipar", {})
    return extra.get("decoding", "ntp"), extra.get("window")


def engine_default_drafts(vllm_config: Any) -> int:
    """The server's `zipar_drafts` default (`vllm serve --zipar-drafts`; 0: none)."""
    extra = (getattr(vllm_config, "additional_config", None) or {}).get("zipar", {})
    return check_drafts(extra.get("drafts", 0))


def image_decoding_for(sampling_params: Any, vllm_config: Any) -> ImageDecoding:
    extra = getattr(sampling_params, "extra_args", None)
    default = (*engine_default(vllm_config), engine_default_drafts(vllm_config))
    return ImageDecoding.from_extra_args(extra, default)


def image_model_of(vllm_config: Any) -> ImageGrid:
    """The engine's view of the served family, from its config alone (the scheduler and each runner build
    one)."""
    model_config = vllm_config.model_config
    return image_model_for_config(model_config.model, model_config.hf_config)
