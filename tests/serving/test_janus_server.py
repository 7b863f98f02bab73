"""`vllm serve JANUS_DIR --decoding zipar` through the `openai` client: a text prompt in, a PNG of the model's
size out, tokens equal to the independent Janus oracle (guided at the family default, ZipAR-2), partial
images streamed; bad sizes, guidance, an empty prompt and a negative prompt (Janus's guidance runs against
its pad-masked prompt, so there is none to give) are 400s naming the field, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.reference.janus_decoders import janus_zipar_decode
from tests.reference.janus_model import reference_from_hf_dir
from tests.serving.served import assert_a_400_naming_the_field, openai_client, png, served_model
from vllm_zipar.models.registry import load_image_model
from vllm_zipar.testing.janus_dirs import write_random_janus_dir

pytestmark = pytest.mark.serving

MODEL = "tiny-janus"
SIZE = "16x16"  # the tiny directory's one size: an 8x8 grid of 2x2-pixel codes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("janus-served") / "tiny-janus"
    write_random_janus_dir(model_dir, seed=4)
    with served_model(model_dir, tmp_path_factory, window=2, name=MODEL) as server:
        yield server, model_dir


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


def test_a_text_prompt_gives_pngs_whose_tokens_equal_the_oracle(served, client):
    _, model_dir = served
    response = client.images.generate(
        model=MODEL,
        prompt="a red cat",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 3, "return_tokens": True},  # guidance: the family default, 5
    )
    assert response.size == SIZE
    images = [png(item.b64_json) for item in response.data]
    assert {(image.format, f"{image.width}x{image.height}") for image in images} == {("PNG", SIZE)}
    assert response.data[0].b64_json != response.data[1].b64_json

    model = load_image_model(model_dir)
    ids = model.prompt_ids("a red cat", model.native_size)
    uncond = model.unconditional_prompt_ids(None, model.native_size, ids)
    defaults = model.sampling_defaults
    codes, _ = janus_zipar_decode(
        reference_from_hf_dir(model_dir),
        ids,
        uncond,
        8,
        8,
        2,
        cfg_scale=defaults.cfg_scale,
        temperature=defaults.temperature,
        top_k=defaults.top_k,
        top_p=defaults.top_p,
        seed=3,
    )
    tokens = torch.tensor(response.data[0].model_extra["tokens"])
    assert torch.equal(model.visual_tokens.id_to_code(tokens), codes)


def test_streaming_sends_partial_images(client):
    stream = client.images.generate(
        model=MODEL, prompt="a red cat", stream=True, partial_images=2, extra_body={"seed": 1}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert {png(e.b64_json).size for e in events} == {(16, 16)}


ERRORS = [
    ({"prompt": "a cat", "size": "384x384"}, "size", "unsupported_value", "'16x16'"),
    ({"prompt": "a cat", "guidance_scale": 0.5}, "guidance_scale", "invalid_value", "guidance_scale"),
    ({"prompt": "a cat", "guidance_scale": "high"}, "guidance_scale", "invalid_type", "guidance_scale"),
    ({"prompt": "   "}, "prompt", "invalid_value", "empty"),
    ({"prompt": "a cat", "negative_prompt": "blurry"}, "negative_prompt", "unsupported_parameter", "padding"),
]


@pytest.mark.parametrize("body, param, code, words", ERRORS)
def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(served, body, param, code, words):
    assert_a_400_naming_the_field(served[0], body, param, code, words, {"prompt": "a cat", "seed": 2})


def test_the_playground_serves_the_page_and_describes_the_model(served):
    server, _ = served
    assert httpx.get(server.url + "/playground", timeout=30.0).status_code == 200
    info = httpx.get(server.url + "/playground/info", timeout=30.0).json()
    assert (info["family"], info["prompt_kind"], info["negative_prompt"]) == ("Janus-Pro", "text", False)
    assert (info["size"], info["grid"], info["sampling_defaults"]["cfg_scale"]) == (SIZE, [8, 8], 5.0)
    assert (info["default_decoding"], info["default_window"]) == ("zipar", 2)
