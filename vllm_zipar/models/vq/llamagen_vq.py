"""LlamaGen's VQ image tokenizer (VQ-16 / VQ-8), ported so the authors' ``.pt`` files load as-is.

The architecture, parameter names and numerics follow FoundationVision/LlamaGen
``tokenizer/tokenizer_image/vq_model.py`` (read at commits 3786e6a and 5a50452, whose architectures
are identical): a taming-transformers style conv encoder/decoder with GroupNorm(32), swish, one
self-attention block per res block at the lowest resolution, and an l2-normalised codebook. Module
attribute names reproduce the authors' state-dict keys (for example
``encoder.conv_blocks.0.res.1.conv2.weight``, ``quantize.embedding.weight``,
``quantize.codebook_used``), so ``load_llamagen_vq`` needs no key conversion. Checkpoint layouts
follow their ``vq_train.py`` (writer) and ``vq_demo.py`` (reader); the uint8 convention follows
their ``autoregressive/sample/sample_c2i_ddp.py``. Serving only needs ``decode_codes``; the encoder
is kept because the authors' files carry its weights (loading is strict) and the project encodes images
with it. What only training uses (the quantizer's losses and usage history, the ``vq_train.py`` args)
is in ``vllm_zipar/training/llamagen_vq_training.py``; random test checkpoints are written by
``vllm_zipar/testing/llamagen_vq_files.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# Size of the quantizer's usage ring buffer. The authors hard-code it (it is not a ModelArgs field),
# and it is persistent, so every checkpoint trained with codebook_show_usage=True carries a [65536]
# tensor.
CODEBOOK_USAGE_HISTORY = 65536
# The one state-dict entry that is training statistics, not weights (see load_llamagen_vq).
CODEBOOK_USAGE_KEY = "quantize.codebook_used"
# GroupNorm group count fixed by the authors' Normalize(); every normalised width must divide by it.
GROUP_NORM_GROUPS = 32
IMAGE_CHANNELS = 3


class LlamaGenCheckpointError(ValueError):
    """A checkpoint file that is not a LlamaGen VQ state dict matching the config.

    A ValueError (the file's content is the bad value) with its own type so the serving layer can
    tell a bad model file apart from a bad request.
    """


# Reading order of the wrapper keys, as in the authors' vq_demo.py: EMA weights win when a training
# checkpoint carries both (they are the ones the authors evaluate), then the DDP "model" weights,
# then a Lightning-style "state_dict".
WEIGHT_KEYS_IN_PRECEDENCE: tuple[str, ...] = ("ema", "model", "state_dict")


@dataclass
class LlamaGenVQConfig:
    """Hyper-parameters of one LlamaGen VQ model.

    The first ten fields are the authors' ``ModelArgs`` with their defaults (which are VQ-16's);
    ``ch`` and ``num_res_blocks`` are constructor defaults of their ``Encoder``/``Decoder`` that
    ``ModelArgs`` never overrides, exposed here so tests and the project's small demo tokenizer can
    shrink the model. Released checkpoints use ``ch=128, num_res_blocks=2``.
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        # Fail at construction, not deep inside GroupNorm or a reshape.
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaGenVQConfig.{name} must be a positive int, got {value!r}")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mults = list(getattr(self, name))
            if not mults or any(not isinstance(m, int) or m < 1 for m in mults):
                raise ValueError(
                    f"LlamaGenVQConfig.{name} must be a non-empty list of positive ints, got {mults!r}"
                )
            setattr(self, name, mults)
            for mult in mults:
                width = self.ch * mult
                if width % GROUP_NORM_GROUPS:
                    raise ValueError(
                        f"LlamaGenVQConfig: ch * {name} entry = {self.ch} * {mult} = {width} is "
                        f"not a multiple of {GROUP_NORM_GROUPS} (the authors' GroupNorm groups)"
                    )
        # The token grid must map back to the image size the encoder took it from.
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                "LlamaGenVQConfig: encoder_ch_mult and decoder_ch_mult must have the same length "
                f"(same downsample factor), got {self.encoder_ch_mult} and {self.decoder_ch_mult}"
            )
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"LlamaGenVQConfig.dropout_p must be in [0, 1), got {self.dropout_p}")

    @property
    def downsample(self) -> int:
        """Pixels per token side: 2 per resolution level after the first (16 for VQ-16)."""
        return 2 ** (len(self.decoder_ch_mult) - 1)

    @classmethod
    def vq_16(cls, **overrides: object) -> LlamaGenVQConfig:
        """The authors' ``VQ_16`` preset (ch_mult [1, 1, 2, 2, 4]), overridable like ``VQ_16``."""
        return cls(**{"encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4], **overrides})

    @classmethod
    def vq_8(cls, **overrides: object) -> LlamaGenVQConfig:
        """The authors' ``VQ_8`` preset (ch_mult [1, 2, 2, 4])."""
        return cls(**{"encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4], **overrides})


# --------------------------------------------------------------------------------------------------
# Building blocks. Attribute names are the authors' (they are the checkpoint keys).
# --------------------------------------------------------------------------------------------------


def swish(x: torch.Tensor) -> torch.Tensor:
    # Written out rather than F.silu: the fused kernel rounds differently in the last bit, and this
    # form keeps decoded pixels bit-identical to the authors' code (checked on CPU float32).
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    # eps=1e-6 (not PyTorch's 1e-5) is what the checkpoints were trained with.
    return nn.GroupNorm(num_groups=GROUP_NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 ``nin_shortcut`` only when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # The authors' conv_shortcut option (3x3) is never enabled by any of their models, so only
        # the 1x1 variant exists here; a checkpoint with conv_shortcut keys fails loading by name.
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        batch, channels, height, width = x.shape
        # [B, HW, C] queries against [B, C, HW] keys: explicit matmul + softmax in float32, the same
        # arithmetic as the authors (the grid here is at most a few hundred positions).
        queries = self.q(normed).reshape(batch, channels, height * width).transpose(1, 2)
        keys = self.k(normed).reshape(batch, channels, height * width)
        values = self.v(normed).reshape(batch, channels, height * width)
        weights = torch.softmax(torch.bmm(queries, keys) * (channels**-0.5), dim=2)
        attended = torch.bmm(values, weights.transpose(1, 2)).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (asymmetric, as taming-transformers)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResolutionLevel(nn.Module):
    """One resolution of the encoder or decoder: ``res`` blocks, ``attn`` blocks (lowest resolution
    only; one after each res block) and an optional ``downsample``/``upsample`` resampler.

    The authors use a bare ``nn.Module`` here; the attribute names are what matters for the keys.
    """

    def __init__(self, res: nn.ModuleList, attn: nn.ModuleList) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for index, res_block in enumerate(self.res):
            h = res_block(h)
            if len(self.attn) > 0:
                h = self.attn[index](h)
        return h


def _middle_blocks(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, dropout),
            AttnBlock(channels),
            ResnetBlock(channels, channels, dropout),
        ]
    )


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> latent [B, z_channels, H/ds, W/ds]."""

    def __init__(self, config: LlamaGenVQConfig) -> None:
        super().__init__()
        ch, mults = config.ch, config.encoder_ch_mult
        self.conv_in = nn.Conv2d(IMAGE_CHANNELS, ch, kernel_size=3, stride=1, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        last_level = len(mults) - 1
        for level, mult in enumerate(mults):
            block_out = ch * mult
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, config.dropout_p))
                block_in = block_out
                if level == last_level:
                    attn.append(AttnBlock(block_in))
            resolution = ResolutionLevel(res, attn)
            if level != last_level:
                resolution.downsample = Downsample(block_in)
            self.conv_blocks.append(resolution)
        self.mid = _middle_blocks(block_in, config.dropout_p)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for resolution in self.conv_blocks:
            h = resolution.run_blocks(h)
            if hasattr(resolution, "downsample"):
                h = resolution.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, 3, h*ds, w*ds] (nominally in [-1, 1])."""

    def __init__(self, config: LlamaGenVQConfig) -> None:
        super().__init__()
        ch, mults = config.ch, config.decoder_ch_mult
        block_in = ch * mults[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _middle_blocks(block_in, config.dropout_p)
        # conv_blocks.0 is the lowest resolution: the authors iterate levels in reverse when
        # building.
        self.conv_blocks = nn.ModuleList()
        last_level = len(mults) - 1
        for level in reversed(range(len(mults))):
            block_out = ch * mults[level]
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out, config.dropout_p))
                block_in = block_out
                if level == last_level:
                    attn.append(AttnBlock(block_in))
            resolution = ResolutionLevel(res, attn)
            if level != 0:
                resolution.upsample = Upsample(block_in)
            self.conv_blocks.append(resolution)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, IMAGE_CHANNELS, kernel_size=3, stride=1, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The output conv weight; the authors' GAN loss balances gradients against it."""
        return self.conv_out.weight

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latent)
        for block in self.mid:
            h = block(h)
        for resolution in self.conv_blocks:
            h = resolution.run_blocks(h)
            if hasattr(resolution, "upsample"):
                h = resolution.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


@dataclass
class QuantizerOutput:
    """What one quantizer pass produced: ``quantized`` carries straight-through gradients to the encoder."""

    quantized: torch.Tensor  # [B, embed_dim, h, w]
    codes: torch.Tensor  # [B, h, w] int64


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser; with ``l2_norm`` both latents and entries live on the unit
    sphere, so the nearest entry is the one with the highest cosine similarity.

    This is the authors' quantizer without its training losses and usage statistics (their forward in
    eval mode); ``training.llamagen_vq_training.TrainingVectorQuantizer`` adds them, same weights and keys.
    """

    def __init__(self, config: LlamaGenVQConfig) -> None:
        super().__init__()
        self.codebook_size = config.codebook_size
        self.embed_dim = config.codebook_embed_dim
        self.l2_norm = config.codebook_l2_norm
        self.show_usage = config.codebook_show_usage
        self.embedding = nn.Embedding(self.codebook_size, self.embed_dim)
        # Initial codebook as the authors draw it; checkpoints overwrite it.
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if self.show_usage:
            # Persistent on purpose: the authors' checkpoints contain it, so a strict key match
            # needs it.
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_HISTORY))

    def codebook(self) -> torch.Tensor:
        """Codebook entries as the quantiser compares and emits them (unit-normalised with l2_norm;
        the stored weights need not be, after training)."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> latent [B, embed_dim, h, w] (the authors' ``get_codebook_entry``)."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def nearest(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z [B, h, w, C] as compared, its nearest entries z_q, flat codes [B*h*w], distances [B*h*w, K])."""
        z = latent.permute(0, 2, 3, 1).contiguous()  # [B, h, w, C]
        codebook = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        z_flat = z.reshape(-1, self.embed_dim)
        # |z|^2 + |e|^2 - 2 z.e, the authors' expansion; kept (rather than cdist) so ties and
        # rounding pick the same index they do.
        distances = (
            torch.sum(z_flat**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * (z_flat @ codebook.t())
        )
        flat_codes = torch.argmin(distances, dim=1)
        return z, codebook[flat_codes].view(z.shape), flat_codes, distances

    @staticmethod
    def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """z_q in value, z's gradient, as [B, C, h, w]; in eval mode too, as the authors (same bits)."""
        return (z + (z_q - z).detach()).permute(0, 3, 1, 2)

    def forward(self, latent: torch.Tensor) -> QuantizerOutput:
        z, z_q, flat_codes, _ = self.nearest(latent)
        return QuantizerOutput(quantized=self.straight_through(z, z_q), codes=flat_codes.view(z.shape[:-1]))


