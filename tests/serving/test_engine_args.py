"""Engine arguments of an image model (`serving/engine_args.py`), no engine started: the dtype each platform
defaults to (simulated platforms), user values winning, and `hf_overrides` merged over the family's."""

from __future__ import annotations

import pytest

from vllm_zipar.engine.request_config import ImageDecoding
from vllm_zipar.models.registry import load_image_model
from vllm_zipar.serving.engine_args import (
    HfOverridesError,
    deep_merge,
    default_dtype,
    draft_headroom,
    drafts_that_fit,
    image_engine_args,
    merge_hf_overrides,
)
from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir
from vllm_zipar.testing.llamagen_dirs import write_random_model_dir

DECODING = ImageDecoding.parse("zipar", 4)


class FakeDevicePlatform:
    """vLLM's platform questions for one device kind and (CUDA) compute capability, e.g. 90 for Hopper."""

    def __init__(self, kind: str, capability: int | None = None) -> None:
        self.kind, self.capability = kind, capability

    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def has_device_capability(self, capability: int) -> bool:
        return self.capability is not None and self.capability >= capability


@pytest.fixture(scope="module")
def llamagen(tmp_path_factory):
    path = tmp_path_factory.mktemp("llamagen")
    write_random_model_dir(path, with_vq=False, dim=64, n_layer=1, n_head=2, codebook_size=64, grid_size=4)
    return load_image_model(path)


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    """A tiny Emu3 whose max_position_embeddings (32) is below its longest request: the family overrides
    both `architectures` and `text_config.max_position_embeddings`."""
    path = tmp_path_factory.mktemp("emu3") / "tiny-emu3"
    write_random_emu3_dir(path, seed=0, max_position_embeddings=32)
    return load_image_model(path)


@pytest.mark.parametrize(
    "platform, dtype",
    [
        (FakeDevicePlatform("cpu"), "float32"),
        (FakeDevicePlatform("cuda", 90), "bfloat16"),
        (FakeDevicePlatform("cuda", 80), "bfloat16"),
        (FakeDevicePlatform("cuda", 75), "float32"),  # Turing: vLLM refuses bfloat16 there
        (FakeDevicePlatform("rocm", 90), "float32"),  # not tested there: the oracle's dtype
    ],
    ids=["cpu", "cuda-sm90", "cuda-sm80", "cuda-sm75", "rocm"],
)
def test_default_dtype_per_platform(platform, dtype):
    assert default_dtype(platform) == dtype


@pytest.mark.parametrize("kind, capability, dtype", [("cpu", None, "float32"), ("cuda", 90, "bfloat16")])
def test_engine_args_take_the_platform_dtype_and_the_users_wins(llamagen, kind, capability, dtype):
    platform = FakeDevicePlatform(kind, capability)
    assert image_engine_args(llamagen, DECODING, {}, platform)["dtype"] == dtype
    assert image_engine_args(llamagen, DECODING, {"dtype": "float16"}, platform)["dtype"] == "float16"


def test_the_fixed_cpu_kv_cache_is_a_cpu_default_only(llamagen, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert (
        image_engine_args(llamagen, DECODING, {}, FakeDevicePlatform("cpu"))["kv_cache_memory_bytes"]
        == 1 << 30
    )
    assert "kv_cache_memory_bytes" not in image_engine_args(
        llamagen, DECODING, {}, FakeDevicePlatform("cuda", 90)
    )


def test_deep_merge_merges_dicts_key_by_key_and_replaces_everything_else():
    base = {"a": {"b": 1, "c": {"d": 2}}, "listed": [1], "kept": 0}
    top = {"a": {"c": {"e": 3}, "f": 4}, "listed": [2]}
    assert deep_merge(base, top) == {"a": {"b": 1, "c": {"d": 2, "e": 3}, "f": 4}, "listed": [2], "kept": 0}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "listed": [1], "kept": 0}  # inputs untouched


def test_a_users_hf_overrides_go_on_top_of_the_familys(emu3):
    family = emu3.engine_args()["hf_overrides"]
    assert family == {
        "architectures": ["Emu3ForImageGeneration"],
        "text_config": {"max_position_embeddings": 1612},
    }
    user = {"text_config": {"rope_theta": 5.0}, "tie_word_embeddings": False}
    merged = image_engine_args(emu3, DECODING, {"hf_overrides": user})["hf_overrides"]
    assert merged == {
        "architectures": ["Emu3ForImageGeneration"],
        "text_config": {"max_position_embeddings": 1612, "rope_theta": 5.0},
        "tie_word_embeddings": False,
    }
    raised = {"text_config": {"max_position_embeddings": 4096}}  # the user's value of a family key wins
    assert image_engine_args(emu3, DECODING, {"hf_overrides": raised})["hf_overrides"]["text_config"] == {
        "max_position_embeddings": 4096
    }


