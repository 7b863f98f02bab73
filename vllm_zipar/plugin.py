"""vLLM general plugin: makes vLLM understand our model directories in every process it starts.

vLLM calls `register()` (entry point `vllm.general_plugins`) in the front-end, the engine core and each
worker before it reads a config. It registers the config types and vLLM model classes that
`models/registry.py` lists (with transformers' AutoConfig and vLLM's ModelRegistry, by "module:Class"
string), and applies the patches that tensor and pipeline parallel and Ray need on vLLM's CPU platform
(`vllm_zipar/patches/README.md`).
"""

from __future__ import annotations


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from vllm_zipar.models.registry import CONFIG_CLASSES, VLLM_MODEL_CLASSES, import_target
    from vllm_zipar.patches import apply_engine_patches

    for model_type, target in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, import_target(target), exist_ok=True)
    for arch, target in VLLM_MODEL_CLASSES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
    apply_engine_patches()
