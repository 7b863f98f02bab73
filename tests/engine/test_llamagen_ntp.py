"""NTP through vLLM's own engine equals the reference oracle, token for token.

Each engine loads a tiny random checkpoint written in the authors' `.pt` format; the oracle loads the same
file with its own, independent implementation of the published architecture.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.engine.conftest import TEST_KV_CACHE_BYTES, kv_cache_usage, tiny_model_with_oracle
from tests.reference.decoders import ntp_decode
from vllm_zipar.serving.offline import ImageGenerator

pytestmark = pytest.mark.engine

LABELS = list(range(8))


def build(tmp_path_factory, name: str, **overrides):
    model_dir = tmp_path_factory.mktemp(name)
    _, oracle = tiny_model_with_oracle(model_dir, seed=11, **overrides)
    generator = ImageGenerator(
        model_dir,
        decoding="ntp",
        max_num_seqs=16,
        kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
        disable_log_stats=False,
    )
    return generator, oracle


@pytest.fixture(scope="module")
def grid8(tmp_path_factory):
    generator, oracle = build(tmp_path_factory, "grid8", grid_size=8)
    yield generator, oracle
    generator.close()


def test_greedy_tokens_equal_the_oracle_for_eight_labels(grid8):
    generator, oracle = grid8
    results = generator.generate(LABELS, temperature=0.0)
    for result in results:
        expected, passes = ntp_decode(oracle, result.class_label, 8, 8)
        assert passes == 64
        assert torch.equal(result.tokens, expected), f"class {result.class_label}"
    assert len({int(t) for r in results for t in r.tokens.flatten()}) > 40  # not collapsed to a few tokens
    assert kv_cache_usage(generator) == 0.0


@pytest.mark.parametrize("seed", [0, 1234])
def test_seeded_tokens_equal_the_oracle_for_eight_labels(grid8, seed):
    generator, oracle = grid8
    sampling = dict(temperature=1.0, top_k=100, top_p=0.95)
    results = generator.generate(LABELS, seeds=[seed] * len(LABELS), **sampling)
    for result in results:
        expected, _ = ntp_decode(oracle, result.class_label, 8, 8, seed=seed, **sampling)
        assert torch.equal(result.tokens, expected), f"class {result.class_label} seed {seed}"
    greedy = generator.generate([LABELS[0]], temperature=0.0)[0]
    assert not torch.equal(results[0].tokens, greedy.tokens)  # sampling really sampled
    assert kv_cache_usage(generator) == 0.0


def test_a_seeded_image_does_not_depend_on_its_batch(grid8):
    generator, _ = grid8
    alone = generator.generate([3], seeds=[77], temperature=1.0)[0]
    crowd = generator.generate([5, 3, 3, 9], seeds=[1, 77, 78, 2], temperature=1.0)
    assert torch.equal(crowd[1].tokens, alone.tokens)
    assert not torch.equal(crowd[2].tokens, alone.tokens)


def test_an_unseeded_request_samples_with_one_seed_of_its_own(grid8):
    generator, oracle = grid8
    scheduler = generator.llm.llm_engine.engine_core.engine_core.scheduler
    draws = random.Random()
    draws.setstate(scheduler.unseeded_seeds.getstate())
    first, second = generator.generate([3, 3], seeds=[None, None], temperature=1.0)
    # Admitted in submission order, each took the scheduler's next seed: the whole image is keyed by it.
    for result in (first, second):
        expected, _ = ntp_decode(oracle, 3, 8, 8, seed=draws.getrandbits(63), temperature=1.0)
        assert torch.equal(result.tokens, expected)
    assert not torch.equal(first.tokens, second.tokens)


def test_a_class_label_outside_the_range_is_refused_and_the_engine_keeps_serving(grid8):
    generator, oracle = grid8
    with pytest.raises(ValueError, match=r"class index 10 is out of range"):
        generator.generate([1, 10], temperature=0.0)
    with pytest.raises(ValueError, match=r"class index -3 is out of range"):
        generator.generate([-3], temperature=0.0)
    result = generator.generate([2], temperature=0.0)[0]
    assert torch.equal(result.tokens, ntp_decode(oracle, 2, 8, 8)[0])
    assert kv_cache_usage(generator) == 0.0


def test_greedy_tokens_equal_the_oracle_on_a_24x24_grid(tmp_path_factory):
    generator, oracle = build(tmp_path_factory, "grid24", grid_size=24)
    with generator:
        result = generator.generate([4], temperature=0.0)[0]
    expected, passes = ntp_decode(oracle, 4, 24, 24)
    assert passes == 576
    assert torch.equal(result.tokens, expected)


def test_padded_heads_of_size_100_give_the_unpadded_oracle_logits(tmp_path_factory):
    # GPT-3B's head dim is 100, which the CPU kernel lacks: the engine pads to 112 with zero channels.
    generator, oracle = build(tmp_path_factory, "head100", grid_size=8, dim=200, n_head=2)
    assert generator.config.rope_head_dim == 100 and generator.config.head_dim == 112
    _, params = generator.request_inputs(6, temperature=0.0, cfg_scale=1.0)
    params.logprobs = 0
    with generator:
        output = generator.llm.generate(
            [{"prompt_token_ids": [generator.config.class_token_id(6)]}], params, use_tqdm=False
        )[0].outputs[0]
    tokens = torch.tensor(output.token_ids)
    assert torch.equal(tokens.view(8, 8), ntp_decode(oracle, 6, 8, 8)[0])
    # Teacher-forced: the oracle's log-probability of each chosen token, against the engine's.
    n = tokens.numel()
    attend = torch.tril(torch.ones(n, n, dtype=torch.bool))
    logits = oracle.forward_tokens(6, tokens[:-1], torch.arange(1, n), attend)
    oracle_logprobs = logits.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    steps = zip(output.logprobs, tokens.tolist(), strict=True)
    engine_logprobs = torch.tensor([step[token].logprob for step, token in steps])
    gap = (engine_logprobs - oracle_logprobs).abs().max()
    assert gap < 1e-4, gap
