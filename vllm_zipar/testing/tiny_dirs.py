"""One tiny random model directory per registered family, in that family's real on-disk format.

`TINY_DIR_WRITERS` maps each `model_type` of `models/registry.py` to a `write_tiny_dir(model_dir, *, seed,
**overrides)` that writes a complete directory (weights, config, tokenizer, VQ) small enough to load and
decode on a CPU in seconds. The family contract test (tests/models/test_family_contract.py) runs on every
entry and fails for a registered family that has none, so a new family adds its writer here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# LlamaGen: head dim 32 (the CPU kernel's smallest), 2 layers, 256 codes, 10 classes, an 8x8 grid, and the
# digits model's small VQ (2x downsampling: 16x16 pixels, cheap to decode).
TINY_LLAMAGEN_VQ = {
    "codebook_size": 256,
    "codebook_embed_dim": 8,
    "ch": 32,
    "z_channels": 64,
    "num_res_blocks": 1,
    "encoder_ch_mult": [1, 2],
    "decoder_ch_mult": [1, 2],
}
TINY_LLAMAGEN = dict(
    dim=64,
    n_layer=2,
    n_head=2,
    codebook_size=256,
    num_classes=10,
    multiple_of=32,
    grid_size=8,
    downsample=2,
    vq_config=TINY_LLAMAGEN_VQ,
)
# Emu3: the writer's defaults, at 64x64 pixels (an 8x8 grid at 1:1, five aspect ratios).
TINY_EMU3 = dict(image_area=64 * 64)
# Janus-Pro: the writer's defaults (head dim 32, 2 layers, 64 codes, an 8x8 grid of 16x16 pixels).
TINY_JANUS: dict[str, Any] = {}
# Lumina-mGPT: the writer's defaults (head dim 32, 2 layers, 64 codes at shuffled non-contiguous ids, a
# native 128x128 image = 8x8 tokens, and Lumina's other aspect ratios at that area).
TINY_LUMINA: dict[str, Any] = {}


def write_tiny_llamagen_dir(model_dir: str | Path, *, seed: int = 0, **overrides: Any) -> None:
    from vllm_zipar.testing.llamagen_dirs import write_random_model_dir

    write_random_model_dir(model_dir, seed=seed, **{**TINY_LLAMAGEN, **overrides})


def write_tiny_emu3_dir(model_dir: str | Path, *, seed: int = 0, **overrides: Any) -> None:
    from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir

    write_random_emu3_dir(model_dir, seed=seed, **{**TINY_EMU3, **overrides})


def write_tiny_janus_dir(model_dir: str | Path, *, seed: int = 0, **overrides: Any) -> None:
    from vllm_zipar.testing.janus_dirs import write_random_janus_dir

    write_random_janus_dir(model_dir, seed=seed, **{**TINY_JANUS, **overrides})


def write_tiny_lumina_dir(model_dir: str | Path, *, seed: int = 0, **overrides: Any) -> None:
    from vllm_zipar.testing.lumina_dirs import write_tiny_lumina_dir as write

    write(model_dir, seed=seed, **{**TINY_LUMINA, **overrides})


TINY_DIR_WRITERS: dict[str, Callable[..., None]] = {
    "llamagen": write_tiny_llamagen_dir,
    "emu3": write_tiny_emu3_dir,
    "janus": write_tiny_janus_dir,
    "chameleon": write_tiny_lumina_dir,
}


def write_tiny_dir(model_type: str, model_dir: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random directory of the family registered as `model_type`; returns its path."""
    if model_type not in TINY_DIR_WRITERS:
        raise KeyError(f"no tiny-directory writer for model_type {model_type!r} in TINY_DIR_WRITERS")
    TINY_DIR_WRITERS[model_type](model_dir, seed=seed, **overrides)
    return Path(model_dir)
