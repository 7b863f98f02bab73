"""Token grids to encoded images on a thread of their own: the route's VQ decoding stays off the event loop.

The decoder is the model family's (`ImageModel.load_decoder`, an `ImageDecoder`), loaded once in that thread
and moved to the GPU when there is one. Partial images
paint the cells not decoded yet grey.
"""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from vllm_zipar.models.image_model import ImageModel

PARTIAL_FILL = 128  # grey for the cells a partial image has not decoded yet


def _single_threaded_torch() -> None:
    """On CPU the engine's worker owns the cores (vLLM binds its OpenMP threads). A second OpenMP pool in
    this process, fighting it for them, slowed VQ decoding ~20x under load: images then finished one every
    ~0.4 s behind the pixel thread (benchmarks/serve_load.py, 2 cores: 1.9-3.9 images/s; 6.2 with this)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(1)


class PixelRenderer:
    """VQ decoding and image encoding of one served model, in one worker thread."""

    def __init__(self, model: ImageModel) -> None:
        self.model = model
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="zipar-pixels", initializer=_single_threaded_torch
        )
        self._vq = None

    def _decoder(self):
        if self._vq is None:
            vq = self.model.load_decoder()
            self._vq = vq.to("cuda") if torch.cuda.is_available() else vq
        return self._vq

    def _decode(self, grids: torch.Tensor, masks: torch.Tensor | None = None):
        """PIL images of token grids [B, H, W]; cells where `masks` is True are painted grey."""
        with torch.inference_mode():
            images = self._decoder().to_pil_images(grids)
        if masks is not None:
            rows, cols = grids.shape[-2:]
            for image, mask in zip(images, masks, strict=True):
                sy, sx = image.height // rows, image.width // cols
                for row, col in mask.nonzero().tolist():
                    box = (col * sx, row * sy, (col + 1) * sx, (row + 1) * sy)
                    image.paste((PARTIAL_FILL,) * 3, box)
        return images

    @staticmethod
    def _encode(image, output_format: str, compression: int | None) -> str:
        buffer = io.BytesIO()
        kwargs: dict[str, Any] = {}
        if output_format in ("jpeg", "webp") and compression is not None:
            kwargs["quality"] = compression
        image.save(buffer, format=output_format.upper(), **kwargs)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def _render(self, grids: torch.Tensor, masks, output_format: str, compression: int | None) -> list[str]:
        return [self._encode(im, output_format, compression) for im in self._decode(grids, masks)]

    async def render(
        self, grids: torch.Tensor, output_format: str, compression: int | None, masks=None
    ) -> list[str]:
        """Base64 images of token grids [B, H, W] (vocabulary ids), encoded as `output_format`."""
        loop = asyncio.get_running_loop()
        render = self._render
        return await loop.run_in_executor(self.executor, render, grids, masks, output_format, compression)

    async def warm_up(self) -> None:
        """Load the VQ decoder before the first request (in the pixel thread)."""
        await asyncio.get_running_loop().run_in_executor(self.executor, self._decoder)
