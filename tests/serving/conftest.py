"""Shared set-up of the serving tests: a tiny random image model (GPT + small VQ) and a real server."""

from __future__ import annotations

from pathlib import Path

from vllm_zipar.testing.tiny_dirs import TINY_LLAMAGEN_VQ

GRID = 8
TEST_KV_CACHE_BYTES = 64 << 20
# The digits model's VQ shape (2x downsampling): 8x8 tokens -> 16x16 pixels, cheap to decode.
SMALL_VQ = TINY_LLAMAGEN_VQ
SERVER_ARGS = ("--kv-cache-memory-bytes", str(TEST_KV_CACHE_BYTES), "--max-num-seqs", "16")


def write_image_model(model_dir: Path, *, seed: int):
    """Tiny GPT (as tests/engine's TINY) with a small VQ, on an 8x8 grid; returns (config, oracle)."""
    from tests.engine.conftest import tiny_model_with_oracle
    from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig
    from vllm_zipar.testing.llamagen_vq_files import write_random_vq_checkpoint

    config, oracle = tiny_model_with_oracle(
        model_dir, seed=seed, grid_size=GRID, downsample=2, vq_config=SMALL_VQ
    )
    vq_config = LlamaGenVQConfig(**config.vq_config)
    write_random_vq_checkpoint(model_dir / config.vq_checkpoint, vq_config, seed=seed)
    return config, oracle
