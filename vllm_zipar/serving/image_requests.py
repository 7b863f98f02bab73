"""What every front-end (offline `ImageGenerator`, the HTTP route) needs to turn an image request into vLLM
inputs and back: engine arguments, prompts, `SamplingParams`, and output tokens to the H×W grid.

Plain functions of the model config; no engine is touched here, so validation errors surface in the front-end
(a malformed request must never reach the engine core, where an exception would take the engine down).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_zipar.engine.attention_backends import has_zipar_attention
from vllm_zipar.engine.request_config import Guidance, ImageDecoding, output_cells
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.zipar.layout import GridLayout

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def image_engine_args(
    model_dir: str | Path, config: LlamaGenConfig, decoding: ImageDecoding, overrides: dict[str, Any]
) -> dict[str, Any]:
    """vLLM engine arguments for serving `model_dir` with our scheduler, worker and decoding default."""
    from vllm_zipar.engine import SCHEDULER_CLS, worker_cls_name

    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "skip_tokenizer_init": True,
        "dtype": "float32",
        "worker_cls": worker_cls_name(),
        "scheduler_cls": SCHEDULER_CLS,
        "additional_config": {"zipar": {"decoding": decoding.decoding, "window": decoding.window}},
        "max_model_len": config.max_position_embeddings,
        "enforce_eager": True,
    }
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ and "gpu_memory_utilization" not in overrides and _on_cpu():
        # vLLM sizes the CPU KV cache from the NUMA node minus this process's memory; its 0.92 default
        # does not fit next to the model, and a fraction shrinks as the process grows. A fixed size is
        # predictable (1 GiB holds ~1,700 LlamaGen-B images of 24x24 tokens).
        kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    kwargs.update(overrides)
    return kwargs


class ImageRequests:
    """Builds and reads the vLLM requests of one class-to-image model."""

    def __init__(self, config: LlamaGenConfig, default_decoding: ImageDecoding, token_budget: int) -> None:
        self.config = config
        self.default_decoding = default_decoding
        self.token_budget = token_budget

    def sampling_params(
        self,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        decoding: ImageDecoding | None = None,
    ):
        """vLLM `SamplingParams` of one image; unset values take the model's `sampling_defaults`."""
        from vllm import SamplingParams

        decoding = decoding or self.default_decoding
        defaults = self.config.sampling_defaults
        temperature = defaults["temperature"] if temperature is None else temperature
        top_k = defaults["top_k"] if top_k is None else top_k
        top_p = defaults["top_p"] if top_p is None else top_p
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        # An image request's output is its feed sequence (see request_config.output_cells), not H·W tokens.
        num_outputs = decoding.num_output_tokens(self.layout(decoding))
        extra_args: dict[str, Any] = {"decoding": decoding.decoding, "zipar_window": decoding.window}
        if decoding.guidance is not None:
            extra_args.update(decoding.guidance.extra_args())
        return SamplingParams(
            max_tokens=num_outputs,
            min_tokens=num_outputs,
            ignore_eos=True,
            detokenize=False,
            temperature=temperature,
            top_k=top_k if top_k > 0 else 0,
            top_p=top_p,
            seed=seed,
            extra_args=extra_args,
        )

    def decoding(
        self,
        decoding: str | None = None,
        zipar_window: int | None = None,
        *,
        cfg_scale: float | None = None,
        cfg_interval: int | None = None,
    ) -> ImageDecoding:
        """Validate a per-request decoding choice (defaults: this generator's and the model's)."""
        chosen = self.default_decoding
        if decoding is not None or zipar_window is not None:
            chosen = ImageDecoding.parse(decoding or "zipar", zipar_window)
        defaults = self.config.sampling_defaults
        scale = defaults["cfg_scale"] if cfg_scale is None else cfg_scale
        interval = defaults["cfg_interval"] if cfg_interval is None else cfg_interval
        # c2i: the unconditional prompt is the null class, one token.
        return chosen.with_guidance(Guidance.parse(scale, 1, interval))

    def layout(self, decoding: ImageDecoding) -> GridLayout:
        """The grid of a class-to-image request: one class token (plus the null class when guided)."""
        return decoding.layout(self.config, prompt_len=1 + (decoding.uncond_prompt_len or 0))

    def request_inputs(
        self,
        class_label: int,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        decoding: str | None = None,
        zipar_window: int | None = None,
        cfg_scale: float | None = None,
        cfg_interval: int | None = None,
    ):
        """The vLLM prompt and SamplingParams of one image, validated (bad input raises ValueError).

        Unset sampling values take the model's `sampling_defaults` (config.json); `cfg_scale=1` runs no
        unconditional sequence.
        """
        chosen = self.decoding(decoding, zipar_window, cfg_scale=cfg_scale, cfg_interval=cfg_interval)
        layout = self.layout(chosen)
        chosen.check_fits(layout, self.token_budget)
        if chosen.needs_masked_attention(layout) and not has_zipar_attention():
            # The platform's own attention would silently attend causally: wrong tokens, not an error.
            raise ValueError(
                "ZipAR windows below the grid width and classifier-free guidance need the ZipAR-masked "
                "attention, which this version implements for vLLM's CPU platform and for CUDA "
                "(FlexAttention); on this platform use decoding='ntp' with cfg_scale=1"
            )
        prompt_ids = [self.config.class_token_id(class_label)]
        if chosen.guidance is not None:
            prompt_ids.append(self.config.null_class_token_id)
        # The salt keeps vLLM's prefix cache from serving KV computed under another decoding (other
        # positions and masks for the same tokens).
        prompt = {"prompt_token_ids": prompt_ids, "cache_salt": chosen.cache_salt}
        params = self.sampling_params(
            seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, decoding=chosen
        )
        return prompt, params

    def grid_from_output(self, token_ids: Sequence[int], decoding: ImageDecoding) -> torch.Tensor:
        """The [H, W] raster grid from a request's output tokens (its inputs in feed order)."""
        layout = self.layout(decoding)
        cells = output_cells(layout, decoding.window, decoding.uncond_prompt_len)
        if len(cells) != len(token_ids):
            raise RuntimeError(f"expected {len(cells)} output tokens for {decoding}, got {len(token_ids)}")
        grid = torch.full((layout.height * layout.width,), -1, dtype=torch.long)
        for position, token in zip(cells, token_ids, strict=True):
            if position is not None:
                grid[position - layout.prompt_len] = token
        return grid.view(layout.height, layout.width)

    def decoding_of(self, stats: dict[str, Any]) -> ImageDecoding:
        """The decoding a finished request reports in its stats (`kv_transfer_params["zipar"]`)."""
        decoding = ImageDecoding.parse(stats["decoding"], stats["window"])
        scale = stats.get("cfg_scale", 1.0)
        return decoding.with_guidance(Guidance.parse(scale, 1) if scale != 1.0 else None)
