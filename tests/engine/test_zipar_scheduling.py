"""ZipAR requests under vLLM's real scheduling: staggered arrivals, mixed decodings, preemption, aborts,
a tiny token budget, and prefix caching. Every image must still equal its own reference run."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import kv_cache_usage, tiny_model_with_oracle
from tests.engine.staggered import assert_preempted_and_drained, decoding_kwargs, run_staggered, scheduler_of
from tests.engine.test_zipar_engine import SAMPLING, reference
from vllm_zipar.engine.request_config import ImageDecoding
from vllm_zipar.models.llamagen_checkpoint import random_gpt_state_dict
from vllm_zipar.serving.offline import ImageGenerator
from vllm_zipar.zipar.layout import GridLayout

pytestmark = pytest.mark.engine

# (window, seed): None = NTP; seed None = greedy.
MIXED = [
    (None, None),
    (1, 3),
    (2, None),
    (3, 11),
    (4, 5),
    (None, 7),
    (8, None),
    (5, 13),
    (2, 17),
    (1, None),
    (6, 19),
    (11, 23),
]


def model_and_oracle(tmp_path_factory, name: str, state_dict=None):
    model_dir = tmp_path_factory.mktemp(name)
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=8, state_dict=state_dict)
    return model_dir, oracle


def as_requests(requests) -> list[tuple[int, dict]]:
    """(label, window, seed) triples as `run_staggered` requests."""
    return [(label, decoding_kwargs(window, seed, SAMPLING)) for label, window, seed in requests]


def check_against_reference(oracle, requests, finished):
    for index, image in finished.items():
        label, window, seed = requests[index]
        assert torch.equal(image.tokens, reference(oracle, label, 8, window, seed=seed)), (
            index,
            window,
            seed,
        )


def test_twelve_staggered_mixed_requests_each_equal_their_reference(tmp_path_factory):
    model_dir, oracle = model_and_oracle(tmp_path_factory, "stagger")
    generator = ImageGenerator(
        model_dir, max_num_seqs=8, kv_cache_memory_bytes=32 << 20, disable_log_stats=False
    )
    requests = [(index % 10, window, seed) for index, (window, seed) in enumerate(MIXED)]
    finished = run_staggered(generator, as_requests(requests), every=3, batch=3)
    assert sorted(finished) == list(range(12))
    check_against_reference(oracle, requests, finished)
    assert kv_cache_usage(generator) == 0.0


def test_preemption_tiny_budget_and_aborts_keep_every_image_exact_and_free_every_block(tmp_path_factory):
    model_dir, oracle = model_and_oracle(tmp_path_factory, "preempt")
    # 8 blocks of 32 tokens hold about three 8x8 images: the scheduler must preempt (recompute) others.
    # An 8-token budget holds the largest pass (window 1: 7 tokens) but not several passes together, nor
    # a recompute.
    generator = ImageGenerator(
        model_dir,
        max_num_seqs=6,
        block_size=32,
        num_gpu_blocks_override=8,
        max_num_batched_tokens=8,
        enable_chunked_prefill=True,
        disable_log_stats=False,
    )
    requests = [(index % 10, window, seed) for index, (window, seed) in enumerate(MIXED)]
    with generator:
        finished = run_staggered(generator, as_requests(requests), every=2, batch=4, abort=(1, 4))
        assert_preempted_and_drained(generator)
    assert sorted(finished) == [i for i in range(12) if i not in (1, 4)]
    check_against_reference(oracle, requests, finished)


def test_a_pass_larger_than_the_token_budget_is_refused_up_front():
    with pytest.raises(
        ValueError, match="feeds up to 7 tokens in one pass, more than max_num_batched_tokens=6"
    ):
        ImageDecoding.parse("zipar", 1).check_fits(GridLayout(prompt_len=1, height=8, width=8), 6)
    ImageDecoding.parse("zipar", 1).check_fits(GridLayout(prompt_len=1, height=8, width=8), 7)


def constant_output(config):
    """Weights whose greedy image is all token 0 whatever the context, so token sequences coincide."""
    state = random_gpt_state_dict(config, seed=1)
    state["output.weight"] = torch.zeros_like(state["output.weight"])
    return state


def test_prefix_cache_never_shares_kv_between_decodings(tmp_path_factory):
    model_dir, _ = model_and_oracle(tmp_path_factory, "prefix", state_dict=constant_output)
    generator = ImageGenerator(
        model_dir,
        block_size=32,
        kv_cache_memory_bytes=16 << 20,
        enable_prefix_caching=True,
        disable_log_stats=False,
    )
    with generator:
        check_prefix_salts(generator)


def check_prefix_salts(generator: ImageGenerator) -> None:
    # Same class, same (all-zero) tokens: ZipAR and NTP feed identical ids at different positions.
    for request_id, kwargs in [
        ("ntp-a", {"decoding": "ntp"}),
        ("ntp-b", {"decoding": "ntp"}),
        ("w4", {"zipar_window": 4}),
    ]:
        generator.add_request(request_id, 1, temperature=0.0, **kwargs)
    scheduler = scheduler_of(generator)
    for _ in range(34):  # NTP has filled its first 32-token block; window 4 (40 passes) is still running
        generator.step()
    # vLLM suffixes request ids internally.
    engine_requests = {rid.rsplit("-", 1)[0]: req for rid, req in scheduler.requests.items()}
    hashes = {rid: engine_requests[rid].block_hashes[0] for rid in ("ntp-a", "ntp-b", "w4")}
    tokens = {rid: engine_requests[rid].all_token_ids[:32] for rid in hashes}
    assert tokens["ntp-a"] == tokens["w4"]  # the situation the guard exists for
    assert hashes["ntp-a"] == hashes["ntp-b"]  # same decoding: sharing is right
    assert hashes["ntp-a"] != hashes["w4"]  # different decoding: never shared
    while generator.has_unfinished_requests():
        generator.step()
    assert kv_cache_usage(generator) == 0.0


def test_an_image_longer_than_max_model_len_is_refused_before_the_engine(tmp_path_factory):
    # Guided ZipAR-4 on 8x8 holds 141 tokens; at max_model_len 131 vLLM failed an assertion on the last
    # sampled token, which killed the engine.
    model_dir, oracle = model_and_oracle(tmp_path_factory, "capped")
    generator = ImageGenerator(
        model_dir, block_size=32, num_gpu_blocks_override=7, max_model_len=131, disable_log_stats=False
    )
    with generator:
        with pytest.raises(ValueError, match="needs a sequence of 141 tokens"):
            generator.add_request("guided", 3, zipar_window=4, cfg_scale=3.0, seed=1)
        requests = [(3, 4, 7)]
        finished = run_staggered(generator, as_requests(requests), every=1, batch=1)
        check_against_reference(oracle, requests, finished)
        assert kv_cache_usage(generator) == 0.0
