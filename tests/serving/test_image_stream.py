"""The stream's pieces without a server: partial grids and progress from a fake output, event bodies, and
the disconnect watch that aborts a request's work (the live stream is tests/serving/test_server.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from vllm_zipar.engine.request_config import Guidance, ImageDecoding
from vllm_zipar.models.image_prompts import ImageSize
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.models.llamagen_image_model import LlamaGenImageModel
from vllm_zipar.serving.client_watch import AbortOnDisconnect
from vllm_zipar.serving.image_requests import ImageRequests
from vllm_zipar.serving.image_service import ImageJob
from vllm_zipar.serving.image_stream import PartialGrid, decoding_progress, partial_grid, stream_event
from vllm_zipar.zipar.image_stats import ImageStats
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.shape import plan_shape

H = W = 6


def fake_service() -> SimpleNamespace:
    config = LlamaGenConfig(dim=64, n_layer=1, n_head=2, grid_size=H, num_classes=10, codebook_size=64)
    model = LlamaGenImageModel(".", config)
    return SimpleNamespace(model=model, requests=ImageRequests(model, ImageDecoding.parse("ntp", None), 2048))


def job_of(decoding: ImageDecoding) -> ImageJob:
    layout = GridLayout(prompt_len=1, height=H, width=W)
    return ImageJob(1, "img-x-1", {}, None, decoding, None, layout, ImageSize(96, 96, (H, W)))


DECODINGS = [
    ImageDecoding.parse("ntp", None),
    ImageDecoding.parse("zipar", 2),
    ImageDecoding.parse("zipar", 2).with_guidance(Guidance(2.0, 1)),
]


@pytest.mark.parametrize("decoding", DECODINGS)
def test_partial_grids_and_progress_follow_the_output_so_far(decoding):
    service, job = fake_service(), job_of(decoding)
    shape = plan_shape(job.layout, decoding.window, decoding.uncond_prompt_len)
    # Fake output: the token of an output slot carrying cell position p is 1000 + p (proxies, twins: -5).
    outputs = [-5 if p is None else 1000 + p for p in shape.output_cells]
    seen_passes = []
    for length in range(len(outputs) + 1):
        grid, missing = partial_grid(service, job, outputs[:length])
        decoded = {job.layout.image_index(p) for p in shape.output_cells[:length] if p is not None}
        assert {i for i in range(H * W) if not missing.flatten()[i]} == decoded
        expected = torch.tensor([1000 + job.layout.pos(*divmod(i, W)) for i in range(H * W)]).view(H, W)
        assert torch.equal(grid[~missing], expected[~missing])
        assert (grid[missing] == service.model.visual_tokens.ids[0]).all()  # painted over, but a valid code
        progress = decoding_progress(job, missing)
        assert progress["cells_decoded"] == len(decoded) and progress["cells"] == H * W
        assert progress["passes"] == (max((shape.sampled_at[i] for i in decoded), default=-1) + 1)
        seen_passes.append(progress["passes"])
    assert seen_passes == sorted(seen_passes) and seen_passes[-1] == max(shape.sampled_at) + 1
    assert decoding_progress(job) == {"passes": seen_passes[-1], "cells_decoded": H * W, "cells": H * W}
    # The completed image reports the engine's own count.
    stats = ImageStats("zipar", 2, 1.0, (H, W), 1, None, passes=7, cells_per_pass=(1,) * 7)
    assert decoding_progress(job, stats=stats)["passes"] == 7


def test_partial_and_completed_events_carry_the_documented_fields():
    job, req = job_of(DECODINGS[1]), SimpleNamespace(output_format="webp")
    progress = {"passes": 3, "cells_decoded": 5, "cells": 36}
    partial = stream_event(req, job, "AAA", index=2, progress=progress)
    completed = stream_event(req, job, "BBB", usage={"total_tokens": 37}, progress=progress)
    common = {"background": "opaque", "output_format": "webp", "quality": "auto", "size": "96x96"}
    assert partial.items() >= {
        "type": "image_generation.partial_image", "b64_json": "AAA", "image_index": 1,
        "partial_image_index": 2, "zipar": progress, **common,
    }.items()  # fmt: skip
    assert "usage" not in partial
    assert completed.items() >= {
        "type": "image_generation.completed", "b64_json": "BBB", "image_index": 1,
        "usage": {"total_tokens": 37}, "zipar": progress, **common,
    }.items()  # fmt: skip
    assert "partial_image_index" not in completed
    assert "zipar" not in stream_event(req, job, "CCC", index=0)


class FakeRequest:
    """`receive()` gives `http.disconnect` once `leave` is set."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args) -> None:
        self.lines.append(message % args)


