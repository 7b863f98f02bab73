"""The API server's engine-output task yields to the event loop once per engine message.

vLLM 0.32's `AsyncMPClient._ensure_output_queue_task` runs `process_outputs_socket`, a loop of
`await output_socket.recv_multipart()`, decode, `outputs_queue.put_nowait`. pyzmq resolves a receive at once
when a message is waiting ("recv immediately, if we can", `zmq/_future.py`), and awaiting a finished future
does not yield, so while the engine core's messages queue up the loop never lets another task run; AsyncLLM's
`output_handler` then drains `outputs_queue` the same way (`Queue.get` on a non-empty queue does not yield
either). An image engine steps fast (one message per step: 700+ a second on the CPU test models), so under
load the API server answered `/health`, `/metrics`, new requests and SIGTERM tens of seconds late (py-spy:
the main thread inside `process_outputs_socket` for whole bursts; `/metrics` took up to 37 s), and the
SIGTERM drain test failed.

The loop awaits `getattr(self.__class__, "process_engine_outputs", None)` for every message (vLLM's hook
for the data-parallel load balancer, `DPLBAsyncMPClient`, which keeps its own); this sets it on
`AsyncMPClient` to a coroutine that yields once, so the other tasks run between two engine messages.
"""

from __future__ import annotations

import asyncio
from typing import Any

WRITTEN_FOR = "0.32.0"


async def yield_to_the_loop(client: Any, outputs: Any) -> None:
    """One turn of the event loop between two engine messages."""
    await asyncio.sleep(0)


def apply() -> None:
    from vllm_zipar.patches import check_vllm_version

    check_vllm_version(__name__, WRITTEN_FOR)
    from vllm.v1.engine.core_client import AsyncMPClient

    current = getattr(AsyncMPClient, "process_engine_outputs", None)
    if current is yield_to_the_loop:
        return
    if current is not None:
        raise RuntimeError(
            "vllm_zipar patch engine_output_yield: vLLM's AsyncMPClient has its own process_engine_outputs "
            "now; re-check whether its output task still runs without yielding (patches/README.md)"
        )
    AsyncMPClient.process_engine_outputs = staticmethod(yield_to_the_loop)  # type: ignore[attr-defined]
