"""Reading a request body within bounds: JSON only (415), at most `max_bytes` (413), within `timeout` (408).

A valid image request is well under 1 KiB; without a bound a 50 MiB prompt was read, parsed and echoed back
in full (4-9 s, blocking the event loop), and a client that stopped sending held its handler forever. A body
announced larger than the limit is refused before a byte of it is read.
"""

from __future__ import annotations

import asyncio
import os

from starlette.requests import ClientDisconnect, Request

from vllm_zipar.serving.images_protocol import ImageAPIError, quote

DEFAULT_MAX_BODY_BYTES = 64 << 10
DEFAULT_BODY_TIMEOUT_SECONDS = 10.0
MAX_BODY_BYTES_ENV = "VLLM_ZIPAR_MAX_REQUEST_BYTES"
BODY_TIMEOUT_ENV = "VLLM_ZIPAR_REQUEST_BODY_TIMEOUT"


class ClientGone(Exception):
    """The client disconnected before its body arrived: nothing to answer."""


def body_limits(environ: dict[str, str] | None = None) -> tuple[int, float]:
    """(max bytes, read timeout in seconds), from our `vllm serve` flags (passed as environment variables)."""
    environ = os.environ if environ is None else environ
    max_bytes = int(environ.get(MAX_BODY_BYTES_ENV, DEFAULT_MAX_BODY_BYTES))
    timeout = float(environ.get(BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT_SECONDS))
    return max_bytes, timeout


def _too_large(max_bytes: int) -> ImageAPIError:
    return ImageAPIError(
        f"The request body is larger than this server's limit of {max_bytes} bytes.",
        code="request_too_large",
        status=413,
    )


def check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return  # curl without -H, some SDKs: the body is parsed as JSON anyway
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ImageAPIError(
            f"Content-Type {quote(content_type)} is not supported: send the body as application/json.",
            code="unsupported_media_type",
            status=415,
        )


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The body, or ImageAPIError (413, 408, 415), or ClientGone."""
    check_content_type(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise ImageAPIError(
            f"The request body did not arrive within {timeout:g} s.", code="request_timeout", status=408
        ) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)
