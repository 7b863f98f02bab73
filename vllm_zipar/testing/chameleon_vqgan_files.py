"""Tiny random Chameleon VQGAN files in Meta's format (``vqgan.yaml`` + ``vqgan.ckpt``), for tests and tiny
Lumina-mGPT model directories.

The yaml has the structure of Meta's (a taming config: ``model.{base_learning_rate, target, params}`` with
``embed_dim``, ``n_embed``, ``ddconfig``, ``lossconfig`` and ``ckpt_path``, the keys transformers' Chameleon
conversion reads and deletes) and the checkpoint is a Lightning-style ``{"state_dict": ..., "epoch", ...}``
holding every tensor of taming's ``VQModel``: encoder, quantizer codebook, quant convs and decoder, plus a few
``loss.*`` weights as a taming training checkpoint carries them. The key list is enumerated here from taming's
``Encoder``/``Decoder`` (as in Lumina's ``chameleon_vae_ori/vqgan.py``), not taken from the loader, so the
loader's and the reference decoder's key names are checked against an independent listing. Tiny choices: the
real five resolution levels (16 pixels per code) and ``num_res_blocks`` 2, at ``ch`` 32 and 32 latent channels
(Meta: 128 and 256), ``embed_dim == z_channels`` as in Meta's file. Weights are random but decode to varied
pixels (random GroupNorm affines, a unit-scale codebook).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import yaml

VQGAN_CONFIG_NAME = "vqgan.yaml"
VQGAN_CHECKPOINT_NAME = "vqgan.ckpt"

TINY_CH = 32
TINY_CH_MULT = (1, 1, 1, 2, 2)
TINY_Z_CHANNELS = 32
TINY_RESOLUTION = 512
TINY_NUM_RES_BLOCKS = 2

_RES_NORMS = ("norm1", "norm2")
_ATTN_CONVS = ("q", "k", "v", "proj_out")


def tiny_vqgan_yaml(
    *,
    codebook_size: int,
    checkpoint_name: str = VQGAN_CHECKPOINT_NAME,
    attn_resolutions: Sequence[int] = (),
) -> dict[str, object]:
    """The tiny ``vqgan.yaml`` document (Meta's structure, tiny values)."""
    return {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": TINY_Z_CHANNELS,
                "n_embed": codebook_size,
                "ddconfig": {
                    "double_z": False,
                    "z_channels": TINY_Z_CHANNELS,
                    "resolution": TINY_RESOLUTION,
                    "in_channels": 3,
                    "out_ch": 3,
                    "ch": TINY_CH,
                    "ch_mult": list(TINY_CH_MULT),
                    "num_res_blocks": TINY_NUM_RES_BLOCKS,
                    "attn_resolutions": list(attn_resolutions),
                    "dropout": 0.0,
                },
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {
                        "disc_conditional": False,
                        "disc_in_channels": 3,
                        "disc_start": 0,
                        "disc_weight": 0.8,
                        "codebook_weight": 1.0,
                    },
                },
                # Loaders ignore it (Lumina's ImageTokenizer overrides it with its own argument).
                "ckpt_path": checkpoint_name,
            },
        }
    }


