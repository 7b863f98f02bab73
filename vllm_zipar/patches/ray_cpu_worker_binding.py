"""A vLLM CPU worker in a Ray actor gets the scheduling an `mp` worker gets: priority, threads, cores.

vLLM 0.32 prepares CPU workers for `mp` only (`OMPProcessManager` sets `OMP_NUM_THREADS` and the OpenMP
core list of each local rank from `VLLM_CPU_OMP_THREADS_BIND` before it spawns them, at the engine's own
priority). A Ray actor gets none of it, and two things Ray does instead make it slow:
- the raylet starts worker processes at niceness 15 (Ray's `worker_niceness`), so a worker that shares a
  core with any ordinary process (another service, the API server, a test) gets ~1/30 of that core: a
  pipeline on a loaded 2-core host ran several times slower than over `mp` (benchmarks/pp_ray_vs_mp.py);
- Ray forces `OMP_NUM_THREADS=1` on an actor that asks for no CPUs (vLLM's actors ask for `num_cpus=0`),
  so a worker on a 32-core node computes on one thread.
`bind()` runs in the actor before the worker is built (before `CPUWorker.init_device` disables
`torch.set_num_threads`): it restores the raylet's priority (the `mp` worker has the engine's), and applies
`VLLM_CPU_OMP_THREADS_BIND` as `mp` does, per node-local rank: a list (`"0-15|16-31"`, one per worker on the
node) binds the rank to its cores with one torch thread each; `auto` (vLLM's default) gives each worker its
share of the node's Ray CPUs (`ray start --num-cpus`) as threads, not pinned to cores (Ray gives CPUs as a
count, not as core ids, and loopback or container "nodes" may share a host); `nobind` leaves torch as
Ray started it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vllm.logger import init_logger

# Under vLLM's logger, so the lines reach the driver with the worker's other log lines.
logger = init_logger("vllm.zipar.ray_cpu_worker_binding")

AUTO = "auto"
NO_BIND = "nobind"


@dataclass(frozen=True)
class NodeShare:
    """What a worker may use on its Ray node: its node-local rank among the node's workers, and the node's
    CPUs as Ray counts them."""

    local_rank: int
    local_workers: int
    node_cpus: float


@dataclass
class Binding:
    """What `bind` set (None: left as it was), logged and returned for inspection."""

    niceness: int | None = None
    torch_threads: int | None = None
    cpus: list[int] = field(default_factory=list)


def node_share(local_rank: int) -> NodeShare:
    """This actor's share of its node, from Ray: the bundles of its placement group on the node (vLLM puts
    one worker per bundle; `VLLM_RAY_BUNDLE_INDICES` picks the bundles used) and the node's CPU resource."""
    import ray
    from ray.util import get_current_placement_group, placement_group_table

    node_id = ray.get_runtime_context().get_node_id()
    group = get_current_placement_group()
    bundles = placement_group_table(group)["bundles_to_node_id"] if group is not None else {}
    chosen = os.environ.get("VLLM_RAY_BUNDLE_INDICES")
    indices = [int(i) for i in chosen.split(",")] if chosen else list(bundles)
    local_workers = max(1, sum(1 for i in indices if bundles.get(i) == node_id))
    node_cpus = next(
        (float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]),
        0.0,
    )
    return NodeShare(local_rank, local_workers, node_cpus)


def cpu_lists(spec: str) -> list[list[int]]:
    """`VLLM_CPU_OMP_THREADS_BIND` as a list of core ids per node-local rank (vLLM's own parser)."""
    from vllm.utils.cpu_resource_utils import parse_id_list

    return [parse_id_list(part) for part in spec.split("|")]


def restore_priority() -> int | None:
    """Every thread of this process to the raylet's (its parent's) niceness, if lower than ours. Linux keeps
    niceness per thread, and Ray's own threads were started at the worker's niceness."""
    try:
        target = os.getpriority(os.PRIO_PROCESS, os.getppid())
    except OSError:
        return None
    if os.getpriority(os.PRIO_PROCESS, 0) <= target:
        return None
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), target)
    except PermissionError:
        logger.warning(
            "This Ray worker runs at niceness %d (Ray's worker_niceness) and may not lower it to its node's "
            "%d: on a busy node it gets a small share of its cores. Start the Ray nodes with "
            "RAY_worker_niceness=%d in `ray start`'s environment.",
            os.getpriority(os.PRIO_PROCESS, 0),
            target,
            target,
        )
        return None
    except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
        pass
    return target


def bind(share: NodeShare, spec: str) -> Binding:
    """Priority, then threads and cores for this worker (`spec`: its `VLLM_CPU_OMP_THREADS_BIND`). Runs on
    the actor's main thread, which runs the model: torch's OpenMP threads, created by it afterwards, inherit
    its priority and its CPU affinity."""
    import torch

    binding = Binding(niceness=restore_priority())
    if spec == NO_BIND:
        pass
    elif spec == AUTO:
        # Ray's count, but never more than the cores this process may run on (a cgroup's cpuset).
        cpus = min(share.node_cpus, len(os.sched_getaffinity(0)))
        binding.torch_threads = max(1, int(cpus // share.local_workers))
    else:
        lists = cpu_lists(spec)
        if len(lists) != share.local_workers:
            raise ValueError(
                f"VLLM_CPU_OMP_THREADS_BIND={spec!r} has {len(lists)} core list(s), but this Ray node runs "
                f"{share.local_workers} worker(s) of the engine: give each node one list per local worker "
                "in `ray start`'s environment (the driver's value only fills in where a node has none)"
            )
        binding.cpus = lists[share.local_rank]
        os.sched_setaffinity(0, binding.cpus)
        binding.torch_threads = len(binding.cpus)
    if binding.torch_threads is not None:
        torch.set_num_threads(binding.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(binding.torch_threads)  # for what reads it later
    logger.info(
        "Ray CPU worker, local rank %d of %d on its node: %s", share.local_rank, share.local_workers, binding
    )
    return binding
