"""Request building of the front-ends (`ImageRequests`): what is refused before anything reaches vLLM."""

from __future__ import annotations

import pytest

from vllm_zipar.engine.request_config import ImageDecoding
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.serving import image_requests
from vllm_zipar.serving.image_requests import ImageRequests


@pytest.fixture
def requests_off_cpu(monkeypatch):
    """A platform without the ZipAR attention backend (anything but vLLM's CPU one, in this version)."""
    monkeypatch.setattr(image_requests, "_on_cpu", lambda: False)
    config = LlamaGenConfig(dim=64, n_layer=1, n_head=2, grid_size=8, num_classes=10, codebook_size=64)
    return ImageRequests(config, ImageDecoding.parse("ntp", None), token_budget=2048)


@pytest.mark.parametrize(
    "kwargs", [{"zipar_window": 4}, {"zipar_window": 1}, {"decoding": "ntp", "cfg_scale": 2.0}]
)
def test_masked_decodings_are_refused_where_the_mask_is_not_implemented(requests_off_cpu, kwargs):
    kwargs.setdefault("cfg_scale", 1.0)
    with pytest.raises(
        ValueError, match="CPU backend only; on this platform use decoding='ntp' with cfg_scale=1"
    ):
        requests_off_cpu.request_inputs(3, **kwargs)


@pytest.mark.parametrize("kwargs", [{"decoding": "ntp"}, {"zipar_window": 8}, {"zipar_window": 20}])
def test_causal_decodings_still_run_there(requests_off_cpu, kwargs):
    prompt, params = requests_off_cpu.request_inputs(3, cfg_scale=1.0, **kwargs)
    assert prompt["prompt_token_ids"] == [64 + 3]
    assert params.max_tokens > 0


def test_on_cpu_the_same_requests_are_accepted(monkeypatch):
    monkeypatch.setattr(image_requests, "_on_cpu", lambda: True)
    config = LlamaGenConfig(dim=64, n_layer=1, n_head=2, grid_size=8, num_classes=10, codebook_size=64)
    requests = ImageRequests(config, ImageDecoding.parse("ntp", None), token_budget=2048)
    prompt, _ = requests.request_inputs(3, zipar_window=2, cfg_scale=2.0)
    assert prompt["prompt_token_ids"] == [64 + 3, config.null_class_token_id]
