"""Meta's Chameleon VQGAN decoder (what Lumina-mGPT turns image codes into pixels with), from Meta's files.

Meta ships the VQGAN as ``vqgan.yaml`` (a taming-transformers config: ``model.params`` with ``embed_dim``,
``n_embed`` and ``ddconfig``) and ``vqgan.ckpt`` (a Lightning checkpoint whose ``state_dict`` holds the
whole taming ``VQModel``: encoder, quantizer, quant convs, decoder, maybe training-loss weights). Lumina loads
them in ``lumina_mgpt/model/chameleon_vae_ori/image_tokenizer.py`` + ``vqgan.py`` (followed here): decoding is
a codebook lookup, ``post_quant_conv``, then taming's ``Decoder``; ``quant_conv`` and the encoder are for
encoding only, so this module leaves them out and the loader skips their keys. The decoder's blocks (pre-norm
ResnetBlock, single-head AttnBlock, nearest-x2 Upsample, GroupNorm(32, eps 1e-6), x*sigmoid(x)) are the same
computation as LlamaGen's, so they are reused from ``llamagen_vq``; the container differs (taming's
``mid.block_1``/``up.{level}.block.{i}`` key names, attention at the configured resolutions rather than the
lowest level only), hence its own class here. ``codes_to_pil`` follows Lumina's ``_pil_from_chw_tensor``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from vllm_zipar.models.vq.llamagen_vq import (
    GROUP_NORM_GROUPS,
    AttnBlock,
    ResnetBlock,
    Upsample,
    group_norm,
    swish,
)

# Top-level prefixes of the checkpoint keys this decoder owns; every key under them must match the module
# exactly. Keys under any other prefix (encoder., quant_conv., loss., ...) are not needed to decode.
DECODE_KEY_PREFIXES = ("quantize.", "post_quant_conv.", "decoder.")


class ChameleonVQGANError(ValueError):
    """A ``vqgan.yaml`` or ``vqgan.ckpt`` that is not a Chameleon VQGAN this module can decode with."""


@dataclass(frozen=True)
class ChameleonVQGANConfig:
    """What decoding needs from ``vqgan.yaml``: ``model.params.{embed_dim, n_embed}`` and its ``ddconfig``."""

    embed_dim: int
    n_embed: int
    z_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    out_ch: int
    dropout: float = 0.0
    tanh_out: bool = False

    @property
    def downsample(self) -> int:
        """Pixels per code along each side: x2 per level after the first (16 for Meta's five levels)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_yaml_params(cls, params: Mapping[str, Any], source: str = "vqgan.yaml") -> ChameleonVQGANConfig:
        """From the mapping under ``model.params``; ``source`` names the file in errors."""

        def need(mapping: Mapping[str, Any], key: str, where: str) -> Any:
            if key not in mapping:
                raise ChameleonVQGANError(f"{source}: missing {where}{key}")
            return mapping[key]

        ddconfig = need(params, "ddconfig", "model.params.")
        if not isinstance(ddconfig, Mapping):
            raise ChameleonVQGANError(f"{source}: model.params.ddconfig must be a mapping, got {ddconfig!r}")
        if params.get("remap") is not None:
            raise ChameleonVQGANError(
                f"{source}: model.params.remap (a used-codes index file) is not supported"
            )
        # taming's Decoder accepts these; Meta's VQGAN leaves them at the defaults below, the only ones
        # implemented here.
        unsupported = {
            "give_pre_end": False,
            "resamp_with_conv": True,
            "use_linear_attn": False,
            "attn_type": "vanilla",
        }
        for key, default in unsupported.items():
            if key in ddconfig and ddconfig[key] != default:
                raise ChameleonVQGANError(
                    f"{source}: ddconfig.{key}={ddconfig[key]!r} is not supported (only {default!r})"
                )
        where = "model.params.ddconfig."
        attn_resolutions = need(ddconfig, "attn_resolutions", where)
        ch_mult = need(ddconfig, "ch_mult", where)
        try:
            config = cls(
                embed_dim=_positive_int(need(params, "embed_dim", "model.params."), "embed_dim"),
                n_embed=_positive_int(need(params, "n_embed", "model.params."), "n_embed"),
                z_channels=_positive_int(need(ddconfig, "z_channels", where), "z_channels"),
                ch=_positive_int(need(ddconfig, "ch", where), "ch"),
                ch_mult=tuple(_positive_int(m, "ch_mult entry") for m in ch_mult),
                num_res_blocks=_positive_int(need(ddconfig, "num_res_blocks", where), "num_res_blocks"),
                attn_resolutions=tuple(
                    _positive_int(r, "attn_resolutions entry") for r in attn_resolutions or ()
                ),
                resolution=_positive_int(need(ddconfig, "resolution", where), "resolution"),
                out_ch=_positive_int(need(ddconfig, "out_ch", where), "out_ch"),
                dropout=float(ddconfig.get("dropout", 0.0)),
                tanh_out=bool(ddconfig.get("tanh_out", False)),
            )
        except (TypeError, ValueError) as error:
            raise ChameleonVQGANError(f"{source}: {error}") from error
        if not config.ch_mult:
            raise ChameleonVQGANError(f"{source}: {where}ch_mult is empty")
        for mult in config.ch_mult:
            if (config.ch * mult) % GROUP_NORM_GROUPS:
                raise ChameleonVQGANError(
                    f"{source}: ch * ch_mult entry = {config.ch} * {mult} is not a multiple of "
                    f"{GROUP_NORM_GROUPS} (taming's GroupNorm groups)"
                )
        return config


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class _Middle(nn.Module):
    """taming's ``mid``: res block, attention, res block (attention here whatever attn_resolutions says)."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _UpLevel(nn.Module):
    """One decoder resolution: ``block`` res blocks, an ``attn`` block after each when the level's nominal
    resolution is in attn_resolutions, then an ``upsample`` except at full resolution."""

    def __init__(self, block: nn.ModuleList, attn: nn.ModuleList, upsample: nn.Module | None) -> None:
        super().__init__()
        self.block = block
        self.attn = attn
        if upsample is not None:
            self.upsample = upsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for index, res_block in enumerate(self.block):
            h = res_block(h)
            if len(self.attn) > 0:
                h = self.attn[index](h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class ChameleonDecoder(nn.Module):
    """taming's ``Decoder``: latent [B, z_channels, h, w] -> image [B, out_ch, h*ds, w*ds]."""

    def __init__(self, config: ChameleonVQGANConfig) -> None:
        super().__init__()
        self.tanh_out = config.tanh_out
        levels = len(config.ch_mult)
        block_in = config.ch * config.ch_mult[-1]
        # Attention placement uses the configured nominal resolution, not the size actually decoded.
        curr_res = config.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Middle(block_in, config.dropout)
        built: list[_UpLevel] = []
        for level in reversed(range(levels)):
            block_out = config.ch * config.ch_mult[level]
            block, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if curr_res in config.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            built.append(_UpLevel(block, attn, Upsample(block_in) if level != 0 else None))
            if level != 0:
                curr_res *= 2
        # Stored full resolution first (taming prepends each level), run lowest resolution first.
        self.up = nn.ModuleList(reversed(built))
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(latent))
        for level in reversed(self.up):
            h = level(h)
        h = self.conv_out(swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class _CodebookLookup(nn.Module):
    """The quantizer's codebook (key ``quantize.embedding.weight``); decoding only looks entries up."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)


class ChameleonVQGAN(nn.Module):
    """The decode half of Meta's VQGAN: codebook, ``post_quant_conv``, decoder (taming's key names)."""

    def __init__(self, config: ChameleonVQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.quantize = _CodebookLookup(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)
        self.decoder = ChameleonDecoder(config)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return self.config.downsample

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, H, W] (codebook indices) -> float images [B, 3, ds*H, ds*W], nominally in [-1, 1].

        Lumina's ``pil_from_img_toks``: ``get_codebook_entry`` (row-major grid, channels last, then
        permuted to channels first), ``post_quant_conv``, decoder.
        """
        if codes.dim() != 3 or codes.shape[1] == 0 or codes.shape[2] == 0:
            raise ValueError(
                f"codes must be [batch, height, width] with height, width > 0, got {tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel():
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.config.n_embed:
                raise ValueError(
                    f"codes must lie in [0, {self.config.n_embed}), got values in [{low}, {high}]"
                )
        weight = self.quantize.embedding.weight
        latent = weight[codes.to(device=weight.device, dtype=torch.long)].permute(0, 3, 1, 2).contiguous()
        return self.decoder(self.post_quant_conv(latent))


def _read_yaml_params(config_path: Path) -> Mapping[str, Any]:
    if not config_path.is_file():
        raise FileNotFoundError(
            f"Chameleon VQGAN config {config_path} does not exist (expected Meta's vqgan.yaml)"
        )
    try:
        document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ChameleonVQGANError(f"{config_path}: not readable as YAML: {error}") from error
    model = document.get("model") if isinstance(document, Mapping) else None
    params = model.get("params") if isinstance(model, Mapping) else None
    if not isinstance(params, Mapping):
        raise ChameleonVQGANError(
            f"{config_path}: no model.params mapping (expected a taming VQModel config, Meta's vqgan.yaml)"
        )
    return params


def read_chameleon_vqgan_config(config_path: str | Path) -> ChameleonVQGANConfig:
    """The decoder's hyper-parameters from Meta's ``vqgan.yaml`` (``lossconfig`` and ``ckpt_path`` ignored,
    as Lumina's ImageTokenizer drops the one and overrides the other)."""
    config_path = Path(config_path)
    return ChameleonVQGANConfig.from_yaml_params(_read_yaml_params(config_path), str(config_path))


def _read_state_dict(checkpoint_path: Path) -> dict[str, torch.Tensor]:
    if not checkpoint_path.is_file():
        raise FileNotFoundError(
            f"Chameleon VQGAN checkpoint {checkpoint_path} does not exist (expected Meta's vqgan.ckpt)"
        )
    try:
        # weights_only: Meta's Lightning checkpoint holds only tensors and plain values (transformers'
        # Chameleon conversion reads it the same way), and nothing in it should run code.
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError on a truncated zip, ...: name the file
        raise ChameleonVQGANError(
            f"{checkpoint_path}: not readable as a weights-only torch checkpoint: {error}"
        ) from error
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ChameleonVQGANError(
            f"{checkpoint_path}: no 'state_dict' mapping (Lumina reads torch.load(path)['state_dict'])"
        )
    return state_dict


def _check_decode_keys(
    weights: Mapping[str, Any], expected: Mapping[str, torch.Tensor], checkpoint_path: Path
) -> None:
    def shown(keys: list[str]) -> str:
        return ", ".join(repr(k) for k in keys[:12]) + (
            f", ... ({len(keys) - 12} more)" if len(keys) > 12 else ""
        )

    ours = {key for key in weights if key.startswith(DECODE_KEY_PREFIXES)}
    problems: list[str] = []
    missing = sorted(set(expected) - ours)
    unexpected = sorted(ours - set(expected))
    if missing:
        problems.append(f"missing key(s): {shown(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {shown(unexpected)}")
    for key in sorted(set(expected) & ours):
        value = weights[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif value.shape != expected[key].shape:
            problems.append(
                f"{key!r}: expected shape {tuple(expected[key].shape)}, found {tuple(value.shape)}"
            )
    if problems:
        raise ChameleonVQGANError(
            f"{checkpoint_path}: decoder weights do not match the config: " + " | ".join(problems)
        )


def load_chameleon_vqgan(config_path: str | Path, checkpoint_path: str | Path) -> ChameleonVQGAN:
    """Meta's ``vqgan.yaml`` + ``vqgan.ckpt``, unchanged, as a float32 ``ChameleonVQGAN`` (eval, on the CPU).

    Strict about the keys decoding uses (``quantize.*``, ``post_quant_conv.*``, ``decoder.*``: none missing,
    none extra, shapes equal); keys under other prefixes (encoder, quant_conv, loss) are ignored, where
    Lumina's non-strict ``load_state_dict`` would load or ignore them. Errors name the file: a missing file
    raises ``FileNotFoundError``, anything else wrong a ``ChameleonVQGANError`` (a ``ValueError``).
    """
    config_path, checkpoint_path = Path(config_path), Path(checkpoint_path)
    config = read_chameleon_vqgan_config(config_path)
    weights = _read_state_dict(checkpoint_path)
    model = ChameleonVQGAN(config)
    expected = model.state_dict()
    _check_decode_keys(weights, expected, checkpoint_path)
    # Copies into the float32 parameters, so a half-precision file comes out float32.
    model.load_state_dict({key: weights[key] for key in expected}, strict=True)
    return model.float().eval()


@torch.inference_mode()
def codes_to_pil(vqgan: ChameleonVQGAN, codes: torch.Tensor) -> list[Image.Image]:
    """Decode code grids ``codes`` [B, H, W] to B RGB images of ds*H rows and ds*W columns.

    Lumina's ``_pil_from_chw_tensor``: clamp to [-1, 1], ``(x + 1) / 2``, channels last, then
    ``(x * 255).astype(uint8)`` in NumPy, which truncates (a value just below 1.0 gives 254, not 255).
    """
    pixels = vqgan.decode_codes(codes).detach().float().cpu()
    unit = (torch.clamp(pixels, -1.0, 1.0) + 1.0) / 2.0
    hwc = unit.permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray((image * 255).astype(np.uint8)) for image in hwc]
    return [image if image.mode == "RGB" else image.convert("RGB") for image in images]
