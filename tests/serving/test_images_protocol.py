"""The image route's request checks and class-name prompts (no server, no engine)."""

from __future__ import annotations

import json

import pytest

from vllm_zipar.models.class_names import ClassNameError, ClassNames
from vllm_zipar.serving.images_protocol import ImageAPIError, parse_request

SIZE = "128x128"


def parse(**body):
    return parse_request(json.dumps(body).encode(), SIZE)


def error_of(raw: bytes | dict) -> ImageAPIError:
    with pytest.raises(ImageAPIError) as info:
        parse_request(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), SIZE)
    return info.value


def test_a_minimal_request_takes_the_defaults():
    req = parse(prompt="3")
    assert (req.n, req.output_format, req.stream, req.partial_images, req.seed) == (1, "png", False, 0, None)
    fields = (
        "size",
        "negative_prompt",
        "temperature",
        "top_k",
        "top_p",
        "decoding",
        "zipar_window",
        "zipar_drafts",
    )
    assert req.sampling_kwargs() == dict.fromkeys((*fields, "cfg_scale", "cfg_interval"))


def test_openai_and_extension_fields_are_read():
    req = parse(
        prompt="golden retriever", model="m", n=4, size=SIZE, response_format="b64_json",
        output_format="webp", output_compression=80, stream=True, partial_images=2, user="u",
        seed=7, cfg_scale=2, cfg_interval=3,
        decoding="zipar", zipar_window=4, temperature=0.5, top_k=10, top_p=0.9, return_tokens=True,
        quality="auto", background="opaque",
    )  # fmt: skip
    assert (req.n, req.output_format, req.partial_images, req.seed, req.cfg_scale) == (4, "webp", 2, 7, 2.0)
    assert req.sampling_kwargs()["zipar_window"] == 4 and req.return_tokens


@pytest.mark.parametrize(
    "body, param, code",
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        ({"n": 1}, "prompt", "missing_required_parameter"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({"prompt": "  "}, "prompt", "invalid_value"),
        ({"prompt": "1", "n": 0}, "n", "invalid_value"),
        ({"prompt": "1", "n": 11}, "n", "invalid_value"),
        ({"prompt": "1", "n": "2"}, "n", "invalid_type"),
        ({"prompt": "1", "n": True}, "n", "invalid_type"),
        ({"prompt": "1", "size": "1024x1024"}, "size", "unsupported_value"),
        ({"prompt": "1", "response_format": "url"}, "response_format", "unsupported_value"),
        ({"prompt": "1", "output_format": "gif"}, "output_format", "unsupported_value"),
        ({"prompt": "1", "output_compression": 101}, "output_compression", "invalid_value"),
        ({"prompt": "1", "background": "transparent"}, "background", "unsupported_value"),
        ({"prompt": "1", "zipar_window": 0}, "zipar_window", "invalid_value"),
        ({"prompt": "1", "zipar_window": 2.5}, "zipar_window", "invalid_type"),
        ({"prompt": "1", "decoding": "ntp", "zipar_window": 2}, "zipar_window", "invalid_value"),
        ({"prompt": "1", "decoding": "beam"}, "decoding", "unsupported_value"),
        ({"prompt": "1", "cfg_scale": -1}, "cfg_scale", "invalid_value"),
        ({"prompt": "1", "cfg_scale": "2"}, "cfg_scale", "invalid_type"),
        ({"prompt": "1", "cfg_interval": -2}, "cfg_interval", "invalid_value"),
        ({"prompt": "1", "temperature": -0.1}, "temperature", "invalid_value"),
        ({"prompt": "1", "top_p": 0}, "top_p", "invalid_value"),
        ({"prompt": "1", "top_k": -1}, "top_k", "invalid_value"),
        ({"prompt": "1", "seed": -1}, "seed", "invalid_value"),
        ({"prompt": "1", "stream": "yes"}, "stream", "invalid_type"),
        ({"prompt": "1", "partial_images": 4, "stream": True}, "partial_images", "invalid_value"),
        ({"prompt": "1", "partial_images": 1}, "partial_images", "invalid_value"),
        ({"prompt": "1", "num_inference_steps": 4}, "num_inference_steps", "unknown_parameter"),
    ],
)
def test_each_bad_field_is_a_400_naming_it(body, param, code):
    error = error_of(body)
    assert (error.status, error.param, error.code) == (400, param, code)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    assert error.body()["error"]["type"] == "invalid_request_error" and error.message


