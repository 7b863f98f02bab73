"""Request building of the front-ends (`ImageRequests`): what is refused before anything reaches vLLM,
on each kind of platform (simulated through vLLM's `current_platform`)."""

from __future__ import annotations

import pytest

from tests.engine.test_attention_choice import FakePlatform
from vllm_zipar.engine.request_config import ImageDecoding
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.models.llamagen_image_model import LlamaGenImageModel
from vllm_zipar.serving.image_requests import ImageRequests
from vllm_zipar.serving.images_protocol import param_of_engine_error


def requests_on(monkeypatch, platform: FakePlatform) -> ImageRequests:
    import vllm.platforms
    from vllm import SamplingParams  # noqa: F401  (vLLM resolves it lazily: before the platform is faked)

    monkeypatch.setattr(vllm.platforms, "current_platform", platform, raising=False)
    config = LlamaGenConfig(dim=64, n_layer=1, n_head=2, grid_size=8, num_classes=10, codebook_size=64)
    return ImageRequests(LlamaGenImageModel(".", config), ImageDecoding.parse("ntp", None), token_budget=2048)


MASKED = [{"zipar_window": 4}, {"zipar_window": 1}, {"decoding": "ntp", "cfg_scale": 2.0}]


@pytest.mark.parametrize("kwargs", MASKED)
def test_masked_decodings_are_refused_where_no_zipar_attention_exists(monkeypatch, kwargs):
    requests = requests_on(monkeypatch, FakePlatform("rocm"))
    kwargs = {"cfg_scale": 1.0, **kwargs}
    with pytest.raises(ValueError, match="on this platform use decoding='ntp' with cfg_scale=1"):
        requests.request_inputs(3, **kwargs)


@pytest.mark.parametrize("kwargs", [{"decoding": "ntp"}, {"zipar_window": 8}, {"zipar_window": 20}])
def test_causal_decodings_still_run_there(monkeypatch, kwargs):
    requests = requests_on(monkeypatch, FakePlatform("rocm"))
    prompt, params = requests.request_inputs(3, cfg_scale=1.0, **kwargs)
    assert prompt["prompt_token_ids"] == [64 + 3]
    assert params.max_tokens > 0


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
@pytest.mark.parametrize("kwargs", MASKED)
def test_on_cpu_and_cuda_zipar_and_guidance_are_accepted(monkeypatch, platform, kwargs):
    requests = requests_on(monkeypatch, FakePlatform(platform))
    prompt, params = requests.request_inputs(3, **{"cfg_scale": 2.0, **kwargs})
    assert prompt["prompt_token_ids"] == [64 + 3, requests.model.hf_config.null_class_token_id]
    assert params.max_tokens > 0


def test_decoding_zipar_without_a_window_takes_the_servers_window(monkeypatch):
    requests = requests_on(monkeypatch, FakePlatform("cpu"))
    requests.default_decoding = ImageDecoding.parse("zipar", 3)
    request = requests.image_request(3, decoding="zipar", cfg_scale=1.0)
    assert (request.decoding.decoding, request.decoding.window) == ("zipar", 3)
    requests.default_decoding = ImageDecoding.parse("ntp", None)
    with pytest.raises(ValueError, match="default is 'ntp', so it has no default window"):
        requests.image_request(3, decoding="zipar", cfg_scale=1.0)


def test_a_window_beyond_the_grids_cells_is_refused(monkeypatch):
    requests = requests_on(monkeypatch, FakePlatform("cpu"))
    assert requests.image_request(3, zipar_window=64, cfg_scale=1.0).decoding.window == 64  # 8x8: the bound
    with pytest.raises(ValueError, match=r"zipar_window must be in 1\.\.64 .* got 65"):
        requests.image_request(3, zipar_window=65, cfg_scale=1.0)


def requests_capped_at(max_model_len: int) -> ImageRequests:
    config = LlamaGenConfig(dim=64, n_layer=1, n_head=2, grid_size=8, num_classes=10, codebook_size=64)
    model = LlamaGenImageModel(".", config)
    default = ImageDecoding.parse("zipar", 4)
    return ImageRequests(model, default, token_budget=2048, max_model_len=max_model_len)


def test_an_image_longer_than_max_model_len_is_refused_naming_its_size():
    # Guided ZipAR-4 on 8x8: 2 prompt tokens, then 139 fed or sampled cells over both streams (141 in all);
    # vLLM would cut the sequence short at 140 (the image never finishes) and fail an assertion at 131.
    guided = {"zipar_window": 4, "cfg_scale": 3.0}
    requests_capped_at(141).request_inputs(3, **guided)
    with pytest.raises(ValueError, match=r"needs a sequence of 141 tokens .*max_model_len=140") as refused:
        requests_capped_at(140).request_inputs(3, **guided)
    assert param_of_engine_error(str(refused.value)) == "size"
    requests_capped_at(140).request_inputs(3, zipar_window=4, cfg_scale=1.0)  # one stream fits
