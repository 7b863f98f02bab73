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

    def __init__(self, model_dir: str | Path, **engine_kwargs: Any) -> None:
        from vllm import LLM

        from vllm_zipar.engine import worker_cls_name

        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        kwargs: dict[str, Any] = {
            "model": str(self.model_dir),
            "skip_tokenizer_init": True,
            "dtype": "float32",
            "worker_cls": worker_cls_name(),
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
    ):
        from vllm import SamplingParams

        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        height, width = self.grid_shape
        return SamplingParams(
            max_tokens=height * width,
            min_tokens=height * width,
            ignore_eos=True,
            detokenize=False,
            temperature=temperature,
            top_k=top_k if top_k > 0 else 0,
            top_p=top_p,
            seed=seed,
        )

    def generate(
        self,
        class_labels: Sequence[int],
        *,
        seeds: Sequence[int | None] | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = DEFAULT_TOP_K,
        top_p: float = DEFAULT_TOP_P,
        use_tqdm: bool = False,
    ) -> list[GeneratedImage]:
        """One token grid per class label; `temperature=0` is greedy."""
        labels = list(class_labels)
        seed_list = list(seeds) if seeds is not None else [None] * len(labels)
        if len(seed_list) != len(labels):
            raise ValueError(f"got {len(seed_list)} seeds for {len(labels)} class labels")
        prompts = [{"prompt_token_ids": [self.config.class_token_id(label)]} for label in labels]
        params = [
            self.sampling_params(seed=s, temperature=temperature, top_k=top_k, top_p=top_p) for s in seed_list
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=use_tqdm)
        height, width = self.grid_shape
        return [
            GeneratedImage(
                class_label=label,
                seed=seed,
                tokens=torch.tensor(out.outputs[0].token_ids, dtype=torch.long).view(height, width),
            )
            for label, seed, out in zip(labels, seed_list, outputs, strict=True)
        ]

    def decode(self, tokens: torch.Tensor):
        """PIL images for a batch of token grids [B, H, W] (the VQ decoder is loaded on first use)."""
        if self._vq is None:
            from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, load_llamagen_vq

            self._vq = load_llamagen_vq(
                self.model_dir / self.config.vq_checkpoint, LlamaGenVQConfig(**self.config.vq_config)
            )
        with torch.inference_mode():
            return self._vq.to_pil_images(tokens)
