"""`vllm serve LUMINA_DIR --decoding zipar` through the `openai` client: a text prompt in, a PNG of the
requested size out (native and one of Lumina's crop sizes), its tokens equal to the independent Lumina oracle
(guided at the family default, ZipAR-2) and its pixels to Meta's VQGAN decode of those tokens; partial images
streamed; bad sizes, guidance, an empty prompt and a negative prompt (Lumina's guidance runs against a context
that starts at BOI, with no text) are 400s naming the field, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from tests.reference.chameleon_vqgan import read_vqgan_files, reference_decode, reference_pil_arrays
from tests.reference.lumina_decoders import lumina_zipar_decode
from tests.reference.lumina_model import LuminaImageIds, ReferenceLumina
from tests.serving.served import assert_a_400_naming_the_field, openai_client, png, served_model
from vllm_zipar.models.registry import load_image_model
from vllm_zipar.testing.lumina_dirs import write_tiny_lumina_dir

pytestmark = pytest.mark.serving

MODEL = "tiny-lumina"
SIZE = "128x128"  # the tiny directory's native size: an 8x8 grid of 16-pixel codes
WIDE = "160x96"  # one of Lumina's crop sizes at that area: 6 rows of 10 codes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = write_tiny_lumina_dir(tmp_path_factory.mktemp("lumina-served") / "tiny-lumina", seed=4)
    with served_model(model_dir, tmp_path_factory, window=2, name=MODEL) as server:
        yield server, model_dir


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


@pytest.mark.parametrize("size", [SIZE, WIDE])
def test_a_text_prompt_gives_pngs_whose_tokens_and_pixels_equal_the_oracle(served, client, size):
    _, model_dir = served
    response = client.images.generate(
        model=MODEL,
        prompt="a red cat",
        n=2,
        size=size,
        response_format="b64_json",
        extra_body={"seed": 3, "return_tokens": True},  # guidance: the family default, 4
    )
    assert response.size == size
    images = [png(item.b64_json) for item in response.data]
    assert {(image.format, f"{image.width}x{image.height}") for image in images} == {("PNG", size)}
    assert response.data[0].b64_json != response.data[1].b64_json

    model = load_image_model(model_dir)
    chosen = model.size(size)
    rows, cols = chosen.grid
    ids = LuminaImageIds.from_vocabulary_map(
        json.loads((model_dir / "config.json").read_text())["vocabulary_map"]
    )
    defaults = model.sampling_defaults
    grid, _ = lumina_zipar_decode(
        ReferenceLumina.from_dir(model_dir),
        model.prompt_ids("a red cat", chosen)[:-3],  # the oracle adds the forced [BOI, h, w] itself
        rows,
        cols,
        2,
        ids,
        cfg_scale=defaults.cfg_scale,
        temperature=defaults.temperature,
        top_k=defaults.top_k,
        top_p=defaults.top_p,
        seed=3,
    )
    tokens = torch.tensor(response.data[0].model_extra["tokens"])
    assert torch.equal(tokens, grid)

    # Pixels: Meta's VQGAN decode of those codes, converted as Lumina converts (a direct re-implementation;
    # float reductions may differ in the last bit, so one grey level of slack at a truncation boundary).
    params, state = read_vqgan_files(model_dir / "vqgan.yaml", model_dir / "vqgan.ckpt")
    codes = model.visual_tokens.id_to_code(tokens)[None]
    with torch.no_grad():
        (expected,) = reference_pil_arrays(reference_decode(params, state, codes))
    served_pixels = np.asarray(images[0].convert("RGB")).astype(int)
    assert served_pixels.shape == expected.shape
    assert np.abs(served_pixels - expected.astype(int)).max() <= 1
    assert (served_pixels == expected).mean() > 0.99


def test_streaming_sends_partial_images(client):
    stream = client.images.generate(
        model=MODEL, prompt="a red cat", size=WIDE, stream=True, partial_images=2, extra_body={"seed": 1}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert {png(e.b64_json).size for e in events} == {(160, 96)}


ERRORS = [
    ({"prompt": "a cat", "size": "768x768"}, "size", "unsupported_value", "'128x128'"),
    ({"prompt": "a cat", "size": "100x100"}, "size", "unsupported_value", "'160x96'"),
    ({"prompt": "a cat", "guidance_scale": 0.5}, "guidance_scale", "invalid_value", "guidance_scale"),
    ({"prompt": "a cat", "guidance_scale": "high"}, "guidance_scale", "invalid_type", "guidance_scale"),
    ({"prompt": "   "}, "prompt", "invalid_value", "empty"),
    (
        {"prompt": "a cat", "negative_prompt": "blurry"},
        "negative_prompt",
        "unsupported_parameter",
        "image start token",
    ),
]


@pytest.mark.parametrize("body, param, code, words", ERRORS)
def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(served, body, param, code, words):
    assert_a_400_naming_the_field(served[0], body, param, code, words, {"prompt": "a cat", "seed": 2})


def test_the_playground_describes_the_model(served):
    server, _ = served
    info = httpx.get(server.url + "/playground/info", timeout=30.0).json()
    assert (info["family"], info["prompt_kind"], info["negative_prompt"]) == ("Lumina-mGPT", "text", False)
    assert (info["size"], info["grid"], info["sampling_defaults"]["cfg_scale"]) == (SIZE, [8, 8], 4.0)
    assert WIDE in info["sizes"] and info["default_window"] == 2
