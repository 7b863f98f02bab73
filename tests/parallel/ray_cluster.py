"""A real two-node Ray cluster on loopback addresses, started and stopped by the tests.

Two `ray start --block` processes on this host, a head on 127.0.0.2 and a worker node on 127.0.0.3, one CPU
each, so that Ray places a two-worker vLLM engine on both nodes; each node's workers are bound to "its" core
(`VLLM_CPU_OMP_THREADS_BIND`: 0 on the head, 1 on the other), as an `mp` engine's two workers would be with
`"0|1"`, since both nodes share this host's cores. 127.0.0.1 is avoided because Ray rewrites
it to the host's primary address (traffic would leave loopback). `stop()` ends only what it started: the two
`ray start` processes and every process below them, by pid, and then checks that none is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"
NODE_START_ATTEMPTS = 3
OBJECT_STORE_BYTES = 200 << 20  # vLLM passes its messages outside Ray's object store; keep /dev/shm free
NODE_CORES = {HEAD_IP: "0", WORKER_IP: "1"}


class NodeStartFailed(RuntimeError):
    pass


def ray_command() -> str:
    return str(Path(sys.executable).parent / "ray")


class LocalRayCluster:
    """`with LocalRayCluster() as cluster: cluster.address` (`HEAD_IP:port`)."""

    def __init__(self, *, node_env: dict[str, str] | None = None, start_timeout: float = 180.0) -> None:
        from vllm_zipar.serving.served_model import free_port

        self.port = free_port(HEAD_IP)
        self.address = f"{HEAD_IP}:{self.port}"
        # Unix socket paths must stay short: a fresh directory right under /tmp.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="zr", dir="/tmp"))
        # Each worker actor inherits its raylet's environment; one OpenMP thread per worker (one CPU each).
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **(node_env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # set per node in `_node`
        self.start_timeout = start_timeout
        self.processes: list[subprocess.Popen] = []
        self.started: set[int] = set()  # every pid this cluster started, for `stop` and the leak check
        self.below: dict[int, set[int]] = {}  # each `ray start` process's descendants

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _node(self, *args: str, name: str, ip: str) -> None:
        log = open(self.temp_dir / f"{name}.log", "w")  # noqa: SIM115
        common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES)]
        common += ["--block", "--disable-usage-stats"]
        process = subprocess.Popen(
            [ray_command(), "start", *args, *common],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, "VLLM_CPU_OMP_THREADS_BIND": NODE_CORES[ip]},
            start_new_session=True,
        )
        self.processes.append(process)

    def start(self) -> None:
        import ray

        head = ["--head", "--node-ip-address", HEAD_IP, "--temp-dir", str(self.temp_dir)]
        head += ["--include-dashboard", "false"]
        self._start_node(
            lambda: self._node(*head, "--port", str(self.port), name="head", ip=HEAD_IP), 1, "the head node"
        )
        worker = ["--address", self.address, "--node-ip-address", WORKER_IP]
        self._start_node(lambda: self._node(*worker, name="worker", ip=WORKER_IP), 2, "the second node")
        assert not ray.is_initialized()

    def _start_node(self, launch, nodes: int, what: str) -> None:
        # Ray gives a starting raylet 30 s (hard-coded) to register with the GCS, which a loaded machine can
        # miss: a node whose `ray start` fails is started again, after its processes are ended by pid.
        for attempt in range(NODE_START_ATTEMPTS):
            launch()
            try:
                self._wait(lambda: self._alive_nodes() >= nodes, what)
                return
            except NodeStartFailed:
                if attempt == NODE_START_ATTEMPTS - 1:
                    raise
                failed = self.processes.pop()
                self._end(self.below.pop(failed.pid, set()))
                if nodes == 1:
                    from vllm_zipar.serving.served_model import free_port

                    self.port = free_port(HEAD_IP)
                    self.address = f"{HEAD_IP}:{self.port}"

    def _alive_nodes(self) -> int:
        self._remember_processes()
        for process in self.processes:
            if process.poll() is not None:
                raise NodeStartFailed(f"`ray start` exited with {process.returncode}: {self.log_tail()}")
        result = subprocess.run(
            [ray_command(), "status", "--address", self.address],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        return result.stdout.count("node_") if result.returncode == 0 else 0

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if ready():
                self._remember_processes()
                return
            time.sleep(1.0)
        raise TimeoutError(f"Ray did not start {what} in {self.start_timeout} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted(self.temp_dir.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)

    def _remember_processes(self) -> None:
        for process in self.processes:
            try:
                below = {child.pid for child in psutil.Process(process.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                continue
            self.below.setdefault(process.pid, set()).update(below)
            self.started |= {process.pid, *below}

    @staticmethod
    def _end(pids: set[int]) -> None:
        processes = []
        for pid in pids:
            try:
                processes.append(psutil.Process(pid))
                processes[-1].kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=10)

    def ray_processes(self) -> list[psutil.Process]:
        """Live processes this cluster started (its `ray start` processes and everything below them)."""
        self._remember_processes()
        alive = []
        for pid in self.started:
            try:
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        return alive

    def worker_processes(self) -> dict[str, list[psutil.Process]]:
        """vLLM's Ray worker actors per node address: each is a child of its node's raylet, whose command
        line names the node (`--node_ip_address`)."""
        found: dict[str, list[psutil.Process]] = {HEAD_IP: [], WORKER_IP: []}
        for process in self.ray_processes():
            try:
                if "RayWorkerProc" not in " ".join(process.cmdline()):
                    continue
                raylet = process.parent().cmdline()
            except (psutil.NoSuchProcess, AttributeError):
                continue
            ips = [arg.split("=", 1)[1] for arg in raylet if arg.startswith("--node_ip_address=")]
            found.setdefault(ips[0] if ips else "?", []).append(process)
        return found

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to each `ray start --block` (it stops its node), SIGKILL what is left, by pid."""
        self._remember_processes()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while (left := self.ray_processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # the session's logs and sockets
