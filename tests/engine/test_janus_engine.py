"""Janus-Pro text-to-image through vLLM's real engine, on tiny random Hugging Face Janus directories.

NTP greedy tokens must equal transformers' own `generate(generation_mode="image")`: with its default
guidance (5, the unconditional prompt padded between BOS and `<begin_of_image>`), and unguided. transformers
5.19 cannot run that generate unguided as is (`guidance_scale=1` adds no CFG processor, so the doubled batch
samples two tokens per image and fails to store them); a logits processor that keeps the conditional half
(`ConditionalHalf`) makes its own loop unguided, the unconditional stream fed and discarded. Pass counts:
NTP = H*W, ZipAR-w = `2W + (H-2)*w` (no EOL, row 0 first) and w >= W equals NTP token for token. Every
assertion runs on each ZipAR attention backend ("cpu" and "flex"); TP=2 over `mp` equals TP=1. ZipAR tokens
against an independent oracle are not checked here (tests/reference/ holds the oracle).
"""

from __future__ import annotations

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
from vllm_zipar.serving.offline import ImageGenerator
from vllm_zipar.testing.janus_dirs import write_random_janus_dir
from vllm_zipar.zipar.plan import zipar_steps

pytestmark = pytest.mark.engine

BACKENDS = ["cpu", "flex"]
GRID = 8
SAMPLING = dict(temperature=1.0, top_k=20, top_p=0.95)
PROMPTS = ["a red cat", "a high quality photo of a small blue bird on a tree, detailed"]


class ConditionalHalf:
    """A transformers logits processor: the conditional half of generate()'s doubled batch, unguided."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores[: scores.shape[0] // 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("janus") / "tiny-janus"
    write_random_janus_dir(model_dir, seed=3)
    return model_dir


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, model_dir):
    generator = engine_on(request.param, model_dir, max_num_seqs=8, kv_cache_memory_bytes=4 << 20)
    yield generator
    generator.close()


def hf_generate(hf_model, prompt_ids: list[int], *, guided: bool) -> torch.Tensor:
    """transformers' greedy `generate(generation_mode="image")` of one prompt: the [8, 8] grid of codes."""
    from transformers import LogitsProcessorList

    kwargs = (
        {} if guided else {"guidance_scale": 1, "logits_processor": LogitsProcessorList([ConditionalHalf()])}
    )
    with torch.no_grad():
        codes = hf_model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            generation_mode="image",
            do_sample=False,
            **kwargs,
        )
    return codes.view(GRID, GRID)


def codes_of(generator: ImageGenerator, image) -> torch.Tensor:
    return generator.model.visual_tokens.id_to_code(image.tokens)


def test_transformers_fails_unguided_without_the_conditional_half(hf_model, model_dir):
    """Why `ConditionalHalf` exists (transformers 5.19): if this starts passing, drop the workaround."""
    from vllm_zipar.models.registry import load_image_model

    model = load_image_model(model_dir)
    ids = model.prompt_ids("a red cat", model.native_size)
    with pytest.raises(RuntimeError, match="expanded size"), torch.no_grad():
        hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            generation_mode="image",
            do_sample=False,
            guidance_scale=1,
        )


def test_ntp_greedy_unguided_equals_transformers_generate(engine, hf_model):
    images = engine.generate(PROMPTS, decoding="ntp", temperature=0.0, cfg_scale=1.0)
    model = engine.model
    for prompt, image in zip(PROMPTS, images, strict=True):
        ids = model.prompt_ids(prompt, model.native_size)
        assert torch.equal(codes_of(engine, image), hf_generate(hf_model, ids, guided=False)), prompt
        assert image.passes == GRID * GRID
        assert len(set(image.tokens.flatten().tolist())) > 16  # not collapsed to a few codes
    assert kv_cache_usage(engine) == 0.0


def test_ntp_greedy_with_the_default_guidance_equals_transformers_generate(engine, hf_model):
    # No cfg_scale given: the family default 5, transformers' generation config default too.
    images = engine.generate(PROMPTS, decoding="ntp", temperature=0.0)
    model = engine.model
    for prompt, image in zip(PROMPTS, images, strict=True):
        ids = model.prompt_ids(prompt, model.native_size)
        assert image.cfg_scale == 5.0 and image.stats.uncond_prompt_len == len(ids)
        assert torch.equal(codes_of(engine, image), hf_generate(hf_model, ids, guided=True)), prompt
        assert image.passes == GRID * GRID
    assert kv_cache_usage(engine) == 0.0


@pytest.mark.parametrize("window", [1, 2, 3, GRID])
def test_zipar_pass_counts_are_the_closed_form(engine, window):
    images = engine.generate(PROMPTS[:1], zipar_window=window, temperature=0.0, cfg_scale=1.0)
    guided = engine.generate(PROMPTS[1:], zipar_window=window, seeds=[7], cfg_scale=5.0, **SAMPLING)
    closed_form = GRID * GRID if window >= GRID else 2 * GRID + (GRID - 2) * window
    assert zipar_steps(GRID, GRID, window, eol=False) == closed_form
    assert images[0].passes == guided[0].passes == closed_form
    assert kv_cache_usage(engine) == 0.0


def test_window_of_the_width_equals_ntp(engine):
    kwargs = dict(seeds=[5, 6], cfg_scale=5.0, **SAMPLING)
    ntp = engine.generate(PROMPTS, decoding="ntp", **kwargs)
    wide = engine.generate(PROMPTS, zipar_window=GRID, **kwargs)
    for a, b in zip(ntp, wide, strict=True):
        assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parallel
