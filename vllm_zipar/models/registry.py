"""Which `ImageModel` serves a model directory: chosen by its config's `model_type`, nowhere else.

Adding a family means adding its entries here: its `ImageModel`, its vLLM model class, and its transformers
config class if transformers lacks one (`plugin.py` registers the last two with vLLM and transformers). The
engine and the front-ends only ever call `image_model_for_config` / `load_image_model` (the engine types the
result as the `ImageGrid` it reads). The key is the family's only `model_type`; every family also gives a
tiny-directory writer for the tests (`vllm_zipar/testing/tiny_dirs.py`), which the family contract test
(tests/models/test_family_contract.py) requires for every key here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_zipar.models.image_model import ImageModel

# model_type -> "module:Class" of its ImageModel (imported on use: a family may need heavy imports).
IMAGE_MODELS = {
    "llamagen": "vllm_zipar.models.llamagen_image_model:LlamaGenImageModel",
    "emu3": "vllm_zipar.models.emu3_image_model:Emu3ImageModel",
    "janus": "vllm_zipar.models.janus_image_model:JanusImageModel",
    "chameleon": "vllm_zipar.models.lumina_image_model:LuminaImageModel",
}


# vLLM architecture name -> "module:Class" of our vLLM model class (ModelRegistry takes the string lazily).
VLLM_MODEL_CLASSES = {
    "LlamaGenForImageGeneration": "vllm_zipar.models.llamagen:LlamaGenForImageGeneration",
    "Emu3ForImageGeneration": "vllm_zipar.models.emu3:Emu3ForImageGeneration",
    "JanusForImageGeneration": "vllm_zipar.models.janus:JanusForImageGeneration",
    "LuminaForImageGeneration": "vllm_zipar.models.lumina:LuminaForImageGeneration",
}
# model_type -> "module:Class" of a transformers config that transformers itself does not know.
CONFIG_CLASSES = {"llamagen": "vllm_zipar.models.llamagen_config:LlamaGenConfig"}


def import_target(target: str):
    """The object a "module:Name" string names."""
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


class NotAnImageModel(ValueError):
    """The directory's model is not one vllm-zipar serves."""


def _image_model_class(model_type: str) -> type[ImageModel]:
    target = IMAGE_MODELS.get(model_type)
    if target is None:
        raise NotAnImageModel(
            f"model_type {model_type!r} is not an image model vllm-zipar serves "
            f"(known: {sorted(IMAGE_MODELS)})"
        )
    return import_target(target)


def image_model_for_config(model_dir: str | Path, hf_config: Any) -> ImageModel:
    """The family adapter for a loaded transformers config (the engine's `model_config.hf_config`)."""
    return _image_model_class(getattr(hf_config, "model_type", None) or "")(model_dir, hf_config)


def load_image_model(model_dir: str | Path) -> ImageModel:
    """Read `model_dir/config.json` and build its family adapter (NotAnImageModel / OSError otherwise)."""
    model_dir = Path(model_dir)
    data = json.loads((model_dir / "config.json").read_text())
    model_type = data.get("model_type") if isinstance(data, dict) else None
    cls = _image_model_class(model_type or "")
    return cls(model_dir, cls.load_config(model_dir))
