"""What every front-end (offline `ImageGenerator`, the HTTP route) needs to turn an image request into vLLM
inputs and back: prompts, `SamplingParams`, and output tokens to the H×W grid (engine arguments:
`engine_args.py`).

Plain functions of the served `ImageModel` (models/registry.py); no engine is touched here, so validation
errors surface in the front-end (a malformed request must never reach the engine core, where an exception
would take the engine down).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm_zipar.engine.attention_backends import has_zipar_attention
from vllm_zipar.engine.request_config import Guidance, ImageDecoding
from vllm_zipar.models.image_model import ImageModel
from vllm_zipar.models.image_prompts import ImageSize
from vllm_zipar.zipar.image_stats import ImageStats
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.shape import plan_shape


@dataclass(frozen=True)
class ImageRequest:
    """One image as the engine gets it, and what reading its output back needs."""

    prompt: dict[str, Any]  # vLLM prompt: token ids (conditional, then unconditional) and cache salt
    params: Any  # vllm.SamplingParams
    decoding: ImageDecoding
    layout: GridLayout  # the conditional sequence's grid
    size: ImageSize


class ImageRequests:
    """Builds and reads the vLLM requests of one served image model."""

    def __init__(
        self,
        model: ImageModel,
        default_decoding: ImageDecoding,
        token_budget: int,
        max_model_len: int | None = None,
    ) -> None:
        self.model = model
        self.default_decoding = default_decoding
        self.token_budget = token_budget
        self.max_model_len = max_model_len

    def sampling_params(
        self,
        decoding: ImageDecoding,
        layout: GridLayout,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
    ):
        """vLLM `SamplingParams` of one image; unset values take the model's `sampling_defaults`."""
        from vllm import SamplingParams

        defaults = self.model.sampling_defaults
        temperature = defaults.temperature if temperature is None else temperature
        top_k = defaults.top_k if top_k is None else top_k
        top_p = defaults.top_p if top_p is None else top_p
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        # An image request's output is its feed sequence (zipar/shape.py: output_cells), not H·W tokens.
        # With drafts its length is unknown in advance (None: up to the engine's longest sequence; the
        # scheduler ends the request when the plan is done).
        num_outputs = decoding.num_output_tokens(layout)
        extra_args = decoding.with_grid((layout.height, layout.width)).to_extra_args()
        return SamplingParams(
            max_tokens=num_outputs,
            min_tokens=num_outputs or 0,
            ignore_eos=True,
            detokenize=False,
            temperature=temperature,
            top_k=top_k if top_k > 0 else 0,
            top_p=top_p,
            seed=seed,
            extra_args=extra_args,
        )

    def decoding(self, decoding: str | None = None, zipar_window: int | None = None) -> ImageDecoding:
        """Validate a per-request decoding choice (default: this front-end's)."""
        if decoding is None and zipar_window is None:
            return self.default_decoding
        if decoding == "zipar" and zipar_window is None:
            # An unset field takes the server's default: its window, when it serves ZipAR.
            if self.default_decoding.window is None:
                raise ValueError(
                    "decoding 'zipar' needs zipar_window (an integer >= 1): this server's default is 'ntp', "
                    "so it has no default window"
                )
            zipar_window = self.default_decoding.window
        return ImageDecoding.parse(decoding or "zipar", zipar_window)

    def guidance(self, uncond_prompt_len: int, cfg_scale: float | None, cfg_interval: int | None):
        defaults = self.model.sampling_defaults
        scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
        interval = defaults.cfg_interval if cfg_interval is None else cfg_interval
        return Guidance.parse(scale, uncond_prompt_len, interval)

    def image_request(
        self,
        prompt: str | int,
        *,
        negative_prompt: str | None = None,
        size: str | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        decoding: str | None = None,
        zipar_window: int | None = None,
        cfg_scale: float | None = None,
        cfg_interval: int | None = None,
        zipar_drafts: int | None = None,
    ) -> ImageRequest:
        """One image's vLLM prompt and SamplingParams, validated (bad input raises ValueError; an unusable
        prompt `PromptError`). Unset sampling values take the model's `sampling_defaults`; `cfg_scale=1` runs
        no unconditional sequence (and then `negative_prompt` is unused)."""
        model = self.model
        chosen_size = model.size(size)
        prompt_ids = model.prompt_ids(prompt, chosen_size)
        chosen = self.decoding(decoding, zipar_window).with_grid(chosen_size.grid)
        chosen = chosen.with_drafts(self.default_decoding.drafts if zipar_drafts is None else zipar_drafts)
        rows, cols = chosen_size.grid
        if zipar_window is not None and zipar_window > rows * cols:
            raise ValueError(
                f"zipar_window must be in 1..{rows * cols} (the cells of a {chosen_size.name} image; a "
                f"window >= the grid width {cols} already decodes in next-token order), got {zipar_window}"
            )
        uncond_ids: list[int] = []
        scale = model.sampling_defaults.cfg_scale if cfg_scale is None else cfg_scale
        if scale != 1.0 or negative_prompt is not None:
            uncond_ids = model.unconditional_prompt_ids(negative_prompt, chosen_size, prompt_ids)
        chosen = chosen.with_guidance(self.guidance(len(uncond_ids), cfg_scale, cfg_interval))
        if chosen.guidance is None:
            uncond_ids = []
        layout = model.layout(len(prompt_ids), chosen_size.grid)
        chosen.check_fits(layout, self.token_budget)
        self.check_sequence_fits(chosen, layout)
        if chosen.needs_masked_attention(layout) and not has_zipar_attention():
            # The platform's own attention would silently attend causally: wrong tokens, not an error.
            raise ValueError(
                "ZipAR windows below the grid width, classifier-free guidance and zipar_drafts need the "
                "ZipAR-masked attention, which this version implements for vLLM's CPU platform and for CUDA "
                "(FlexAttention); on this platform use decoding='ntp' with cfg_scale=1 and zipar_drafts=0"
            )
        # The salt keeps vLLM's prefix cache from serving KV computed under another decoding (other
        # positions and masks for the same tokens).
        engine_prompt = {"prompt_token_ids": prompt_ids + uncond_ids, "cache_salt": chosen.cache_salt}
        params = self.sampling_params(
            chosen, layout, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p
        )
        return ImageRequest(engine_prompt, params, chosen, layout, chosen_size)

    def check_sequence_fits(self, decoding: ImageDecoding, layout: GridLayout) -> None:
        """Refuse an image whose KV sequence (prompts and every fed cell; a guided image holds both streams)
        would outgrow the engine's `max_model_len`: vLLM would cut it short, or fail on its last token."""
        needed = decoding.min_sequence_len(layout)
        if self.max_model_len is not None and needed > self.max_model_len:
            guided = " (both streams of a guided image)" if decoding.guidance else ""
            raise ValueError(
                f"this image needs a sequence of {needed} tokens{guided}, more than the engine's "
                f"max_model_len={self.max_model_len}: ask for a smaller size, or start the engine with a "
                "larger max_model_len"
            )

    def request_inputs(self, prompt: str | int, **kwargs: Any):
        """`(vLLM prompt, SamplingParams)` of one image (see `image_request`)."""
        request = self.image_request(prompt, **kwargs)
        return request.prompt, request.params

    def grid_from_output(
        self,
        token_ids: Sequence[int],
        decoding: ImageDecoding,
        layout: GridLayout,
        *,
        partial: bool = False,
        stats: ImageStats | None = None,
    ) -> torch.Tensor:
        """The [H, W] raster grid of vocabulary ids from a request's output tokens (its inputs in feed
        order); -1 where a cell is not decoded yet (`partial`: the output so far). With drafts the output
        tokens hold guesses and superseded tokens: the grid is the finished image's `stats.tokens`."""
        if decoding.drafts:
            if stats is None or stats.tokens is None:
                raise RuntimeError(f"a {decoding} image's grid comes with its finished stats, got {stats}")
            return torch.tensor(stats.tokens, dtype=torch.long).view(layout.height, layout.width)
        cells = plan_shape(layout, decoding.window, decoding.uncond_prompt_len).output_cells
        if not partial and len(cells) != len(token_ids):
            raise RuntimeError(f"expected {len(cells)} output tokens for {decoding}, got {len(token_ids)}")
        grid = torch.full((layout.height * layout.width,), -1, dtype=torch.long)
        for position, token in zip(cells, token_ids, strict=False):
            if position is not None:
                index = layout.image_index(position)
                if index is not None:
                    grid[index] = token
        return grid.view(layout.height, layout.width)

    def decoding_of(self, stats: ImageStats) -> tuple[ImageDecoding, GridLayout]:
        """The decoding and grid a finished request reports in its stats."""
        decoding = ImageDecoding.parse(stats.decoding, stats.window)
        scale = stats.cfg_scale
        guidance = Guidance.parse(scale, stats.uncond_prompt_len) if scale != 1.0 else None
        decoding = decoding.with_guidance(guidance).with_grid(stats.grid).with_drafts(stats.drafts)
        return decoding, self.model.layout(stats.prompt_len, stats.grid)
