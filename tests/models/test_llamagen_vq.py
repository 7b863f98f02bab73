"""Behaviour of the LlamaGen VQ port: the authors' key names, their checkpoint layouts, decoding to
pixels with their uint8 convention, and loader errors that name the bad key and file."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_zipar.models.vq.llamagen_vq import (
    CODEBOOK_USAGE_KEY,
    LlamaGenVQConfig,
    LlamaGenVQModel,
    images_to_uint8,
    load_llamagen_vq,
)
from vllm_zipar.testing.llamagen_vq_files import CHECKPOINT_LAYOUTS, write_random_vq_checkpoint
from vllm_zipar.training.llamagen_vq_training import training_vq_model


def tiny_two_level_config(**overrides: object) -> LlamaGenVQConfig:
    """Two resolutions (downsample 2): the smallest config that has every kind of block."""
    fields: dict[str, object] = {
        "ch": 32,
        "encoder_ch_mult": [1, 2],
        "decoder_ch_mult": [1, 2],
        "z_channels": 32,
        "codebook_size": 64,
    }
    return LlamaGenVQConfig(**{**fields, **overrides})


def tiny_vq16_config() -> LlamaGenVQConfig:
    """VQ-16's five levels (downsample 16) at ch=32, so grids map to pixels as in serving."""
    return LlamaGenVQConfig(ch=32, z_channels=32, codebook_size=64)


# Every module with a weight and a bias in the authors' VQModel for tiny_two_level_config(), written
# out by hand from tokenizer/tokenizer_image/vq_model.py: encoder levels 0..1 (two res blocks each,
# a 1x1 nin_shortcut where 32 -> 64 channels, attention after each res block at the last level, a
# downsample on all but the last), mid = res/attn/res, and decoder levels stored lowest resolution
# first (three res blocks each, shortcut where 64 -> 32, upsample on all but the full-resolution
# level).
_RES = ("norm1", "conv1", "norm2", "conv2")
_ATTN = ("norm", "q", "k", "v", "proj_out")
EXPECTED_WEIGHT_AND_BIAS_MODULES = [
    "encoder.conv_in",
    *[f"encoder.conv_blocks.0.res.0.{m}" for m in _RES],
    *[f"encoder.conv_blocks.0.res.1.{m}" for m in _RES],
    "encoder.conv_blocks.0.downsample.conv",
    *[f"encoder.conv_blocks.1.res.0.{m}" for m in _RES],
    "encoder.conv_blocks.1.res.0.nin_shortcut",
    *[f"encoder.conv_blocks.1.attn.0.{m}" for m in _ATTN],
    *[f"encoder.conv_blocks.1.res.1.{m}" for m in _RES],
    *[f"encoder.conv_blocks.1.attn.1.{m}" for m in _ATTN],
    *[f"encoder.mid.0.{m}" for m in _RES],
    *[f"encoder.mid.1.{m}" for m in _ATTN],
    *[f"encoder.mid.2.{m}" for m in _RES],
    "encoder.norm_out",
    "encoder.conv_out",
    "decoder.conv_in",
    *[f"decoder.mid.0.{m}" for m in _RES],
    *[f"decoder.mid.1.{m}" for m in _ATTN],
    *[f"decoder.mid.2.{m}" for m in _RES],
    *[f"decoder.conv_blocks.0.res.0.{m}" for m in _RES],
    *[f"decoder.conv_blocks.0.attn.0.{m}" for m in _ATTN],
    *[f"decoder.conv_blocks.0.res.1.{m}" for m in _RES],
    *[f"decoder.conv_blocks.0.attn.1.{m}" for m in _ATTN],
    *[f"decoder.conv_blocks.0.res.2.{m}" for m in _RES],
    *[f"decoder.conv_blocks.0.attn.2.{m}" for m in _ATTN],
    "decoder.conv_blocks.0.upsample.conv",
    *[f"decoder.conv_blocks.1.res.0.{m}" for m in _RES],
    "decoder.conv_blocks.1.res.0.nin_shortcut",
    *[f"decoder.conv_blocks.1.res.1.{m}" for m in _RES],
    *[f"decoder.conv_blocks.1.res.2.{m}" for m in _RES],
    "decoder.norm_out",
    "decoder.conv_out",
    "quant_conv",
    "post_quant_conv",
]
EXPECTED_SINGLE_TENSORS = ["quantize.embedding.weight", "quantize.codebook_used"]


