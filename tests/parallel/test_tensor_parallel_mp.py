"""Tensor parallel (TP=2) through vLLM's `mp` executor on CPU: every token equals TP=1's.

Two worker processes each hold half of every attention head group and MLP (vLLM's parallel layers), receive
the same ZipAR plan on the `SchedulerOutput`, and must apply the same positions and mask; the row-parallel
all-reduce sums in another order than TP=1, which could in principle flip a near-tie pick (ZIPAR.md §6), so
a mismatch is reported per decoding with its cell count. vLLM's CPU workers need one OpenMP core list per
rank (`VLLM_CPU_OMP_THREADS_BIND`), else they fail with "Not enough allowed NUMA nodes" on one NUMA node.
"""

from __future__ import annotations

import pytest

from tests.parallel.conftest import TEST_KV_CACHE_BYTES, decode_all
from vllm_zipar.serving.offline import ImageGenerator

pytestmark = [pytest.mark.engine, pytest.mark.parallel]


@pytest.fixture(scope="module")
def tp2_mp(parallel_model):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        generator = ImageGenerator(
            parallel_model.model_dir,
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            max_num_seqs=16,
            kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
        )
    yield generator
    generator.close()


@pytest.mark.timeout(900)
def test_tp2_over_mp_equals_tp1(tp2_mp, parallel_model):
    generator = tp2_mp
    config = generator.llm.llm_engine.vllm_config.parallel_config
    assert (config.tensor_parallel_size, config.distributed_executor_backend) == (2, "mp")
    images = decode_all(generator)
    assert parallel_model.mismatches(images) == {}
    assert {d.name: image.passes for d, image in images.items()} == {
        d.name: (144 if d.window is None else 2 * 12 + 10 * d.window) for d in images
    }
