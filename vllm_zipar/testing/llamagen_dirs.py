"""Random LlamaGen model directories in the authors' formats (GPT `.pt`, VQ `.pt`, our `config.json`).

For tests, benchmarks and `vllm-zipar write-random-model` (the demo's stand-in until a trained model ships).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_zipar.models.llamagen_checkpoint import random_gpt_state_dict, save_gpt_checkpoint
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.models.model_dir import save_config


def write_random_model_dir(
    model_dir: str | Path,
    *,
    seed: int = 0,
    layout: str = "model",
    std: float = 0.25,
    with_vq: bool = True,
    vq_config: dict[str, Any] | None = None,
    **config_kwargs: Any,
) -> LlamaGenConfig:
    """A complete model directory of random weights in the authors' formats (GPT `.pt`, VQ `.pt`, config)."""
    model_dir = Path(model_dir)
    config = LlamaGenConfig(
        gpt_checkpoint="gpt.pt", vq_checkpoint="vq.pt", vq_config=vq_config, **config_kwargs
    )
    save_gpt_checkpoint(
        random_gpt_state_dict(config, seed=seed, std=std), model_dir / "gpt.pt", layout, config
    )
    if with_vq:
        from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig
        from vllm_zipar.testing.llamagen_vq_files import write_random_vq_checkpoint

        write_random_vq_checkpoint(model_dir / "vq.pt", LlamaGenVQConfig(**config.vq_config), seed=seed)
    save_config(config, model_dir)
    return config
