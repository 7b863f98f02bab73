"""How one image was decoded, as the engine core reports it back to the front-end that asked for it.

The scheduler fills one `ImageStats` per finished image and sends it as plain data in the request output's
`kv_transfer_params["zipar"]` (vLLM's only free-form per-request channel from the engine core); front-ends
read it back with `from_dict` to rebuild the grid, record metrics and log. `to_dict` is the one writer of that
wire form and `from_dict` the one reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEY = "zipar"  # the key of `kv_transfer_params` that carries the stats


@dataclass(frozen=True)
class ImageStats:
    decoding: str  # "zipar" or "ntp"
    window: int | None  # the ZipAR window; None for NTP
    cfg_scale: float  # classifier-free guidance scale (1: none)
    grid: tuple[int, int]  # (rows, columns) of the image
    prompt_len: int  # the conditional prompt's tokens
    uncond_prompt_len: int | None  # the unconditional prompt's tokens (None: unguided)
    passes: int  # engine forward passes, prefill included
    cells_per_pass: tuple[int, ...]  # grid cells sampled in each pass

    def to_dict(self) -> dict[str, Any]:
        return {
            "decoding": self.decoding,
            "window": self.window,
            "cfg_scale": self.cfg_scale,
            "grid": [self.grid[0], self.grid[1]],
            "prompt_len": self.prompt_len,
            "uncond_prompt_len": self.uncond_prompt_len,
            "passes": self.passes,
            "cells_per_pass": list(self.cells_per_pass),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageStats:
        rows, cols = data["grid"]
        return cls(
            decoding=str(data["decoding"]),
            window=data["window"],
            cfg_scale=float(data["cfg_scale"]),
            grid=(int(rows), int(cols)),
            prompt_len=int(data["prompt_len"]),
            uncond_prompt_len=data["uncond_prompt_len"],
            passes=int(data["passes"]),
            cells_per_pass=tuple(int(cells) for cells in data["cells_per_pass"]),
        )

    @classmethod
    def of_output(cls, kv_transfer_params: Mapping[str, Any] | None) -> ImageStats | None:
        """The stats a request output carries, or None (not finished, or not an image request)."""
        data = (kv_transfer_params or {}).get(KEY)
        return None if data is None else cls.from_dict(data)
