"""The image route's life after start-up: draining on SIGTERM, and noticing that the engine died.

On SIGTERM (a rolling restart) the route stops admitting (503 with `Retry-After` and OpenAI's error body),
lets the images in flight finish for up to the drain time, fails the rest with a clean 503, then stops the
server (SIGINT, or a second SIGTERM, skips the drain). vLLM's stock handler stopped the engine under the open
requests. When the engine core dies the route fails its requests at once and records a non-zero exit status,
which our `vllm` command returns after vLLM's server stops (vLLM itself exits 0 then, so a supervisor would
not restart it).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

from vllm_zipar.serving.images_protocol import ImageAPIError

DEFAULT_DRAIN_SECONDS = 20.0  # fits Kubernetes' default 30 s grace period with vLLM's own shutdown after it
DRAIN_SECONDS_ENV = "VLLM_ZIPAR_DRAIN_TIMEOUT"  # set by `vllm serve --drain-timeout`
ENGINE_POLL_SECONDS = 0.5
ENGINE_DEAD_EXIT_STATUS = 3
# Set when the engine died under this process; `vllm_command.main` exits with it once vLLM returns.
exit_status = 0
# Set once the route stops the server (`quiet_logs` expects the engine's end from then on).
stopping = False


def drain_seconds_from_env(environ: dict[str, str] | None = None) -> float:
    environ = os.environ if environ is None else environ
    return float(environ.get(DRAIN_SECONDS_ENV, DEFAULT_DRAIN_SECONDS))


class RouteLifecycle:
    """Admission, in-flight bookkeeping, drain and engine watch of one server's image route."""

    def __init__(self, engine: Any, log: Any, drain_seconds: float | None = None) -> None:
        self.engine = engine
        self.log = log
        self.drain_seconds = drain_seconds_from_env() if drain_seconds is None else drain_seconds
        self.inflight: set[asyncio.Task] = set()
        self.draining = False
        self.engine_dead = False
        # Requests that got the engine's death as their own error, often before the watcher noticed it.
        self.failed_by_engine_death = 0
        self._drain_deadline = 0.0
        self._drain_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._signals_task: asyncio.Task | None = None
        self._engine_processes: list[Any] = []  # psutil.Process, set by watch_engine
        self.server: Any = None  # uvicorn's, once the signals are ours

    # ---------------------------------------------------------------- admission

    def retry_after(self) -> int:
        """Seconds a refused client should wait: until this replica is gone, at least 1."""
        return max(1, math.ceil(self._drain_deadline - time.monotonic()))

    def refusal(self) -> ImageAPIError | None:
        """Why a new request is refused now (503), or None."""
        if self.engine_dead:
            return ImageAPIError.unavailable("The engine has stopped; this server is exiting.", "engine_dead")
        if self.draining:
            return ImageAPIError.unavailable(
                "The server is shutting down and takes no new requests; retry after the Retry-After seconds "
                "(another replica may take it)."
            )
        return None

    def track(self, task: asyncio.Task) -> None:
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    def cut_off(self, task: asyncio.Task) -> bool:
        """Whether a cancelled task was cancelled by shutdown (not by its client leaving)."""
        return task.cancelled() and (self.draining or self.engine_dead)

    # ---------------------------------------------------------------- signals

    def take_signals(self, state: Any) -> None:
        """SIGTERM and SIGINT come here once vLLM's server runs (`patches/sigterm_drain.py`)."""
        from vllm_zipar.patches import take_over_shutdown_signals

        async def take() -> None:
            self.server = await take_over_shutdown_signals(state, self.on_sigterm, self.on_sigint)

        self._signals_task = asyncio.get_running_loop().create_task(take())

    def on_sigterm(self) -> None:
        """First SIGTERM: drain. A second one: stop now."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain_then_stop())
        else:
            self.stop("second SIGTERM")

    def on_sigint(self) -> None:
        self.stop("SIGINT")

    async def drain_then_stop(self) -> None:
        self.draining = True
        self._drain_deadline = time.monotonic() + self.drain_seconds
        pending = set(self.inflight)
        self.log.info(
            "[shutdown] SIGTERM: draining %d image request(s) for up to %g s; new requests get 503",
            len(pending),
            self.drain_seconds,
        )
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.drain_seconds)
        if pending:
            self.log.info("[shutdown] drain time over: failing %d image request(s)", len(pending))
        self.stop("drained" if not pending else "drain time over")

    def stop(self, reason: str) -> None:
        """Fail what is in flight (503) and stop the HTTP server; vLLM then shuts the engine down."""
        global stopping
        if stopping:
            return
        stopping = True
        self.draining = True
        self.log.info(
            "[shutdown] %s: stopping the server (%d image request(s) failed)", reason, len(self.inflight)
        )
        self._cancel_inflight()
        if self.server is not None:
            self.server.should_exit = True

    def _cancel_inflight(self) -> None:
        for task in list(self.inflight):
            task.cancel()

    # ---------------------------------------------------------------- engine death

    def watch_engine(self) -> None:
        # The engine's processes (engine core, its workers), known while they are our descendants: once the
        # engine core dies its workers are orphans, which vLLM's own parent check ends only seconds later.
        import psutil

        self._engine_processes = [
            child for child in psutil.Process().children(recursive=True) if _is_engine_process(child)
        ]
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    def _kill_engine_leftovers(self) -> None:
        """Kill the dead engine's processes still running (its workers, and what they started, such as a
        kernel build): a supervisor restarting this server finds the cores and memory free."""
        import psutil

        leftovers = []
        for process in self._engine_processes:
            try:
                if process.is_running():  # psutil compares creation times: never a reused pid
                    leftovers += [process, *process.children(recursive=True)]
            except psutil.Error:
                pass
        for process in leftovers:
            try:
                process.kill()
            except psutil.Error:
                pass

    async def _watch(self) -> None:
        global exit_status
        while not self.engine.errored:
            await asyncio.sleep(ENGINE_POLL_SECONDS)
        if stopping:  # we stopped it
            return
        self.engine_dead = True
        exit_status = ENGINE_DEAD_EXIT_STATUS
        self.log.error(
            "the engine core died: %d image request(s) failed (%d already, %d still in flight); the server "
            "exits with status %d",
            self.failed_by_engine_death + len(self.inflight),
            self.failed_by_engine_death,
            len(self.inflight),
            ENGINE_DEAD_EXIT_STATUS,
        )
        self._cancel_inflight()
        self._kill_engine_leftovers()
        if self.server is not None:  # vLLM's watchdog would stop it too, up to 5 s later
            self.server.should_exit = True


def _is_engine_process(process: Any) -> bool:
    """vLLM names its processes `VLLM::EngineCore`, `VLLM::Worker...` (not multiprocessing's resource
    tracker, which cleans up shared memory after us)."""
    import psutil

    try:
        return process.name().startswith("VLLM::")
    except psutil.Error:
        return False
