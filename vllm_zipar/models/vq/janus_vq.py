"""Janus-Pro's VQ decoder for serving: transformers' `JanusVQVAE`, only its weights read from the directory.

The VQ shares the safetensors with the language model (`model.vqmodel.*`, what transformers 5's
save_pretrained and the deepseek-community repositories have); `load_janus_vq` reads just those keys, checked
against the module, into a float32 model in eval mode, with the directory's image processor for the pixel
postprocessing. `codes_to_pil` turns grids of VQ code indices into PIL images exactly as
`JanusForConditionalGeneration.decode_image_tokens`' `vqmodel.decode` and `JanusProcessor.postprocess` do
(the model's one square grid; 16 pixels per code for the real VQ). `JanusPixelDecoder` is the family's
`ImageDecoder` (vocabulary ids in).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vllm_zipar.models.image_grid import VisualTokens
from vllm_zipar.models.vq.transformers_vq import load_vq_module, read_prefixed_state_dict

VQ_PREFIX = "model.vqmodel."


@dataclass
class JanusVQ:
    """A loaded Janus VQ: the decoder model and the image processor that turns its output into pixels."""

    model: Any  # transformers' JanusVQVAE
    image_processor: Any  # transformers' JanusImageProcessor (or its PIL twin without torchvision)

    @property
    def grid(self) -> tuple[int, int]:
        """The (rows, columns) of codes `decode` takes (`vq_config.num_patches`, square)."""
        rows, cols = self.model.quantize.quant_state_dims
        return int(rows), int(cols)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side: one upsampling per level after the first."""
        return 2 ** (len(self.model.config.channel_multiplier) - 1)


def read_janus_vq_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The VQ's tensors from a model directory's safetensors, keyed as `JanusVQVAE` names them."""
    return read_prefixed_state_dict(model_dir, (VQ_PREFIX,))


def load_janus_vq(model_dir: str | Path, device: str | torch.device = "cpu") -> JanusVQ:
    """transformers' `JanusVQVAE` for `model_dir`'s `vq_config` (float32, eval), only the VQ weights read."""
    from transformers import AutoImageProcessor, JanusVQVAE

    model = load_vq_module(model_dir, JanusVQVAE, (VQ_PREFIX,), device)
    return JanusVQ(model=model, image_processor=AutoImageProcessor.from_pretrained(model_dir))


@torch.inference_mode()
def codes_to_pil(vq: JanusVQ, codes: torch.Tensor) -> list[Image.Image]:
    """Decode VQ code grids `codes` [B, H, W] (code indices, not vocabulary ids) to B RGB images."""
    if codes.ndim != 3 or tuple(codes.shape[1:]) != vq.grid:
        raise ValueError(f"codes must be [batch, {vq.grid[0]}, {vq.grid[1]}], got shape {tuple(codes.shape)}")
    size = vq.model.config.num_embeddings
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
        raise ValueError(f"codes must lie in [0, {size}), got [{int(codes.min())}, {int(codes.max())}]")
    device = next(vq.model.parameters()).device
    pixels = vq.model.decode(
        codes.flatten(1).to(device=device, dtype=torch.long)
    )  # [B, 3, H*d, W*d], [-1, 1]
    out = vq.image_processor.postprocess(list(pixels.float().cpu()), return_tensors="PIL.Image.Image")
    return list(out["pixel_values"])


class JanusPixelDecoder:
    """Vocabulary ids -> VQ codes -> pixels through transformers' `JanusVQVAE` (not re-implemented)."""

    def __init__(self, model_dir: str | Path, visual: VisualTokens) -> None:
        self.visual = visual
        self.vq = load_janus_vq(model_dir)

    def to(self, device: torch.device | str) -> JanusPixelDecoder:
        self.vq.model = self.vq.model.to(device)
        return self

    def to_pil_images(self, grid_ids: torch.Tensor) -> list[Any]:
        return codes_to_pil(self.vq, self.visual.id_to_code(grid_ids))
