"""Model directories: the authors' checkpoint files plus our `config.json`.

`init_model_dir` writes the config for a pair of authors' files (inferring the GPT size from the weights
where the presets allow); `vllm_zipar/testing/llamagen_dirs.py` writes complete directories of random
weights in the same formats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_zipar.models.llamagen_checkpoint import check_gpt_state_dict, load_gpt_state_dict
from vllm_zipar.models.llamagen_config import GPT_PRESETS, LlamaGenConfig
from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, read_vq_codebook_shape

CONFIG_NAME = "config.json"


def save_config(config: LlamaGenConfig, model_dir: str | Path) -> Path:
    path = Path(model_dir) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    for key in ("transformers_version", "_name_or_path"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def load_config(model_dir: str | Path) -> LlamaGenConfig:
    data = json.loads((Path(model_dir) / CONFIG_NAME).read_text())
    data.pop("model_type", None)
    return LlamaGenConfig(**data)


def infer_gpt_model(state: dict[str, Any]) -> str | None:
    """The authors' preset whose (dim, layers) match the weights, if exactly one does."""
    dim = state["tok_embeddings.weight"].shape[1]
    n_layer = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    matches = [name for name, p in GPT_PRESETS.items() if p["dim"] == dim and p["n_layer"] == n_layer]
    return matches[0] if len(matches) == 1 else None


def init_model_dir(
    model_dir: str | Path,
    gpt_checkpoint: str,
    vq_checkpoint: str,
    *,
    image_size: int,
    downsample: int = 16,
    gpt_model: str | None = None,
    **overrides: Any,
) -> LlamaGenConfig:
    """Write config.json for the authors' GPT and VQ files (paths relative to `model_dir`), checking them."""
    model_dir = Path(model_dir)
    state = load_gpt_state_dict(model_dir / gpt_checkpoint)
    if gpt_model is None and "n_head" not in overrides:
        gpt_model = infer_gpt_model(state)
        if gpt_model is None:
            dim = state["tok_embeddings.weight"].shape[1]
            raise ValueError(
                f"{gpt_checkpoint}: its size (width {dim}) matches no single preset of "
                f"{sorted(GPT_PRESETS)}; pass --gpt-model, or --n-head for a custom GPT (width and "
                "depth are read from the weights)"
            )
    if gpt_model is None:
        overrides.setdefault("dim", state["tok_embeddings.weight"].shape[1])
        overrides.setdefault("n_layer", len({k.split(".")[1] for k in state if k.startswith("layers.")}))
    overrides.setdefault("codebook_size", state["tok_embeddings.weight"].shape[0])
    overrides.setdefault("num_classes", state["cls_embedding.embedding_table.weight"].shape[0] - 1)
    if image_size % downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of downsample {downsample}")
    vq_path = model_dir / vq_checkpoint
    if not vq_path.is_file():
        raise FileNotFoundError(f"VQ checkpoint {vq_path} does not exist")
    codes, code_dim = read_vq_codebook_shape(vq_path)  # the VQ's shape, unless vq_config says otherwise
    overrides["vq_config"] = {
        "codebook_size": codes,
        "codebook_embed_dim": code_dim,
        **overrides.get("vq_config", {}),
    }
    config = LlamaGenConfig(
        gpt_model=gpt_model,
        grid_size=image_size // downsample,
        downsample=downsample,
        gpt_checkpoint=gpt_checkpoint,
        vq_checkpoint=vq_checkpoint,
        **overrides,
    )
    check_gpt_state_dict(state, config, model_dir / gpt_checkpoint)
    check_vq_codebook(vq_path, config)
    save_config(config, model_dir)
    return config


def check_vq_codebook(vq_path: Path, config: LlamaGenConfig) -> None:
    """The VQ's codebook must hold one code per GPT vocabulary entry, of the dimension its config reads
    (otherwise decoding fails, or draws the wrong codes, only once images are requested)."""
    codes, code_dim = read_vq_codebook_shape(vq_path)
    if codes != config.codebook_size:
        raise ValueError(
            f"{vq_path}: its codebook has {codes} codes but the GPT ({config.gpt_checkpoint}) has a "
            f"vocabulary of {config.codebook_size}: they are not a matching pair"
        )
    expected = LlamaGenVQConfig(**config.vq_config)
    if (expected.codebook_size, expected.codebook_embed_dim) != (codes, code_dim):
        raise ValueError(
            f"{vq_path}: codebook {codes}x{code_dim}, but vq_config reads "
            f"{expected.codebook_size}x{expected.codebook_embed_dim}"
        )
