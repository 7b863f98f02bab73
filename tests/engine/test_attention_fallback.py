"""With the compiled kernel switched off (VLLM_ZIPAR_MASKED_KERNEL=0, or no compiler), the PyTorch path
of the masked attention serves the same images: ZipAR, NTP and guided, equal to the reference decoders.

Its own engine (module scope): the switch is read when each attention layer first runs.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import TEST_KV_CACHE_BYTES, attention_impls, kv_cache_usage, tiny_model_with_oracle
from tests.reference.decoders import ntp_decode, zipar_decode
from vllm_zipar.serving.offline import ImageGenerator

pytestmark = pytest.mark.engine

SAMPLING = dict(temperature=1.0, top_k=100, top_p=0.95)


@pytest.fixture(scope="module")
def pytorch_path(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("fallback8")
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=8)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ZIPAR_MASKED_KERNEL", "0")
        generator = ImageGenerator(
            model_dir, max_num_seqs=8, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, disable_log_stats=False
        )
        generator.generate([0], temperature=0.0, zipar_window=2)  # every layer decides its path now
    yield generator, oracle
    generator.close()


def test_the_switch_selects_the_pytorch_path(pytorch_path):
    generator, _ = pytorch_path
    impls = attention_impls(generator)
    assert impls and all(impl._kernel_key_layout is None for impl in impls)
    assert all(impl.request_kv for impl in impls)  # this path keeps its own copy of each image's keys


@pytest.mark.parametrize("window", [1, 3, 4, 8])
def test_pytorch_path_tokens_equal_the_reference(pytorch_path, window):
    generator, oracle = pytorch_path
    greedy = generator.generate([1, 6], temperature=0.0, zipar_window=window)
    seeded = generator.generate([3], seeds=[21], zipar_window=window, **SAMPLING)
    for result in greedy:
        expected = zipar_decode(oracle, result.class_label, 8, 8, window)[0]
        assert torch.equal(result.tokens, expected), result
    expected = zipar_decode(oracle, 3, 8, 8, window, seed=21, **SAMPLING)[0]
    assert torch.equal(seeded[0].tokens, expected)
    assert kv_cache_usage(generator) == 0.0


def test_pytorch_path_guided_images_equal_the_reference(pytorch_path):
    generator, oracle = pytorch_path
    for kwargs, decode in (({"decoding": "ntp"}, ntp_decode), ({"zipar_window": 4}, zipar_decode)):
        image = generator.generate([5], temperature=0.0, cfg_scale=2.0, **kwargs)[0]
        args = (oracle, 5, 8, 8) + (() if decode is ntp_decode else (4,))
        assert torch.equal(image.tokens, decode(*args, cfg_scale=2.0)[0])
