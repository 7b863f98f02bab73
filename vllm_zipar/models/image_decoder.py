"""What a family's pixel decoder must do: token grids in, PIL images out, on the device it is moved to.

Front-ends get one from `ImageModel.load_decoder()`, move it once with `to(device)` (the HTTP route puts it
on the GPU when there is one) and then call `to_pil_images` on [B, H, W] grids of vocabulary ids; the
decoder maps ids to VQ codes itself (`VisualTokens.id_to_code`). A torch `nn.Module` with a
`to_pil_images` method already satisfies it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageDecoder(Protocol):
    def to_pil_images(self, grid_ids: torch.Tensor) -> list[Any]:
        """One RGB `PIL.Image` per grid of `grid_ids` [B, H, W] (vocabulary ids of visual tokens)."""
        ...

    def to(self, device: torch.device | str) -> ImageDecoder:
        """This decoder with its weights on `device` (inputs may come from any device)."""
        ...
