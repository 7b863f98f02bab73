"""Reading the authors' GPT checkpoint layouts, and the errors a bad file gets."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_zipar.models.llamagen_checkpoint import (
    check_gpt_state_dict,
    expected_gpt_shapes,
    load_gpt_state_dict,
    random_gpt_state_dict,
    save_gpt_checkpoint,
)
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.models.model_dir import init_model_dir, load_config

TINY = dict(dim=64, n_layer=2, n_head=2, codebook_size=256, num_classes=10, grid_size=8, multiple_of=32)


@pytest.fixture
def config() -> LlamaGenConfig:
    return LlamaGenConfig(**TINY)


@pytest.mark.parametrize("layout", ["model", "state_dict", "raw"])
def test_every_authors_layout_loads_the_same_tensors(tmp_path, config, layout):
    state = random_gpt_state_dict(config, seed=3)
    path = tmp_path / f"{layout}.pt"
    save_gpt_checkpoint(state, path, layout, config)
    if layout == "raw":
        # FSDP-consolidated files may carry the derived rotary table; it must be dropped, not rejected.
        raw = torch.load(path, weights_only=True)
        raw["freqs_cis"] = torch.zeros(3, 2)
        torch.save(raw, path)
    loaded = load_gpt_state_dict(path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    check_gpt_state_dict(loaded, config, path)


def test_model_layout_pickles_an_argparse_namespace_and_still_loads_weights_only(tmp_path, config):
    path = tmp_path / "train.pt"
    save_gpt_checkpoint(random_gpt_state_dict(config), path, "model", config)
    raw = torch.load(path, weights_only=True)  # the Namespace is the only non-tensor class allowed
    assert type(raw["args"]).__name__ == "Namespace"


def test_missing_key_is_named_with_the_file(tmp_path, config):
    state = random_gpt_state_dict(config)
    del state["layers.1.feed_forward.w3.weight"]
    path = tmp_path / "gpt.pt"
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w3\.weight") as err:
        check_gpt_state_dict(state, config, path)
    assert str(path) in str(err.value) and "missing" in str(err.value)


def test_unexpected_and_misshaped_keys_are_named(tmp_path, config):
    state = random_gpt_state_dict(config)
    state["layers.0.attention.bias"] = torch.zeros(3)
    state["norm.weight"] = torch.ones(65)
    with pytest.raises(ValueError) as err:
        check_gpt_state_dict(state, config, tmp_path / "gpt.pt")
    message = str(err.value)
    assert "unexpected keys: layers.0.attention.bias" in message
    assert "norm.weight (expected (64,), found (65,))" in message


def test_expected_names_are_the_authors_for_gpt_b():
    shapes = expected_gpt_shapes(LlamaGenConfig(gpt_model="GPT-B", grid_size=16))
    assert shapes["layers.11.attention.wqkv.weight"] == (3 * 768, 768)
    assert shapes["layers.0.feed_forward.w1.weight"] == (2048, 768)
    assert shapes["cls_embedding.embedding_table.weight"] == (1001, 768)
    assert shapes["output.weight"] == (16384, 768)
    assert len(shapes) == 4 + 12 * 7


def test_gpt_3b_heads_are_padded_to_a_kernel_size():
    config = LlamaGenConfig(gpt_model="GPT-3B", grid_size=24)
    assert config.rope_head_dim == 100 and config.head_dim == 112
    assert config.max_position_embeddings == 2 * (1 + 24 * 24 + 2 * 24)  # two CFG streams


def test_class_labels_outside_the_range_are_refused(config):
    assert config.class_token_id(9) == 256 + 9
    with pytest.raises(ValueError, match=r"class label 10 is outside \[0, 10\)"):
        config.class_token_id(10)
    with pytest.raises(ValueError, match=r"class label -1 is outside \[0, 10\)"):
        config.class_token_id(-1)
    with pytest.raises(TypeError):
        config.class_token_id("3")  # type: ignore[arg-type]
    assert config.null_class_token_id == 256 + 10


def write_codebook(path, codes: int, code_dim: int = 8) -> None:
    """A VQ checkpoint holding only its codebook: what init-model reads of it."""
    torch.save({"model": {"quantize.embedding.weight": torch.zeros(codes, code_dim)}}, path)


def test_init_model_refuses_a_vq_whose_codebook_is_not_the_gpts_vocabulary(tmp_path):
    config = LlamaGenConfig(**TINY)
    save_gpt_checkpoint(random_gpt_state_dict(config), tmp_path / "c2i_tiny.pt", "model", config)
    write_codebook(tmp_path / "vq.pt", 16384)
    with pytest.raises(
        ValueError, match=r"vq.pt: its codebook has 16384 codes but the GPT \(c2i_tiny.pt\) has a "
    ):
        init_model_dir(tmp_path, "c2i_tiny.pt", "vq.pt", image_size=128, n_head=2, multiple_of=32)
    assert not (tmp_path / "config.json").exists()


def test_init_model_cli_takes_a_custom_gpt_with_n_head(tmp_path, capsys):
    from vllm_zipar.cli import main

    config = LlamaGenConfig(**{**TINY, "multiple_of": 256})  # the default: the CLI has no flag for it
    save_gpt_checkpoint(random_gpt_state_dict(config), tmp_path / "c2i_tiny.pt", "model", config)
    write_codebook(tmp_path / "vq.pt", 256)
    argv = ["init-model", str(tmp_path), "--gpt", "c2i_tiny.pt", "--vq", "vq.pt", "--image-size", "128"]
    assert main(argv) == 2  # no preset has this width, and no --n-head
    assert "--n-head" in capsys.readouterr().err
    assert main([*argv, "--n-head", "2"]) == 0
    assert load_config(tmp_path).n_head == 2


def test_init_model_writes_a_config_that_round_trips(tmp_path):
    config = LlamaGenConfig(**TINY)
    save_gpt_checkpoint(random_gpt_state_dict(config), tmp_path / "c2i_tiny.pt", "model", config)
    write_codebook(tmp_path / "vq.pt", 256)
    written = init_model_dir(tmp_path, "c2i_tiny.pt", "vq.pt", image_size=128, n_head=2, multiple_of=32)
    assert written.dim == 64 and written.n_layer == 2 and written.grid_size == 8 and written.num_classes == 10
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "llamagen" and data["architectures"] == ["LlamaGenForImageGeneration"]
    assert "head_dim" not in data  # derived values stay out of the file
    again = load_config(tmp_path).to_dict()
    for key, value in written.to_dict().items():
        if key not in ("_name_or_path", "transformers_version"):
            assert again[key] == value, key


def test_init_model_infers_the_authors_preset(tmp_path):
    config = LlamaGenConfig(gpt_model="GPT-B", grid_size=16)
    shapes = expected_gpt_shapes(config)
    state = {name: torch.zeros(shape) for name, shape in shapes.items()}
    torch.save({"model": state}, tmp_path / "c2i_B_256.pt")
    write_codebook(tmp_path / "vq_ds16_c2i.pt", 16384)
    written = init_model_dir(tmp_path, "c2i_B_256.pt", "vq_ds16_c2i.pt", image_size=256)
    assert written.gpt_model == "GPT-B" and written.grid_size == 16 and written.num_classes == 1000