def test_class_prompts_by_index_and_case_insensitive_name():
    names = ClassNames(3, [["Golden Retriever", "golden retriever"], ["crane"], ["crane", "derrick"]])
    assert names.label("1") == 1 and names.label(" GOLDEN   retriever ") == 0 and names.label("derrick") == 2
    with pytest.raises(ClassNameError, match="ambiguous"):
        names.label("crane")  # a primary name of class 1 too, and class 2's primary is also 'crane'
    with pytest.raises(ClassNameError, match="out of range"):
        names.label("3")
    with pytest.raises(ClassNameError, match="did you mean 'derrick'"):
        names.label("derick")


def test_imagenet_and_digit_names():
    class Config:
        num_classes = 1000

    imagenet = ClassNames.for_config(Config())
    assert imagenet.label("golden retriever") == 207 == imagenet.label("Golden Retriever")
    assert imagenet.label("tench") == 0 and imagenet.label("Tinca tinca") == 0
    Config.num_classes = 10
    assert ClassNames.for_config(Config()).label("Seven") == 7
    Config.class_names = [f"c{i}" for i in range(10)]
    assert ClassNames.for_config(Config()).label("c3") == 3


def test_model_limits_bound_window_interval_top_k_and_prompt():
    from vllm_zipar.serving.images_protocol import RequestLimits

    limits = RequestLimits(max_window=64, max_cfg_interval=64, max_top_k=256, max_prompt_chars=30)
    for field, value in [("zipar_window", 65), ("cfg_interval", 65), ("top_k", 257), ("prompt", "p" * 31)]:
        with pytest.raises(ImageAPIError) as info:
            parse_request(json.dumps({"prompt": "1", field: value}).encode(), SIZE, limits)
        assert info.value.param == field
    assert parse_request(b'{"prompt": "1", "zipar_window": 64}', SIZE, limits).zipar_window == 64


def test_a_negative_prompt_for_a_model_without_one_names_what_its_guidance_runs_against():
    from vllm_zipar.serving.images_protocol import RequestLimits

    limits = RequestLimits(prompt_kind="text", unconditional_context="the null class")
    with pytest.raises(ImageAPIError) as info:
        parse_request(b'{"prompt": "a cat", "negative_prompt": "blurry"}', SIZE, limits)
    assert (info.value.param, info.value.code) == ("negative_prompt", "unsupported_parameter")
    assert str(info.value).endswith("its guidance runs against the null class.")
    with_negative = RequestLimits(prompt_kind="text", negative_prompt=True)
    body = b'{"prompt": "a cat", "negative_prompt": "blurry"}'
    assert parse_request(body, SIZE, with_negative).negative_prompt == "blurry"


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 2.01),
        ("cfg_scale", 50.5),
        ("cfg_scale", 1e308),
        ("seed", 2**53),
        ("zipar_window", 2**64),
    ],
)
def test_values_vllm_would_refuse_or_overflow_are_ours_to_refuse(field, value):
    error = error_of({"prompt": "1", field: value})
    assert (error.param, error.code, error.status) == (field, "invalid_value", 400)


def test_messages_quote_a_short_prefix_of_the_value():
    huge = "z" * 100_000
    for body in ({"prompt": "1", "n": huge}, {"prompt": "1", "size": huge}, {"prompt": "1", huge: 1}):
        error = error_of(body)
        assert len(error.message) < 200 and "(100000 characters)" in error.message
    assert len(error.param) == 40
    with pytest.raises(ClassNameError) as info:
        ClassNames(10, None).label("q" * 100_000)
    assert len(str(info.value)) < 300


def test_partial_frames_is_partial_images_beyond_openais_three():
    assert parse(prompt="1", stream=True, partial_frames=40).partial_images == 40
    for body, message in [
        ({"prompt": "1", "partial_frames": 4}, "needs 'stream'"),
        ({"prompt": "1", "stream": True, "partial_frames": 257}, "between 0 and 256"),
        ({"prompt": "1", "stream": True, "partial_frames": 4, "partial_images": 2}, "not both"),
    ]:
        with pytest.raises(ImageAPIError, match=message) as err:
            parse(**body)
        assert err.value.param == "partial_frames"
