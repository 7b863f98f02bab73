"""Tiny random Emu3 directories in the Hugging Face on-disk format, and vLLM engines on them."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# In-process engine core: seconds instead of a second process per engine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TEST_KV_CACHE_BYTES = 64 << 20

# The Hub's Emu3-Gen-hf key prefixes (which transformers 5's save_pretrained still writes) -> the names of
# transformers 5's modules (`model.state_dict()`); transformers maps either on load (conversion_mapping.py).
STATE_DICT_LAYOUT = (
    ("text_model.model.", "model.text_model."),
    ("text_model.lm_head.", "lm_head."),
    ("vqmodel.", "model.vqmodel."),
)


def rewrite_in_state_dict_layout(model_dir: Path) -> list[str]:
    """Rename model.safetensors' keys to transformers 5's module names, in place; returns the new keys."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    renamed = {}
    for key, tensor in state.items():
        new = next((ours + key[len(hub) :] for hub, ours in STATE_DICT_LAYOUT if key.startswith(hub)), None)
        assert new is not None, key
        renamed[new] = tensor
    save_file(renamed, str(path), metadata={"format": "pt"})
    return sorted(renamed)


@pytest.fixture(scope="session")
def emu3_dir(tmp_path_factory) -> Path:
    """The default tiny Emu3-Gen directory as save_pretrained writes it (the Hub's key layout), seed 0."""
    from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir

    model_dir = tmp_path_factory.mktemp("emu3") / "tiny-emu3"
    write_random_emu3_dir(model_dir, seed=0)
    return model_dir


@pytest.fixture(scope="session")
def emu3_state_dict_dir(tmp_path_factory) -> Path:
    """The same weights under transformers 5's module names, with max_position_embeddings 32 (below a prompt
    plus its generated tokens, so an engine must lift vLLM's length cap through `emu3_engine_overrides`)."""
    from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir

    model_dir = tmp_path_factory.mktemp("emu3-sd") / "tiny-emu3-state-dict"
    write_random_emu3_dir(model_dir, seed=0, max_position_embeddings=32)
    rewrite_in_state_dict_layout(model_dir)
    return model_dir


def close_llm(llm) -> None:
    """Shut an in-process engine down with vLLM's process-wide parallel state (as ImageGenerator.close)."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    llm.llm_engine.engine_core.shutdown()
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()