def test_a_client_that_leaves_gets_its_work_cancelled_once():
    async def scenario():
        request, log, gone = FakeRequest(), FakeLog(), []
        work = asyncio.create_task(asyncio.sleep(60))
        watch = AbortOnDisconnect(request, work, log, "img-a-0", on_gone=lambda: gone.append(True))
        await asyncio.sleep(0)
        assert not work.done() and not watch.aborted
        request.leave.set()
        await asyncio.wait({work}, timeout=10)
        assert work.cancelled() and watch.aborted and gone == [True]
        watch.abort()  # Starlette cancelling the stream afterwards: no second log line
        watch.stop()
        assert log.lines == ["image request img-a-0: client disconnected, aborted"]

    asyncio.run(scenario())


def test_work_that_ends_first_is_neither_cancelled_nor_logged():
    async def scenario():
        request, log, gone = FakeRequest(), FakeLog(), []
        work = asyncio.create_task(asyncio.sleep(0, result="image"))
        watch = AbortOnDisconnect(request, work, log, "img-b-0", on_gone=lambda: gone.append(True))
        await asyncio.wait({work})
        watch.stop()
        watch.abort()  # a late cancellation of the handler: the work is done, nothing to abort
        request.leave.set()
        await asyncio.sleep(0.01)
        assert work.result() == "image" and not watch.aborted and gone == [] and log.lines == []

    asyncio.run(scenario())


@pytest.mark.parametrize("decoding", DECODINGS)
def test_the_incremental_grid_equals_a_rebuild_after_every_output(decoding):
    """The stream keeps each image's grid incrementally (new tokens only per engine output); whatever the
    outputs' sizes, it equals the grid rebuilt from the whole output so far."""
    import random

    service, job = fake_service(), job_of(decoding)
    shape = plan_shape(job.layout, decoding.window, decoding.uncond_prompt_len)
    outputs = [-5 if p is None else 1000 + p for p in shape.output_cells]
    tracker = PartialGrid(service, job)
    rng, length = random.Random(0), 0
    while length < len(outputs):
        length = min(len(outputs), length + rng.randint(1, 5))
        tracker.update(outputs[:length])
        grid, missing = tracker.snapshot()
        rebuilt = service.requests.grid_from_output(outputs[:length], decoding, job.layout, partial=True)
        assert torch.equal(missing, rebuilt < 0) and torch.equal(grid[~missing], rebuilt[~missing])
        assert tracker.filled == int((~missing).sum())
    assert tracker.filled == H * W


def test_a_streamed_requests_images_reach_the_engine_before_its_response_is_iterated():
    # During a burst Starlette starts iterating a streaming response late; images submitted only then
    # reached the engine behind JSON requests sent after them (serve_load.py --profile burst).
    from vllm_zipar.serving.image_stream import stream_images

    async def scenario():
        submitted: list[str] = []
        finish = asyncio.Event()

        async def run(job, on_output):
            submitted.append(job.request_id)
            await finish.wait()
            raise RuntimeError("the engine is not part of this test")

        service = SimpleNamespace(
            run=run,
            lifecycle=SimpleNamespace(track=lambda task: None, cut_off=lambda task: False),
            log=FakeLog(),
            usage=lambda jobs: {},
        )
        req = SimpleNamespace(partial_images=0)
        jobs = [job_of(ImageDecoding.parse("zipar", 2))]
        events = stream_images(service, req, jobs, FakeRequest())
        for _ in range(3):  # a few turns of the loop (producer, then its job's task), `events` untouched
            await asyncio.sleep(0)
        assert submitted == [jobs[0].request_id]
        await events.aclose()
        finish.set()

    asyncio.run(scenario())


