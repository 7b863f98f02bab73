"""One served image model as the HTTP route sees it: request validation, engine calls, results, metrics.

`ImageService` turns a parsed body (`images_protocol`) into engine requests through the model's
`ImageModel` (`ImageRequests.image_request`), runs them with `engine_client.generate` exactly as vLLM's own
handlers do (the `n` images of a request concurrently), and reads each output back into its token grid;
pixels come from `PixelRenderer` (its own thread), streaming from `image_stream`, the route from
`images_route`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_zipar.engine.request_config import ImageDecoding, engine_default, engine_default_drafts
from vllm_zipar.models.image_model import ImageModel
from vllm_zipar.models.image_prompts import ImageSize
from vllm_zipar.models.prompt_error import PromptError
from vllm_zipar.models.registry import NotAnImageModel, load_image_model
from vllm_zipar.serving.image_requests import ImageRequests
from vllm_zipar.serving.images_protocol import (
    ImageAPIError,
    ImageGenerationRequest,
    RequestLimits,
    param_of_engine_error,
    quote,
)
from vllm_zipar.serving.lifecycle import RouteLifecycle
from vllm_zipar.serving.pixels import PixelRenderer
from vllm_zipar.serving.request_body import body_limits
from vllm_zipar.zipar.image_stats import ImageStats
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.seeding import image_seed

# A child of vLLM's "vllm" logger, so our lines share its handler, format and VLLM_LOGGING_LEVEL.
LOGGER_NAME = "vllm.zipar.images"


def route_logger():
    from vllm.logger import init_logger

    return init_logger(LOGGER_NAME)


@dataclass
class ImageJob:
    """One image of a request: what the engine gets, and how to read its output."""

    index: int
    request_id: str
    prompt: dict[str, Any]
    params: Any  # vllm.SamplingParams
    decoding: ImageDecoding
    seed: int | None
    layout: GridLayout
    size: ImageSize


@dataclass
class FinishedImage:
    job: ImageJob
    grid: torch.Tensor  # [H, W] vocabulary ids of the visual tokens, raster order
    stats: ImageStats
    seconds: float


class ImageService:
    """Everything the route needs about one served image model."""

    def __init__(
        self,
        engine_client: Any,
        model: ImageModel,
        served_names: Sequence[str],
        token_budget: int,
        default_decoding: ImageDecoding,
        max_model_len: int | None = None,
    ) -> None:
        self.engine = engine_client
        self.model = model
        self.model_dir = Path(model.model_dir)
        self.served_names = list(served_names)
        self.requests = ImageRequests(model, default_decoding, token_budget, max_model_len)
        self.native_size = model.native_size.name
        self.sizes = [size.name for size in model.sizes()]
        cells = max(size.grid[0] * size.grid[1] for size in model.sizes())
        self.limits = RequestLimits(
            max_window=cells,
            max_cfg_interval=cells,
            max_top_k=model.visual_tokens.count,
            max_prompt_chars=model.max_prompt_chars,
            prompt_kind=model.prompt_kind,
            negative_prompt=model.takes_negative_prompt,
            unconditional_context=model.unconditional_context,
        )
        self.max_body_bytes, self.body_timeout = body_limits()
        self.pixels = PixelRenderer(model)
        self.log = route_logger()
        self.lifecycle = RouteLifecycle(engine_client, self.log)

    @classmethod
    def from_engine(cls, engine_client: Any, args: Any) -> ImageService | None:
        """The service for the engine's model, or None when it is not one of our image models."""
        vllm_config = engine_client.vllm_config
        model_dir = vllm_config.model_config.model
        try:
            model = load_image_model(model_dir)
        except (OSError, TypeError, ValueError, NotAnImageModel):
            return None
        decoding, window = engine_default(vllm_config)
        drafts = engine_default_drafts(vllm_config)
        served = getattr(args, "served_model_name", None) or [getattr(args, "model", None) or model_dir]
        budget = vllm_config.scheduler_config.max_num_batched_tokens
        default = ImageDecoding.parse(decoding, window).with_drafts(drafts)
        return cls(engine_client, model, served, budget, default, vllm_config.model_config.max_model_len)

    async def render(self, grids: torch.Tensor, req: ImageGenerationRequest, masks=None) -> list[str]:
        return await self.pixels.render(grids, req.output_format, req.output_compression, masks)

    async def warm_up(self) -> None:
        await self.pixels.warm_up()

    # ---------------------------------------------------------------- requests

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_names:
            raise ImageAPIError(
                f"The model '{model}' does not exist; this server serves {self.served_names}.",
                param="model",
                code="model_not_found",
                status=404,
            )

    def jobs(self, req: ImageGenerationRequest) -> list[ImageJob]:
        """The engine requests of one HTTP request, fully validated (ImageAPIError otherwise)."""
        from vllm.sampling_params import RequestOutputKind

        self.check_model(req.model)
        kwargs = req.sampling_kwargs()
        base = uuid.uuid4().hex
        jobs = []
        try:
            for index in range(req.n):
                # Image i's seed derives from (seed, i): distinct from every other request's images.
                seed = None if req.seed is None else image_seed(req.seed, index)
                one = self.requests.image_request(req.prompt, seed=seed, **kwargs)
                if not req.partial_images:  # intermediate outputs are only needed for partial images
                    one.params.output_kind = RequestOutputKind.FINAL_ONLY
                jobs.append(
                    ImageJob(
                        index,
                        f"img-{base}-{index}",
                        one.prompt,
                        one.params,
                        one.decoding,
                        seed,
                        one.layout,
                        one.size,
                    )
                )
        except PromptError as err:
            raise ImageAPIError(quote(str(err), 300)[1:-1], param=err.param, code=err.code) from None
        except ValueError as err:
            raise ImageAPIError(quote(str(err), 300)[1:-1], param=param_of_engine_error(str(err))) from None
        except Exception as err:  # vLLM's own validation (VLLMValidationError): same schema as ours
            if type(err).__name__ != "VLLMValidationError":
                raise
            param = getattr(err, "parameter", None) or param_of_engine_error(str(err))
            raise ImageAPIError(quote(str(err), 300)[1:-1], param=param) from None
        return jobs

    async def run(
        self, job: ImageJob, on_output: Callable[[ImageJob, Any], None] | None = None
    ) -> FinishedImage:
        start = time.perf_counter()
        final = None
        async for out in self.engine.generate(job.prompt, job.params, job.request_id):
            final = out
            if on_output is not None and not out.finished:
                on_output(job, out)
        stats = ImageStats.of_output(final.kv_transfer_params) if final is not None else None
        if stats is None:
            reason = final.outputs[0].finish_reason if final is not None else "no output"
            raise RuntimeError(f"image request {job.request_id} ended without image stats ({reason})")
        grid = self.requests.grid_from_output(
            final.outputs[0].token_ids, job.decoding, job.layout, stats=stats
        )
        finished = FinishedImage(job, grid, stats, time.perf_counter() - start)
        self._record(finished)
        return finished

    def _record(self, image: FinishedImage) -> None:
        from vllm_zipar.serving.metrics import record_image
        from vllm_zipar.serving.route_metrics import record_served

        record_image(image.stats)
        record_served(image.stats, image.seconds)
        self.log.info(
            "image %s: decoding=%s window=%s cfg_scale=%s passes=%d seconds=%.3f",
            image.job.request_id,
            image.stats.decoding,
            image.stats.window,
            image.stats.cfg_scale,
            image.stats.passes,
            image.seconds,
        )

    async def run_all(self, jobs: Sequence[ImageJob], on_output=None) -> list[FinishedImage]:
        """All images of a request; cancelling this (client gone) cancels each, which aborts it."""
        tasks = [asyncio.create_task(self.run(job, on_output)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def usage(self, jobs: Sequence[ImageJob]) -> dict[str, Any]:
        input_tokens = sum(len(job.prompt["prompt_token_ids"]) for job in jobs)
        output_tokens = sum(job.layout.num_cells for job in jobs)
        return {
            "input_tokens": input_tokens,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": input_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }

    async def generate(self, req: ImageGenerationRequest, jobs: Sequence[ImageJob]) -> dict[str, Any]:
        images = await self.run_all(jobs)
        b64 = await self.render(torch.stack([image.grid for image in images]), req)
        data = []
        for image, encoded in zip(images, b64, strict=True):
            item: dict[str, Any] = {"b64_json": encoded}
            if req.return_tokens:
                item["tokens"] = image.grid.tolist()
            data.append(item)
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": req.output_format,
            "size": jobs[0].size.name,
            "usage": self.usage(jobs),
        }

    def cut_off_error(self) -> ImageAPIError:
        if self.lifecycle.engine_dead:
            return ImageAPIError.unavailable("The engine stopped before this image finished.", "engine_dead")
        return ImageAPIError.unavailable(
            "The server shut down before this image finished "
            f"(drain time {self.lifecycle.drain_seconds:g} s)."
        )

    def failure(self, err: BaseException, request_id: str) -> ImageAPIError:
        """The error body of a request that failed in the engine; a traceback only for the unexpected."""
        if self.lifecycle.engine_dead or type(err).__name__ == "EngineDeadError":
            self.lifecycle.failed_by_engine_death += 1
            self.log.info("image request %s: failed, the engine died", request_id)
            return ImageAPIError.unavailable("The engine stopped before this image finished.", "engine_dead")
        self.log.exception("image request %s failed", request_id, exc_info=err)
        return ImageAPIError.server_error(f"image generation failed: {quote(str(err), 200)}")
