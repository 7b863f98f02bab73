"""Lumina-mGPT ZipAR through vLLM's real engine equals the independent EOL-grid oracle, on both backends.

The tiny directory is Lumina's on-disk format (`vllm_zipar/testing/lumina_dirs.py`); the oracle is the plain
torch re-implementation of Lumina's decoder (tests/reference/lumina_model.py) driven by the EOL-grid decoders
(tests/reference/lumina_decoders.py): the prompt, the forced `[BOI, h, w]`, rows of image tokens sampled
through `vocabulary_map` ids with an EOL each, and guidance against Lumina's unconditional context (`[BOI, h,
w]` from position 0, no text). ZipAR windows 1/2/3/W, greedy and seeded, guided and not, at square and
non-square sizes, equal the oracle token for token with the closed-form pass counts `(H-1)*w + W`; a mixed
staggered batch of sizes, windows and guidance, and a forced preemption, stay exact. NTP against transformers'
Chameleon modules is tests/models/test_lumina_model.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.conftest import kv_cache_usage
from tests.engine.staggered import (
    PREEMPTING_ENGINE,
    assert_preempted_and_drained,
    decoding_kwargs,
    engine_on,
    run_staggered,
)
from tests.reference.lumina_decoders import lumina_zipar_decode
from tests.reference.lumina_model import LuminaImageIds, ReferenceLumina
from vllm_zipar.serving.offline import ImageGenerator
from vllm_zipar.testing.lumina_dirs import write_tiny_lumina_dir
from vllm_zipar.zipar.plan import zipar_steps

pytestmark = pytest.mark.engine

BACKENDS = ["cpu", "flex"]
SAMPLING = dict(temperature=1.0, top_k=20, top_p=0.95)
# The tiny directory's native 128x128 (an 8x8 grid of 16-pixel codes) and two of Lumina's crop sizes at
# that area.
SIZES = {"128x128": (8, 8), "160x96": (6, 10), "96x160": (10, 6)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_lumina_dir(tmp_path_factory.mktemp("lumina") / "tiny-lumina", seed=3)


@pytest.fixture(scope="module")
def oracle(model_dir):
    vocabulary_map = json.loads((model_dir / "config.json").read_text())["vocabulary_map"]
    return ReferenceLumina.from_dir(model_dir), LuminaImageIds.from_vocabulary_map(vocabulary_map)


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, model_dir):
    generator = engine_on(request.param, model_dir, max_num_seqs=8, kv_cache_memory_bytes=4 << 20)
    yield generator
    generator.close()


def expected(generator: ImageGenerator, oracle, prompt: str, size: str, window, *, scale=1.0, seed=None):
    """The oracle's (grid of vocabulary ids, passes) for one request as the engine got it."""
    reference, ids = oracle
    model = generator.model
    chosen = model.size(size)
    prompt_ids = model.prompt_ids(prompt, chosen)
    # The adapter's prompt ends with the forced [BOI, h, w]; the oracle adds them itself (and checks them).
    assert prompt_ids[-3:] == ids.image_prefix(*chosen.grid)
    if scale != 1.0:
        assert model.unconditional_prompt_ids(None, chosen, prompt_ids) == ids.image_prefix(*chosen.grid)
    rows, cols = SIZES[size]
    sampling = dict(seed=seed, **SAMPLING) if seed is not None else dict(temperature=0.0)
    return lumina_zipar_decode(
        reference, prompt_ids[:-3], rows, cols, window or cols, ids, cfg_scale=scale, **sampling
    )


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_zipar_greedy_and_seeded_equal_the_oracle(engine, oracle, window):
    size, (rows, cols) = "160x96", SIZES["160x96"]
    greedy = engine.generate(["a red cat"], size=size, zipar_window=window, temperature=0.0, cfg_scale=1.0)[0]
    seeded = engine.generate(
        ["a blue dog"], size=size, zipar_window=window, seeds=[7], cfg_scale=3.0, **SAMPLING
    )[0]
    grid, passes = expected(engine, oracle, "a red cat", size, window)
    assert torch.equal(greedy.tokens, grid)
    assert len(set(greedy.tokens.flatten().tolist())) > 8  # not collapsed to a few codes
    grid, _ = expected(engine, oracle, "a blue dog", size, window, scale=3.0, seed=7)
    assert torch.equal(seeded.tokens, grid)
    assert seeded.stats.uncond_prompt_len == 3  # Lumina's unconditional context: [BOI, h, w]
    closed_form = zipar_steps(rows, cols, window, eol=True)
    assert greedy.passes == seeded.passes == passes == closed_form
    assert closed_form == (rows * cols if window >= cols else (rows - 1) * window + cols)
    assert kv_cache_usage(engine) == 0.0


