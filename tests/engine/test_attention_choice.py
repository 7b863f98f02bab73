"""Which attention serves image models on which platform (`engine/attention_backends.py`), on simulated
platforms: CPU -> vLLM's CPU backend (FlexAttention on request), CUDA -> FlexAttention, others -> none."""

from __future__ import annotations

import pytest

from vllm_zipar.engine import CPU_WORKER_CLS, GPU_WORKER_CLS, worker_cls_name
from vllm_zipar.engine.attention_backends import (
    ATTENTION_ENV,
    attention_choice,
    has_zipar_attention,
    zipar_attention_backend,
)


class FakePlatform:
    """Answers vLLM's platform questions for one device kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    def is_cuda(self) -> bool:
        return self.kind == "cuda"


@pytest.fixture
def on_platform(monkeypatch):
    import vllm.platforms

    monkeypatch.delenv(ATTENTION_ENV, raising=False)

    def use(kind: str) -> FakePlatform:
        platform = FakePlatform(kind)
        monkeypatch.setattr(vllm.platforms, "current_platform", platform, raising=False)
        return platform

    return use


@pytest.mark.parametrize(
    ("kind", "env", "choice"),
    [
        ("cpu", None, "cpu"),
        ("cpu", "auto", "cpu"),
        ("cpu", "flex", "flex"),
        ("cuda", None, "flex"),
        ("cuda", "flex", "flex"),
        ("rocm", None, None),
        ("tpu", "flex", None),
    ],
)
def test_each_platform_gets_its_backend(on_platform, monkeypatch, kind, env, choice):
    if env is not None:
        monkeypatch.setenv(ATTENTION_ENV, env)
    platform = on_platform(kind)
    assert attention_choice() == attention_choice(platform) == choice
    assert has_zipar_attention() is (choice is not None)


def test_cuda_routes_image_models_to_the_zipar_flex_backend(on_platform):
    from vllm_zipar.engine.flex_attention import ZipARFlexAttentionBackend, ZipARFlexMetadataBuilder

    on_platform("cuda")
    backend = zipar_attention_backend()
    assert backend is ZipARFlexAttentionBackend
    assert backend.get_name() == "FLEX_ATTENTION"  # vLLM looks backends up by this name
    assert backend.get_builder_cls() is ZipARFlexMetadataBuilder
    assert worker_cls_name() == GPU_WORKER_CLS


def test_cpu_keeps_the_cpu_backend_and_worker(on_platform):
    from vllm_zipar.engine.attention import ZipARCPUAttentionBackend

    on_platform("cpu")
    assert zipar_attention_backend() is ZipARCPUAttentionBackend
    assert worker_cls_name() == CPU_WORKER_CLS


def test_other_platforms_get_the_platform_default(on_platform):
    on_platform("xpu")
    assert zipar_attention_backend() is None


@pytest.mark.parametrize(
    ("kind", "env", "message"), [("cuda", "cpu", "CPU platform only"), ("cpu", "tree", "expected one of")]
)
def test_impossible_or_unknown_choices_are_refused(on_platform, monkeypatch, kind, env, message):
    monkeypatch.setenv(ATTENTION_ENV, env)
    on_platform(kind)
    with pytest.raises(ValueError, match=message):
        attention_choice()
