"""Exact drafts (`zipar_drafts: L`, docs/exact_drafts.md) in vLLM's engine, on both attention backends.

For L in {1, 2, 4} the tokens must equal the reference decoders' ZipAR-w (NTP for w >= W), greedy and
seeded, guided and not, alone, in a staggered batch mixed with L = 0 images, and under forced preemption;
passes never exceed ZipAR-w's; every KV block comes back. The drafts must do something (some accepted, some
superseded, some image in fewer passes), and a wrong finality rule must change tokens: the tests can fail.

The engines get `max_model_len` 1024 (the tiny LlamaGen's own is 162): a draft image's KV sequence holds
its superseded tokens too. One test keeps a tight cap and checks that the scheduler cuts drafts to fit it
rather than end the request or change a token.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import kv_cache_usage, tiny_model_with_oracle
from tests.engine.staggered import assert_preempted_and_drained, decoding_kwargs, engine_on, run_staggered
from tests.engine.test_guidance import reference as guided_reference
from tests.engine.test_zipar_engine import SAMPLING
from vllm_zipar.serving.engine_args import draft_headroom
from vllm_zipar.zipar.draft_plan import DraftPlan
from vllm_zipar.zipar.plan import zipar_steps

pytestmark = pytest.mark.engine

BACKENDS = ["cpu", "flex"]
GRID = 8
LONG = 1024
LONG_ENGINE = dict(max_model_len=LONG, hf_overrides={"max_position_embeddings": LONG})


def zipar_passes(window: int | None) -> int:
    return zipar_steps(GRID, GRID, window, False)


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(f"drafts-{request.param}")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=GRID)
    generator = engine_on(
        request.param, model_dir, max_num_seqs=8, kv_cache_memory_bytes=2 << 20, **LONG_ENGINE
    )
    yield request.param, generator, oracle
    generator.close()


def check_image(image, oracle, window, drafts, *, scale=1.0) -> None:
    expected = guided_reference(oracle, image.class_label, window, seed=image.seed, cfg_scale=scale)
    assert torch.equal(image.tokens, expected), (window, drafts, image.seed, scale)
    stats = image.stats
    assert stats.drafts == drafts and stats.passes == image.passes <= zipar_passes(window)
    assert sum(stats.cells_per_pass) == GRID * GRID
    assert stats.fed >= stats.draft_tokens >= stats.accepted
    assert stats.superseded <= stats.fed


def decode_together(generator, requests: list[tuple[int, dict]]) -> list:
    """The images of `requests` (label, kwargs), submitted at once: one batch, half the engine steps."""
    finished = run_staggered(generator, requests, every=1, batch=len(requests))
    return [finished[index] for index in range(len(requests))]


# (window, drafts): NTP, windows below the width and the window of the width, with L = 1, 2, 4. Eager
# FlexAttention is slow on the CPU, so it runs the cases marked FLEX (every window, every L once).
UNGUIDED = [(None, 1), (None, 2), (None, 4), (2, 1), (2, 2), (2, 4), (3, 2), (GRID, 4)]
FLEX = {(None, 2), (2, 1), (2, 4), (GRID, 4)}


@pytest.mark.parametrize(("window", "drafts"), UNGUIDED)
def test_greedy_and_seeded_tokens_equal_zipar_in_no_more_passes(engine, window, drafts):
    backend, generator, oracle = engine
    if backend == "flex" and (window, drafts) not in FLEX:
        pytest.skip("the CPU backend runs this case; FlexAttention runs a subset (eager, slow on the CPU)")
    kwargs = dict(
        zipar_drafts=drafts, **({"decoding": "ntp"} if window is None else {"zipar_window": window})
    )
    images = decode_together(
        generator, [(1, dict(temperature=0.0, **kwargs)), (3, dict(seed=21, **kwargs, **SAMPLING))]
    )
    for image in images:
        check_image(image, oracle, window, drafts)
    assert kv_cache_usage(generator) == 0.0


def test_the_drafts_do_something(engine):
    """Seeded NTP with L = 4 on the tiny model: some guesses are right (fewer passes than NTP's 64), the
    wrong ones are superseded (dead KV slots), and L = 0 is plain ZipAR (no drafts, the same passes)."""
    _, generator, oracle = engine
    before = {name: counter(generator, name) for name in COUNTERS}
    image, plain = decode_together(
        generator,
        [(3, dict(seed=21, decoding="ntp", zipar_drafts=n, **SAMPLING)) for n in (4, 0)],
    )
    assert torch.equal(image.tokens, plain.tokens)
    assert image.passes < plain.passes == zipar_passes(None)
    assert image.stats.accepted > 0 and image.stats.superseded > 0
    assert max(image.cells_per_pass) > 1  # a pass that settled several cells of the one NTP chain
    assert plain.stats.drafts == plain.stats.fed == 0 and plain.cells_per_pass == [1] * (GRID * GRID)
    # The front-end's Prometheus counters took this image's draft stats (the plain one adds nothing).
    stats = image.stats
    expected = (stats.fed, stats.draft_tokens, stats.accepted, stats.superseded)
    assert tuple(counter(generator, name) - before[name] for name in COUNTERS) == expected


COUNTERS = (
    "vllm:zipar_draft_images_fed_tokens",
    "vllm:zipar_draft_tokens",
    "vllm:zipar_draft_tokens_accepted",
    "vllm:zipar_superseded_kv_slots",
)


def counter(generator, name: str) -> float:
    """A Prometheus counter of the front-end for NTP images (0 before its first increment)."""
    return sum(
        metric.value
        for metric in generator.llm.get_metrics()
        if metric.name in (name, f"{name}_total") and metric.labels.get("decoding") == "ntp"
    )


@pytest.mark.parametrize(("window", "drafts"), [(None, 2), (2, 1), (2, 4)])
def test_guided_images_equal_zipar(engine, window, drafts):
    _, generator, oracle = engine
    kwargs = dict(
        zipar_drafts=drafts, **({"decoding": "ntp"} if window is None else {"zipar_window": window})
    )
    greedy, seeded = decode_together(
        generator,
        [
            (5, dict(temperature=0.0, cfg_scale=2.0, **kwargs)),
            (7, dict(seed=3, cfg_scale=4.0, **kwargs, **SAMPLING)),
        ],
    )
    check_image(greedy, oracle, window, drafts, scale=2.0)
    check_image(seeded, oracle, window, drafts, scale=4.0)
    assert kv_cache_usage(generator) == 0.0


# (label, window, seed, cfg scale, drafts): L = 0 beside L > 0, NTP and windows, greedy and seeded, guided.
MIXED = [
    (0, None, None, 1.0, 2),
    (1, 1, 3, 1.0, 0),
    (2, 2, None, 2.0, 4),
    (3, 3, 11, 1.0, 1),
    (4, None, 7, 2.0, 0),
    (5, GRID, None, 1.0, 4),
    (6, 4, 5, 4.0, 2),
    (7, 2, 17, 1.0, 0),
    (8, None, 9, 1.0, 4),
]


def mixed_requests() -> list[tuple[int, dict]]:
    return [
        (label, dict(cfg_scale=scale, zipar_drafts=drafts, **decoding_kwargs(window, seed, SAMPLING)))
        for label, window, seed, scale, drafts in MIXED
    ]


def check_mixed(oracle, finished: dict) -> None:
    assert sorted(finished) == list(range(len(MIXED)))
    for index, (_, window, _, scale, drafts) in enumerate(MIXED):
        check_image(finished[index], oracle, window, drafts, scale=scale)


def test_a_staggered_batch_mixing_drafts_and_plain_zipar_equals_zipar(engine):
    _, generator, oracle = engine
    check_mixed(oracle, run_staggered(generator, mixed_requests(), every=3, batch=3))
    assert kv_cache_usage(generator) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_preemption_keeps_draft_images_exact(backend, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(f"drafts-preempt-{backend}")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=GRID)
    # 12 blocks of 32 tokens: one draft image can take most of them, so the scheduler must preempt
    # (recompute) others; a 16-token budget cuts recomputes into chunks and drafts to fit a pass.
    generator = engine_on(
        backend,
        model_dir,
        max_num_seqs=6,
        block_size=32,
        num_gpu_blocks_override=12,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        max_model_len=352,  # 11 of the 12 blocks: vLLM keeps one back
        hf_overrides={"max_position_embeddings": 352},
    )
    with generator:
        finished = run_staggered(generator, mixed_requests(), every=2, batch=4)
        assert_preempted_and_drained(generator)
    check_mixed(oracle, finished)


def test_a_tight_sequence_cap_cuts_drafts_not_tokens(tmp_path_factory):
    """The tiny model's own max_model_len (162) leaves a guided ZipAR-2 image ~20 slots for drafts: the
    scheduler feeds fewer guesses, and the image still finishes with ZipAR's tokens."""
    model_dir = tmp_path_factory.mktemp("drafts-tight")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=GRID)
    with engine_on("cpu", model_dir, max_num_seqs=4, kv_cache_memory_bytes=2 << 20) as generator:
        cap = generator.llm.llm_engine.vllm_config.model_config.max_model_len
        tight = generator.generate([2], seeds=[4], zipar_window=2, cfg_scale=2.0, zipar_drafts=8, **SAMPLING)
        check_image(tight[0], oracle, 2, 8, scale=2.0)
        assert 2 * tight[0].stats.fed + 2 <= cap - 1
        unguided = generator.generate([2], seeds=[4], decoding="ntp", zipar_drafts=8, **SAMPLING)
        check_image(unguided[0], oracle, None, 8)
        assert kv_cache_usage(generator) == 0.0


