"""Ray executor on vLLM's CPU platform: Ray actors as CPU workers, one per placement-group bundle.

vLLM 0.32's `RayExecutorV2` knows accelerators only. On the CPU platform three things stop it: the platform
has no `ray_device_key` ("current platform cpu does not support ray"); with one set to `"CPU"`, the actors
would ask Ray for a custom `"CPU"` resource, which Ray refuses (CPUs are its built-in `num_cpus`); and each
actor looks its device ids up in `get_accelerator_ids()`, which has no `"CPU"` key. So: bundles are
`{"CPU": 1}` (one CPU worker each, placed on nodes by Ray as GPU bundles are), actors take `num_gpus=0` and
no custom resource (the bundle index already pins each actor to its node), and a CPU worker reports no
device ids. The worker class is replaced by a subclass defined here: Ray pickles actor classes by
reference, so each actor process imports this module and needs no patch of its own. Before the stock
`initialize_worker` builds the worker, the subclass gives the actor the priority, threads and cores an `mp`
worker gets (`ray_cpu_worker_binding.py`). Importing this module imports Ray; it is imported only when Ray is
installed and the platform is the CPU.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.executor import ray_executor_v2

WRITTEN_FOR = "0.32.0"
CPU_RAY_DEVICE_KEY = "CPU"
STOCK_RAY_WORKER_PROC = ray_executor_v2.RayWorkerProc


class CPURayWorkerProc(STOCK_RAY_WORKER_PROC):
    """vLLM's Ray worker actor, for CPU workers: replaces `RayWorkerProc.get_node_and_physical_gpu_ids`."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        # A CPU worker owns no device ids; the executor only groups them per node.
        return ray.get_runtime_context().get_node_id(), []

    def initialize_worker(
        self,
        local_rank: int,
        env_vars: dict[str, str],
        distributed_init_method: str,
        driver_env_vars: dict[str, str] | None = None,
        assigned_physical_gpu_ids: list[int] | None = None,
    ) -> None:
        """Extends `RayWorkerProc.initialize_worker`: binds the actor first (see the module docstring)."""
        from vllm_zipar.patches import ray_cpu_worker_binding

        # The environment the stock method is about to apply: the driver's values fill in, the node's win.
        env = {**(driver_env_vars or {}), **os.environ, **env_vars}
        spec = env.get("VLLM_CPU_OMP_THREADS_BIND", ray_cpu_worker_binding.AUTO)
        ray_cpu_worker_binding.bind(ray_cpu_worker_binding.node_share(local_rank), spec)
        super().initialize_worker(
            local_rank, env_vars, distributed_init_method, driver_env_vars, assigned_physical_gpu_ids
        )


def cpu_actor_resource_kwargs() -> dict[str, Any]:
    """Replaces `RayExecutorV2._get_actor_resource_kwargs` (the caller already passes `num_cpus=0`)."""
    return {"num_gpus": 0}


def apply() -> None:
    from vllm_zipar.patches import check_vllm_version

    check_vllm_version("ray_cpu_workers", WRITTEN_FOR)
    CpuPlatform.ray_device_key = CPU_RAY_DEVICE_KEY
    ray_executor_v2.RayExecutorV2._get_actor_resource_kwargs = staticmethod(cpu_actor_resource_kwargs)
    ray_executor_v2.RayWorkerProc = CPURayWorkerProc