# --------------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------------


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images [B, 3, H, W] nominally in [-1, 1] -> uint8 [B, H, W, 3].

    The authors' FID sampler (``sample_c2i_ddp.py``): ``clamp(127.5 * x + 128, 0, 255)`` then a cast
    to uint8, which truncates, so this is round-half-up of ``127.5 * (x + 1)``. torchvision's
    ``save_image(normalize=True, value_range=(-1, 1))`` used by ``sample_c2i.py`` computes
    ``clamp(x, -1, 1)`` -> ``(x + 1) / 2 * 255 + 0.5`` -> clamp -> truncate: the same mapping, up to
    float rounding in the last bit.
    """
    scaled = torch.clamp(127.5 * images.float() + 128.0, 0.0, 255.0)
    return scaled.permute(0, 2, 3, 1).to(torch.uint8).contiguous()


class LlamaGenVQModel(nn.Module):
    """The authors' ``VQModel``: encoder, quant_conv, quantize, post_quant_conv, decoder."""

    def __init__(self, config: LlamaGenVQConfig, quantizer: type[VectorQuantizer] = VectorQuantizer) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = quantizer(config)  # training passes the quantizer with losses
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)

    def _check_images(self, images: torch.Tensor) -> None:
        ds = self.config.downsample
        if images.dim() != 4 or images.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"images must be [B, {IMAGE_CHANNELS}, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[2], images.shape[3]
        if height % ds or width % ds or height == 0 or width == 0:
            raise ValueError(
                f"image size {height}x{width} must be a positive multiple of the downsample factor {ds}"
            )

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, h, w], got shape {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel():
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.config.codebook_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"code {bad} is outside the codebook range [0, {self.config.codebook_size - 1}]"
                )

    def quantize_images(self, images: torch.Tensor) -> QuantizerOutput:
        """Encoder, quant_conv and quantizer (the authors' ``encode``): training and evaluation."""
        self._check_images(images)
        return self.quantize(self.quant_conv(self.encoder(images)))

    def decode_latent(self, quantized: torch.Tensor) -> torch.Tensor:
        """post_quant_conv + decoder (the authors' ``decode``)."""
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruction and quantizer output (a training quantizer adds losses), as their ``forward``."""
        quantized = self.quantize_images(images)
        return self.decode_latent(quantized.quantized), quantized

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, H/ds, W/ds] (int64 codebook indices)."""
        return self.quantize_images(images).codes

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> float images [B, 3, h*ds, w*ds], nominally in [-1, 1] (the authors'
        ``decode_code`` with ``shape=(B, embed_dim, h, w)``, channel-first)."""
        self._check_codes(codes)
        codes = codes.to(device=self.quantize.embedding.weight.device, dtype=torch.long)
        return self.decode_latent(self.quantize.lookup(codes))

    @torch.inference_mode()
    def decode_to_uint8(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> uint8 RGB [B, h*ds, w*ds, 3] on the model's device.

        Pixel convention: ``images_to_uint8``.
        """
        return images_to_uint8(self.decode_codes(codes))

    def to_pil_images(self, codes: torch.Tensor) -> list[Image.Image]:
        """Codes [B, h, w] -> one RGB Pillow image per batch entry."""
        pixels = self.decode_to_uint8(codes).cpu().numpy()
        return [Image.fromarray(image) for image in pixels]


