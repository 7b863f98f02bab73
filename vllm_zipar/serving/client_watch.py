"""Noticing that an HTTP client left while its images are made, and aborting its engine requests.

Starlette notices a client that left only when a send fails: for a JSON response never before the images
finish, for a stream possibly long after. So both the route and the stream watch the request for its
`http.disconnect` message (the body has been read by then, so it is the only message left) and cancel the
task doing the work, which aborts its engine requests (cancelling `engine_client.generate` aborts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import Request


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only `http.disconnect` is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class AbortOnDisconnect:
    """Cancels `work` once when `request`'s client leaves, and logs it; `stop()` once the work is over.

    `on_gone` runs on the event loop when the disconnect is seen, whatever the handler is doing (Starlette
    may never resume a streaming generator). `abort()` is also the stream's way out when Starlette cancels it.
    """

    def __init__(
        self,
        request: Request,
        work: asyncio.Task,
        log: Any,
        request_id: str,
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        self.work = work
        self.log = log
        self.request_id = request_id
        self.on_gone = on_gone
        self.aborted = False
        self._watcher = asyncio.create_task(until_disconnected(request))
        self._watcher.add_done_callback(self._on_disconnect)

    def abort(self) -> None:
        """The client left: cancel the work (once, and only while it runs)."""
        if not self.aborted and not self.work.done():
            self.aborted = True
            self.log.info("image request %s: client disconnected, aborted", self.request_id)
            self.work.cancel()

    def stop(self) -> None:
        self._watcher.cancel()

    def _on_disconnect(self, watcher: asyncio.Task) -> None:
        if watcher.cancelled():  # stopped: the work ended first
            return
        self.abort()
        if self.on_gone is not None:
            self.on_gone()