def _conv(name: str, c_in: int, c_out: int, k: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    yield f"{name}.weight", (c_out, c_in, k, k), "conv"
    yield f"{name}.bias", (c_out,), "conv_bias"


def _norm(name: str, channels: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    yield f"{name}.weight", (channels,), "norm_weight"
    yield f"{name}.bias", (channels,), "norm_bias"


def _resnet(name: str, c_in: int, c_out: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    yield from _norm(f"{name}.norm1", c_in)
    yield from _conv(f"{name}.conv1", c_in, c_out, 3)
    yield from _norm(f"{name}.norm2", c_out)
    yield from _conv(f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        yield from _conv(f"{name}.nin_shortcut", c_in, c_out, 1)


def _attn(name: str, channels: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    yield from _norm(f"{name}.norm", channels)
    for conv in _ATTN_CONVS:
        yield from _conv(f"{name}.{conv}", channels, channels, 1)


def _mid(name: str, channels: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    yield from _resnet(f"{name}.block_1", channels, channels)
    yield from _attn(f"{name}.attn_1", channels)
    yield from _resnet(f"{name}.block_2", channels, channels)


def taming_vqmodel_tensors(params: dict) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) of every tensor in taming's ``VQModel`` for a yaml's ``model.params``."""
    dd = params["ddconfig"]
    ch, mults, blocks = dd["ch"], list(dd["ch_mult"]), dd["num_res_blocks"]
    attn_at, levels = set(dd["attn_resolutions"]), len(dd["ch_mult"])
    z, embed = dd["z_channels"], params["embed_dim"]

    # Encoder: levels full resolution first, num_res_blocks each, downsample on all but the last.
    yield from _conv("encoder.conv_in", dd["in_channels"], ch, 3)
    curr_res, block_in = dd["resolution"], ch
    for level in range(levels):
        block_out = ch * mults[level]
        for i in range(blocks):
            yield from _resnet(f"encoder.down.{level}.block.{i}", block_in, block_out)
            block_in = block_out
            if curr_res in attn_at:
                yield from _attn(f"encoder.down.{level}.attn.{i}", block_in)
        if level != levels - 1:
            yield from _conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
            curr_res //= 2
    yield from _mid("encoder.mid", block_in)
    yield from _norm("encoder.norm_out", block_in)
    yield from _conv("encoder.conv_out", block_in, 2 * z if dd["double_z"] else z, 3)

    # Decoder: built lowest resolution first, stored under up.{level} (level 0 = full resolution),
    # num_res_blocks + 1 blocks each, upsample on all but level 0.
    block_in = ch * mults[-1]
    curr_res = dd["resolution"] // 2 ** (levels - 1)
    yield from _conv("decoder.conv_in", z, block_in, 3)
    yield from _mid("decoder.mid", block_in)
    for level in reversed(range(levels)):
        block_out = ch * mults[level]
        for i in range(blocks + 1):
            yield from _resnet(f"decoder.up.{level}.block.{i}", block_in, block_out)
            block_in = block_out
            if curr_res in attn_at:
                yield from _attn(f"decoder.up.{level}.attn.{i}", block_in)
        if level != 0:
            yield from _conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
            curr_res *= 2
    yield from _norm("decoder.norm_out", block_in)
    yield from _conv("decoder.conv_out", block_in, dd["out_ch"], 3)

    yield "quantize.embedding.weight", (params["n_embed"], embed), "codebook"
    yield from _conv("quant_conv", z, embed, 1)
    yield from _conv("post_quant_conv", embed, z, 1)
    # A stand-in for the training loss weights a taming checkpoint carries (PatchGAN's first conv).
    yield from _conv("loss.discriminator.main.0", dd["out_ch"], 8, 4)


def _random_tensor(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "codebook":
        # taming initialises entries at +-1/n_embed; unit scale keeps distinct codes visibly distinct.
        return torch.randn(shape, generator=generator)
    if kind == "norm_weight":
        # Random GroupNorm affines keep contrast through the blocks (weight 1, bias 0 whitens everything).
        return torch.empty(shape).uniform_(0.5, 1.5, generator=generator)
    if kind == "norm_bias":
        return torch.randn(shape, generator=generator) * 0.2
    if kind == "conv":
        fan_in = math.prod(shape[1:])
        return torch.empty(shape).uniform_(-1.0, 1.0, generator=generator) * math.sqrt(3.0 / fan_in)
    return torch.randn(shape, generator=generator) * 0.05  # conv_bias


def write_tiny_vqgan(
    directory: str | Path,
    *,
    codebook_size: int = 64,
    seed: int = 0,
    attn_resolutions: Sequence[int] = (),
) -> tuple[Path, Path]:
    """Write ``vqgan.yaml`` and ``vqgan.ckpt`` into ``directory``; return (yaml path, checkpoint path).

    ``attn_resolutions`` (nominal resolutions 32..512 here) adds attention blocks to the levels taming
    would; the default, none, is what Meta's VQGAN config has.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = tiny_vqgan_yaml(codebook_size=codebook_size, attn_resolutions=attn_resolutions)
    params = document["model"]["params"]  # type: ignore[index]
    generator = torch.Generator().manual_seed(seed)
    state_dict = {
        key: _random_tensor(shape, kind, generator) for key, shape, kind in taming_vqmodel_tensors(params)
    }
    yaml_path = directory / VQGAN_CONFIG_NAME
    checkpoint_path = directory / VQGAN_CHECKPOINT_NAME
    yaml_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    torch.save(
        {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.9.0", "state_dict": state_dict},
        checkpoint_path,
    )
    return yaml_path, checkpoint_path
