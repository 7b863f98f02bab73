"""`ray_cpu_worker_binding.bind` without a cluster: what a Ray CPU worker gets from its node's share and
`VLLM_CPU_OMP_THREADS_BIND`. The cases run in one fresh interpreter (started as Ray starts workers, with
`OMP_NUM_THREADS=1`), since binding changes the process's CPU affinity and torch's thread pool; each case
starts from the interpreter's original affinity. (The Ray cluster test checks the same on real actors.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORES = sorted(os.sched_getaffinity(0))

BIND_EACH = """
import json, os, sys, torch
from vllm_zipar.patches.ray_cpu_worker_binding import NodeShare, bind
original = os.sched_getaffinity(0)
results = []
for rank, workers, cpus, spec in json.loads(sys.argv[1]):
    os.sched_setaffinity(0, original)
    try:
        binding = bind(NodeShare(rank, workers, cpus), spec)
    except ValueError as error:
        results.append({"error": str(error)})
        continue
    results.append({"threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)),
                    "cpus": binding.cpus, "niceness": os.getpriority(os.PRIO_PROCESS, 0)})
print(json.dumps(results))
"""


def bound(*cases: tuple[int, int, float, str]) -> list[dict]:
    """`bind(NodeShare(rank, workers, node_cpus), spec)` for each case: the worker's state after it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", BIND_EACH, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_core_lists_auto_and_nobind_as_mp_workers_get_them():
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    first, last = CORES[0], CORES[-1]
    nobind, listed, whole, auto, auto_capped, auto_shared, mismatched = bound(
        (0, 1, len(CORES), "nobind"),
        (1, 2, 2, f"{first}|{last}"),
        (0, 1, len(CORES), ",".join(map(str, CORES))),
        (0, 1, len(CORES), "auto"),
        (0, 1, 1000, "auto"),
        (0, 4, 1, "auto"),
        (0, 1, 2, "0|1"),
    )
    # nobind: torch keeps the thread count Ray started the worker with.
    assert nobind == {"threads": 1, "affinity": CORES, "cpus": [], "niceness": niceness}
    # A core list per node-local rank: the rank's list, pinned, one thread per core.
    assert listed == {"threads": 1, "affinity": [last], "cpus": [last], "niceness": niceness}
    assert (whole["threads"], whole["affinity"]) == (len(CORES), CORES)
    # auto: the node's Ray CPUs shared among its workers, as threads, not pinned; never more than the cores
    # this process may use, never fewer than one.
    assert (auto["threads"], auto["affinity"], auto["cpus"]) == (len(CORES), CORES, [])
    assert auto_capped["threads"] == len(CORES)
    assert auto_shared["threads"] == 1
    # A list that does not match the node's workers is refused, and the message says what to set where.
    error = mismatched["error"]
    assert "2 core list(s)" in error and "1 worker(s)" in error and "ray start" in error
