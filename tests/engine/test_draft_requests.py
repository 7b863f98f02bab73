"""`zipar_drafts` from every front-end to the engine's request config, without starting an engine: extra
args (per request and the engine default), validation, the prefix-cache salt, the token-budget check, the
stats wire form, the HTTP body and `vllm serve --zipar-drafts`."""

from __future__ import annotations

import json

import pytest

from vllm_zipar.engine.request_config import Guidance, ImageDecoding, image_decoding_for
from vllm_zipar.serving.images_protocol import ImageAPIError, param_of_engine_error, parse_request
from vllm_zipar.serving.vllm_command import CommandError, serve_argv
from vllm_zipar.testing.llamagen_dirs import write_random_model_dir
from vllm_zipar.zipar.draft_plan import DraftPlan
from vllm_zipar.zipar.guidance import GuidedPlan
from vllm_zipar.zipar.image_stats import ImageStats
from vllm_zipar.zipar.layout import GridLayout

LAYOUT = GridLayout(1, 8, 8)


class Config:
    def __init__(self, zipar: dict) -> None:
        self.additional_config = {"zipar": zipar}


class Params:
    def __init__(self, extra_args) -> None:
        self.extra_args = extra_args


def test_drafts_round_trip_through_extra_args_and_default_to_none():
    decoding = ImageDecoding.parse("zipar", 4).with_guidance(Guidance(2.0, 1)).with_drafts(3)
    extra = decoding.to_extra_args()
    assert extra["zipar_drafts"] == 3
    assert ImageDecoding.from_extra_args(extra, ("ntp", None)) == decoding
    plain = ImageDecoding.parse("zipar", 4)
    assert plain.to_extra_args()["zipar_drafts"] == 0
    assert ImageDecoding.from_extra_args(plain.to_extra_args(), ("ntp", None)).drafts == 0
    # A front-end's L = 0 request on an engine whose default has drafts stays plain ZipAR (the key used to
    # be left out for L = 0, and the engine's default drafts applied).
    assert ImageDecoding.from_extra_args(plain.to_extra_args(), ("ntp", None, 4)).drafts == 0


def test_the_engine_default_applies_unless_a_request_says_otherwise():
    config = Config({"decoding": "ntp", "window": None, "drafts": 4})
    assert image_decoding_for(Params(None), config).drafts == 4
    assert image_decoding_for(Params({"zipar_drafts": 0}), config).drafts == 0
    assert image_decoding_for(Params(None), Config({"decoding": "ntp"})).drafts == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None])
def test_bad_drafts_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="zipar_drafts"):
        ImageDecoding.from_extra_args({"zipar_drafts": bad}, ("ntp", None))


def test_draft_decodings_get_a_draft_plan_their_own_salt_and_the_mask():
    plain = ImageDecoding.parse("ntp", None)
    drafts = plain.with_drafts(2)
    assert isinstance(drafts.plan(LAYOUT), DraftPlan) and drafts.plan(LAYOUT).drafts == 2
    guided = drafts.with_guidance(Guidance(2.0, 1))
    plan = guided.plan(LAYOUT)
    assert isinstance(plan, DraftPlan) and plan.uncond_prompt_len == 1
    assert isinstance(plain.with_guidance(Guidance(2.0, 1)).plan(LAYOUT), GuidedPlan)
    assert drafts.cache_salt != plain.cache_salt and drafts.cache_salt != plain.with_drafts(3).cache_salt
    assert not plain.needs_masked_attention(LAYOUT) and drafts.needs_masked_attention(LAYOUT)
    assert drafts.num_output_tokens(LAYOUT) is None and plain.num_output_tokens(LAYOUT) == 64
    assert drafts.min_sequence_len(LAYOUT) == 1 + 64


def test_a_draft_free_pass_must_fit_the_token_budget():
    # ZipAR-1 on 8 rows: eight chains at once, twice with guidance; a draft-free pass feeds one per chain.
    decoding = ImageDecoding.parse("zipar", 1).with_guidance(Guidance(2.0, 1)).with_drafts(2)
    decoding.check_fits(LAYOUT, 16)
    with pytest.raises(ValueError, match="zipar_drafts=2"):
        decoding.check_fits(LAYOUT, 12)


def test_stats_carry_the_draft_counts_and_the_grid():
    stats = ImageStats("zipar", 2, 1.0, (1, 2), 1, None, 3, (1, 1, 0), 4, 9, 5, 2, 3, (7, 8))
    assert ImageStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    plain = ImageStats("zipar", 2, 1.0, (1, 2), 1, None, 2, (1, 1))
    assert "drafts" not in plain.to_dict() and ImageStats.from_dict(plain.to_dict()) == plain


def test_the_http_body_takes_zipar_drafts():
    body = json.dumps({"prompt": "3", "zipar_drafts": 4}).encode()
    assert parse_request(body, "256x256").sampling_kwargs()["zipar_drafts"] == 4
    for bad in (-1, "4", 2.5):
        with pytest.raises(ImageAPIError) as err:
            parse_request(json.dumps({"prompt": "3", "zipar_drafts": bad}).encode(), "256x256")
        assert err.value.status == 400 and err.value.param == "zipar_drafts"
    assert (
        param_of_engine_error("zipar_drafts must be an integer >= 0 (0: no drafts), got -1") == "zipar_drafts"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("drafts-cmd")
    write_random_model_dir(path, with_vq=False, dim=64, n_layer=1, n_head=2, codebook_size=64, grid_size=4)
    return str(path)


def test_vllm_serve_takes_a_server_default(model_dir):
    argv = serve_argv(["serve", model_dir, "--decoding", "ntp", "--zipar-drafts", "4"], {})
    config = json.loads(argv[argv.index("--additional-config") + 1])
    assert config == {"zipar": {"decoding": "ntp", "window": None, "drafts": 4}}
    plain = serve_argv(["serve", model_dir, "--decoding", "ntp"], {})
    assert json.loads(plain[plain.index("--additional-config") + 1]) == {
        "zipar": {"decoding": "ntp", "window": None}
    }
    with pytest.raises(CommandError, match="--zipar-drafts"):
        serve_argv(["serve", model_dir, "--decoding", "ntp", "--zipar-drafts", "-2"], {})
