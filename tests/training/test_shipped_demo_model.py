"""The shipped demo model (models/digits/), when present: loadable, in the authors' formats, small."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_zipar.models.llamagen_checkpoint import check_gpt_state_dict, load_gpt_state_dict
from vllm_zipar.models.model_dir import load_config
from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, load_llamagen_vq

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "digits"
MAX_BYTES = 20 << 20

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").is_file(), reason="models/digits/ is not there (make train-demo)"
)


def test_config_and_checkpoints_load():
    config = load_config(MODEL_DIR)
    assert config.vq_config, "config.json must carry the VQ's vq_config"
    state = load_gpt_state_dict(MODEL_DIR / config.gpt_checkpoint)
    check_gpt_state_dict(state, config, MODEL_DIR / config.gpt_checkpoint)
    assert config.rope_head_dim >= 32  # vLLM's CPU attention kernel
    vq_config = LlamaGenVQConfig(**config.vq_config)
    assert vq_config.downsample == config.downsample
    vq = load_llamagen_vq(MODEL_DIR / config.vq_checkpoint, vq_config)
    grid = torch.zeros(1, config.grid_size, config.grid_size, dtype=torch.long)
    assert vq.decode_to_uint8(grid).shape == (1, config.image_size, config.image_size, 3)


def test_shipped_files_fit_the_budget():
    sizes = {path.name: path.stat().st_size for path in MODEL_DIR.iterdir() if path.is_file()}
    assert sum(sizes.values()) <= MAX_BYTES, sizes
    assert sizes.get("classifier.pt", 0) <= 2 << 20, sizes


def test_classifier_loads():
    from vllm_zipar.training.classifier import load_classifier

    model = load_classifier(MODEL_DIR / "classifier.pt")
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
