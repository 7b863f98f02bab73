"""The FlexAttention form of the ZipAR rule (`engine/flex_mask.py`) equals the CPU backend's visibility matrix
(`engine/attention_mask.py`) and the plan's own definition (`zipar.plan.visible`) over real plans, guided
and unguided, written into the buffers as the runner does (several requests, tokens added step by step)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vllm_zipar.engine.attention_mask import ImageKeyMetadata
from vllm_zipar.engine.flex_mask import CAUSAL, ZipARMaskBuffers, zipar_visible
from vllm_zipar.zipar.guidance import image_plan
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import FeedKind, visible

UNCONDITIONAL = 1


def fed_inputs(height: int, width: int, window: int | None, uncond_prompt_len: int | None, seed: int):
    """Every input a plan feeds, in feed order, with random sampled tokens."""
    rng = random.Random(seed)
    layout = GridLayout(prompt_len=1, height=height, width=width)
    plan = image_plan(layout, window, uncond_prompt_len)
    inputs = plan.prefill_inputs([0] * (1 + (uncond_prompt_len or 0)))
    while inputs:
        predicted = [f for f in inputs if f.predicts is not None and f.stream != UNCONDITIONAL]
        plan.record([rng.randrange(16) for _ in predicted])
        inputs = plan.next_inputs()
    return plan.history


def key_metadata(fed) -> ImageKeyMetadata:
    keys = ImageKeyMetadata()
    keys.write(
        0,
        [f.position for f in fed],
        [f.step for f in fed],
        [f.kind is FeedKind.PROXY for f in fed],
        [f.stream for f in fed],
    )
    return keys


def dense_rule(buffers: ZipARMaskBuffers, row: int, length: int) -> np.ndarray:
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    return zipar_visible(buffers, torch.full_like(q, row), q, kv).numpy()


CASES = [
    (8, 8, 1, None),
    (8, 8, 2, None),
    (8, 8, 3, 1),
    (6, 9, 4, 2),
    (5, 7, None, 1),
    (8, 8, 8, None),
    (4, 12, 2, 3),
]


@pytest.mark.parametrize(("height", "width", "window", "uncond"), CASES)
def test_the_flex_rule_equals_the_cpu_mask_and_the_plan(height, width, window, uncond):
    fed = fed_inputs(height, width, window, uncond, seed=height * width)
    keys = key_metadata(fed)
    buffers = ZipARMaskBuffers.allocate(slots=3, tokens=len(fed) + 5, rows=4, device="cpu")
    # Written the way the runner does it: a few tokens per step, into a slot that is not 0.
    start = 0
    while start < len(fed):
        end = min(len(fed), start + random.Random(start).randint(1, 6))
        buffers.write_tokens(
            torch.full((end - start,), 2),
            torch.arange(start, end),
            torch.from_numpy(keys.positions[start:end]),
            torch.from_numpy(keys.steps[start:end]),
            torch.tensor([f.stream for f in fed[start:end]]),
            torch.from_numpy(keys.proxy[start:end]),
        )
        start = end
    buffers.set_batch_slots(torch.tensor([CAUSAL, 2], dtype=torch.int32))
    rule = dense_rule(buffers, 1, len(fed))
    assert np.array_equal(rule, keys.mask(0, len(fed)))
    plan_rule = np.array([[visible(k, q, j, i) for j, k in enumerate(fed)] for i, q in enumerate(fed)])
    assert np.array_equal(rule, plan_rule)
    # vLLM prunes KV blocks that start after a query's logical index: sound only if no query sees a key
    # fed after it. A pass's inputs are in raster order per stream, so none does.
    assert not np.triu(rule, k=1).any()
    # A causal row (slot -1) of the same step sees exactly its earlier tokens.
    assert np.array_equal(dense_rule(buffers, 0, len(fed)), np.tril(np.ones_like(rule)))


def test_a_proxy_is_seen_by_itself_only():
    fed = fed_inputs(8, 8, 2, None, seed=1)
    proxies = [i for i, f in enumerate(fed) if f.kind is FeedKind.PROXY]
    assert proxies
    keys = key_metadata(fed)
    buffers = ZipARMaskBuffers.allocate(slots=1, tokens=len(fed), rows=1, device="cpu")
    buffers.write_tokens(
        torch.zeros(len(fed), dtype=torch.long),
        torch.arange(len(fed)),
        torch.from_numpy(keys.positions),
        torch.from_numpy(keys.steps),
        torch.zeros(len(fed), dtype=torch.long),
        torch.from_numpy(keys.proxy),
    )
    buffers.set_batch_slots(torch.tensor([0], dtype=torch.int32))
    rule = dense_rule(buffers, 0, len(fed))
    for p in proxies:
        assert rule[:, p].sum() == 1 and rule[p, p]