def test_a_wrong_finality_rule_changes_tokens(engine, monkeypatch):
    """Call a token's keys and values final as soon as its value is, although its context held a guess (a
    row's first token reading the drafts the row above feeds in the same pass): the engine then accepts
    outputs computed from wrong keys, and the tokens are no longer ZipAR-4's. (Under NTP the one chain
    never reads a guess before its own value is a guess, so the rule only bites with rows in parallel.)"""
    _, generator, oracle = engine
    monkeypatch.setattr(DraftPlan, "_context_final", lambda self, index: True)
    kwargs = dict(zipar_window=4, zipar_drafts=4, **SAMPLING)
    images = decode_together(
        generator, [(label, dict(seed=seed, **kwargs)) for label, seed in [(1, 21), (3, 5), (6, 8)]]
    )
    wrong = [
        not torch.equal(image.tokens, guided_reference(oracle, image.class_label, 4, seed=image.seed))
        for image in images
    ]
    assert any(wrong)
    assert kv_cache_usage(generator) == 0.0


def test_an_engine_serving_drafts_by_default_gets_room_for_them(tmp_path_factory):
    """`ImageGenerator(zipar_drafts=L)` with no max_model_len: the family's 162 (plain ZipAR's guided
    sequence) is raised by `draft_headroom`, so a guided seeded NTP image feeds more than 162 tokens of
    guesses and keeps NTP's tokens in fewer passes (with 162 the drafts were cut to ~20 slots)."""
    model_dir = tmp_path_factory.mktemp("drafts-default")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=GRID)
    with engine_on(
        "cpu", model_dir, decoding="ntp", zipar_drafts=4, max_num_seqs=4, kv_cache_memory_bytes=2 << 20
    ) as generator:
        cap = generator.llm.llm_engine.vllm_config.model_config.max_model_len
        assert cap == generator.model.max_model_len() + draft_headroom(generator.model, 4) > 162
        (image,) = generator.generate([3], seeds=[21], cfg_scale=2.0, **SAMPLING)
        check_image(image, oracle, None, 4, scale=2.0)
        assert 2 * image.stats.fed > 162 and image.passes < zipar_passes(None)
        # A request asking for L = 0 on this engine is plain NTP, not the engine's default drafts.
        (plain,) = generator.generate([3], seeds=[21], cfg_scale=2.0, zipar_drafts=0, **SAMPLING)
        assert torch.equal(plain.tokens, image.tokens)
        assert plain.stats.drafts == plain.stats.fed == 0 and plain.passes == zipar_passes(None)
        assert kv_cache_usage(generator) == 0.0
