"""vLLM's API server speaks HTTP through our bounded uvicorn protocols (`serving/http_limits.py`).

vLLM 0.32's `serve_http` (`vllm/entrypoints/launchers/launcher.py`, imported by name into
`vllm.entrypoints.launchers.api_server.entry`) builds `uvicorn.Config(app, **uvicorn_kwargs)` with uvicorn's
default `http="auto"`: httptools' protocol, which has no bound on the request head and no header timeout
(vLLM's `--h11-*` limits reach h11 only). uvicorn's `Config` takes a protocol class for `http`, and neither
vLLM nor uvicorn 0.55 has an option for a header timeout or for httptools' header size, so this wraps the
`serve_http` that `api_server.entry.build_and_serve` calls to pass our subclass of the protocol uvicorn would
have chosen, with the limits of our `vllm serve` flags and vLLM's `--h11-max-header-count`.
"""

from __future__ import annotations

import functools
from typing import Any

WRITTEN_FOR = "0.32.0"
UVICORN_WRITTEN_FOR = "0.55.0"  # `HttpToolsProtocol` / `H11Protocol` internals, see serving/http_limits.py


def check_uvicorn_version() -> None:
    import uvicorn

    if uvicorn.__version__ != UVICORN_WRITTEN_FOR:
        raise RuntimeError(
            f"vllm_zipar patch {__name__!r} subclasses uvicorn {UVICORN_WRITTEN_FOR}'s HTTP protocols, but "
            f"uvicorn {uvicorn.__version__} is installed; re-check `data_received` and the parser callbacks "
            "of uvicorn's httptools_impl and h11_impl and update serving/http_limits.py "
            "(see vllm_zipar/patches/README.md)"
        )


def apply() -> None:
    from vllm_zipar.patches import check_vllm_version

    check_vllm_version(__name__, WRITTEN_FOR)
    check_uvicorn_version()
    from vllm.entrypoints.launchers.api_server import entry

    original = entry.serve_http
    if getattr(original, "_vllm_zipar_patched", False):
        return

    @functools.wraps(original)
    async def serve_http(app: Any, *args: Any, **uvicorn_kwargs: Any) -> Any:
        from vllm_zipar.serving.http_limits import head_limits_from_env, http_logger, limited_protocol_class

        http = uvicorn_kwargs.get("http", "auto")
        limits = head_limits_from_env(uvicorn_kwargs.get("h11_max_header_count"))
        protocol = None if uvicorn_kwargs.get("http2") else limited_protocol_class(http, limits)
        if protocol is None:
            http_logger().warning("HTTP protocol %r: request head limits are not enforced", http)
        else:
            uvicorn_kwargs["http"] = protocol
            http_logger().info(
                "request heads: at most %d bytes and %d headers, within %g s (%s)",
                limits.max_bytes,
                limits.max_count,
                limits.timeout,
                protocol.__name__,
            )
        return await original(app, *args, **uvicorn_kwargs)

    serve_http._vllm_zipar_patched = True  # type: ignore[attr-defined]
    entry.serve_http = serve_http
