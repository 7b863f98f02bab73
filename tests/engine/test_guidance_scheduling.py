"""Guided images under vLLM's real scheduling: staggered arrivals of mixed scales and windows, forced
preemption and a small token budget. Its own module: it needs its own engine (see test_guidance.py)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import tiny_model_with_oracle
from tests.engine.staggered import assert_preempted_and_drained, run_staggered
from tests.engine.test_guidance import GRID, reference, request_kwargs
from vllm_zipar.serving.offline import ImageGenerator

pytestmark = pytest.mark.engine

# (window, seed, scale): twelve images mixing NTP and windows, greedy and seeded, scales 1, 2 and 4.
MIXED = [
    (None, None, 2.0),
    (2, 3, 4.0),
    (4, None, 1.0),
    (8, 11, 2.0),
    (2, None, 2.0),
    (None, 7, 4.0),
    (4, 5, 4.0),
    (1, None, 2.0),
    (None, None, 1.0),
    (2, 13, 1.0),
    (8, None, 4.0),
    (4, 17, 2.0),
]


def test_twelve_staggered_mixed_scales_and_windows_under_preemption(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("cfg-preempt")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=GRID)
    # 10 blocks of 32 tokens: a guided 8x8 image needs 5, so at most two run at once and the scheduler
    # must preempt (recompute). A 16-token budget holds the largest guided pass (window 1: 14 tokens) but
    # cuts recomputes into chunks.
    generator = ImageGenerator(
        model_dir,
        max_num_seqs=8,
        block_size=32,
        num_gpu_blocks_override=10,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        disable_log_stats=False,
    )
    requests = [(i % 10, request_kwargs(w, s, c)) for i, (w, s, c) in enumerate(MIXED)]
    with generator:
        finished = run_staggered(generator, requests, every=2, batch=3)
        assert_preempted_and_drained(generator)
    assert sorted(finished) == list(range(12))
    for index, (window, seed, scale) in enumerate(MIXED):
        expected = reference(oracle, index % 10, window, seed=seed, cfg_scale=scale)
        assert torch.equal(finished[index].tokens, expected), (index, window, seed, scale)
