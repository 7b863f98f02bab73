"""One image-model family as a whole: the engine's `ImageGrid` and the front-ends' `ImagePrompts` in one.

A family (LlamaGen, Emu3, ...) implements `ImageModel` once, in `models/`, built from its model directory
and transformers config; `models/registry.py` maps its `model_type` to it. The engine types against
`ImageGrid` (`image_grid.py`) only, the front-ends against this class; the pixel decoder is an
`ImageDecoder` (`image_decoder.py`). Nothing outside `models/` names a family.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, Protocol

from vllm_zipar.models.image_grid import ImageGrid
from vllm_zipar.models.image_prompts import ImagePrompts


class ImageModel(ImageGrid, ImagePrompts, Protocol):
    """A served image-generation model: one subclass per family, built from the model directory."""

    model_dir: Path
    hf_config: Any

    def __init__(self, model_dir: str | Path, hf_config: Any) -> None:
        self.model_dir = Path(model_dir)
        self.hf_config = hf_config

    @classmethod
    @abstractmethod
    def load_config(cls, model_dir: Path) -> Any:
        """The transformers config of `model_dir`, as vLLM will read it."""
