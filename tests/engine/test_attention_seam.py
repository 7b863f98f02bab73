"""Attention is chosen once per engine, by our worker, for every attention layer: families build plain vLLM
`Attention` layers and name no backend. A model whose layers did not get the ZipAR backend must refuse a
masked step rather than decode it causally (wrong tokens, no error)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.engine.conftest import TEST_KV_CACHE_BYTES, kv_cache_usage, tiny_model_with_oracle
from tests.reference.decoders import ntp_decode
from vllm_zipar.engine.attention_backends import ATTENTION_ENV, is_zipar_attention_backend
from vllm_zipar.serving.offline import ImageGenerator

MODELS = Path(__file__).parents[2] / "vllm_zipar" / "models"


def test_no_family_names_an_attention_backend():
    """The seam: no module in models/ passes `attn_backend=` (the engine's worker decides for all)."""
    offenders = []
    for path in MODELS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(kw.arg == "attn_backend" for kw in node.keywords):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def layer_backends(generator: ImageGenerator) -> dict[str, type]:
    core = generator.llm.llm_engine.engine_core.engine_core
    context = core.vllm_config.compilation_config.static_forward_context
    return {name: layer.get_attn_backend() for name, layer in context.items() if hasattr(layer, "impl")}


@pytest.mark.engine
@pytest.mark.parametrize("backend", ["cpu", "flex"])
def test_the_worker_gives_every_layer_the_zipar_backend(tmp_path, monkeypatch, backend):
    tiny_model_with_oracle(tmp_path, seed=1, grid_size=4)
    monkeypatch.setenv(ATTENTION_ENV, backend)
    with ImageGenerator(tmp_path, max_num_seqs=2, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES) as generator:
        backends = layer_backends(generator)
        assert len(backends) == 2  # one per decoder layer of the tiny model
        assert all(is_zipar_attention_backend(cls) for cls in backends.values()), backends
        expected = "FLEX_ATTENTION" if backend == "flex" else "CPU_ATTN"
        assert {cls.get_name() for cls in backends.values()} == {expected}


@pytest.mark.engine
def test_a_masked_step_on_layers_without_the_zipar_backend_raises(tmp_path, monkeypatch):
    """Simulate a family whose layers escaped the seam: the worker installs nothing, so every layer gets
    vLLM's stock CPU backend. NTP (causal) still decodes exactly; a ZipAR step is refused, never decoded
    causally."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import _cached_get_attn_backend

    import vllm_zipar.engine.worker as worker

    def install_nothing(vllm_config):
        AttentionBackendEnum.CPU_ATTN.clear_override()
        _cached_get_attn_backend.cache_clear()

    _, oracle = tiny_model_with_oracle(tmp_path, seed=2, grid_size=4)
    monkeypatch.setenv(ATTENTION_ENV, "cpu")
    monkeypatch.setattr(worker, "install_zipar_attention", install_nothing)
    with ImageGenerator(
        tmp_path, max_num_seqs=2, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, disable_log_stats=False
    ) as generator:
        assert not any(is_zipar_attention_backend(cls) for cls in layer_backends(generator).values())
        ntp = generator.generate([3], temperature=0.0, decoding="ntp")[0]
        assert torch.equal(ntp.tokens, ntp_decode(oracle, 3, 4, 4)[0])
        assert kv_cache_usage(generator) == 0.0
        with pytest.raises(RuntimeError, match=r"without the ZipAR mask \(\S*layers\.0\.self_attn\.attn"):
            generator.generate([3], temperature=0.0, zipar_window=1)
