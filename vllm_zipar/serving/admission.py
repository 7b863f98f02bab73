"""Images reach the engine one per turn of the API server's event loop.

Submitting an image (vLLM's `AsyncLLM.generate` up to its first wait: input processing, serialisation, a
ZMQ send) holds the loop for a few milliseconds. A burst of requests made hundreds of images ready at once,
and the loop submitted them all in one stretch before it polled its sockets again: `/health`, `/metrics`
and new connections waited seconds. Behind this FIFO turnstile each submission first yields one turn, so the
loop polls its sockets between any two submissions; the images still go in arrival order.
"""

from __future__ import annotations

import asyncio


class AdmissionTurnstile:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()  # its waiters are woken in arrival order

    async def wait_turn(self) -> None:
        """Return when the caller may submit: the loop has had a turn since the previous submission."""
        async with self._lock:
            await asyncio.sleep(0)
