"""`POST /v1/images/generations` on vLLM's own OpenAI server: a `vllm.endpoint_plugins` plugin.

vLLM 0.32 loads endpoint plugins in the API server process only, and only when named in `VLLM_PLUGINS`
(`vllm.plugins.load_endpoint_plugins`; our `vllm serve --decoding ...` names it). `attach_router` adds the
route while the app is built; `init_state` runs once the engine client exists and builds the
`ImageService` (model config, request builder, VQ decoder, a thread for pixels).

One image is one engine request (`engine_client.generate`, exactly as vLLM's own handlers reach the engine);
the `n` images of a request run concurrently and their token grids are VQ-decoded in one batch, off the event
loop. Every field is checked before anything reaches the engine (`images_protocol.parse_request`, then
`ImageRequests.request_inputs`). A client that disconnects cancels the handler, which aborts its requests.
Bodies are bounded (`request_body`); SIGTERM drains and engine death fails requests fast (`lifecycle`); every
response of the route, 405 included, uses OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from vllm_zipar.engine.request_config import ImageDecoding, engine_default, output_cells
from vllm_zipar.serving.class_names import ClassNameError, ClassNames
from vllm_zipar.serving.decode_order import passes_for, sampled_at
from vllm_zipar.serving.image_requests import ImageRequests
from vllm_zipar.serving.images_protocol import (
    ImageAPIError,
    ImageGenerationRequest,
    RequestLimits,
    param_of_engine_error,
    parse_request,
    quote,
)
from vllm_zipar.serving.lifecycle import RouteLifecycle
from vllm_zipar.serving.playground import attach_playground, playground_address
from vllm_zipar.serving.request_body import ClientGone, body_limits, read_body
from vllm_zipar.zipar.seeding import image_seed

ROUTE = "/v1/images/generations"
# A child of vLLM's "vllm" logger, so our lines share its handler, format and VLLM_LOGGING_LEVEL.
LOGGER_NAME = "vllm.zipar.images"
PARTIAL_FILL = 128  # grey for the cells a partial image has not decoded yet


def _logger():
    from vllm.logger import init_logger

    return init_logger(LOGGER_NAME)


def _single_threaded_torch() -> None:
    """On CPU the engine's worker owns the cores (vLLM binds its OpenMP threads). A second OpenMP pool in
    this process, fighting it for them, slowed VQ decoding ~20x under load: images then finished one every
    ~0.4 s behind the pixel thread (benchmarks/serve_load.py, 2 cores: 1.9-3.9 images/s; 6.2 with this)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(1)


@dataclass
class ImageJob:
    """One image of a request: what the engine gets, and how to read its output."""

    index: int
    request_id: str
    prompt: dict[str, Any]
    params: Any  # vllm.SamplingParams
    decoding: ImageDecoding
    seed: int | None


@dataclass
class FinishedImage:
    job: ImageJob
    grid: torch.Tensor  # [H, W] VQ codes in raster order
    stats: dict[str, Any]
    seconds: float


