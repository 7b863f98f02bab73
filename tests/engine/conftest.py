"""Shared set-up for tests that start vLLM's real engine in-process on tiny random checkpoints."""

from __future__ import annotations

import os

# In-process engine core: ~4 s start instead of ~19 s with worker processes.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TEST_KV_CACHE_BYTES = 64 << 20


def kv_cache_usage(generator) -> float:
    """vLLM's own KV-cache usage gauge (fraction of blocks in use) for an in-process engine."""
    for metric in generator.llm.get_metrics():
        if metric.name == "vllm:kv_cache_usage_perc":
            return float(metric.value)
    raise AssertionError("vLLM reported no vllm:kv_cache_usage_perc metric")
