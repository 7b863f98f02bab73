"""vLLM general plugin: makes vLLM understand our model directories in every process it starts.

vLLM calls `register()` (entry point `vllm.general_plugins`) in the front-end, the engine core and each
worker before it reads a config. It registers the `llamagen` config type with transformers' AutoConfig and
the model classes with vLLM's ModelRegistry by "module:Class" string, and applies the patches that tensor
and pipeline parallel and Ray need on vLLM's CPU platform (`vllm_zipar/patches/README.md`).
"""

from __future__ import annotations

MODEL_CLASSES = {
    "LlamaGenForImageGeneration": "vllm_zipar.models.llamagen:LlamaGenForImageGeneration",
    "Emu3ForImageGeneration": "vllm_zipar.models.emu3:Emu3ForImageGeneration",
}


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from vllm_zipar.models.llamagen_config import LlamaGenConfig
    from vllm_zipar.patches import apply_engine_patches

    AutoConfig.register(LlamaGenConfig.model_type, LlamaGenConfig, exist_ok=True)
    for arch, target in MODEL_CLASSES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
    apply_engine_patches()
