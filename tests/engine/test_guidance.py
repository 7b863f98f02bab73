"""Classifier-free guidance inside vLLM's engine equals the reference decoders, token for token.

A guided image is one vLLM request holding both sequences (see vllm_zipar/zipar/guidance.py), so the
scheduler can never hold one without the other; these tests check the tokens under NTP and ZipAR, mixed
scales and windows, staggered and shuffled arrivals and forced preemption, and vLLM's own block accounting.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine.conftest import TEST_KV_CACHE_BYTES, kv_cache_usage, tiny_model_with_oracle
from tests.engine.staggered import run_staggered, scheduler_of
from tests.reference.decoders import ntp_decode, zipar_decode
from vllm_zipar.serving.offline import ImageGenerator

pytestmark = pytest.mark.engine

GRID = 8
SAMPLING = dict(temperature=1.0, top_k=100, top_p=0.95)
MODES = [None, 2, GRID // 2, GRID]  # NTP, then windows 2, W/2, W


def reference(oracle, label, window, *, seed=None, cfg_scale=1.0, cfg_interval=-1):
    kwargs = dict(
        seed=seed, cfg_scale=cfg_scale, cfg_interval=cfg_interval, **(SAMPLING if seed is not None else {})
    )
    if window is None:
        return ntp_decode(oracle, label, GRID, GRID, **kwargs)[0]
    return zipar_decode(oracle, label, GRID, GRID, window, **kwargs)[0]


def decoding_kwargs(window, seeded: bool, scale, **extra):
    """Keyword arguments of `ImageGenerator.generate` (seeds go separately)."""
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    kwargs.update(SAMPLING if seeded else {"temperature": 0.0})
    return {**kwargs, "cfg_scale": scale, **extra}


def request_kwargs(window, seed, scale, **extra):
    """Keyword arguments of `ImageGenerator.add_request`."""
    return {**decoding_kwargs(window, seed is not None, scale, **extra), "seed": seed}


@pytest.fixture(scope="module")
def grid8(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("cfg8")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=GRID)
    generator = ImageGenerator(
        model_dir, max_num_seqs=16, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, disable_log_stats=False
    )
    yield generator, oracle, model_dir
    generator.close()


@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0])
def test_greedy_and_seeded_guided_tokens_equal_the_reference(grid8, scale):
    generator, oracle, _ = grid8
    for window in MODES:
        greedy = generator.generate([1, 6], **decoding_kwargs(window, False, scale))
        seeded = generator.generate([3, 6], seeds=[21, 4], **decoding_kwargs(window, True, scale))
        for image in greedy + seeded:
            assert image.cfg_scale == scale
            expected = reference(oracle, image.class_label, window, seed=image.seed, cfg_scale=scale)
            assert torch.equal(image.tokens, expected), (window, image)
    assert kv_cache_usage(generator) == 0.0


def test_guidance_changes_the_image(grid8):
    generator, _, _ = grid8
    plain, guided = (generator.generate([2], seeds=[3], **decoding_kwargs(2, True, s))[0] for s in (1.0, 4.0))
    assert (plain.tokens != guided.tokens).sum() > 8
    assert plain.passes == guided.passes == 28  # guidance costs no pass: 2W + (H-2)w


def test_cfg_interval_equals_the_reference(grid8):
    generator, oracle, _ = grid8
    for window, seed in [(2, None), (2, 9), (None, 9)]:
        kwargs = decoding_kwargs(window, seed is not None, 4.0, cfg_interval=5)
        image = generator.generate([4], seeds=[seed], **kwargs)[0]
        expected = reference(oracle, 4, window, seed=seed, cfg_scale=4.0, cfg_interval=5)
        assert torch.equal(image.tokens, expected)
        assert not torch.equal(image.tokens, reference(oracle, 4, window, seed=seed, cfg_scale=4.0))


def engine_request(generator, request_id):
    # vLLM suffixes request ids internally.
    return next(
        r for rid, r in scheduler_of(generator).requests.items() if rid.rsplit("-", 1)[0] == request_id
    )


def test_scale_one_holds_kv_for_one_sequence_and_a_guided_image_for_two(grid8):
    generator, _, _ = grid8
    scheduler = scheduler_of(generator)
    block_size = scheduler.block_size
    generator.add_request("plain", 1, **request_kwargs(4, None, 1.0))
    generator.add_request("guided", 1, **request_kwargs(4, None, 2.0))
    checked = 0
    while generator.has_unfinished_requests():
        generator.step()
        if not any(rid.startswith("plain") for rid in scheduler.requests):
            continue
        plain, guided = engine_request(generator, "plain"), engine_request(generator, "guided")
        assert (plain.num_prompt_tokens, guided.num_prompt_tokens) == (1, 2)
        assert guided.num_computed_tokens == 2 * plain.num_computed_tokens  # both streams, every pass
        for request in (plain, guided):
            (blocks,) = scheduler.kv_cache_manager.get_block_ids(request.request_id)
            assert len(blocks) == math.ceil(request.num_computed_tokens / block_size)
        checked += 1
    assert checked > 30
    assert kv_cache_usage(generator) == 0.0


def copy(entry):
    label, kwargs = entry
    return label, dict(kwargs)


def test_arrival_order_and_company_cannot_change_a_guided_image(grid8):
    """The same guided images alone, then arriving one per step in reverse order with unguided and
    differently guided images arriving between them: every image is identical."""
    generator, oracle, _ = grid8
    guided = [
        (5, request_kwargs(2, 31, 4.0)),
        (0, request_kwargs(None, 32, 2.0)),
        (9, request_kwargs(4, None, 2.0)),
    ]
    alone = [generator.generate([label], seeds=[kw.pop("seed")], **kw)[0] for label, kw in map(copy, guided)]
    others = [
        (1, request_kwargs(2, 40, 1.0)),
        (2, request_kwargs(None, None, 1.0)),
        (3, request_kwargs(1, 41, 4.0)),
    ]
    shuffled = [others[0], guided[2], others[1], guided[1], others[2], guided[0]]
    finished = run_staggered(generator, shuffled, every=1, batch=1)
    for position, original in [(1, 2), (3, 1), (5, 0)]:
        assert torch.equal(finished[position].tokens, alone[original].tokens), (position, original)
    label, kw = guided[0]
    assert torch.equal(alone[0].tokens, reference(oracle, label, 2, seed=31, cfg_scale=4.0))
    assert kv_cache_usage(generator) == 0.0


@pytest.mark.parametrize("scale", [1.3, 3.0, 7.5])
def test_the_one_scale_fast_path_of_the_cfg_combine_is_the_reference_formula_bit_for_bit(scale):
    from vllm_zipar.engine.runner import guided_logits

    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(10, 4096, generator=gen) * 4
    c, u = logits[:5], logits[5:]
    combined = guided_logits(logits, 5, [(k, scale) for k in range(5)])
    assert torch.equal(combined, u + scale * (c - u))
    # Mixed scales (the general path) agree with it row by row.
    mixed = guided_logits(logits, 5, [(k, scale if k % 2 else 2.0) for k in range(5)])
    assert torch.equal(mixed[1::2], combined[1::2])