# --------------------------------------------------------------------------------------------------
# Checkpoint files in the authors' layouts.
# --------------------------------------------------------------------------------------------------


def _select_weights(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise LlamaGenCheckpointError(
            f"{path}: expected a dict checkpoint, found {type(checkpoint).__name__}"
        )
    for key in WEIGHT_KEYS_IN_PRECEDENCE:
        if key in checkpoint:
            weights, where = checkpoint[key], f"[{key!r}]"
            break
    else:
        weights, where = checkpoint, ""
        non_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
        if non_tensors:
            raise LlamaGenCheckpointError(
                f"{path}: no weights found: none of the keys {list(WEIGHT_KEYS_IN_PRECEDENCE)} is "
                f"present and it is not a raw state dict (non-tensor entries: {non_tensors[:8]})"
            )
    if not isinstance(weights, dict):
        raise LlamaGenCheckpointError(
            f"{path}: checkpoint{where} is a {type(weights).__name__}, not a state dict"
        )
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise LlamaGenCheckpointError(
                f"{path}: checkpoint{where} entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return weights


def _describe_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_weights_match(
    weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path
) -> None:
    problems: list[str] = []
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"missing key(s): {_describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_describe_keys(unexpected)}")
    mismatched = [
        f"{key!r}: expected {tuple(expected[key].shape)}, found {tuple(weights[key].shape)}"
        for key in sorted(set(expected) & set(weights))
        if weights[key].shape != expected[key].shape
    ]
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:20]))
    if problems:
        raise LlamaGenCheckpointError(
            f"{path} does not match the LlamaGen VQ config: " + " | ".join(problems)
        )


