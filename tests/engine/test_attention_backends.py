"""The same engine assertions on every ZipAR attention backend on main, selected with VLLM_ZIPAR_ATTENTION:
vLLM's CPU backend with the compiled masked kernel ("cpu"), and vLLM's FlexAttention backend with the ZipAR
rule as its mask ("flex": the CUDA route, run here through eager FlexAttention). Tokens must equal the
reference decoders for NTP, ZipAR windows 1/2/3/W, guidance, a staggered mixed batch and forced preemption.

The FlexAttention engines get a small KV cache: eager FlexAttention scores every query against the whole
paged cache, so its cost grows with the cache, not with the request.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import attention_impls, kv_cache_usage, tiny_model_with_oracle
from tests.engine.staggered import assert_preempted_and_drained, decoding_kwargs, engine_on, run_staggered
from tests.engine.test_guidance import reference as guided_reference
from tests.engine.test_zipar_engine import SAMPLING, reference
from vllm_zipar.engine.attention import ZipARCPUAttentionImpl
from vllm_zipar.engine.flex_attention import ZipARFlexAttentionImpl

pytestmark = pytest.mark.engine

BACKENDS = ["cpu", "flex"]
IMPLS = {"cpu": ZipARCPUAttentionImpl, "flex": ZipARFlexAttentionImpl}
GRID = 8


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(f"backend-{request.param}")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=GRID)
    generator = engine_on(request.param, model_dir, max_num_seqs=8, kv_cache_memory_bytes=2 << 20)
    yield request.param, generator, oracle
    generator.close()


def test_the_selected_backend_serves_every_layer(engine):
    backend, generator, _ = engine
    impls = attention_impls(generator)
    assert impls and all(type(impl) is IMPLS[backend] for impl in impls)


@pytest.mark.parametrize("window", [None, 1, 2, 3, GRID])
def test_greedy_and_seeded_tokens_and_passes_equal_the_reference(engine, window):
    _, generator, oracle = engine
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    greedy = generator.generate([1, 6], temperature=0.0, **kwargs)
    seeded = generator.generate([3], seeds=[21], **kwargs, **SAMPLING)
    for image in greedy + seeded:
        assert torch.equal(image.tokens, reference(oracle, image.class_label, GRID, window, seed=image.seed))
    passes = {None: 64, 1: 2 * 8 + 6 * 1, 2: 2 * 8 + 6 * 2, 3: 2 * 8 + 6 * 3, GRID: 64}[window]
    assert {image.passes for image in greedy + seeded} == {passes}
    assert kv_cache_usage(generator) == 0.0


@pytest.mark.parametrize("window", [None, 2])
def test_guided_images_equal_the_reference(engine, window):
    _, generator, oracle = engine
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    greedy = generator.generate([5], temperature=0.0, cfg_scale=2.0, **kwargs)[0]
    seeded = generator.generate([7], seeds=[3], cfg_scale=4.0, **kwargs, **SAMPLING)[0]
    assert torch.equal(greedy.tokens, guided_reference(oracle, 5, window, cfg_scale=2.0))
    assert torch.equal(seeded.tokens, guided_reference(oracle, 7, window, seed=3, cfg_scale=4.0))
    assert kv_cache_usage(generator) == 0.0


# (label, window, seed, cfg scale): NTP and windows, greedy and seeded, unguided and guided.
MIXED = [
    (0, None, None, 1.0),
    (1, 1, 3, 1.0),
    (2, 2, None, 2.0),
    (3, 3, 11, 1.0),
    (4, None, 7, 2.0),
    (5, 8, None, 1.0),
    (6, 4, 5, 4.0),
    (7, 2, 17, 1.0),
]


def mixed_requests() -> list[tuple[int, dict]]:
    return [
        (label, dict(cfg_scale=scale, **decoding_kwargs(window, seed, SAMPLING)))
        for label, window, seed, scale in MIXED
    ]


def check(oracle, finished: dict) -> None:
    assert sorted(finished) == list(range(len(MIXED)))
    for index, (label, window, seed, scale) in enumerate(MIXED):
        expected = guided_reference(oracle, label, window, seed=seed, cfg_scale=scale)
        assert torch.equal(finished[index].tokens, expected), MIXED[index]


def test_a_staggered_mixed_batch_equals_the_reference(engine):
    _, generator, oracle = engine
    check(oracle, run_staggered(generator, mixed_requests(), every=3, batch=3))
    assert kv_cache_usage(generator) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_preemption_keeps_every_image_exact(backend, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(f"preempt-{backend}")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=GRID)
    # 10 blocks of 32 tokens: a guided 8x8 image needs 5, so at most two run at once and the scheduler must
    # preempt (recompute) others; a 16-token budget cuts recomputes into chunks (as test_guidance_scheduling).
    generator = engine_on(
        backend,
        model_dir,
        max_num_seqs=6,
        block_size=32,
        num_gpu_blocks_override=10,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
    )
    with generator:
        finished = run_staggered(generator, mixed_requests(), every=2, batch=4)
        assert_preempted_and_drained(generator)
    check(oracle, finished)