def test_without_user_hf_overrides_the_familys_are_used_as_they_are(emu3, llamagen):
    assert image_engine_args(emu3, DECODING, {})["hf_overrides"] == emu3.engine_args()["hf_overrides"]
    assert "hf_overrides" not in image_engine_args(llamagen, DECODING, {})
    user = {"rope_theta": 5.0}
    assert image_engine_args(llamagen, DECODING, {"hf_overrides": user})["hf_overrides"] == user


@pytest.mark.parametrize("fixture", ["emu3", "llamagen"])
def test_an_architectures_override_that_drops_our_model_class_is_refused(request, fixture):
    model = request.getfixturevalue(fixture)
    with pytest.raises(HfOverridesError, match="drop 'architectures' from hf_overrides"):
        image_engine_args(model, DECODING, {"hf_overrides": {"architectures": ["LlamaForCausalLM"]}})
    ours = image_engine_args(model, DECODING, {})
    same = ours.get("hf_overrides", {}).get("architectures") or list(model.hf_config.architectures)
    kept = image_engine_args(model, DECODING, {"hf_overrides": {"architectures": same}})
    assert kept["hf_overrides"]["architectures"] == same


def test_merge_hf_overrides_without_a_known_architecture_takes_any():
    assert merge_hf_overrides({}, {"architectures": ["X"]}, None) == {"architectures": ["X"]}


def test_a_callable_hf_overrides_cannot_be_merged_with_a_familys_dict(emu3, llamagen):
    def rewrite(config):
        return config

    with pytest.raises(HfOverridesError, match="callable"):
        image_engine_args(emu3, DECODING, {"hf_overrides": rewrite})
    assert image_engine_args(llamagen, DECODING, {"hf_overrides": rewrite})["hf_overrides"] is rewrite


# Exact drafts: the superseded guesses live in the request's KV sequence, so a family's max_model_len (sized
# for plain ZipAR) would cut them to almost nothing (docs/exact_drafts.md §10).
DRAFTING = DECODING.with_drafts(4)


def test_default_drafts_raise_the_familys_max_model_len_and_its_position_cap(llamagen, emu3, caplog):
    for model in (llamagen, emu3):
        plain = image_engine_args(model, DECODING, {})["max_model_len"]
        assert plain == model.max_model_len()
        with caplog.at_level("INFO", logger="vllm.zipar.engine_args"):
            args = image_engine_args(model, DRAFTING, {})
        assert args["max_model_len"] == plain + draft_headroom(model, 4) > plain
        assert f"max_model_len raised from {plain} to {args['max_model_len']}" in caplog.text
        assert drafts_that_fit(model, args["max_model_len"]) == 4
    # 2 streams x 4 drafts x the largest grid's positions (4x4 LlamaGen, EOL column counted: an upper bound).
    assert draft_headroom(llamagen, 4) == 2 * 4 * 4 * 5
    raised = image_engine_args(llamagen, DRAFTING, {})
    assert raised["hf_overrides"] == {"max_position_embeddings": raised["max_model_len"]}
    raised = image_engine_args(emu3, DRAFTING, {})
    assert raised["hf_overrides"]["text_config"] == {"max_position_embeddings": raised["max_model_len"]}


def test_a_users_max_model_len_wins_lifts_the_cap_and_warns_when_drafts_do_not_fit(llamagen, caplog):
    short = llamagen.max_model_len() + draft_headroom(llamagen, 1)  # room for about one draft
    with caplog.at_level("WARNING", logger="vllm.zipar.engine_args"):
        args = image_engine_args(llamagen, DRAFTING, {"max_model_len": short})
    assert args["max_model_len"] == short
    assert args["hf_overrides"] == {"max_position_embeddings": short}  # no hf_overrides needed from the user
    assert "zipar_drafts=4 with max_model_len=" in caplog.text and "room for about 1 drafts" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm.zipar.engine_args"):
        image_engine_args(llamagen, DRAFTING, {"max_model_len": 10_000})
        image_engine_args(llamagen, DECODING, {"max_model_len": 50})  # no drafts: nothing to warn about
    assert caplog.text == ""
    assert image_engine_args(llamagen, DECODING, {"max_model_len": 50})["max_model_len"] == 50
