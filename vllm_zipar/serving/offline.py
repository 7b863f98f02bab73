"""Offline image generation through vLLM's own engine (`vllm.LLM`), one request per image.

`ImageGenerator` sets the engine arguments our models need (no tokenizer, our worker class, a context as
long as the prompt plus the grid) and turns class labels into prompts and output tokens into H×W grids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_zipar.engine.request_config import ImageDecoding, output_cells
from vllm_zipar.models.model_dir import load_config

# The authors' LlamaGen c2i sampling defaults (autoregressive/sample/sample_c2i.py), without guidance.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 2000
DEFAULT_TOP_P = 1.0
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@dataclass
class GeneratedImage:
    class_label: int
    seed: int | None
    tokens: torch.Tensor  # [H, W] int64 VQ codes in raster order


class ImageGenerator:
    """Generates VQ token grids (and images) for a LlamaGen model directory with vLLM."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        decoding: str = "zipar",
        zipar_window: int | None = 8,
        **engine_kwargs: Any,
    ) -> None:
        """`decoding`/`zipar_window` are the engine defaults; each `generate` call may override them."""
        from vllm import LLM

        from vllm_zipar.engine import SCHEDULER_CLS, worker_cls_name

        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        self.default_decoding = ImageDecoding.parse(decoding, zipar_window)
        kwargs: dict[str, Any] = {
            "model": str(self.model_dir),
            "skip_tokenizer_init": True,
            "dtype": "float32",
            "worker_cls": worker_cls_name(),
            "scheduler_cls": SCHEDULER_CLS,
            "additional_config": {
                "zipar": {"decoding": self.default_decoding.decoding, "window": self.default_decoding.window}
            },
            "max_model_len": self.config.max_position_embeddings,
            "enforce_eager": True,
        }
        if (
            "VLLM_CPU_KVCACHE_SPACE" not in os.environ
            and "gpu_memory_utilization" not in engine_kwargs
            and _on_cpu()
        ):
            # vLLM sizes the CPU KV cache from the NUMA node minus this process's memory; its 0.92 default
            # does not fit next to the model, and a fraction shrinks as the process grows. A fixed size is
            # predictable (1 GiB holds ~1,700 LlamaGen-B images of 24x24 tokens).
            kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
        kwargs.update(engine_kwargs)
        self.llm = LLM(**kwargs)
        self._vq = None

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.config.grid_size, self.config.grid_size)

    def sampling_params(
        self,
        *,
        seed: int | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = DEFAULT_TOP_K,
        top_p: float = DEFAULT_TOP_P,
        decoding: ImageDecoding | None = None,
    ):
        from vllm import SamplingParams

        decoding = decoding or self.default_decoding

        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        # An image request's output is its feed sequence (see request_config.output_cells), not H·W tokens.
        num_outputs = decoding.num_output_tokens(decoding.layout(self.config, prompt_len=1))
        return SamplingParams(
            max_tokens=num_outputs,
            min_tokens=num_outputs,
            ignore_eos=True,
            detokenize=False,
            temperature=temperature,
            top_k=top_k if top_k > 0 else 0,
            top_p=top_p,
            seed=seed,
            extra_args={"decoding": decoding.decoding, "zipar_window": decoding.window},
        )

    def decoding(self, decoding: str | None = None, zipar_window: int | None = None) -> ImageDecoding:
        """Validate a per-request decoding choice (defaults: this generator's)."""
        if decoding is None and zipar_window is None:
            return self.default_decoding
        if decoding is None:
            decoding = "zipar"
        return ImageDecoding.parse(decoding, zipar_window)

    def generate(
        self,
        class_labels: Sequence[int],
        *,
        seeds: Sequence[int | None] | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = DEFAULT_TOP_K,
        top_p: float = DEFAULT_TOP_P,
        decoding: str | None = None,
        zipar_window: int | None = None,
        use_tqdm: bool = False,
    ) -> list[GeneratedImage]:
        """One token grid per class label; `temperature=0` is greedy."""
        chosen = self.decoding(decoding, zipar_window)
        labels = list(class_labels)
        seed_list = list(seeds) if seeds is not None else [None] * len(labels)
        if len(seed_list) != len(labels):
            raise ValueError(f"got {len(seed_list)} seeds for {len(labels)} class labels")
        prompts = [
            {"prompt_token_ids": [self.config.class_token_id(label)], "cache_salt": chosen.cache_salt}
            for label in labels
        ]
        params = [
            self.sampling_params(seed=s, temperature=temperature, top_k=top_k, top_p=top_p, decoding=chosen)
            for s in seed_list
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=use_tqdm)
        return [
            GeneratedImage(
                class_label=label, seed=seed, tokens=self.grid_from_output(out.outputs[0].token_ids, chosen)
            )
            for label, seed, out in zip(labels, seed_list, outputs, strict=True)
        ]

    def grid_from_output(self, token_ids: Sequence[int], decoding: ImageDecoding) -> torch.Tensor:
        """The [H, W] raster grid from a request's output tokens (its inputs in feed order)."""
        layout = decoding.layout(self.config, prompt_len=1)
        cells = output_cells(layout, decoding.window)
        if len(cells) != len(token_ids):
            raise RuntimeError(f"expected {len(cells)} output tokens for {decoding}, got {len(token_ids)}")
        grid = torch.full((layout.height * layout.width,), -1, dtype=torch.long)
        for position, token in zip(cells, token_ids, strict=True):
            if position is not None:
                grid[position - layout.prompt_len] = token
        return grid.view(layout.height, layout.width)

    def decode(self, tokens: torch.Tensor):
        """PIL images for a batch of token grids [B, H, W] (the VQ decoder is loaded on first use)."""
        if self._vq is None:
            from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, load_llamagen_vq

            self._vq = load_llamagen_vq(
                self.model_dir / self.config.vq_checkpoint, LlamaGenVQConfig(**self.config.vq_config)
            )
        with torch.inference_mode():
            return self._vq.to_pil_images(tokens)
