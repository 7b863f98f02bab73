"""Meta's Chameleon VQGAN decoder (Lumina-mGPT's): loads Meta's file format, decodes pixels equal to a
functional re-implementation of taming's decode, converts to PIL as Lumina does, and rejects bad files and
codes with errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tests.reference.chameleon_vqgan import read_vqgan_files, reference_decode, reference_pil_arrays
from vllm_zipar.models.vq import llamagen_vq
from vllm_zipar.models.vq.chameleon_vqgan import (
    ChameleonVQGAN,
    ChameleonVQGANError,
    codes_to_pil,
    load_chameleon_vqgan,
)
from vllm_zipar.testing.chameleon_vqgan_files import write_tiny_vqgan

CODEBOOK = 64
# Grids [B, H, W]: square, wide, tall, a single code.
GRIDS = [(1, 2, 2), (2, 3, 5), (1, 4, 1), (1, 1, 1)]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_vqgan(tmp_path_factory.mktemp("vqgan"), codebook_size=CODEBOOK, seed=3)


@pytest.fixture(scope="module")
def vqgan(tiny_files: tuple[Path, Path]) -> ChameleonVQGAN:
    return load_chameleon_vqgan(*tiny_files)


def _codes(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, CODEBOOK, shape, generator=torch.Generator().manual_seed(seed))


def _reference(tiny_files: tuple[Path, Path], codes: torch.Tensor) -> torch.Tensor:
    params, state = read_vqgan_files(*tiny_files)
    return reference_decode(params, state, codes)


def test_loaded_module_is_float32_eval_and_checkpoint_carries_meta_keys(
    tiny_files: tuple[Path, Path], vqgan: ChameleonVQGAN
) -> None:
    assert not vqgan.training
    assert {p.dtype for p in vqgan.parameters()} == {torch.float32}
    assert vqgan.downsample == 16
    checkpoint = torch.load(tiny_files[1], weights_only=True)
    keys = set(checkpoint["state_dict"])
    # The file has the whole taming VQModel (and a loss weight); the module only the decode half.
    assert {"encoder.conv_in.weight", "quant_conv.weight", "loss.discriminator.main.0.weight"} <= keys
    assert set(vqgan.state_dict()) == {
        k for k in keys if k.startswith(("decoder.", "quantize.", "post_quant_conv."))
    }


@pytest.mark.parametrize("shape", GRIDS)
def test_decode_codes_equals_reference(tiny_files: tuple[Path, Path], vqgan: ChameleonVQGAN, shape) -> None:
    codes = _codes(shape, seed=sum(shape))
    with torch.no_grad():
        pixels = vqgan.decode_codes(codes)
        expected = _reference(tiny_files, codes)
    batch, height, width = shape
    assert pixels.shape == (batch, 3, 16 * height, 16 * width)
    torch.testing.assert_close(pixels, expected, rtol=1e-5, atol=1e-5)
    assert pixels.std() > 0.3  # the random weights give varied pixels, not a flat image


def test_decode_with_attention_levels_equals_reference(tmp_path: Path) -> None:
    # Nominal resolutions 32 and 64 are the two lowest decoder levels of the tiny 512-px config.
    files = write_tiny_vqgan(tmp_path, codebook_size=CODEBOOK, seed=5, attn_resolutions=[32, 64])
    model = load_chameleon_vqgan(*files)
    assert any(".attn.2." in key for key in model.state_dict())
    codes = _codes((2, 2, 3), seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_codes(codes), _reference(files, codes), rtol=1e-5, atol=1e-5)


def test_grid_orientation_is_row_major(vqgan: ChameleonVQGAN) -> None:
    # A transposed grid is a different image, and the decode of a grid's rows is not its columns'.
    codes = _codes((1, 2, 3), seed=11)
    with torch.no_grad():
        pixels = vqgan.decode_codes(codes)
        transposed = vqgan.decode_codes(codes.transpose(1, 2).contiguous())
    assert not torch.allclose(pixels.transpose(2, 3), transposed, atol=1e-3)


def _bilinear_upsample(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="bilinear"))


@pytest.mark.parametrize("wrong", ["no_post_quant_conv", "bilinear_upsample", "group_norm_eps_1e-5"])
def test_reference_comparison_catches_a_wrong_block(
    tiny_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, wrong: str
) -> None:
    model = load_chameleon_vqgan(*tiny_files)
    if wrong == "no_post_quant_conv":
        model.post_quant_conv = nn.Identity()  # type: ignore[assignment]  # embed_dim == z_channels
    elif wrong == "bilinear_upsample":
        monkeypatch.setattr(llamagen_vq.Upsample, "forward", _bilinear_upsample)
    else:
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.eps = 1e-5
    codes = _codes((1, 2, 3), seed=4)
    with torch.no_grad():
        pixels, expected = model.decode_codes(codes), _reference(tiny_files, codes)
    # The tolerance test_decode_codes_equals_reference uses; GroupNorm's eps moves pixels by ~1e-4 only.
    assert not torch.allclose(pixels, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 3, 5)])
def test_codes_to_pil_follows_luminas_conversion(vqgan: ChameleonVQGAN, shape) -> None:
    codes = _codes(shape, seed=7 + shape[2])
    images = codes_to_pil(vqgan, codes)
    with torch.no_grad():
        expected = reference_pil_arrays(vqgan.decode_codes(codes))
    assert len(images) == shape[0]
    for image, array in zip(images, expected, strict=True):
        assert image.mode == "RGB"
        assert image.size == (16 * shape[2], 16 * shape[1])  # PIL: (width, height)
        np.testing.assert_array_equal(np.asarray(image), array)
        assert len(np.unique(np.asarray(image))) > 50


def test_codes_to_pil_truncates_like_lumina(monkeypatch: pytest.MonkeyPatch, vqgan: ChameleonVQGAN) -> None:
    # Lumina's (x * 255).astype(uint8) truncates: 0.999 -> 254, and clamping maps out-of-range to 0 / 255.
    values = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 2.5])
    fixed = values.view(1, 1, 1, 6).expand(1, 3, 1, 6).contiguous()
    monkeypatch.setattr(ChameleonVQGAN, "decode_codes", lambda self, codes: fixed)
    image = codes_to_pil(vqgan, torch.zeros(1, 1, 1, dtype=torch.long))[0]
    assert np.asarray(image)[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_to_device_moves_weights_and_accepts_cpu_codes(tiny_files: tuple[Path, Path]) -> None:
    model = load_chameleon_vqgan(*tiny_files)
    assert model.to(torch.device("cpu")) is model
    # The meta device stands in for an accelerator: codes on the CPU follow the weights there.
    out = model.to("meta").decode_codes(_codes((1, 2, 3), seed=1).to(torch.int32))
    assert out.device.type == "meta" and out.shape == (1, 3, 32, 48)


def test_codebook_and_encoder_layout_match_transformers_chameleon_vqvae(
    tiny_files: tuple[Path, Path], vqgan: ChameleonVQGAN
) -> None:
    """transformers' ChameleonVQVAE (built for Meta's real file) loads the tiny file's encoder-side keys
    strictly, and the codes it encodes index the same codebook rows this decoder looks up."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    params = yaml.safe_load(tiny_files[0].read_text())["model"]["params"]
    dd = params["ddconfig"]
    config = ChameleonVQVAEConfig(
        embed_dim=params["embed_dim"],
        num_embeddings=params["n_embed"],
        double_latent=dd["double_z"],
        latent_channels=dd["z_channels"],
        resolution=dd["resolution"],
        in_channels=dd["in_channels"],
        base_channels=dd["ch"],
        channel_multiplier=dd["ch_mult"],
        num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=dd["attn_resolutions"],
        dropout=dd["dropout"],
    )
    hf = ChameleonVQVAE(config).float().eval()
    state = torch.load(tiny_files[1], weights_only=True)["state_dict"]
    hf.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(("decoder.", "loss."))}, strict=True
    )
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        encoded = hf.encode(image)
        codes = encoded.image_tokens.view(1, 2, 3)
        rows = vqgan.quantize.embedding.weight[codes].permute(0, 3, 1, 2)
    # Not bit-equal: transformers returns the straight-through z + (z_q - z), which rounds in the last bit.
    torch.testing.assert_close(rows, encoded.quantized_last_hidden_state, rtol=0, atol=1e-6)
    assert codes.unique().numel() > 1