def test_the_default_guidance_is_lumina_s_and_equals_the_oracle(engine, oracle):
    # No cfg_scale, top-k or temperature given: the family defaults (CFG 4, image top-k 2000, temperature 1).
    (image,) = engine.generate(["a red cat"], size="96x160", zipar_window=2, seeds=[5])
    assert image.cfg_scale == 4.0
    reference, ids = oracle
    prompt_ids = engine.model.prompt_ids("a red cat", engine.model.size("96x160"))
    grid, passes = lumina_zipar_decode(
        reference, prompt_ids[:-3], 10, 6, 2, ids, cfg_scale=4.0, temperature=1.0, top_k=2000, seed=5
    )
    assert torch.equal(image.tokens, grid) and image.passes == passes


def test_window_of_the_width_equals_ntp(engine):
    kwargs = dict(size="128x128", seeds=[5], cfg_scale=3.0, **SAMPLING)
    ntp = engine.generate(["a red cat"], decoding="ntp", **kwargs)
    wide = engine.generate(["a red cat"], zipar_window=8, **kwargs)
    assert torch.equal(ntp[0].tokens, wide[0].tokens)
    assert ntp[0].passes == wide[0].passes == 64


# (prompt, size, window, seed, cfg scale): sizes, NTP and windows, greedy and seeded, guided and not.
MIXED = [
    ("a red cat", "128x128", None, None, 1.0),
    ("a blue dog", "160x96", 2, 3, 1.0),
    ("a red cat", "96x160", 1, None, 4.0),
    ("a small house", "128x128", 3, 11, 2.0),
    ("a blue dog", "96x160", None, 7, 4.0),
    ("a red house", "160x96", 4, None, 1.0),
]


def mixed_requests() -> list[tuple[str, dict]]:
    return [
        (prompt, dict(size=size, cfg_scale=scale, **decoding_kwargs(window, seed, SAMPLING)))
        for prompt, size, window, seed, scale in MIXED
    ]


def check_mixed(generator: ImageGenerator, oracle, finished: dict) -> None:
    assert sorted(finished) == list(range(len(MIXED)))
    for index, (prompt, size, window, seed, scale) in enumerate(MIXED):
        grid, passes = expected(generator, oracle, prompt, size, window, scale=scale, seed=seed)
        assert torch.equal(finished[index].tokens, grid), MIXED[index]
        assert finished[index].passes == passes, MIXED[index]


def test_a_staggered_mixed_batch_of_sizes_equals_the_oracle(engine, oracle):
    check_mixed(engine, oracle, run_staggered(engine, mixed_requests(), every=3, batch=2))
    assert kv_cache_usage(engine) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_preemption_keeps_every_image_exact(backend, model_dir, oracle):
    # 12 blocks of 32 tokens: a guided image holds ~4 of them, so the scheduler must preempt (recompute)
    # others. max_model_len fits the largest request here (the default reserves room for 512-token prompts).
    generator = engine_on(
        backend, model_dir, **PREEMPTING_ENGINE, num_gpu_blocks_override=12, max_model_len=320
    )
    with generator:
        finished = run_staggered(generator, mixed_requests(), every=2, batch=3)
        assert_preempted_and_drained(generator)
        check_mixed(generator, oracle, finished)
