"""Random LlamaGen VQ checkpoints in the authors' file layouts, for tests, benchmarks and random model dirs.

Each layout is one the loader (``models/vq/llamagen_vq.load_llamagen_vq``) must read: what the authors'
``vq_train.py`` saves with and without ``--ema``, a Lightning-style ``{"state_dict": ...}`` and a bare state
dict. The weights are random but decode to visibly varied images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, LlamaGenVQModel
from vllm_zipar.training.llamagen_vq_training import vq_training_args

CheckpointLayout = Literal["model", "ema", "state_dict", "raw"]
CHECKPOINT_LAYOUTS: tuple[str, ...] = ("model", "ema", "state_dict", "raw")


def _random_weights(config: LlamaGenVQConfig, seed: int) -> dict[str, torch.Tensor]:
    # A forked RNG so writing a test checkpoint does not reseed the caller's global generator.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = LlamaGenVQModel(config)
        # PyTorch's default GroupNorm affine (1, 0) makes every block whiten its input; random
        # affine values keep contrast through the decoder so random checkpoints give visibly varied
        # images.
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
        return {key: value.detach().clone() for key, value in model.state_dict().items()}


def write_random_vq_checkpoint(
    path: str | Path, config: LlamaGenVQConfig, seed: int = 0, layout: CheckpointLayout = "model"
) -> None:
    """Write a randomly initialised checkpoint for ``config`` in one of the authors' layouts.

    ``layout``:
      - ``"model"``: what ``vq_train.py`` saves without ``--ema``: ``{"model", "steps", "args"}``
        (optimizer and discriminator states are left out; loaders ignore them).
      - ``"ema"``: what it saves with ``--ema``: also ``"ema"``. Here ``"ema"`` holds the weights
        drawn from ``seed`` and ``"model"`` different ones (from ``seed + 1``), so a loader that
        ignores the vq_demo.py precedence decodes differently.
      - ``"state_dict"``: ``{"state_dict": weights}``.
      - ``"raw"``: the bare state dict.
    Every layout yields the same weights (those from ``seed``) through ``load_llamagen_vq``.
    """
    if layout not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"layout must be one of {CHECKPOINT_LAYOUTS}, got {layout!r}")
    weights = _random_weights(config, seed)
    checkpoint: dict[str, object]
    if layout == "raw":
        checkpoint = dict(weights)
    elif layout == "state_dict":
        checkpoint = {"state_dict": weights}
    else:
        checkpoint = {
            "model": weights,
            "steps": 0,
            "args": vq_training_args(config, seed, ema=layout == "ema"),
        }
        if layout == "ema":
            checkpoint["model"] = _random_weights(config, seed + 1)
            checkpoint["ema"] = weights
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