# --- errors ---------------------------------------------------------------------------------------


def _rewrite_yaml(path: Path, edit) -> None:
    document = yaml.safe_load(path.read_text())
    edit(document["model"]["params"])
    path.write_text(yaml.safe_dump(document))


def _rewrite_state(path: Path, edit) -> None:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint["state_dict"])
    torch.save(checkpoint, path)


def test_missing_files_name_the_path(tmp_path: Path, tiny_files: tuple[Path, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="vqgan.yaml"):
        load_chameleon_vqgan(tmp_path / "nope.yaml", tiny_files[1])
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_chameleon_vqgan(tiny_files[0], tmp_path / "nope.ckpt")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model: [unclosed", "not readable as YAML"),
        ("- just\n- a list\n", "no model.params"),
        ("model:\n  params:\n    n_embed: 64\n", r"missing model\.params\.ddconfig"),
    ],
)
def test_garbled_yaml_is_rejected(
    tmp_path: Path, tiny_files: tuple[Path, Path], text: str, match: str
) -> None:
    path = tmp_path / "vqgan.yaml"
    path.write_text(text)
    with pytest.raises(ChameleonVQGANError, match=match):
        load_chameleon_vqgan(path, tiny_files[1])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: p["ddconfig"].pop("ch_mult"), r"missing model\.params\.ddconfig\.ch_mult"),
        (lambda p: p.update(n_embed="many"), "n_embed must be a positive integer"),
        (lambda p: p["ddconfig"].update(ch=24), "not a multiple of 32"),
        (lambda p: p["ddconfig"].update(resamp_with_conv=False), "resamp_with_conv"),
    ],
)
def test_invalid_yaml_values_are_rejected(tmp_path: Path, edit, match: str) -> None:
    config, checkpoint = write_tiny_vqgan(tmp_path, codebook_size=CODEBOOK)
    _rewrite_yaml(config, edit)
    with pytest.raises(ChameleonVQGANError, match=match):
        load_chameleon_vqgan(config, checkpoint)


