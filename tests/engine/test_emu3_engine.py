"""Emu3-Gen text-to-image through vLLM's real engine, on tiny random Hugging Face Emu3 directories.

NTP greedy tokens must equal transformers' own `generate()` with Emu3's logits constraints (visual tokens
inside a row, EOL at column W, then EOF, image end, EOS), without and with classifier-free guidance against
a negative prompt of another length. ZipAR windows 1/2/3/W, greedy and seeded, must equal the independent
EOL-grid oracle (tests/reference/emu3_decoders.py), with the closed-form pass counts `(H-1)*w + W`; a mixed
staggered batch of sizes, windows and guidance, and a forced preemption, stay exact. Every assertion runs on
each ZipAR attention backend on main ("cpu" and "flex").
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
from tests.reference.emu3_decoders import zipar_decode_eol
from tests.reference.emu3_hf import Emu3SpecialIds, hf_generate_image
from tests.reference.emu3_text import ReferenceEmu3
from vllm_zipar.serving.offline import ImageGenerator
from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir
from vllm_zipar.zipar.plan import zipar_steps

pytestmark = pytest.mark.engine

BACKENDS = ["cpu", "flex"]
SAMPLING = dict(temperature=1.0, top_k=20, top_p=0.95)
# 64x64 pixels at ratio 1:1 is an 8x8 grid; the other ratios give 7x9, 9x7, 6x11 and 11x6.
OPTIONS = {
    "image_area": 64 * 64,
    "positive_prompt_suffix": "",
    "negative_prompt": "ugly blurry",
    "sampling_defaults": {"cfg_scale": 1.0},
}
SIZES = {"64x64": (8, 8), "72x56": (7, 9), "56x72": (9, 7)}
NEGATIVE = "a bad ugly blurry picture of a dog"


def write_model(model_dir):
    write_random_emu3_dir(model_dir, seed=3)
    (model_dir / "zipar.json").write_text(json.dumps(OPTIONS))
    return model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("emu3"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import Emu3ForConditionalGeneration

    return Emu3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def oracle(hf_model):
    return ReferenceEmu3.from_hf(hf_model)


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, model_dir):
    generator = engine_on(request.param, model_dir, max_num_seqs=8, kv_cache_memory_bytes=4 << 20)
    yield request.param, generator
    generator.close()


def ids_of(generator: ImageGenerator, prompt: str, size: str, negative: str | None):
    """The conditional and unconditional prompt ids the engine got (from the model's own tokenizer)."""
    model = generator.model
    chosen = model.size(size)
    uncond = None if negative is None else model.unconditional_prompt_ids(negative, chosen)
    return model.prompt_ids(prompt, chosen), uncond


def expected(generator, oracle, prompt, size, window, *, negative=None, scale=1.0, seed=None):
    model = generator.model
    cond, uncond = ids_of(generator, prompt, size, negative if scale != 1.0 else None)
    rows, cols = SIZES[size]
    visual = (model.visual_tokens.ids.start, model.visual_tokens.ids.stop)
    sampling = SAMPLING if seed is not None else dict(temperature=0.0)
    return zipar_decode_eol(
        oracle,
        cond,
        rows,
        cols,
        eol_id=model.eol_token,
        visual=visual,
        window=window,
        negative_prompt_ids=uncond,
        cfg_scale=scale,
        seed=seed,
        **sampling,
    )


def hf_generate(hf_model, generator, prompt_ids, rows, cols, *, negative_ids=None, scale=1.0):
    """transformers' greedy generate() with Emu3's logits constraints: the [rows, cols] grid (the EOLs and
    closing tokens it forced are checked)."""
    model = generator.model
    tokens = model.tokens
    ids = Emu3SpecialIds(
        image_wrapper=prompt_ids[-1],
        eol=tokens.eol,
        eof=tokens.eof,
        image_end=tokens.eoi,
        eos=tokens.eos,
        pad=tokens.pad,
        visual=(tokens.visual_start, tokens.visual_stop),
    )
    out = torch.tensor(
        hf_generate_image(
            hf_model, prompt_ids, rows, cols, ids, negative_prompt_ids=negative_ids, guidance_scale=scale
        )
    )
    grid = out[: rows * (cols + 1)].view(rows, cols + 1)
    assert (grid[:, cols] == tokens.eol).all()
    assert out[rows * (cols + 1) :].tolist() == list(model.closing_tokens)
    return grid[:, :cols]


@pytest.mark.parametrize("size", ["64x64", "72x56"])
def test_ntp_greedy_equals_transformers_generate(engine, hf_model, size):
    _, generator = engine
    rows, cols = SIZES[size]
    (image,) = generator.generate(["a red cat"], size=size, decoding="ntp", temperature=0.0, cfg_scale=1.0)
    cond, _ = ids_of(generator, "a red cat", size, None)
    assert torch.equal(image.tokens, hf_generate(hf_model, generator, cond, rows, cols))
    assert image.passes == rows * cols  # forced EOLs ride in the pass before them
    assert len(set(image.tokens.flatten().tolist())) > 8  # not collapsed to one code
    assert kv_cache_usage(generator) == 0.0


def test_ntp_guided_by_a_negative_prompt_equals_transformers_generate(engine, hf_model):
    _, generator = engine
    (image,) = generator.generate(
        ["a red cat"], size="56x72", decoding="ntp", temperature=0.0, cfg_scale=3.0, negative_prompt=NEGATIVE
    )
    cond, uncond = ids_of(generator, "a red cat", "56x72", NEGATIVE)
    assert len(uncond) != len(cond)
    expected_grid = hf_generate(hf_model, generator, cond, 9, 7, negative_ids=uncond, scale=3.0)
    assert torch.equal(image.tokens, expected_grid)
    assert image.stats.uncond_prompt_len == len(uncond)


@pytest.mark.parametrize("window", [1, 2, 3, 9])
def test_zipar_greedy_and_seeded_equal_the_oracle(engine, oracle, window):
    _, generator = engine
    size, (rows, cols) = "72x56", SIZES["72x56"]
    kwargs = dict(size=size, zipar_window=window, cfg_scale=1.0)
    greedy = generator.generate(["a red cat"], temperature=0.0, **kwargs)[0]
    seeded = generator.generate(["a blue dog"], seeds=[7], **kwargs, **SAMPLING)[0]
    grid, passes = expected(generator, oracle, "a red cat", size, window)
    assert torch.equal(greedy.tokens, grid)
    grid, _ = expected(generator, oracle, "a blue dog", size, window, seed=7)
    assert torch.equal(seeded.tokens, grid)
    closed_form = zipar_steps(rows, cols, window, eol=True)
    assert greedy.passes == seeded.passes == passes == closed_form
    assert closed_form == (rows * cols if window >= cols else (rows - 1) * window + cols)
    assert kv_cache_usage(generator) == 0.0


def test_window_of_the_width_equals_ntp(engine):
    _, generator = engine
    kwargs = dict(size="64x64", seeds=[5], cfg_scale=1.0, **SAMPLING)
    ntp = generator.generate(["a red cat"], decoding="ntp", **kwargs)
    wide = generator.generate(["a red cat"], zipar_window=8, **kwargs)
    assert torch.equal(ntp[0].tokens, wide[0].tokens)
    assert ntp[0].passes == wide[0].passes == 64


# (prompt, size, window, seed, cfg scale): sizes, NTP and windows, greedy and seeded, guided and not.
MIXED = [
    ("a red cat", "64x64", None, None, 1.0),
    ("a blue dog", "72x56", 2, 3, 1.0),
    ("a red cat", "56x72", 1, None, 3.0),
    ("a small house", "64x64", 3, 11, 2.0),
    ("a blue dog", "56x72", None, 7, 3.0),
    ("a red house", "72x56", 4, None, 1.0),
]


def mixed_requests() -> list[tuple[str, dict]]:
    return [
        (
            prompt,
            dict(
                size=size,
                cfg_scale=scale,
                negative_prompt=NEGATIVE,
                **decoding_kwargs(window, seed, SAMPLING),
            ),
        )
        for prompt, size, window, seed, scale in MIXED
    ]


def check_mixed(generator, oracle, finished) -> None:
    assert sorted(finished) == list(range(len(MIXED)))
    for index, (prompt, size, window, seed, scale) in enumerate(MIXED):
        grid, passes = expected(
            generator, oracle, prompt, size, window or 99, negative=NEGATIVE, scale=scale, seed=seed
        )
        assert torch.equal(finished[index].tokens, grid), MIXED[index]
        assert finished[index].passes == passes, MIXED[index]


def test_a_staggered_mixed_batch_of_sizes_equals_the_oracle(engine, oracle):
    _, generator = engine
    check_mixed(generator, oracle, run_staggered(generator, mixed_requests(), every=3, batch=2))
    assert kv_cache_usage(generator) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_preemption_keeps_every_image_exact(backend, model_dir, oracle):
    # 12 blocks of 32 tokens: a guided image holds ~6 of them, so the scheduler must preempt (recompute)
    # others; a 32-token budget cuts the recomputes into chunks. max_model_len fits the largest request
    # here (the model's default reserves room for 512-token prompts).
    generator = engine_on(
        backend, model_dir, **PREEMPTING_ENGINE, num_gpu_blocks_override=12, max_model_len=352
    )
    with generator:
        finished = run_staggered(generator, mixed_requests(), every=2, batch=3)
        assert_preempted_and_drained(generator)
        check_mixed(generator, oracle, finished)
