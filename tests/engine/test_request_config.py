"""Per-request decoding and guidance choices: parsing, errors, output lengths and salts (no engine)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from vllm_zipar.engine.request_config import Guidance, ImageDecoding, image_decoding_for
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.models.llamagen_image_model import LlamaGenImageModel
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import ZipARPlan
from vllm_zipar.zipar.shape import plan_shape


def test_scale_one_means_no_unconditional_sequence():
    assert Guidance.parse(1.0, None) is None
    assert Guidance.parse(1, 1) is None
    assert Guidance.parse(2.5, 1, 7) == Guidance(2.5, 1, 7)


@pytest.mark.parametrize(
    "scale, uncond, interval, message",
    [
        (-1.0, 1, -1, "cfg_scale must be a finite number >= 1"),
        (0.5, 1, -1, "cfg_scale must be a finite number >= 1"),
        (math.nan, 1, -1, "cfg_scale must be a finite number >= 1"),
        (math.inf, 1, -1, "cfg_scale must be a finite number >= 1"),
        ("2", 1, -1, "cfg_scale must be a number >= 1"),
        (True, 1, -1, "cfg_scale must be a number >= 1"),
        (2.0, None, -1, "needs cfg_uncond_prompt_len"),
        (2.0, 0, -1, "needs cfg_uncond_prompt_len"),
        (2.0, 1, -2, "cfg_interval must be an int >= -1"),
        (2.0, 1, 1.5, "cfg_interval must be an int >= -1"),
    ],
)
def test_bad_guidance_is_refused_with_the_parameter_named(scale, uncond, interval, message):
    with pytest.raises(ValueError, match=message):
        Guidance.parse(scale, uncond, interval)


def test_guided_requests_read_their_extra_args_and_split_the_prompt():
    config = SimpleNamespace(additional_config={"zipar": {"decoding": "zipar", "window": 4}})
    params = SimpleNamespace(extra_args={"cfg_scale": 3.0, "cfg_uncond_prompt_len": 1})
    decoding = image_decoding_for(params, config)
    assert decoding == ImageDecoding("zipar", 4, Guidance(3.0, 1, -1))
    model = LlamaGenImageModel(".", LlamaGenConfig(grid_size=8))
    layout = decoding.layout(model, prompt_len=2)
    assert layout == GridLayout(prompt_len=1, height=8, width=8)
    with pytest.raises(ValueError, match="leaves no conditional prompt"):
        decoding.layout(model, prompt_len=1)
    assert decoding.cache_salt == "zipar-w4-cfg1"
    assert ImageDecoding("zipar", 4).cache_salt == "zipar-w4"


@pytest.mark.parametrize(
    "decoding",
    [
        ImageDecoding("ntp", None),
        ImageDecoding("zipar", 3, None, (4, 5)),
        ImageDecoding("zipar", 2, Guidance(2.5, 7, 10), (6, 6)),
    ],
)
def test_extra_args_read_back_what_they_wrote(decoding):
    extra = decoding.to_extra_args()
    assert ImageDecoding.from_extra_args(extra, ("zipar", 99)) == decoding
    config = SimpleNamespace(additional_config={"zipar": {"decoding": "zipar", "window": 99}})
    assert image_decoding_for(SimpleNamespace(extra_args=extra), config) == decoding


def test_requests_without_extra_args_take_the_engine_default():
    assert ImageDecoding.from_extra_args(None, ("zipar", 4)) == ImageDecoding("zipar", 4)
    assert ImageDecoding.from_extra_args({}, ("ntp", None)) == ImageDecoding("ntp", None)


def fed_after_prompt(layout, window):
    plan = ZipARPlan(layout, window)
    inputs = plan.prefill_inputs([0] * layout.prompt_len)
    while inputs:
        plan.record([0] * sum(f.predicts is not None for f in inputs))
        inputs = plan.next_inputs()
    return plan.num_fed - layout.prompt_len


@pytest.mark.parametrize("window", [None, 1, 2, 4, 8])
def test_guided_output_is_both_streams_feeds_and_reads_back_to_every_cell_once(window):
    layout = GridLayout(prompt_len=1, height=8, width=8)
    fed = fed_after_prompt(layout, window)
    plain = plan_shape(layout, window).output_cells
    guided = plan_shape(layout, window, 1).output_cells
    last_pass = len(plain) - fed
    assert len(guided) == 2 * fed + last_pass
    assert sorted(c for c in guided if c is not None) == sorted(c for c in plain if c is not None)
    assert len({c for c in guided if c is not None}) == 64  # every cell once, from the conditional stream
    decoding = ImageDecoding.parse("ntp" if window is None else "zipar", window)
    with pytest.raises(ValueError, match="with cfg_scale=2.0 on a 8x8 grid feeds up to"):
        decoding.with_guidance(Guidance(2.0, 1)).check_fits(layout, 1)


@pytest.mark.parametrize(
    ("decoding", "window", "guided", "needs"),
    [
        ("ntp", None, False, False),
        ("zipar", 8, False, False),
        ("zipar", 30, False, False),
        ("zipar", 7, False, True),
        ("zipar", 1, False, True),
        ("ntp", None, True, True),
        ("zipar", 8, True, True),
    ],
)
def test_which_decodings_need_the_masked_attention(decoding, window, guided, needs):
    chosen = ImageDecoding.parse(decoding, window)
    if guided:
        chosen = chosen.with_guidance(Guidance.parse(2.0, 1))
    assert chosen.needs_masked_attention(GridLayout(prompt_len=1, height=8, width=8)) is needs
