"""Emu3's VQ decoder for serving: transformers' `Emu3VQVAE`, only its weights read from the model directory.

The VQ shares the safetensors with the text model (`vqmodel.*` in the Hub's Emu3-Gen-hf and in what
transformers 5's save_pretrained writes, `model.vqmodel.*` under transformers 5's module names);
`load_emu3_vq` reads just those keys, checked against the module, into a float32 model in eval mode, with
the directory's image processor for the pixel postprocessing. `codes_to_pil` turns
grids of VQ code indices into PIL images exactly as `Emu3ForConditionalGeneration.decode_image_tokens` and
`Emu3Processor.postprocess` do (one image per grid, 8 pixels per code on each side for the real VQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vllm_zipar.models.vq.transformers_vq import load_vq_module, read_prefixed_state_dict

VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")


@dataclass
class Emu3VQ:
    """A loaded Emu3 VQ: the decoder model and the image processor that turns its output into pixels."""

    model: Any  # transformers' Emu3VQVAE
    image_processor: Any  # transformers' Emu3ImageProcessor

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return int(self.model.spatial_scale_factor)


def read_emu3_vq_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The VQ's tensors from a model directory's safetensors, keyed as `Emu3VQVAE` names them."""
    return read_prefixed_state_dict(model_dir, VQ_PREFIXES)


def load_emu3_vq(model_dir: str | Path, device: str | torch.device = "cpu") -> Emu3VQ:
    """transformers' `Emu3VQVAE` for `model_dir`'s `vq_config` (float32, eval), only the VQ weights read."""
    from transformers import Emu3ImageProcessor, Emu3VQVAE

    model = load_vq_module(model_dir, Emu3VQVAE, VQ_PREFIXES, device)
    return Emu3VQ(model=model, image_processor=Emu3ImageProcessor.from_pretrained(model_dir))


@torch.inference_mode()
def codes_to_pil(vq: Emu3VQ, codes: torch.Tensor) -> list[Image.Image]:
    """Decode VQ code grids `codes` [B, H, W] (code indices, not vocabulary ids) to B RGB images."""
    if codes.ndim != 3:
        raise ValueError(f"codes must be [batch, height, width], got shape {tuple(codes.shape)}")
    size = vq.model.config.codebook_size
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
        raise ValueError(f"codes must lie in [0, {size}), got [{int(codes.min())}, {int(codes.max())}]")
    device = next(vq.model.parameters()).device
    pixels = vq.model.decode(codes.to(device=device, dtype=torch.long))  # [B, 3, 8H, 8W] in [-1, 1]
    out = vq.image_processor.postprocess(list(pixels.float().cpu()), return_tensors="PIL.Image.Image")
    return list(out["pixel_values"])
