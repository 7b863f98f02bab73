"""Shared set-up for tests that start vLLM's real engine in-process on tiny random checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

# In-process engine core: ~4 s start instead of ~19 s with worker processes.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TEST_KV_CACHE_BYTES = 64 << 20
# Head dim 32 (the CPU kernel's smallest), 2 layers, 256 codes, 10 classes. Unguided unless a test asks for
# guidance (the model default would be the authors' scale 2.0).
TINY = dict(
    dim=64,
    n_layer=2,
    n_head=2,
    codebook_size=256,
    num_classes=10,
    multiple_of=32,
    sampling_defaults={"cfg_scale": 1.0},
)


def tiny_model_with_oracle(model_dir: Path, *, seed: int, state_dict=None, **overrides):
    """Write a tiny random checkpoint in the authors' format; load it into the reference oracle too.

    `state_dict(config)`, when given, replaces the random weights (still saved in the authors' layout).
    """
    from tests.reference.llamagen_gpt import ReferenceLlamaGenConfig, load_authors_checkpoint
    from vllm_zipar.models.llamagen_checkpoint import save_gpt_checkpoint
    from vllm_zipar.testing.llamagen_dirs import write_random_model_dir

    config = write_random_model_dir(model_dir, with_vq=False, seed=seed, **{**TINY, **overrides})
    if state_dict is not None:
        save_gpt_checkpoint(state_dict(config), model_dir / "gpt.pt", "model", config)
    oracle = load_authors_checkpoint(model_dir / "gpt.pt", ReferenceLlamaGenConfig.matching(config))
    return config, oracle


def kv_cache_usage(generator) -> float:
    """vLLM's own KV-cache usage gauge (fraction of blocks in use) for an in-process engine."""
    for metric in generator.llm.get_metrics():
        if metric.name == "vllm:kv_cache_usage_perc":
            return float(metric.value)
    raise AssertionError("vLLM reported no vllm:kv_cache_usage_perc metric")


def attention_impls(generator) -> list:
    """The attention implementations of every layer of an in-process engine's model."""
    core = generator.llm.llm_engine.engine_core.engine_core
    context = core.vllm_config.compilation_config.static_forward_context
    return [layer.impl for layer in context.values() if hasattr(layer, "impl")]