@pytest.mark.timeout(900)
def test_tensor_parallel_2_over_mp_equals_tp1(model_dir, hf_model):
    """TP=2 over vLLM's `mp` executor: each rank holds one of the two query heads, a replica of the single KV
    head, half of the MLP, and a replica of the generation embeddings, aligner and head; NTP tokens still
    equal transformers', ZipAR-2 seeded guided tokens equal TP=1's."""
    from vllm import envs

    zipar = dict(zipar_window=2, seeds=[7, 8], cfg_scale=5.0, **SAMPLING)
    with engine_on("cpu", model_dir, max_num_seqs=8, kv_cache_memory_bytes=4 << 20) as tp1:
        expected = [image.tokens for image in tp1.generate(PROMPTS, **zipar)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one OpenMP core list per rank
        envs.disable_envs_cache()  # an earlier engine in this process froze vLLM's env reads
        tp2 = engine_on(
            "cpu",
            model_dir,
            max_num_seqs=8,
            kv_cache_memory_bytes=4 << 20,
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
        )
    with tp2:
        assert tp2.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
        model = tp2.model
        for guided in (False, True):
            images = tp2.generate(PROMPTS, decoding="ntp", temperature=0.0, cfg_scale=5.0 if guided else 1.0)
            for prompt, image in zip(PROMPTS, images, strict=True):
                ids = model.prompt_ids(prompt, model.native_size)
                assert torch.equal(codes_of(tp2, image), hf_generate(hf_model, ids, guided=guided))
        images = tp2.generate(PROMPTS, **zipar)
        assert all(torch.equal(image.tokens, grid) for image, grid in zip(images, expected, strict=True))
        assert all(image.passes == 2 * GRID + (GRID - 2) * 2 for image in images)


# ----------------------------------------------------------------------------- ZipAR against the oracle


@pytest.fixture(scope="module")
def oracle(model_dir):
    from tests.reference.janus_model import reference_from_hf_dir

    return reference_from_hf_dir(model_dir)


def oracle_codes(generator: ImageGenerator, oracle, prompt: str, window, *, scale: float, seed):
    """The independent oracle's codes and passes (tests/reference/janus_decoders.py) for one request."""
    from tests.reference.janus_decoders import janus_ntp_decode, janus_zipar_decode

    model = generator.model
    size = model.native_size
    ids = model.prompt_ids(prompt, size)
    uncond = model.unconditional_prompt_ids(None, size, ids) if scale != 1.0 else None
    sampling = dict(seed=seed, **SAMPLING) if seed is not None else dict(temperature=0.0)
    if window is None:
        return janus_ntp_decode(oracle, ids, uncond, GRID, GRID, cfg_scale=scale, **sampling)
    return janus_zipar_decode(oracle, ids, uncond, GRID, GRID, window, cfg_scale=scale, **sampling)


@pytest.mark.parametrize("window", [1, 2, 3, GRID])
def test_zipar_tokens_equal_the_oracle_greedy_and_seeded(engine, oracle, window):
    greedy = engine.generate(PROMPTS[:1], zipar_window=window, temperature=0.0, cfg_scale=1.0)[0]
    seeded = engine.generate(PROMPTS[1:], zipar_window=window, seeds=[11], cfg_scale=5.0, **SAMPLING)[0]
    for image, prompt, scale, seed in ((greedy, PROMPTS[0], 1.0, None), (seeded, PROMPTS[1], 5.0, 11)):
        codes, passes = oracle_codes(engine, oracle, prompt, window, scale=scale, seed=seed)
        assert torch.equal(codes_of(engine, image), codes), (prompt, window)
        assert image.passes == passes
    assert kv_cache_usage(engine) == 0.0


# (prompt, window, seed, cfg scale): NTP and windows, greedy and seeded, guided and not.
MIXED = [
    (PROMPTS[0], None, None, 1.0),
    (PROMPTS[1], 2, 3, 1.0),
    (PROMPTS[0], 1, None, 5.0),
    ("a small house", 3, 11, 2.0),
    (PROMPTS[1], None, 7, 5.0),
    ("a red house", 4, None, 1.0),
]


def mixed_requests() -> list[tuple[str, dict]]:
    return [
        (prompt, dict(cfg_scale=scale, **decoding_kwargs(window, seed, SAMPLING)))
        for prompt, window, seed, scale in MIXED
    ]


def check_mixed(generator: ImageGenerator, oracle, finished: dict) -> None:
    assert sorted(finished) == list(range(len(MIXED)))
    for index, (prompt, window, seed, scale) in enumerate(MIXED):
        codes, passes = oracle_codes(generator, oracle, prompt, window, scale=scale, seed=seed)
        assert torch.equal(codes_of(generator, finished[index]), codes), MIXED[index]
        assert finished[index].passes == passes, MIXED[index]


def test_a_staggered_mixed_batch_equals_the_oracle(engine, oracle):
    check_mixed(engine, oracle, run_staggered(engine, mixed_requests(), every=3, batch=2))
    assert kv_cache_usage(engine) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_preemption_keeps_every_image_exact(backend, model_dir, oracle):
    # Few blocks of 32 tokens for six images (a guided one holds several): the scheduler must preempt and
    # recompute; a 32-token budget cuts the recomputes into chunks.
    generator = engine_on(
        backend, model_dir, **PREEMPTING_ENGINE, num_gpu_blocks_override=14, max_model_len=320
    )
    with generator:
        finished = run_staggered(generator, mixed_requests(), every=2, batch=3)
        assert_preempted_and_drained(generator)
        check_mixed(generator, oracle, finished)
