"""Offline image generation through vLLM's own engine (`vllm.LLM`), one request per image.

`ImageGenerator` starts `vllm.LLM` with the engine arguments the model's family needs (`image_engine_args`)
and turns prompts (class labels or text, whatever the family takes) into requests and output tokens into
H×W grids (`ImageRequests`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_zipar.engine.request_config import ImageDecoding
from vllm_zipar.models.registry import load_image_model
from vllm_zipar.serving.engine_args import image_engine_args
from vllm_zipar.serving.image_requests import ImageRequests
from vllm_zipar.serving.metrics import record_image
from vllm_zipar.zipar.image_stats import ImageStats


@dataclass
class GeneratedImage:
    request_id: str
    prompt: str | int  # a class label or name (class-to-image) or a text prompt
    seed: int | None
    tokens: torch.Tensor  # [H, W] int64 vocabulary ids of the visual tokens, raster order
    passes: int  # forward passes the engine spent on this image, prefill included
    cells_per_pass: list[int]  # grid cells sampled in each of those passes
    cfg_scale: float = 1.0  # classifier-free guidance it was decoded with (1: none)
    stats: ImageStats | None = None  # everything the engine reported about this image

    @property
    def class_label(self) -> str | int:
        return self.prompt


class ImageGenerator:
    """Generates VQ token grids (and images) for a vllm-zipar model directory with vLLM."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        decoding: str = "zipar",
        zipar_window: int | None = 8,
        zipar_drafts: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        """`decoding`/`zipar_window`/`zipar_drafts` are the engine defaults; each `generate` call may override
        them. `engine_kwargs` go to `vllm.LLM` over ours (`image_engine_args`; `hf_overrides` is merged)."""
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.model = load_image_model(self.model_dir)
        self.config = self.model.hf_config
        self.default_decoding = ImageDecoding.parse(decoding, zipar_window).with_drafts(zipar_drafts)
        kwargs = image_engine_args(self.model, self.default_decoding, engine_kwargs)
        self.llm = LLM(**kwargs)
        model_config = self.llm.llm_engine.vllm_config.model_config
        self.requests = ImageRequests(
            self.model, self.default_decoding, self.token_budget, model_config.max_model_len
        )
        self._vq = None
        self._submitted: dict[str, tuple[str | int, int | None]] = {}

    @property
    def token_budget(self) -> int:
        return self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, columns) of the model's native size."""
        return self.model.native_size.grid

    def request_inputs(self, prompt: str | int, **kwargs: Any):
        """The vLLM prompt and SamplingParams of one image (see `ImageRequests.image_request`)."""
        return self.requests.request_inputs(prompt, **kwargs)

    def generate(
        self,
        prompts: Sequence[str | int],
        *,
        seeds: Sequence[int | None] | None = None,
        use_tqdm: bool = False,
        **request_kwargs: Any,
    ) -> list[GeneratedImage]:
        """One token grid per prompt (class labels or text); `temperature=0` is greedy. Keyword arguments:
        `ImageRequests.image_request` (`size`, `negative_prompt`, `decoding`, `zipar_window`, `zipar_drafts`,
        ...)."""
        prompts = list(prompts)
        seed_list = list(seeds) if seeds is not None else [None] * len(prompts)
        if len(seed_list) != len(prompts):
            raise ValueError(f"got {len(seed_list)} seeds for {len(prompts)} prompts")
        pairs = zip(prompts, seed_list, strict=True)
        inputs = [self.request_inputs(prompt, seed=seed, **request_kwargs) for prompt, seed in pairs]
        outputs = self.llm.generate([p for p, _ in inputs], [s for _, s in inputs], use_tqdm=use_tqdm)
        return [
            self.image_from_output(out, prompt, seed)
            for prompt, seed, out in zip(prompts, seed_list, outputs, strict=True)
        ]

    def add_request(self, request_id: str, prompt: str | int, **request_kwargs: Any) -> None:
        """Submit one image to the running engine without waiting (pair with `step`)."""
        engine_prompt, params = self.request_inputs(prompt, **request_kwargs)
        self._submitted[request_id] = (prompt, request_kwargs.get("seed"))
        self.llm.llm_engine.add_request(request_id, engine_prompt, params)

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

    def image_from_output(self, out: Any, prompt: str | int, seed: int | None) -> GeneratedImage:
        stats = ImageStats.of_output(out.kv_transfer_params)
        if stats is None:
            raise RuntimeError(
                f"request {out.request_id} finished without image stats ({out.outputs[0].finish_reason})"
            )
        decoding, layout = self.requests.decoding_of(stats)
        record_image(stats)
        return GeneratedImage(
            request_id=out.request_id,
            prompt=prompt,
            seed=seed,
            tokens=self.requests.grid_from_output(out.outputs[0].token_ids, decoding, layout, stats=stats),
            passes=stats.passes,
            cells_per_pass=list(stats.cells_per_pass),
            cfg_scale=stats.cfg_scale,
            stats=stats,
        )

    def decode(self, tokens: torch.Tensor):
        """PIL images for a batch of token grids [B, H, W] (the VQ decoder is loaded on first use)."""
        if self._vq is None:
            self._vq = self.model.load_decoder()
        with torch.inference_mode():
            return self._vq.to_pil_images(tokens)
