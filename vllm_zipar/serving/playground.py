"""The browser playground: a page served next to `POST /v1/images/generations` by the same `vllm serve`.

`GET /playground` is a static page (plain HTML, CSS and JavaScript shipped in `serving/static/`, no build
step, nothing from a CDN) that asks `GET /playground/info` what the served model is (name, size, classes,
defaults) and then talks only to the public images API: streamed requests with the extension
`partial_frames`, painting each partial image and its `zipar` progress (passes, cells) as it arrives.
`GET /` redirects to it, so the address the server prints opens it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from vllm_zipar.serving.images_protocol import MAX_PARTIAL_FRAMES

PAGE = "/playground"
STATIC_DIR = Path(__file__).parent / "static"


def model_info(service: Any) -> dict[str, Any]:
    """What the page needs to know about the served model (`service`: image_service.ImageService)."""
    model = service.model
    default = service.requests.default_decoding
    return {
        **model.describe(),
        "model": service.served_names[0],
        "num_classes": model.num_classes,
        "class_names": model.class_names,
        "default_decoding": default.decoding,
        "default_window": default.window,
        "sampling_defaults": model.sampling_defaults.to_dict(),
        "max_partial_frames": MAX_PARTIAL_FRAMES,
    }


def attach_playground(app: FastAPI) -> None:
    """Add the page, its static files and its info route to vLLM's app."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(PAGE)

    @router.get(PAGE, include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "playground.html", media_type="text/html")

    @router.get(PAGE + "/info")
    async def info(request: Request) -> JSONResponse:
        service = getattr(request.app.state, "zipar_images", None)
        if service is None:
            body = {
                "error": {
                    "message": "This server's model is not a vllm-zipar image model.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "model_not_supported",
                }
            }
            return JSONResponse(body, status_code=404)
        return JSONResponse(model_info(service))

    app.include_router(router)
    app.mount(PAGE + "/static", StaticFiles(directory=STATIC_DIR), name="zipar_playground_static")


def playground_address(args: Any) -> str:
    """The page's address for the server's `--host`/`--port` (all interfaces: this machine's loopback)."""
    host = getattr(args, "host", None) or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if getattr(args, "ssl_certfile", None) else "http"
    return f"{scheme}://{host}:{getattr(args, 'port', 8000)}{PAGE}"
