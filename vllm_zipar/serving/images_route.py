"""`POST /v1/images/generations` on vLLM's own OpenAI server: a `vllm.endpoint_plugins` plugin.

vLLM 0.32 loads endpoint plugins in the API server process only, and only when named in `VLLM_PLUGINS`
(`vllm.plugins.load_endpoint_plugins`; our `vllm serve --decoding ...` names it). `attach_router` adds the
route while the app is built; `init_state` runs once the engine client exists and builds the
`ImageService` (image_service.py) for the engine's model, whatever its family.

Every field is checked before anything reaches the engine (`images_protocol.parse_request`, then
`ImageService.jobs`). A client that disconnects cancels the handler, which aborts its requests. Bodies are
bounded (`request_body`); SIGTERM drains and engine death fails requests fast (`lifecycle`); every response
of the route, 405 included, uses OpenAI's error body.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from vllm_zipar.patches import apply_http_head_limits
from vllm_zipar.serving.client_watch import AbortOnDisconnect
from vllm_zipar.serving.image_service import ImageService, route_logger
from vllm_zipar.serving.image_stream import stream_images
from vllm_zipar.serving.images_protocol import ImageAPIError, parse_request
from vllm_zipar.serving.playground import attach_playground, playground_address
from vllm_zipar.serving.request_body import ClientGone, read_body
from vllm_zipar.serving.route_metrics import record_accepted

ROUTE = "/v1/images/generations"


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
        req = parse_request(raw, service.sizes, service.limits)
        jobs = service.jobs(req)
    except ImageAPIError as err:
        return _error_response(err)
    except ClientGone:
        service.log.info("image request: client disconnected while sending its body")
        return None
    record_accepted()

    if req.stream:
        return StreamingResponse(stream_images(service, req, jobs, request), media_type="text/event-stream")

    work = asyncio.create_task(service.generate(req, jobs))
    service.lifecycle.track(work)
    # The client left: cancelling the work aborts its engine requests.
    watch = AbortOnDisconnect(request, work, service.log, jobs[0].request_id)
    try:
        await asyncio.wait({work})
    finally:
        watch.stop()
    if watch.aborted:
        return None
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
        # Before vLLM builds its uvicorn server: our bounded HTTP protocols (request head size, count, time).
        apply_http_head_limits()
        service = ImageService.from_engine(engine_client, args)
        if service is None:
            route_logger().warning("%s: the model is not a vllm-zipar model directory; route disabled", ROUTE)
            return
        await service.warm_up()
        service.lifecycle.watch_engine()
        service.lifecycle.take_signals(state)
        # vLLM unregisters every `vllm:` collector when its own loggers start (before this runs).
        ensure_registered()
        ensure_route_metrics()
        state.zipar_images = service
        route_logger().info(
            "%s serves %s (%s, default %s)",
            ROUTE,
            service.served_names,
            service.native_size,
            service.requests.default_decoding,
        )
        route_logger().info("playground: open %s", playground_address(args))


def plugin() -> ZipARImagesPlugin:
    return ZipARImagesPlugin()
