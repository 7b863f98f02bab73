"""vLLM adapters: the ZipAR scheduler, worker and runner subclasses, attention backends and sampling."""

from __future__ import annotations

CPU_WORKER_CLS = "vllm_zipar.engine.worker.ZipARCPUWorker"
GPU_WORKER_CLS = "vllm_zipar.engine.worker.ZipARGPUWorker"
SCHEDULER_CLS = "vllm_zipar.engine.scheduler.ZipARScheduler"


def worker_cls_name() -> str:
    """The `worker_cls` engine argument for this machine's platform (a name; nothing heavy is imported)."""
    from vllm.platforms import current_platform

    return CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
