"""Our SIGTERM handler replaces uvicorn's, whichever task runs first (`patches/sigterm_drain.py`).

uvicorn's `serve()` puts its own `handle_exit` on SIGTERM when its task first runs. Installed before that,
our loop handler ran together with uvicorn's, which closed the listening socket at once: a request arriving
during the drain was refused (seen once in a fresh-clone CI run) instead of getting 503. Here our take-over
task is made to run before uvicorn's first step; the scenario runs in a child process, since uvicorn
re-raises a signal it caught when it returns."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCENARIO = textwrap.dedent(
    """
    import asyncio, os, signal, types
    import uvicorn
    from vllm_zipar.patches.sigterm_drain import take_over_shutdown_signals

    async def app(scope, receive, send):
        pass

    async def main():
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        state = types.SimpleNamespace(server=server)  # set before serve() runs, as vllm's serve_http does
        ours = []
        take = take_over_shutdown_signals(state, lambda: ours.append("TERM"), lambda: None)
        taking = asyncio.create_task(take)  # first in the queue: before uvicorn's first step
        serving = asyncio.create_task(server.serve())
        await taking
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.5)
        print("ours", ours, "uvicorn_should_exit", server.should_exit, flush=True)
        server.should_exit = True
        await serving

    asyncio.run(main())
    """
)


def test_our_sigterm_handler_replaces_uvicorns_whichever_starts_first():
    done = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, timeout=120)
    assert "ours ['TERM'] uvicorn_should_exit False" in done.stdout, (
        done.returncode,
        done.stdout,
        done.stderr[-2000:],
    )
    assert done.returncode == 0, done.stderr[-2000:]
