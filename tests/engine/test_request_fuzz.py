"""A seeded fuzz of valid image requests through one real engine per family: no valid request may break it.

Random sizes, windows (below the width, at it and past it), NTP, exact drafts, guidance on and off with and
without a negative prompt, repeated prompts (prefix-cache hits), requests arriving in waves, aborts
mid-image, and a KV cache small enough to force preemption. Invariants: the engine never raises; KV blocks
return to zero; every finished image has the closed-form pass count (at most that with drafts) and equals
the same request decoded alone without drafts (position-keyed seeds make that a property of any correct
engine).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tests.engine.conftest import kv_cache_usage
from tests.engine.staggered import scheduler_of
from vllm_zipar.serving.offline import ImageGenerator
from vllm_zipar.testing.tiny_dirs import write_tiny_dir
from vllm_zipar.zipar.plan import zipar_steps

pytestmark = pytest.mark.engine

REQUESTS = 100  # per family
MAX_STEPS = 6000  # a stall fails the test instead of hanging it
TEXT_PROMPTS = ["a red cat", "a red cat", "two dogs on a beach at dawn", "a house", "an old tree in a field"]
NEGATIVES = [None, "ugly blurry", "lowres, bad anatomy, blurry, ugly, " * 8]


@dataclass(frozen=True)
class FuzzRequest:
    prompt: Any
    kwargs: tuple[tuple[str, Any], ...]
    seed: int

    def args(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def without_drafts(self) -> dict[str, Any]:
        return {key: value for key, value in self.kwargs if key != "zipar_drafts"}


def random_request(rng: random.Random, generator: ImageGenerator) -> FuzzRequest:
    model = generator.model
    size = rng.choice(model.sizes())
    width = size.grid[1]
    kwargs: dict[str, Any] = {"size": size.name}
    if rng.random() < 0.2:
        kwargs["decoding"] = "ntp"
    else:
        kwargs["zipar_window"] = rng.choice([1, 2, 3, width - 1, width, width + 2])
    kwargs["cfg_scale"] = rng.choice([1.0, 1.0, 2.0, 3.0])
    text = model.prompt_kind == "text"
    if model.takes_negative_prompt and kwargs["cfg_scale"] != 1.0:
        negative = rng.choice(NEGATIVES)
        if negative is not None:
            kwargs["negative_prompt"] = negative
    if rng.random() < 0.3:
        kwargs["temperature"] = 0.0
    else:
        kwargs.update(temperature=1.0, top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]))
    prompt = rng.choice(TEXT_PROMPTS) if text else rng.randrange(model.num_classes)
    if rng.random() < 0.25:
        kwargs["zipar_drafts"] = rng.choice([1, 2, 4])
    return FuzzRequest(prompt, tuple(sorted(kwargs.items())), seed=rng.randrange(4))


def expected_passes(image, eol: bool) -> int:
    """ZIPAR.md §4's closed form (NTP, and windows >= W, take H*W)."""
    height, width = image.stats.grid
    return zipar_steps(height, width, image.stats.window, eol=eol)


@pytest.fixture(scope="module", params=["llamagen", "emu3", "janus", "chameleon"])
def fuzz_engine(request, tmp_path_factory):
    model_dir = write_tiny_dir(request.param, tmp_path_factory.mktemp(f"fuzz-{request.param}"), seed=7)
    # KV for a handful of images (Emu3's and Janus's must hold one request of max_model_len), in blocks of 32
    # tokens: preemption and prefix-cache hits.
    kv_bytes = {"llamagen": 512 << 10, "emu3": 700 << 10, "janus": 700 << 10, "chameleon": 1400 << 10}
    # Lumina-mGPT's tiny directory: its default max_model_len reserves 512-token prompts; these are ~50.
    limits = {"chameleon": {"max_model_len": 640}}.get(request.param, {})
    generator = ImageGenerator(
        model_dir,
        max_num_seqs=12,
        kv_cache_memory_bytes=kv_bytes[request.param],
        block_size=32,
        disable_log_stats=False,
        **limits,
    )
    yield request.param, generator
    generator.close()


def test_random_valid_requests_never_break_the_engine(fuzz_engine):
    family, generator = fuzz_engine
    rng = random.Random(2026)
    pending = [random_request(rng, generator) for _ in range(REQUESTS)]
    submitted: dict[str, FuzzRequest] = {}
    finished: dict[str, Any] = {}
    aborted: set[str] = set()
    steps = 0
    while pending or generator.has_unfinished_requests():
        for _ in range(min(rng.randint(0, 6), len(pending))):  # arrivals in waves
            fuzz = pending.pop()
            request_id = f"fuzz-{len(submitted)}"
            generator.add_request(request_id, fuzz.prompt, seed=fuzz.seed, **fuzz.args())
            submitted[request_id] = fuzz
        for image in generator.step():
            finished[image.request_id] = image
        in_flight = [r for r in submitted if r not in finished and r not in aborted]
        if in_flight and rng.random() < 0.02:
            victim = rng.choice(in_flight)
            generator.abort([victim])
            aborted.add(victim)
        steps += 1
        assert steps < MAX_STEPS, f"{family}: no progress after {steps} steps ({len(in_flight)} in flight)"
    # The block pool itself: vLLM's usage gauge is from the last step, and an abort may come after it.
    assert scheduler_of(generator).kv_cache_manager.block_pool.get_usage() == 0.0
    assert len(finished) + len(aborted) == REQUESTS
    assert scheduler_of(generator).num_preempted_images > 0, "the KV cache was meant to force preemption"

    alone: dict[FuzzRequest, torch.Tensor] = {}
    for request_id, image in finished.items():
        fuzz = submitted[request_id]
        closed_form = expected_passes(image, generator.model.eol_token is not None)
        if image.stats.drafts:
            assert image.passes <= closed_form, fuzz
        else:
            assert image.passes == closed_form, fuzz
        plain = FuzzRequest(fuzz.prompt, tuple(sorted(fuzz.without_drafts().items())), fuzz.seed)
        if plain not in alone:
            (single,) = generator.generate([fuzz.prompt], seeds=[fuzz.seed], **plain.args())
            alone[plain] = single.tokens
        assert torch.equal(image.tokens, alone[plain]), fuzz
    assert kv_cache_usage(generator) == 0.0