def read_vq_codebook_shape(path: str | Path) -> tuple[int, int]:
    """(codebook size, code dimension) of the authors' VQ checkpoint at ``path``, without building the model
    (memory-mapped: only the codebook is read)."""
    path = Path(path)
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise LlamaGenCheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint: {error}"
        ) from error
    codebook = _select_weights(checkpoint, path).get("quantize.embedding.weight")
    if codebook is None or codebook.dim() != 2:
        raise LlamaGenCheckpointError(f"{path}: no 2-D 'quantize.embedding.weight' (the VQ codebook)")
    return int(codebook.shape[0]), int(codebook.shape[1])


def load_llamagen_vq(path: str | Path, config: LlamaGenVQConfig) -> LlamaGenVQModel:
    """Build a model for ``config`` and load the authors' checkpoint at ``path``.

    The model comes back on the CPU, in eval mode, float32. Accepted layouts: a training checkpoint
    (``vq_train.py``: ``{"model", "ema"?, "optimizer", ..., "steps", "args": argparse.Namespace}``),
    ``{"state_dict": ...}``, or a raw state dict. When more than one weight set is present the
    choice follows ``vq_demo.py``: ``"ema"``, then ``"model"``, then ``"state_dict"``.
    (``sample_c2i.py`` reads ``"model"`` directly; a checkpoint without ``"ema"`` reads the same
    either way.)

    Loading is strict, like the authors' ``load_state_dict``, with one exception: the quantizer's
    ``codebook_used`` usage history is training statistics that never affects encoding or decoding,
    so it may be absent (kept at zeros) or present when the config has ``codebook_show_usage=False``
    (dropped). Any other missing, unexpected or mis-shaped key raises an error naming the key(s)
    and ``path`` (a ``LlamaGenCheckpointError``, which is a ``ValueError``).
    """
    path = Path(path)
    # The training script pickles its argparse.Namespace beside the weights; allow exactly that one
    # class so weights_only loading (no arbitrary code execution) still reads the authors' files.
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # UnpicklingError and friends: say which file, keep the cause
        raise LlamaGenCheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint: {error}"
        ) from error
    weights = dict(_select_weights(checkpoint, path))

    model = LlamaGenVQModel(config)
    expected = model.state_dict()
    if CODEBOOK_USAGE_KEY in expected and CODEBOOK_USAGE_KEY not in weights:
        weights[CODEBOOK_USAGE_KEY] = expected[CODEBOOK_USAGE_KEY]
    if CODEBOOK_USAGE_KEY not in expected:
        weights.pop(CODEBOOK_USAGE_KEY, None)
    _check_weights_match(weights, expected, path)
    # load_state_dict copies into the float32 parameters, so bf16/fp16 files come out float32.
    model.load_state_dict(weights, strict=True)
    return model.float().eval()
