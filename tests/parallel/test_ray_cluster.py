"""Pipeline and tensor parallel over a real two-node Ray cluster on loopback, on CPU.

The module starts `ray start` on 127.0.0.2 (head) and 127.0.0.3 (second node), one CPU each, so vLLM's Ray
executor (`RayExecutorV2`) must place its two workers on different nodes; that is asserted from Ray's
placement-group table and from each node's process tree, not assumed. PP=2 runs in-process through
`vllm.LLM`; TP=2 through `vllm serve ... -tp 2 --distributed-executor-backend ray` and the `openai` client,
which also sees what killing a worker mid-request does. Every token equals TP=1's. The
cluster is stopped afterwards and no process it started may be left.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.parallel.conftest import DECODINGS, TEST_KV_CACHE_BYTES, decode_all
from tests.parallel.ray_cluster import HEAD_IP, NODE_CORES, WORKER_IP, LocalRayCluster
from vllm_zipar.serving.offline import ImageGenerator
from vllm_zipar.serving.served_model import ServedModel

ray = pytest.importorskip("ray", reason="the `ray` extra (scripts/install.sh installs it)")

pytestmark = [pytest.mark.ray, pytest.mark.parallel]

MODEL = "tiny"
SERVER_ARGS = ["--kv-cache-memory-bytes", str(TEST_KV_CACHE_BYTES), "--max-num-seqs", "16"]


@pytest.fixture(scope="module")
def cluster():
    with LocalRayCluster() as cluster:
        yield cluster
    assert cluster.ray_processes() == [], "processes of the test's Ray cluster are still running"


def placement_node_ips() -> list[str]:
    """The node address of every bundle of every live placement group, from Ray's own tables."""
    node_ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
    ips = []
    for table in ray.util.placement_group_table().values():
        if table["state"] == "CREATED":
            ips += [node_ips[node_id] for node_id in table["bundles_to_node_id"].values()]
    return sorted(ips)


def assert_one_worker_per_node(cluster: LocalRayCluster) -> dict[str, int]:
    assert placement_node_ips() == [HEAD_IP, WORKER_IP]
    workers = cluster.worker_processes()
    assert {ip: len(procs) for ip, procs in workers.items()} == {HEAD_IP: 1, WORKER_IP: 1}
    return {ip: procs[0].pid for ip, procs in workers.items()}


def worker_threads(_worker=None) -> tuple[str, int]:
    """Run in each worker (collective_rpc): its node address and torch's thread count."""
    return ray.util.get_node_ip_address(), torch.get_num_threads()


def assert_bound_like_mp_workers(cluster: LocalRayCluster, generator=None) -> None:
    """Each worker runs at its node's priority (Ray starts workers at niceness 15), on its node's core
    (`NODE_CORES`, the node's `VLLM_CPU_OMP_THREADS_BIND`) with one torch thread, as an `mp` worker would."""
    for ip, (process,) in cluster.worker_processes().items():
        assert process.nice() == process.parent().nice(), f"{ip}: niceness {process.nice()}"
        assert process.cpu_affinity() == [int(NODE_CORES[ip])], f"{ip}: affinity {process.cpu_affinity()}"
    if generator is not None:
        assert sorted(generator.llm.collective_rpc(worker_threads)) == [(HEAD_IP, 1), (WORKER_IP, 1)]


@pytest.mark.timeout(1200)
def test_pp2_on_two_ray_nodes_equals_tp1(cluster, parallel_model):
    ray.init(address=cluster.address)
    try:
        generator = ImageGenerator(
            parallel_model.model_dir,
            pipeline_parallel_size=2,
            distributed_executor_backend="ray",
            max_num_seqs=16,
            kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
        )
        try:
            assert_one_worker_per_node(cluster)
            assert_bound_like_mp_workers(cluster, generator)
            images = decode_all(generator)
            assert parallel_model.mismatches(images) == {}
        finally:
            generator.close()
    finally:
        ray.shutdown()
    assert cluster.worker_processes() == {HEAD_IP: [], WORKER_IP: []}


@pytest.mark.timeout(1500)
def test_vllm_serve_tp2_on_two_ray_nodes(cluster, parallel_model, tmp_path):
    from openai import APIConnectionError, InternalServerError, OpenAI

    server = ServedModel(
        parallel_model.model_dir,
        zipar_window=8,
        served_model_name=MODEL,
        extra_args=["-tp", "2", "--distributed-executor-backend", "ray", *SERVER_ARGS],
        env={"RAY_ADDRESS": cluster.address},
        log_path=tmp_path / "server.log",
        start_timeout=900,
    )
    with server:
        ray.init(address=cluster.address)
        try:
            pids = assert_one_worker_per_node(cluster)
            assert_bound_like_mp_workers(cluster)
        finally:
            ray.shutdown()
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def generate(decoding):
            result = client.images.generate(
                model=MODEL, prompt=str(decoding.label), n=1, extra_body=decoding.request_body()
            )
            return torch.tensor(result.data[0].model_extra["tokens"])

        with ThreadPoolExecutor(len(DECODINGS)) as pool:
            tokens = dict(zip(DECODINGS, pool.map(generate, DECODINGS), strict=True))
        assert parallel_model.mismatches(tokens) == {}, server.log_tail()

        # A worker dies mid-request: the client gets an error, bounded in time, not a hang.
        long_request = {"decoding": "ntp", "temperature": 0.0, "return_tokens": True}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                client.images.generate, model=MODEL, prompt="3", n=4, extra_body=long_request
            )
            deadline = time.monotonic() + 300
            while server.metric("vllm:num_requests_running") < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not pending.done()
            os.kill(pids[WORKER_IP], signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises((InternalServerError, APIConnectionError)) as failure:
                pending.result(timeout=300)
            waited = time.monotonic() - killed_at
        print(f"worker killed: client error after {waited:.1f} s: {failure.value!r}")
        if isinstance(failure.value, InternalServerError):
            # A dead worker is a dead engine: the route's engine-death answer (docs/serving.md).
            assert failure.value.status_code == 503 and failure.value.body["code"] == "engine_dead"
        # What the server does next (documented in docs/multinode.md): vLLM treats a dead worker as a
        # dead engine and the API server exits (status 3, as for a dead engine core) rather than serve
        # from a broken executor.
        deadline = time.monotonic() + 120
        while server.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        print("server after the kill:", server.process.poll(), server.log_tail(1500))
        assert server.process.poll() is not None, "the server kept running with a dead worker"
        assert server.process.poll() == 3, "a supervisor must see the engine's death as a failure"
