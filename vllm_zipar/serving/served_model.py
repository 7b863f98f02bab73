"""A served model as a child process: `vllm serve MODEL_DIR --decoding ...`, ready once it answers `/health`.

`make demo` (`serving/demo.py`, `vllm-zipar demo --serve`) serves through it, which is why it ships in
`serving/`; the server tests, the cluster tests and `benchmarks/serve_load.py` use it too. It runs the
`vllm` console command next to the running Python (ours, see `vllm_command.py`), so what it starts is
exactly what a user types.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vllm_command() -> Path:
    """Our `vllm` console script beside this interpreter; refuses vLLM's own (it has no --decoding)."""
    script = Path(sys.executable).parent / "vllm"
    if not script.is_file() or "vllm_zipar" not in script.read_text(errors="replace"):
        raise RuntimeError(
            f"{script} is not vllm-zipar's `vllm` command; run scripts/install.sh (it rewrites the script "
            "after installing, since vLLM's distribution installs one of the same name)"
        )
    return script


class ServedModel:
    """A `vllm serve` child process on loopback: `with ServedModel(model_dir, ...) as server: server.url`."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        decoding: str = "zipar",
        zipar_window: int | None = 8,
        served_model_name: str | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.url = f"http://{self.host}:{self.port}"
        args = [str(vllm_command()), "serve", str(model_dir), "--decoding", decoding]
        if decoding == "zipar" and zipar_window is not None:
            args += ["--zipar-window", str(zipar_window)]
        if served_model_name is not None:
            args += ["--served-model-name", served_model_name]
        args += ["--host", self.host, "--port", str(self.port), *extra_args]
        self.args = args
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = {**os.environ, **(env or {})}
        # Offline tests and benchmarks run vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0); inherited by a
        # server, it puts the CPU worker in the engine core process without its OpenMP thread binding, and
        # steps got 10-100x slower under load here. The server keeps vLLM's own process layout.
        if env is None or "VLLM_ENABLE_V1_MULTIPROCESSING" not in env:
            self.env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServedModel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        log = open(self.log_path, "w") if self.log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve did not answer /health in {self.start_timeout} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str) -> float:
        """The sum over label sets of one Prometheus sample name on `/metrics`."""
        total, found = 0.0, False
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(f"{name} is not on /metrics")
        return total

    def idle_kv_usage(self, timeout: float = 30.0) -> float:
        """vLLM's KV usage gauge once it settles at zero (engine steps refresh it), or its last value."""
        deadline = time.monotonic() + timeout
        usage = self.metric("vllm:kv_cache_usage_perc")
        while usage != 0.0 and time.monotonic() < deadline:
            time.sleep(0.5)
            usage = self.metric("vllm:kv_cache_usage_perc")
        return usage

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT to the server's process group (vLLM shuts its engine down), then SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGINT)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