@pytest.fixture(scope="module")
def vq16_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny VQ-16-shaped checkpoint per layout, all from seed 0."""
    directory = tmp_path_factory.mktemp("vq16")
    paths = {}
    for layout in CHECKPOINT_LAYOUTS:
        paths[layout] = directory / f"{layout}.pt"
        write_random_vq_checkpoint(paths[layout], tiny_vq16_config(), seed=0, layout=layout)
    return paths


@pytest.fixture(scope="module")
def vq16_model(vq16_checkpoints: dict[str, Path]) -> LlamaGenVQModel:
    return load_llamagen_vq(vq16_checkpoints["model"], tiny_vq16_config())


def grid_of_codes(batch: int, rows: int, cols: int, codebook_size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, codebook_size, (batch, rows, cols), generator=generator)


# --- names and sizes ------------------------------------------------------------------------------


def test_state_dict_keys_are_the_authors_keys() -> None:
    expected = {f"{m}.{p}" for m in EXPECTED_WEIGHT_AND_BIAS_MODULES for p in ("weight", "bias")}
    expected |= set(EXPECTED_SINGLE_TENSORS)
    assert set(LlamaGenVQModel(tiny_two_level_config()).state_dict()) == expected


def test_vq16_defaults_match_the_released_tokenizer() -> None:
    config = LlamaGenVQConfig()
    assert config.downsample == 16
    assert LlamaGenVQConfig.vq_8().downsample == 8
    with torch.device("meta"):
        model = LlamaGenVQModel(config)
    state = model.state_dict()
    assert state["quantize.embedding.weight"].shape == (16384, 8)
    assert state["decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert state["quant_conv.weight"].shape == (8, 256, 1, 1)
    assert state[CODEBOOK_USAGE_KEY].shape == (65536,)
    # Janus-Pro ships LlamaGen's VQ-16 as 343 weight tensors plus the codebook_used buffer, and the
    # LlamaGen paper gives VQ-16 72M parameters.
    assert len(state) == 344
    weights = sum(v.numel() for k, v in state.items() if k != CODEBOOK_USAGE_KEY)
    assert 71.5e6 < weights < 72.5e6


def test_config_rejects_widths_groupnorm_cannot_split() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        LlamaGenVQConfig(ch=16)
    with pytest.raises(ValueError, match="same length"):
        LlamaGenVQConfig(encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2, 2])


# --- checkpoint layouts ---------------------------------------------------------------------------


def test_every_layout_decodes_identically(vq16_checkpoints: dict[str, Path]) -> None:
    codes = grid_of_codes(2, 3, 2, codebook_size=64)
    outputs = {
        layout: load_llamagen_vq(path, tiny_vq16_config()).decode_to_uint8(codes)
        for layout, path in vq16_checkpoints.items()
    }
    for layout, pixels in outputs.items():
        assert torch.equal(pixels, outputs["model"]), layout


def test_ema_weights_win_over_model_weights(vq16_checkpoints: dict[str, Path]) -> None:
    torch.serialization.add_safe_globals([argparse.Namespace])
    saved = torch.load(vq16_checkpoints["ema"], map_location="cpu", weights_only=True)
    key = "decoder.conv_out.weight"
    assert not torch.equal(saved["model"][key], saved["ema"][key])
    loaded = load_llamagen_vq(vq16_checkpoints["ema"], tiny_vq16_config())
    assert torch.equal(loaded.state_dict()[key], saved["ema"][key])


def test_training_layout_carries_args_namespace_and_steps(
    vq16_checkpoints: dict[str, Path],
) -> None:
    torch.serialization.add_safe_globals([argparse.Namespace])
    saved = torch.load(vq16_checkpoints["model"], map_location="cpu", weights_only=True)
    assert isinstance(saved["args"], argparse.Namespace)
    assert saved["args"].codebook_size == 64
    assert isinstance(saved["steps"], int)


def test_loaded_model_is_eval_float32_even_from_bf16(tmp_path: Path) -> None:
    config = tiny_two_level_config()
    weights = {k: v.to(torch.bfloat16) for k, v in LlamaGenVQModel(config).state_dict().items()}
    path = tmp_path / "bf16.pt"
    torch.save({"state_dict": weights}, path)
    model = load_llamagen_vq(path, config)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_codebook_usage_buffer_is_optional_both_ways(tmp_path: Path) -> None:
    config = tiny_two_level_config()
    weights = LlamaGenVQModel(config).state_dict()
    without_usage = {k: v for k, v in weights.items() if k != CODEBOOK_USAGE_KEY}
    torch.save(without_usage, tmp_path / "without.pt")
    assert load_llamagen_vq(tmp_path / "without.pt", config).quantize.codebook_used.abs().sum() == 0
    torch.save(weights, tmp_path / "with.pt")
    model = load_llamagen_vq(tmp_path / "with.pt", tiny_two_level_config(codebook_show_usage=False))
    assert CODEBOOK_USAGE_KEY not in model.state_dict()


# --- loader errors --------------------------------------------------------------------------------


def _save_edited(tmp_path: Path, edit: str) -> Path:
    weights = dict(LlamaGenVQModel(tiny_two_level_config()).state_dict())
    if edit == "missing":
        del weights["decoder.conv_blocks.1.res.0.nin_shortcut.weight"]
    elif edit == "extra":
        weights["decoder.conv_blocks.1.res.0.conv_shortcut.weight"] = torch.zeros(32, 64, 3, 3)
    elif edit == "shape":
        weights["quantize.embedding.weight"] = torch.zeros(65, 8)
    path = tmp_path / f"{edit}.pt"
    torch.save({"model": weights}, path)
    return path


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("missing", ["missing", "decoder.conv_blocks.1.res.0.nin_shortcut.weight"]),
        ("extra", ["unexpected", "decoder.conv_blocks.1.res.0.conv_shortcut.weight"]),
        ("shape", ["quantize.embedding.weight", "expected (64, 8)", "found (65, 8)"]),
    ],
)
def test_mismatched_checkpoint_names_key_and_file(tmp_path: Path, edit: str, named: list[str]) -> None:
    path = _save_edited(tmp_path, edit)
    with pytest.raises(ValueError) as error:
        load_llamagen_vq(path, tiny_two_level_config())
    for fragment in [str(path), *named]:
        assert fragment in str(error.value)


def test_checkpoint_without_weights_names_file(tmp_path: Path) -> None:
    path = tmp_path / "optimizer_only.pt"
    torch.save({"optimizer": {"lr": 1e-4}, "steps": 3}, path)
    with pytest.raises(ValueError, match="no weights found") as error:
        load_llamagen_vq(path, tiny_two_level_config())
    assert str(path) in str(error.value)


@dataclass
class NotAllowListed:
    """A class the weights-only unpickler must refuse to build."""

    note: str = "arbitrary pickled object"


def test_arbitrary_pickled_objects_are_refused(tmp_path: Path) -> None:
    weights = LlamaGenVQModel(tiny_two_level_config()).state_dict()
    path = tmp_path / "unsafe.pt"
    torch.save({"model": weights, "args": NotAllowListed()}, path)
    with pytest.raises(ValueError, match="weights-only") as error:
        load_llamagen_vq(path, tiny_two_level_config())
    assert str(path) in str(error.value)


# --- decoding and encoding ------------------------------------------------------------------------


def test_decode_to_uint8_is_image_shaped_and_varied(vq16_model: LlamaGenVQModel) -> None:
    codes = grid_of_codes(2, 3, 2, codebook_size=64)
    pixels = vq16_model.decode_to_uint8(codes)
    assert pixels.shape == (2, 3 * 16, 2 * 16, 3)
    assert pixels.dtype == torch.uint8
    assert pixels.float().std() > 5.0
    assert len(torch.unique(pixels)) > 32
    # Different codes make different pictures (the codes are actually read).
    assert not torch.equal(pixels[0], pixels[1])


def test_pil_images_carry_the_uint8_pixels(vq16_model: LlamaGenVQModel) -> None:
    codes = grid_of_codes(2, 2, 3, codebook_size=64)
    images = vq16_model.to_pil_images(codes)
    pixels = vq16_model.decode_to_uint8(codes)
    assert [image.size for image in images] == [(3 * 16, 2 * 16)] * 2
    assert all(image.mode == "RGB" for image in images)
    assert torch.equal(torch.from_numpy(np.array(images[1])), pixels[1])
    assert isinstance(images[0], Image.Image)


def test_uint8_convention_rounds_half_up_like_the_authors_sampler() -> None:
    values = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5, (10.4 / 127.5) - 1.0, (10.6 / 127.5) - 1.0])
    pixels = images_to_uint8(values.view(1, 1, 1, -1).expand(1, 3, 1, -1))[0, 0, :, 0]
    assert pixels.tolist() == [0, 0, 128, 255, 255, 10, 11]


def test_uint8_convention_agrees_with_torchvision_save_image() -> None:
    # torchvision.utils.save_image(normalize=True, value_range=(-1, 1)), which sample_c2i.py uses:
    # clamp to the range, map to [0, 1], then mul(255).add(0.5).clamp(0, 255) and truncate.
    x = torch.linspace(-1.2, 1.2, 200_001)
    ours = images_to_uint8(x.view(1, 1, 1, -1).expand(1, 3, 1, -1))[0, 0, :, 0].int()
    saved = ((x.clamp(-1, 1) + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).int()
    scaled = 127.5 * (x + 1)
    away_from_half = (scaled - scaled.floor() - 0.5).abs() > 1e-3
    assert torch.equal(ours[away_from_half], saved[away_from_half])
    assert (ours - saved).abs().max() <= 1  # the two float orders may round an exact .5 differently


def test_encode_of_decoded_image_is_a_code_grid(vq16_model: LlamaGenVQModel) -> None:
    codes = grid_of_codes(2, 3, 2, codebook_size=64)
    with torch.inference_mode():
        again = vq16_model.encode(vq16_model.decode_codes(codes).clamp(-1, 1))
    assert again.shape == codes.shape
    assert again.dtype == torch.int64
    assert int(again.min()) >= 0
    assert int(again.max()) < 64


def test_bad_inputs_are_rejected_with_the_allowed_range(vq16_model: LlamaGenVQModel) -> None:
    with pytest.raises(ValueError, match=r"code 64 .*\[0, 63\]"):
        vq16_model.decode_codes(torch.full((1, 2, 2), 64))
    with pytest.raises(ValueError, match="integer"):
        vq16_model.decode_codes(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="multiple of the downsample factor 16"):
        vq16_model.encode(torch.zeros(1, 3, 40, 32))


def test_training_forward_sends_gradients_to_the_encoder() -> None:
    model = training_vq_model(tiny_two_level_config()).train()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    reconstruction, quantized = model(images)
    assert reconstruction.shape == images.shape
    loss = (reconstruction - images).pow(2).mean() + quantized.codebook_loss + quantized.commitment_loss
    loss.backward()
    assert model.encoder.conv_in.weight.grad is not None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert 0 < quantized.codebook_usage <= 1
