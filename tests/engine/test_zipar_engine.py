"""ZipAR inside vLLM's V1 engine equals the reference ZipAR decoder, token for token.

One engine per grid size; every request picks its decoding through `SamplingParams.extra_args`.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import TEST_KV_CACHE_BYTES, attention_impls, kv_cache_usage, tiny_model_with_oracle
from tests.reference.decoders import ntp_decode, zipar_decode
from vllm_zipar.serving.offline import ImageGenerator

pytestmark = pytest.mark.engine

SAMPLING = dict(temperature=1.0, top_k=100, top_p=0.95)


def build(tmp_path_factory, name: str, grid: int, **engine_kwargs):
    model_dir = tmp_path_factory.mktemp(name)
    _, oracle = tiny_model_with_oracle(model_dir, seed=5, grid_size=grid)
    kwargs = dict(max_num_seqs=16, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, disable_log_stats=False)
    kwargs.update(engine_kwargs)
    return ImageGenerator(model_dir, **kwargs), oracle


def reference(oracle, label, grid, window, seed=None):
    sampling = SAMPLING if seed is not None else {}
    if window is None:
        return ntp_decode(oracle, label, grid, grid, seed=seed, **sampling)[0]
    return zipar_decode(oracle, label, grid, grid, window, seed=seed, **sampling)[0]


@pytest.fixture(scope="module")
def grid8(tmp_path_factory):
    generator, oracle = build(tmp_path_factory, "zipar8", 8)
    yield generator, oracle
    generator.close()


@pytest.mark.parametrize("window", [1, 2, 3, 4, 7, 8, 11])
def test_greedy_and_seeded_tokens_equal_the_reference_on_8x8(grid8, window):
    generator, oracle = grid8
    greedy = generator.generate([1, 6], temperature=0.0, zipar_window=window)
    seeded = generator.generate([3, 6], seeds=[21, 4], zipar_window=window, **SAMPLING)
    for result in greedy:
        assert torch.equal(result.tokens, reference(oracle, result.class_label, 8, window)), result
    for result in seeded:
        expected = reference(oracle, result.class_label, 8, window, seed=result.seed)
        assert torch.equal(result.tokens, expected), result
    assert kv_cache_usage(generator) == 0.0


def test_masked_rows_take_the_compiled_kernel_and_keep_no_kv_copy(grid8):
    generator, _ = grid8
    generator.generate([2], temperature=0.0, zipar_window=2)
    impls = attention_impls(generator)
    assert impls and all(impl._kernel_key_layout == "transposed" for impl in impls)
    assert all(not impl.request_kv for impl in impls)  # the PyTorch path's per-request buffers stay unused


def test_steps_whose_rows_are_all_masked_skip_the_stock_kernel(grid8, monkeypatch):
    from vllm import _custom_ops

    generator, _ = grid8
    calls = []
    stock = _custom_ops.cpu_attention_with_kv_cache
    monkeypatch.setattr(
        _custom_ops, "cpu_attention_with_kv_cache", lambda *a, **k: calls.append(1) or stock(*a, **k)
    )
    layers = len(attention_impls(generator))
    ntp = generator.generate([2], temperature=0.0, decoding="ntp")[0]
    assert len(calls) == ntp.passes * layers  # causal steps: vLLM's kernel every layer, every pass
    calls.clear()
    zipar = generator.generate([2], temperature=0.0, zipar_window=2)[0]
    # Only the causal start (prefill, row 0) uses it; the masked steps run the compiled kernel alone.
    assert 0 < len(calls) <= 10 * layers < zipar.passes * layers


def test_window_of_at_least_the_width_gives_the_ntp_tokens(grid8):
    generator, oracle = grid8
    ntp = generator.generate([2, 5], seeds=[8, 9], decoding="ntp", **SAMPLING)
    for window in (8, 9, 30):
        wide = generator.generate([2, 5], seeds=[8, 9], zipar_window=window, **SAMPLING)
        for a, b in zip(ntp, wide, strict=True):
            assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(ntp[0].tokens, reference(oracle, 2, 8, None, seed=8))


def test_a_small_window_really_changes_the_image(grid8):
    generator, _ = grid8
    ntp = generator.generate([7], temperature=0.0, decoding="ntp")[0]
    zipar = generator.generate([7], temperature=0.0, zipar_window=1)[0]
    assert not torch.equal(ntp.tokens, zipar.tokens)
    assert torch.equal(ntp.tokens[:2], zipar.tokens[:2])  # rows 0 and 1 see exactly NTP's context


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3", True])
def test_invalid_windows_are_refused_with_a_clear_message(grid8, bad):
    generator, _ = grid8
    with pytest.raises(ValueError, match="zipar_window must be an integer >= 1"):
        generator.generate([1], temperature=0.0, zipar_window=bad)


def test_the_engine_reports_passes_and_cells_per_pass(grid8):
    generator, _ = grid8
    ntp, zipar = generator.generate([4, 4], temperature=0.0, decoding="ntp"), None
    zipar = generator.generate([4], temperature=0.0, zipar_window=2)[0]
    assert ntp[0].passes == 64 and ntp[0].cells_per_pass == [1] * 64
    # LlamaGen layout: 2W + (H-2)·w passes (ZIPAR.md §4), every cell sampled once.
    assert zipar.passes == 2 * 8 + 6 * 2 == len(zipar.cells_per_pass)
    assert sum(zipar.cells_per_pass) == 64 and max(zipar.cells_per_pass) > 1


@pytest.fixture(scope="module")
def grid24(tmp_path_factory):
    generator, oracle = build(tmp_path_factory, "zipar24", 24)
    yield generator, oracle
    generator.close()


@pytest.mark.parametrize(("window", "passes"), [(8, 224), (12, 312), (16, 400), (None, 576)])
def test_24x24_tokens_and_pass_counts(grid24, window, passes):
    generator, oracle = grid24
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    greedy = generator.generate([3], temperature=0.0, **kwargs)[0]
    seeded = generator.generate([8], seeds=[99], **kwargs, **SAMPLING)[0]
    assert greedy.passes == seeded.passes == passes
    assert torch.equal(greedy.tokens, reference(oracle, 3, 24, window))
    assert torch.equal(seeded.tokens, reference(oracle, 8, 24, window, seed=99))


def test_prometheus_metrics_count_passes_and_cells_per_pass(grid8):
    generator, _ = grid8

    def histogram(name: str, decoding: str):
        for metric in generator.llm.get_metrics():
            if metric.name == name and metric.labels.get("decoding") == decoding:
                return metric
        return None

    before = histogram("vllm:zipar_grid_cells_per_pass", "zipar")
    count_before, sum_before = (before.count, before.sum) if before else (0, 0.0)
    image = generator.generate([4], temperature=0.0, zipar_window=2)[0]
    after = histogram("vllm:zipar_grid_cells_per_pass", "zipar")
    assert after.count - count_before == image.passes == 28
    assert after.sum - sum_before == 64  # every cell counted once
    passes = histogram("vllm:zipar_forward_passes_per_image", "zipar")
    assert passes is not None and passes.count >= 1