def test_a_stream_that_fell_behind_renders_its_backlog_in_one_batch_and_sends_every_frame_in_order():
    """While the pixel thread is busy, due partial images queue up: they go to it as one VQ batch (at most
    MAX_FRAMES_PER_RENDER), not one turn each; the final grid is rendered once, for the completed image and
    the partial images decoding outran. Every promised frame is sent, in order, with its own progress."""
    from vllm_zipar.serving.image_stream import MAX_FRAMES_PER_RENDER, stream_images

    frames = 12
    decoding = DECODINGS[1]
    job = dataclasses.replace(job_of(decoding), index=0)  # the request's only image
    shape = plan_shape(job.layout, decoding.window, decoding.uncond_prompt_len)
    outputs = [-5 if p is None else 1000 + p for p in shape.output_cells]
    streamed = len(outputs) * 3 // 4  # the rest arrives with the finished output: frames the stream owes

    async def scenario():
        base = fake_service()
        pixels_busy = asyncio.Event()
        calls: list[tuple[int, bool]] = []

        async def run(job, on_output):
            for length in range(1, streamed + 1):
                on_output(job, SimpleNamespace(outputs=[SimpleNamespace(token_ids=outputs[:length])]))
                await asyncio.sleep(0)
            pixels_busy.set()  # the first frame's render ends only now: every other frame is waiting
            grid = base.requests.grid_from_output(outputs, decoding, job.layout)
            stats = ImageStats("zipar", 2, 1.0, (H, W), 1, None, passes=9, cells_per_pass=(4,) * 9)
            return SimpleNamespace(grid=grid, stats=stats)

        async def render(grids, req, masks=None):
            calls.append((grids.shape[0], masks is not None))
            if len(calls) == 1:
                await pixels_busy.wait()
            return [f"call{len(calls)}-{i}" for i in range(grids.shape[0])]

        service = SimpleNamespace(
            model=base.model,
            run=run,
            render=render,
            lifecycle=SimpleNamespace(track=lambda task: None, cut_off=lambda task: False),
            log=FakeLog(),
            usage=lambda jobs: {},
            failure=lambda err, request_id: (_ for _ in ()).throw(err),
        )
        req = SimpleNamespace(partial_images=frames, output_format="png", return_tokens=False)
        events = [e async for e in stream_images(service, req, [job], FakeRequest())]
        return calls, [json.loads(e.split("data: ", 1)[1]) for e in events]

    calls, events = asyncio.run(scenario())
    partial, (completed,) = events[:-1], events[-1:]
    assert [e["partial_image_index"] for e in partial] == list(range(frames))
    assert completed["type"] == "image_generation.completed" and completed["zipar"]["passes"] == 9
    cells = [e["zipar"]["cells_decoded"] for e in partial]
    assert cells == sorted(cells) and cells[-1] == H * W
    due = [c for c in cells if c < H * W]  # frames rendered from partial grids, the rest from the final one
    assert all(c * (frames + 1) >= H * W * (k + 1) for k, c in enumerate(due))  # at its evenly spaced share
    # One render for the first frame, the backlog in batches of at most MAX_FRAMES_PER_RENDER, one for the
    # final grid (no mask), shared by the owed frames and the completed image.
    sizes = [size for size, masked in calls if masked]
    assert sizes[0] == 1 and max(sizes) == MAX_FRAMES_PER_RENDER and sum(sizes) == len(due) > 2
    assert len(sizes) == 1 + -(-(len(due) - 1) // MAX_FRAMES_PER_RENDER)
    assert calls[-1] == (1, False)
    final_b64 = f"call{len(calls)}-0"
    assert [e["b64_json"] for e in partial[len(due) :]] == [final_b64] * (frames - len(due))
    assert completed["b64_json"] == final_b64
