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

from vllm_zipar.engine.request_config import Guidance, ImageDecoding, output_cells
from vllm_zipar.models.model_dir import load_config
from vllm_zipar.serving.metrics import record_image
from vllm_zipar.zipar.layout import GridLayout

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@dataclass
class GeneratedImage:
    request_id: str
    class_label: int
    seed: int | None
    tokens: torch.Tensor  # [H, W] int64 VQ codes in raster order
    passes: int  # forward passes the engine spent on this image, prefill included
    cells_per_pass: list[int]  # grid cells sampled in each of those passes
    cfg_scale: float = 1.0  # classifier-free guidance it was decoded with (1: none)


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
        self._submitted: dict[str, tuple[int, int | None]] = {}

    @property
    def token_budget(self) -> int:
        return self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.config.grid_size, self.config.grid_size)

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
        chosen.check_fits(self.layout(chosen), self.token_budget)
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

    def generate(
        self,
        class_labels: Sequence[int],
        *,
        seeds: Sequence[int | None] | None = None,
        use_tqdm: bool = False,
        **request_kwargs: Any,
    ) -> list[GeneratedImage]:
        """One token grid per class label; `temperature=0` is greedy. Keyword arguments: `request_inputs`."""
        labels = list(class_labels)
        seed_list = list(seeds) if seeds is not None else [None] * len(labels)
        if len(seed_list) != len(labels):
            raise ValueError(f"got {len(seed_list)} seeds for {len(labels)} class labels")
        pairs = zip(labels, seed_list, strict=True)
        inputs = [self.request_inputs(label, seed=seed, **request_kwargs) for label, seed in pairs]
        outputs = self.llm.generate([p for p, _ in inputs], [s for _, s in inputs], use_tqdm=use_tqdm)
        return [
            self.image_from_output(out, label, seed)
            for label, seed, out in zip(labels, seed_list, outputs, strict=True)
        ]

    def add_request(self, request_id: str, class_label: int, **request_kwargs: Any) -> None:
        """Submit one image to the running engine without waiting (pair with `step`)."""
        prompt, params = self.request_inputs(class_label, **request_kwargs)
        self._submitted[request_id] = (class_label, request_kwargs.get("seed"))
        self.llm.llm_engine.add_request(request_id, prompt, params)

    def step(self) -> list[GeneratedImage]:
        """Run one engine step; the images that finished in it."""
        finished = []
        for out in self.llm.llm_engine.step():
            if out.finished and out.request_id in self._submitted:
                label, seed = self._submitted.pop(out.request_id)
                finished.append(self.image_from_output(out, label, seed))
        return finished

    def abort(self, request_ids: Sequence[str]) -> None:
        self.llm.llm_engine.abort_request(list(request_ids))
        for request_id in request_ids:
            self._submitted.pop(request_id, None)

    def close(self) -> None:
        """Shut the engine down now, and vLLM's process-wide parallel state with it.

        An in-process engine left to the garbage collector tears that global state down whenever it is
        collected, possibly under a newer engine in the same process.
        """
        import gc

        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del self.llm
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()

    def __enter__(self) -> ImageGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_unfinished_requests(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def image_from_output(self, out: Any, class_label: int, seed: int | None) -> GeneratedImage:
        stats = (out.kv_transfer_params or {}).get("zipar")
        if stats is None:
            raise RuntimeError(
                f"request {out.request_id} finished without image stats ({out.outputs[0].finish_reason})"
            )
        decoding = ImageDecoding.parse(stats["decoding"], stats["window"])
        scale = stats.get("cfg_scale", 1.0)
        decoding = decoding.with_guidance(Guidance.parse(scale, 1) if scale != 1.0 else None)
        record_image(stats)
        return GeneratedImage(
            request_id=out.request_id,
            class_label=class_label,
            seed=seed,
            tokens=self.grid_from_output(out.outputs[0].token_ids, decoding),
            passes=stats["passes"],
            cells_per_pass=stats["cells_per_pass"],
            cfg_scale=scale,
        )

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

    def decode(self, tokens: torch.Tensor):
        """PIL images for a batch of token grids [B, H, W] (the VQ decoder is loaded on first use)."""
        if self._vq is None:
            from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, load_llamagen_vq

            self._vq = load_llamagen_vq(
                self.model_dir / self.config.vq_checkpoint, LlamaGenVQConfig(**self.config.vq_config)
            )
        with torch.inference_mode():
            return self._vq.to_pil_images(tokens)
