"""Loading a VQ decoder that transformers implements (`Emu3VQVAE`, `JanusVQVAE`) from a model directory whose
safetensors also hold the language model: only the VQ's keys are read, checked against the module, into a
float32 model in eval mode. Families keep their own pixel postprocessing (`vq/emu3_vq.py`, `vq/janus_vq.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards its index names, else every `*.safetensors`."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return files


def read_prefixed_state_dict(model_dir: str | Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors under any of `prefixes` in a model directory's safetensors, keyed without the prefix."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                prefix = next((p for p in prefixes if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix) :]] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{model_dir}: no VQ weights (keys under {list(prefixes)}) in its safetensors")
    return state


def load_vq_module(
    model_dir: str | Path, vq_class: Any, prefixes: tuple[str, ...], device: str | torch.device = "cpu"
) -> Any:
    """transformers' `vq_class` for `model_dir`'s `vq_config` (float32, eval), only the VQ weights read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    state = read_prefixed_state_dict(model_dir, prefixes)
    with torch.device("meta"):
        model = vq_class(config.vq_config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: the VQ weights do not match its vq_config: missing {missing[:8]} "
            f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).float().eval()
