"""`vllm serve EMU3_DIR --decoding zipar` through the `openai` client: a text prompt in, a PNG of the
requested size out, tokens equal to the EOL-grid oracle; bad sizes, guidance values and negative prompts
are 400s naming the field, and the server keeps serving. The model is a tiny random HF Emu3 directory."""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference.emu3_decoders import zipar_decode_eol
from tests.reference.emu3_text import ReferenceEmu3
from tests.serving.served import assert_a_400_naming_the_field, openai_client, png, post, served_model
from vllm_zipar.models.registry import load_image_model
from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir

pytestmark = pytest.mark.serving

MODEL = "tiny-emu3"
OPTIONS = {"image_area": 64 * 64, "positive_prompt_suffix": "", "negative_prompt": "ugly blurry"}
NEGATIVE = "a bad ugly blurry picture of a dog"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("emu3-served")
    write_random_emu3_dir(model_dir, seed=4)
    (model_dir / "zipar.json").write_text(json.dumps(OPTIONS))
    with served_model(model_dir, tmp_path_factory, window=2, name=MODEL) as server:
        yield server, model_dir


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


@pytest.mark.parametrize("size, grid", [("64x64", (8, 8)), ("72x56", (7, 9)), ("48x88", (11, 6))])
def test_a_text_prompt_gives_a_png_of_the_requested_size(client, size, grid):
    response = client.images.generate(
        model=MODEL,
        prompt="a red cat",
        size=size,
        n=2,
        response_format="b64_json",
        extra_body={"seed": 3, "guidance_scale": 2.0, "negative_prompt": NEGATIVE, "return_tokens": True},
    )
    assert response.size == size
    for item in response.data:
        image = png(item.b64_json)
        assert (image.format, f"{image.width}x{image.height}") == ("PNG", size)
        assert torch.tensor(item.model_extra["tokens"]).shape == grid
    assert response.data[0].b64_json != response.data[1].b64_json


def test_tokens_equal_the_oracle(served, client):
    from transformers import Emu3ForConditionalGeneration

    server, model_dir = served
    body = {"temperature": 0.0, "guidance_scale": 3.0, "negative_prompt": NEGATIVE, "return_tokens": True}
    response = client.images.generate(model=MODEL, prompt="a blue dog", size="56x72", extra_body=body)
    tokens = torch.tensor(response.data[0].model_extra["tokens"])
    model = load_image_model(model_dir)
    size = model.size("56x72")
    hf = Emu3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected, _ = zipar_decode_eol(
        ReferenceEmu3.from_hf(hf),
        model.prompt_ids("a blue dog", size),
        9,
        7,
        eol_id=model.eol_token,
        visual=(model.visual_tokens.ids.start, model.visual_tokens.ids.stop),
        window=2,
        negative_prompt_ids=model.unconditional_prompt_ids(NEGATIVE, size),
        cfg_scale=3.0,
        temperature=0.0,
    )
    assert torch.equal(tokens, expected)


def test_streaming_sends_partial_images_of_the_requested_size(client):
    stream = client.images.generate(
        model=MODEL, prompt="a red cat", size="72x56", stream=True, partial_images=2, extra_body={"seed": 1}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert {png(e.b64_json).size for e in events} == {(72, 56)}


def test_n_images_with_a_long_negative_prompt_share_the_prefix_cache_safely(served):
    """Issue 22's engine killer: n > 1 guided images whose unconditional prompt fills a KV block past the end
    of the conditional prompt (the second image's prefix-cache hit covered cell (0, 0)'s logits row)."""
    server, _ = served
    negative = "lowres, bad anatomy, blurry, ugly, " * 8  # 144 tokens: past the 128-token block
    for body in (
        {"prompt": "a red cat", "size": "88x48", "n": 3, "seed": 4, "negative_prompt": negative},
        {
            "prompt": "a red cat",
            "size": "88x48",
            "n": 2,
            "seed": 4,
            "negative_prompt": negative,
            "stream": True,
        },
    ):
        response = post(server, {**body, "guidance_scale": 3.0, "return_tokens": True})
        assert response.status_code == 200, response.text
    first = post(
        server,
        {
            "prompt": "a red cat",
            "size": "88x48",
            "n": 2,
            "seed": 4,
            "negative_prompt": negative,
            "guidance_scale": 3.0,
            "return_tokens": True,
        },
    ).json()["data"]
    again = post(
        server,
        {
            "prompt": "a red cat",
            "size": "88x48",
            "seed": 4,
            "negative_prompt": negative,
            "guidance_scale": 3.0,
            "return_tokens": True,
        },
    ).json()["data"]
    assert first[0]["tokens"] == again[0]["tokens"]  # the cache changes no image
    assert server.idle_kv_usage() == 0.0


ERRORS = [
    ({"prompt": "a cat", "size": "1024x1024"}, "size", "unsupported_value", "'64x64'"),
    ({"prompt": "a cat", "size": "64by64"}, "size", "unsupported_value", "'72x56'"),
    ({"prompt": "a cat", "guidance_scale": 0.5}, "guidance_scale", "invalid_value", "guidance_scale"),
    ({"prompt": "a cat", "guidance_scale": "high"}, "guidance_scale", "invalid_type", "guidance_scale"),
    ({"prompt": "a cat", "guidance_scale": 2, "cfg_scale": 2}, "guidance_scale", "invalid_value", "alias"),
    ({"prompt": "a cat", "cfg_scale": 100}, "cfg_scale", "invalid_value", "cfg_scale"),
    ({"prompt": "a cat", "negative_prompt": 3}, "negative_prompt", "invalid_type", "negative_prompt"),
    ({"prompt": "   "}, "prompt", "invalid_value", "empty"),
    ({"prompt": "a cat", "zipar_window": 0}, "zipar_window", "invalid_value", "zipar_window"),
]


@pytest.mark.parametrize("body, param, code, words", ERRORS)
def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(served, body, param, code, words):
    ok = {"prompt": "a cat", "size": "64x64", "seed": 2}
    assert_a_400_naming_the_field(served[0], body, param, code, words, ok)
