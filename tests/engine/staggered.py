"""Engine-test drivers shared by every family: an engine on a chosen attention backend, decoding kwargs, a
staggered submission loop over real `ImageGenerator` steps, and the checks after a forced preemption."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from tests.engine.conftest import kv_cache_usage
from vllm_zipar.engine.attention_backends import ATTENTION_ENV
from vllm_zipar.serving.offline import ImageGenerator

# Small KV blocks and a small token budget: few images fit, so the scheduler preempts (recomputes) others,
# and recomputes run in chunks. Tests add `num_gpu_blocks_override` (and `max_model_len`) to taste.
PREEMPTING_ENGINE = dict(
    max_num_seqs=6, block_size=32, max_num_batched_tokens=32, enable_chunked_prefill=True
)


def engine_on(backend: str, model_dir, **kwargs) -> ImageGenerator:
    """An in-process engine whose ZipAR attention is `backend` ("cpu" or "flex")."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ATTENTION_ENV, backend)  # read when the worker installs attention and builds the model
        return ImageGenerator(model_dir, disable_log_stats=False, **kwargs)


def decoding_kwargs(window: int | None, seed: int | None, sampling: dict[str, Any]) -> dict[str, Any]:
    """Request kwargs: NTP for `window=None`, greedy for `seed=None`, else seeded with `sampling`."""
    kwargs: dict[str, Any] = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    kwargs.update(dict(seed=seed, **sampling) if seed is not None else dict(temperature=0.0))
    return kwargs


def run_staggered(
    generator: ImageGenerator,
    requests: Sequence[tuple[Any, dict[str, Any]]],
    *,
    every: int,
    batch: int,
    abort: Sequence[int] = (),
    abort_at_step: int = 7,
) -> dict[int, Any]:
    """Submit `batch` of the (prompt, kwargs) requests every `every` engine steps, abort the indices in
    `abort` at step `abort_at_step`, and step until none is left; returns {index: finished image}."""
    finished, pending, steps = {}, list(enumerate(requests)), 0
    while pending or generator.has_unfinished_requests():
        if pending and steps % every == 0:
            for index, (prompt, kwargs) in pending[:batch]:
                generator.add_request(f"img-{index}", prompt, **kwargs)
            pending = pending[batch:]
        if abort and steps == abort_at_step:
            generator.abort([f"img-{index}" for index in abort])
        for image in generator.step():
            finished[int(image.request_id.split("-")[1])] = image
        steps += 1
    return finished


def scheduler_of(generator: ImageGenerator):
    """The ZipAR scheduler of an in-process engine."""
    return generator.llm.llm_engine.engine_core.engine_core.scheduler


def assert_preempted_and_drained(generator: ImageGenerator) -> None:
    """The run preempted at least one image, and every block and image record is back."""
    scheduler = scheduler_of(generator)
    assert scheduler.num_preempted_images > 0, "the KV cache was meant to force preemption"
    assert kv_cache_usage(generator) == 0.0
    assert not scheduler.images