def test_yaml_that_disagrees_with_the_checkpoint_names_the_shape(tmp_path: Path) -> None:
    config, checkpoint = write_tiny_vqgan(tmp_path, codebook_size=CODEBOOK)
    _rewrite_yaml(config, lambda p: p.update(n_embed=CODEBOOK * 2))
    with pytest.raises(
        ChameleonVQGANError, match=r"'quantize\.embedding\.weight': expected shape \(128, 32\)"
    ):
        load_chameleon_vqgan(config, checkpoint)


def test_garbled_checkpoint_is_rejected(tmp_path: Path, tiny_files: tuple[Path, Path]) -> None:
    path = tmp_path / "vqgan.ckpt"
    path.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ChameleonVQGANError, match="not readable as a weights-only torch checkpoint"):
        load_chameleon_vqgan(tiny_files[0], path)
    torch.save(torch.load(tiny_files[1], weights_only=True)["state_dict"], path)  # bare, no wrapper
    with pytest.raises(ChameleonVQGANError, match="no 'state_dict'"):
        load_chameleon_vqgan(tiny_files[0], path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda sd: sd.pop("decoder.up.0.block.2.conv2.weight"),
            r"missing key\(s\): 'decoder\.up\.0\.block\.2",
        ),
        (lambda sd: sd.pop("post_quant_conv.bias"), r"missing key\(s\): 'post_quant_conv\.bias'"),
        (
            lambda sd: sd.update({"decoder.up.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)}),
            r"unexpected key\(s\): 'decoder\.up\.0\.attn\.0\.q\.weight'",
        ),
        (
            lambda sd: sd.update({"decoder.conv_out.weight": torch.zeros(4, 32, 3, 3)}),
            r"'decoder\.conv_out\.weight': expected shape \(3, 32, 3, 3\)",
        ),
    ],
)
def test_decoder_keys_are_strict(tmp_path: Path, edit, match: str) -> None:
    config, checkpoint = write_tiny_vqgan(tmp_path, codebook_size=CODEBOOK)
    _rewrite_state(checkpoint, edit)
    with pytest.raises(ChameleonVQGANError, match=match):
        load_chameleon_vqgan(config, checkpoint)


def test_keys_outside_the_decode_path_are_ignored(tmp_path: Path) -> None:
    config, checkpoint = write_tiny_vqgan(tmp_path, codebook_size=CODEBOOK, seed=3)

    def edit(sd: dict) -> None:
        for key in [k for k in sd if k.startswith(("encoder.", "quant_conv."))]:
            del sd[key]
        sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
        sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"].half()  # a half file loads float32

    _rewrite_state(checkpoint, edit)
    model = load_chameleon_vqgan(config, checkpoint)
    assert model.decoder.conv_out.weight.dtype == torch.float32
    codes = _codes((1, 2, 2), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            model.decode_codes(codes), _reference((config, checkpoint), codes), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    ("codes", "match"),
    [
        (torch.zeros(2, 2, dtype=torch.long), r"\[batch, height, width\]"),
        (torch.zeros(1, 0, 2, dtype=torch.long), r"height, width > 0"),
        (torch.zeros(1, 2, 2), "integer tensor"),
        (torch.full((1, 2, 2), CODEBOOK, dtype=torch.long), r"\[0, 64\)"),
        (torch.full((1, 2, 2), -1, dtype=torch.long), r"\[0, 64\)"),
    ],
)
def test_bad_codes_are_rejected(vqgan: ChameleonVQGAN, codes: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vqgan.decode_codes(codes)
