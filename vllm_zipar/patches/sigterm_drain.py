"""SIGTERM and SIGINT in the API server go to the image route's handlers (`serving/lifecycle.py`).

vLLM 0.32's `serve_http` (`vllm/entrypoints/launchers/launcher.py`) installs one handler for SIGINT and
SIGTERM on the event loop: it stops the engine client at once (`--shutdown-timeout 0`) under the open HTTP
requests, which then hung or failed with the engine's own error, or (with a timeout) drains the engine while
new requests get 500 "cannot schedule new futures after shutdown". Endpoint plugins have no shutdown hook, so
once `serve_http` has installed its handlers (it sets `app.state.server` just before) both signals go
to ours. They end the way vLLM's watchdog does on engine death, by setting uvicorn's `should_exit`:
`serve_http` returns and vLLM's engine-client context manager shuts the engine down
(`build_async_engine_client`).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

WRITTEN_FOR = "0.32.0"
POLL_SECONDS = 0.05


async def take_over_shutdown_signals(
    state: Any, on_sigterm: Callable[[], None], on_sigint: Callable[[], None]
) -> Any:
    """Once `serve_http` has installed its signal handlers on this loop, point SIGTERM and SIGINT at ours;
    returns the uvicorn server (`state.server`)."""
    from vllm_zipar.patches import check_vllm_version

    check_vllm_version(__name__, WRITTEN_FOR)
    # `app.state.server` is set in the same synchronous stretch as the handlers; by the time this task
    # runs again after seeing it, `serve_http` is awaiting its server and the handlers are in place.
    while getattr(state, "server", None) is None:
        await asyncio.sleep(POLL_SECONDS)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    return state.server