class ImageService:
    """Everything the route needs about one served class-to-image model."""

    def __init__(
        self,
        engine_client: Any,
        model_dir: str | Path,
        config: Any,
        served_names: Sequence[str],
        token_budget: int,
        default_decoding: ImageDecoding,
    ) -> None:
        self.engine = engine_client
        self.model_dir = Path(model_dir)
        self.config = config
        self.served_names = list(served_names)
        self.requests = ImageRequests(config, default_decoding, token_budget)
        self.class_names = ClassNames.for_config(config)
        self.native_size = f"{config.image_size}x{config.image_size}"
        cells = config.grid_size**2
        self.limits = RequestLimits(
            max_window=cells,
            max_cfg_interval=cells,
            max_top_k=config.codebook_size,
            max_prompt_chars=self.class_names.max_prompt_chars,
        )
        self.max_body_bytes, self.body_timeout = body_limits()
        # One thread: VQ decoding and image encoding leave the event loop.
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="zipar-pixels", initializer=_single_threaded_torch
        )
        self._vq = None
        self.log = _logger()
        self.lifecycle = RouteLifecycle(engine_client, self.log)

    @classmethod
    def from_engine(cls, engine_client: Any, args: Any) -> ImageService | None:
        """The service for the engine's model, or None when it is not one of our image models."""
        from vllm_zipar.models.model_dir import load_config

        vllm_config = engine_client.vllm_config
        model_dir = vllm_config.model_config.model
        try:
            config = load_config(model_dir)
        except (OSError, TypeError, ValueError):
            return None
        decoding, window = engine_default(vllm_config)
        served = getattr(args, "served_model_name", None) or [getattr(args, "model", None) or model_dir]
        budget = vllm_config.scheduler_config.max_num_batched_tokens
        return cls(engine_client, model_dir, config, served, budget, ImageDecoding.parse(decoding, window))

    # ---------------------------------------------------------------- pixels (executor thread)

    def _vq_model(self):
        if self._vq is None:
            from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, load_llamagen_vq

            vq = load_llamagen_vq(
                self.model_dir / self.config.vq_checkpoint, LlamaGenVQConfig(**self.config.vq_config)
            )
            self._vq = vq.cuda() if torch.cuda.is_available() else vq
        return self._vq

    def _decode(self, grids: torch.Tensor, masks: torch.Tensor | None = None):
        """PIL images of token grids [B, H, W]; cells where `masks` is True are painted grey."""
        with torch.inference_mode():
            images = self._vq_model().to_pil_images(grids)
        if masks is not None:
            scale = self.config.image_size // self.config.grid_size
            for image, mask in zip(images, masks, strict=True):
                for row, col in mask.nonzero().tolist():
                    box = (col * scale, row * scale, (col + 1) * scale, (row + 1) * scale)
                    image.paste((PARTIAL_FILL,) * 3, box)
        return images

    @staticmethod
    def _encode(image, output_format: str, compression: int | None) -> str:
        buffer = io.BytesIO()
        kwargs: dict[str, Any] = {}
        if output_format in ("jpeg", "webp") and compression is not None:
            kwargs["quality"] = compression
        image.save(buffer, format=output_format.upper(), **kwargs)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def _render(self, grids: torch.Tensor, masks, output_format: str, compression: int | None) -> list[str]:
        return [self._encode(im, output_format, compression) for im in self._decode(grids, masks)]

    async def render(self, grids: torch.Tensor, req: ImageGenerationRequest, masks=None) -> list[str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self._render, grids, masks, req.output_format, req.output_compression
        )

    async def warm_up(self) -> None:
        """Load the VQ decoder before the first request (in the pixel thread)."""
        await asyncio.get_running_loop().run_in_executor(self.executor, self._vq_model)

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
        try:
            label = self.class_names.label(req.prompt)
        except ClassNameError as err:
            raise ImageAPIError(str(err), param="prompt", code="unknown_class") from None
        kwargs = req.sampling_kwargs()
        base = uuid.uuid4().hex
        jobs = []
        try:
            decoding = self.requests.decoding(
                req.decoding, req.zipar_window, cfg_scale=req.cfg_scale, cfg_interval=req.cfg_interval
            )
            for index in range(req.n):
                # Image i's seed derives from (seed, i): distinct from every other request's images.
                seed = None if req.seed is None else image_seed(req.seed, index)
                prompt, params = self.requests.request_inputs(label, seed=seed, **kwargs)
                if not req.stream:  # intermediate outputs are only needed for partial images
                    params.output_kind = RequestOutputKind.FINAL_ONLY
                jobs.append(ImageJob(index, f"img-{base}-{index}", prompt, params, decoding, seed))
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
        stats = ((final.kv_transfer_params or {}).get("zipar") if final is not None else None) or None
        if stats is None:
            reason = final.outputs[0].finish_reason if final is not None else "no output"
            raise RuntimeError(f"image request {job.request_id} ended without image stats ({reason})")
        grid = self.requests.grid_from_output(final.outputs[0].token_ids, self.requests.decoding_of(stats))
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
            image.stats["decoding"],
            image.stats.get("window"),
            image.stats.get("cfg_scale", 1.0),
            image.stats["passes"],
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
        output_tokens = len(jobs) * self.config.grid_size**2
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
            "size": self.native_size,
            "usage": self.usage(jobs),
        }

    # ---------------------------------------------------------------- streaming

    def partial_grid(self, job: ImageJob, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid decoded so far from a request's output tokens, and the mask of cells still missing."""
        layout = self.requests.layout(job.decoding)
        cells = output_cells(layout, job.decoding.window, job.decoding.uncond_prompt_len)
        grid = torch.full((layout.height * layout.width,), -1, dtype=torch.long)
        for position, token in zip(cells, token_ids, strict=False):
            if position is not None:
                grid[position - layout.prompt_len] = token
        missing = grid < 0
        grid[missing] = 0
        return grid.view(layout.height, layout.width), missing.view(layout.height, layout.width)

    async def stream(
        self, req: ImageGenerationRequest, jobs: Sequence[ImageJob], request: Request | None = None
    ) -> AsyncIterator[str]:
        """Server-sent events: `partial_images` partial images per image, then its completed image.

        Starlette's StreamingResponse notices a client that left only when a send fails, which may be long
        after (or, here, never before the images finish), so `request`'s disconnect is watched too."""
        queue: asyncio.Queue = asyncio.Queue()
        cells = self.config.grid_size**2
        sent = [0] * len(jobs)

        def on_output(job: ImageJob, out: Any) -> None:
            tokens = list(out.outputs[0].token_ids)
            grid, missing = self.partial_grid(job, tokens)
            filled = cells - int(missing.sum())
            while sent[job.index] < req.partial_images and filled * (req.partial_images + 1) >= cells * (
                sent[job.index] + 1
            ):
                queue.put_nowait(("partial", job, sent[job.index], grid, missing))
                sent[job.index] += 1

        async def one(job: ImageJob) -> None:
            image = await self.run(job, on_output if req.partial_images else None)
            queue.put_nowait(("done", job, image))

        async def produce() -> None:
            tasks = [asyncio.create_task(one(job)) for job in jobs]
            try:
                await asyncio.gather(*tasks)
            except Exception as err:  # reported to the client as an error event
                queue.put_nowait(("error", err))
            finally:  # cancelled (client gone) or failed: cancelling the others aborts their requests
                pending = [task for task in tasks if not task.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)

        producer = asyncio.create_task(produce())
        self.lifecycle.track(producer)

        def on_cut_off(task: asyncio.Task) -> None:  # SIGTERM's drain time ran out, or the engine died
            if self.lifecycle.cut_off(task):
                queue.put_nowait(("error", self.cut_off_error()))

        producer.add_done_callback(on_cut_off)
        abandoned = False

        def abandon() -> None:  # the client left: cancelling the producer aborts the engine requests
            nonlocal abandoned
            if not abandoned and not producer.done():
                abandoned = True
                self.log.info("image request %s: client disconnected, aborted", jobs[0].request_id)
                producer.cancel()

        def on_disconnect(task: asyncio.Task) -> None:
            # Runs on the loop whatever this generator is doing: Starlette may never resume it.
            if not task.cancelled():
                abandon()
                queue.put_nowait(("gone",))

        watcher = None
        if request is not None:
            watcher = asyncio.create_task(_until_disconnected(request))
            watcher.add_done_callback(on_disconnect)
        remaining = len(jobs)
        usage = self.usage(jobs[:1])
        try:
            while remaining:
                event = await queue.get()
                if event[0] == "gone":
                    return
                if event[0] == "error":
                    error = event[1]
                    if not isinstance(error, ImageAPIError):
                        error = self.failure(error, jobs[0].request_id)
                    yield _sse("error", error.body())
                    return
                job = event[1]
                if event[0] == "partial":
                    _, _, index, grid, missing = event
                    (b64,) = await self.render(grid[None], req, masks=missing[None])
                    payload = self._event(req, job, b64, index=index, progress=self.progress(job, missing))
                    yield _sse("image_generation.partial_image", payload)
                    continue
                image = event[2]
                while sent[job.index] < req.partial_images:  # the promised count, even if decoding outran us
                    (b64,) = await self.render(image.grid[None], req)
                    payload = self._event(req, job, b64, index=sent[job.index], progress=self.progress(job))
                    yield _sse("image_generation.partial_image", payload)
                    sent[job.index] += 1
                (b64,) = await self.render(image.grid[None], req)
                progress = self.progress(job, stats=image.stats)
                payload = self._event(req, job, b64, usage=usage, progress=progress)
                if req.return_tokens:
                    payload["tokens"] = image.grid.tolist()
                yield _sse("image_generation.completed", payload)
                remaining -= 1
        except (asyncio.CancelledError, GeneratorExit):
            abandon()  # before any await: inside Starlette's cancelled task group every await raises again
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)

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
            self.log.info("image request %s: failed, the engine died", request_id)
            return ImageAPIError.unavailable("The engine stopped before this image finished.", "engine_dead")
        self.log.exception("image request %s failed", request_id, exc_info=err)
        return ImageAPIError.server_error(f"image generation failed: {quote(str(err), 200)}")

    def progress(self, job: ImageJob, missing=None, stats=None) -> dict[str, Any]:
        """Extension field `zipar` of stream events: engine passes and cells decoded so far (docs/serving.md).
        A partial image's passes are those its decoded cells needed (the plan's order); the completed image's
        are the engine's count."""
        layout = self.requests.layout(job.decoding)
        order = sampled_at(layout, job.decoding.window, job.decoding.uncond_prompt_len)
        decoded = None if missing is None else (~missing).flatten().tolist()
        passes = stats["passes"] if stats is not None else passes_for(order, decoded)
        cells = len(order) if decoded is None else sum(decoded)
        return {"passes": passes, "cells_decoded": cells, "cells": len(order)}

    def _event(
        self, req, job: ImageJob, b64: str, *, index: int | None = None, usage=None, progress=None
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "image_generation.partial_image" if usage is None else "image_generation.completed",
            "b64_json": b64,
            "background": "opaque",
            "created_at": int(time.time()),
            "output_format": req.output_format,
            "quality": "auto",
            "size": self.native_size,
            "image_index": job.index,  # extension: which of the request's n images
        }
        if usage is None:
            event["partial_image_index"] = index
        else:
            event["usage"] = usage
        if progress is not None:
            event["zipar"] = progress
        return event


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only `http.disconnect` is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _error_response(error: ImageAPIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def create_image(request: Request):
    """The route handler: validate everything, then run (or stream) the images."""
    service: ImageService | None = getattr(request.app.state, "zipar_images", None)
    if service is None:
        return _error_response(
            ImageAPIError(
                "This server's model is not a vllm-zipar image model.", code="model_not_supported", status=404
            )
        )
    refusal = service.lifecycle.refusal()
    if refusal is not None:
        return _error_response(refusal, {"Retry-After": str(service.lifecycle.retry_after())})
    try:
        raw = await read_body(request, service.max_body_bytes, service.body_timeout)
        req = parse_request(raw, service.native_size, service.limits)
        jobs = service.jobs(req)
    except ImageAPIError as err:
        return _error_response(err)
    except ClientGone:
        service.log.info("image request: client disconnected while sending its body")
        return None

    if req.stream:
        return StreamingResponse(service.stream(req, jobs, request), media_type="text/event-stream")

    work = asyncio.create_task(service.generate(req, jobs))
    service.lifecycle.track(work)
    watcher = asyncio.create_task(_until_disconnected(request))
    done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:  # the client left: cancelling the work aborts its engine requests
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        service.log.info("image request %s: client disconnected, aborted", jobs[0].request_id)
        return None
    watcher.cancel()
    if service.lifecycle.cut_off(work):
        return _error_response(service.cut_off_error())
    try:
        return work.result()
    except Exception as err:
        return _error_response(service.failure(err, jobs[0].request_id))


async def method_not_allowed(request: Request) -> JSONResponse:
    error = ImageAPIError(
        f"Method {request.method} is not allowed on {ROUTE}; use POST.",
        code="method_not_allowed",
        status=405,
    )
    return _error_response(error, {"Allow": "POST"})


class ZipARImagesPlugin:
    """The `vllm.endpoint_plugins` entry (`vllm_zipar_images`): adds `POST /v1/images/generations`."""

    name = "vllm_zipar_images"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.post(ROUTE)
        async def images_generations(raw_request: Request):
            return await create_image(raw_request)

        router.add_api_route(
            ROUTE, method_not_allowed, methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False
        )

        app.include_router(router)
        attach_playground(app)  # GET /playground: the browser page (serving/playground.py)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        from vllm_zipar.serving.metrics import ensure_registered
        from vllm_zipar.serving.route_metrics import ensure_route_metrics

        if engine_client is None:
            return
        service = ImageService.from_engine(engine_client, args)
        if service is None:
            _logger().warning("%s: the model is not a vllm-zipar model directory; route disabled", ROUTE)
            return
        await service.warm_up()
        service.lifecycle.watch_engine()
        service.lifecycle.take_signals(state)
        # vLLM unregisters every `vllm:` collector when its own loggers start (before this runs).
        ensure_registered()
        ensure_route_metrics()
        state.zipar_images = service
        _logger().info(
            "%s serves %s (%s, default %s)",
            ROUTE,
            service.served_names,
            service.native_size,
            service.requests.default_decoding,
        )
        _logger().info("playground: open %s", playground_address(args))


def plugin() -> ZipARImagesPlugin:
    return ZipARImagesPlugin()
