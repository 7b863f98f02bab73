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
    cells_per_pass: tuple[int, ...]  # grid cells sampled in each pass (with drafts: whose value became final)
    # Exact drafts (docs/exact_drafts.md §8; conditional stream: a guided image feeds every token twice).
    drafts: int = 0  # zipar_drafts: guesses per chain per pass (0: none, and the fields below stay 0)
    fed: int = 0  # logical tokens fed after the prefill
    draft_tokens: int = 0  # of which guesses
    accepted: int = 0  # guesses that turned out final
    superseded: int = 0  # KV slots whose token a later one at its position replaced
    tokens: tuple[int, ...] | None = None  # the H*W grid (vocabulary ids, raster order) of a draft image

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
        } | (
            {}
            if not self.drafts
            else {
                "drafts": self.drafts,
                "fed": self.fed,
                "draft_tokens": self.draft_tokens,
                "accepted": self.accepted,
                "superseded": self.superseded,
                "tokens": None if self.tokens is None else list(self.tokens),
            }
        )

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
            drafts=int(data.get("drafts", 0)),
            fed=int(data.get("fed", 0)),
            draft_tokens=int(data.get("draft_tokens", 0)),
            accepted=int(data.get("accepted", 0)),
            superseded=int(data.get("superseded", 0)),
            tokens=None if data.get("tokens") is None else tuple(int(t) for t in data["tokens"]),
        )

    @classmethod
    def of_output(cls, kv_transfer_params: Mapping[str, Any] | None) -> ImageStats | None:
        """The stats a request output carries, or None (not finished, or not an image request)."""
        data = (kv_transfer_params or {}).get(KEY)
        return None if data is None else cls.from_dict(data)
