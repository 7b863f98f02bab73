"""The base of families served from an unchanged Hugging Face model directory (Emu3, Janus-Pro): the config
as transformers reads it, and the directory's optional `zipar.json` of serving options (sizes, prompt texts,
sampling defaults), each family naming the keys it accepts."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from vllm_zipar.models.image_model import ImageModel

OPTIONS_FILE = "zipar.json"


class HFImageModel(ImageModel):
    option_keys: ClassVar[frozenset[str]] = frozenset({"sampling_defaults"})

    @classmethod
    def load_config(cls, model_dir: Path) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir)

    @cached_property
    def options(self) -> dict[str, Any]:
        """The directory's `zipar.json` ({} without one); a key the family does not know is an error."""
        path = self.model_dir / OPTIONS_FILE
        if not path.is_file():
            return {}
        options = json.loads(path.read_text())
        unknown = set(options) - self.option_keys
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        return options
