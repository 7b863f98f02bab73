"""Streamed image generation: server-sent events, partial images while the engine decodes, then each image.

Partial images are read from the request's output tokens so far (the plan's feed order) and rendered with
the cells not decoded yet painted grey; every event carries the extension field `zipar` (passes, cells
decoded). A client that disconnects aborts its engine requests; SIGTERM's drain time running out, or the
engine dying, ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from fastapi import Request

from vllm_zipar.serving.client_watch import AbortOnDisconnect
from vllm_zipar.serving.image_service import ImageJob, ImageService
from vllm_zipar.serving.images_protocol import ImageAPIError, ImageGenerationRequest
from vllm_zipar.zipar.image_stats import ImageStats
from vllm_zipar.zipar.shape import passes_for, plan_shape

# Partial images rendered in one VQ batch at most (the backlog of a stream that fell behind): bounds the
# pixel thread's memory for large images and keeps its turns short for the other streams.
MAX_FRAMES_PER_RENDER = 8


def stream_images(
    service: ImageService,
    req: ImageGenerationRequest,
    jobs: Sequence[ImageJob],
    request: Request,
) -> AsyncIterator[str]:
    """Submit the images now and return their server-sent events: `partial_images` partial images per
    image, then its completed image.

    The images go to the engine here, in the route, not when Starlette starts iterating the response:
    during a burst that start comes late, and streamed requests then reached the engine behind JSON ones
    sent after them. Starlette's StreamingResponse notices a client that left only when a send fails, which
    may be long after (or, here, never before the images finish), so `request`'s disconnect is watched too
    (`client_watch`)."""
    queue: asyncio.Queue = asyncio.Queue()
    sent = [0] * len(jobs)

    grids = {job.index: PartialGrid(service, job) for job in jobs} if req.partial_images else {}

    def on_output(job: ImageJob, out: Any) -> None:
        # Runs on the event loop for every engine output: work only on the tokens that are new, and build
        # a grid only when a partial image is due.
        partial = grids[job.index]
        partial.update(out.outputs[0].token_ids)
        cells = job.layout.num_cells
        while sent[job.index] < req.partial_images and partial.filled * (req.partial_images + 1) >= cells * (
            sent[job.index] + 1
        ):
            grid, missing = partial.snapshot()
            queue.put_nowait(("partial", job, sent[job.index], grid, missing))
            sent[job.index] += 1

    async def one(job: ImageJob) -> None:
        image = await service.run(job, on_output if req.partial_images else None)
        queue.put_nowait(("done", job, image))

    async def produce() -> None:
        tasks = [asyncio.create_task(one(job)) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        except Exception as err:  # reported to the client as an error event
            queue.put_nowait(("error", err))
        finally:  # cancelled (client gone) or failed: cancelling the others aborts their requests
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    producer = asyncio.create_task(produce())
    service.lifecycle.track(producer)

    def on_cut_off(task: asyncio.Task) -> None:  # SIGTERM's drain time ran out, or the engine died
        if service.lifecycle.cut_off(task):
            queue.put_nowait(("error", service.cut_off_error()))

    producer.add_done_callback(on_cut_off)
    # The client left: cancelling the producer aborts the engine requests.
    watch = AbortOnDisconnect(
        request, producer, service.log, jobs[0].request_id, on_gone=lambda: queue.put_nowait(("gone",))
    )
    return _events(service, req, jobs, queue, sent, producer, watch)


async def _events(
    service: ImageService,
    req: ImageGenerationRequest,
    jobs: Sequence[ImageJob],
    queue: asyncio.Queue,
    sent: list[int],
    producer: asyncio.Task,
    watch: AbortOnDisconnect,
) -> AsyncIterator[str]:
    """The events of `stream_images`' images, rendered as they arrive on `queue`."""
    remaining = len(jobs)
    usage = service.usage(jobs[:1])
    backlog: deque = deque()  # events taken off `queue`, not sent yet (in order)
    try:
        while remaining:
            event = backlog.popleft() if backlog else await queue.get()
            if event[0] == "gone":
                return
            if event[0] == "error":
                error = event[1]
                if not isinstance(error, ImageAPIError):
                    error = service.failure(error, jobs[0].request_id)
                yield _sse("error", error.body())
                return
            job = event[1]
            if event[0] == "partial":
                frames = partial_run(event, backlog, queue)
                grids = torch.stack([frame[3] for frame in frames])
                masks = torch.stack([frame[4] for frame in frames])
                encoded = await service.render(grids, req, masks=masks)
                for (_, frame_job, index, _, missing), b64 in zip(frames, encoded, strict=True):
                    progress = decoding_progress(frame_job, missing)
                    payload = stream_event(req, frame_job, b64, index=index, progress=progress)
                    yield _sse("image_generation.partial_image", payload)
                continue
            image = event[2]
            # One render of the final grid serves the completed image and any partial images the stream
            # still owes (decoding outran it): they are the same pixels.
            (b64,) = await service.render(image.grid[None], req)
            while sent[job.index] < req.partial_images:  # the promised count, even if decoding outran us
                payload = stream_event(req, job, b64, index=sent[job.index], progress=decoding_progress(job))
                yield _sse("image_generation.partial_image", payload)
                sent[job.index] += 1
            progress = decoding_progress(job, stats=image.stats)
            payload = stream_event(req, job, b64, usage=usage, progress=progress)
            if req.return_tokens:
                payload["tokens"] = image.grid.tolist()
            yield _sse("image_generation.completed", payload)
            remaining -= 1
    except (asyncio.CancelledError, GeneratorExit):
        watch.abort()  # before any await: inside Starlette's cancelled task group every await raises again
        raise
    finally:
        watch.stop()
        if not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)


def partial_run(first: tuple, backlog: deque, queue: asyncio.Queue) -> list[tuple]:
    """`first` and the partial-image events right behind it, oldest first, at most MAX_FRAMES_PER_RENDER:
    the frames this stream fell behind on, rendered in one VQ batch. Whatever else had arrived stays in
    `backlog`, in order.

    Each streamed frame is a VQ decode on the one pixel thread, which the streams take in turns (each
    waits for its own render): a stream whose frames come fast (ZipAR's, several cells per pass) fell
    further behind with every frame and finished well after its engine did. A backlog taken in one turn
    is one batched decode, cheaper per frame than one call each (docs/serving.md, "Streaming"), and sends
    the same frames in the same order."""
    while True:
        try:
            backlog.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            break
    frames = [first]
    while backlog and backlog[0][0] == "partial" and len(frames) < MAX_FRAMES_PER_RENDER:
        frames.append(backlog.popleft())
    return frames


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class PartialGrid:
    """One image's grid as its output grows, kept incrementally: each engine output costs its new tokens
    only (a rebuild from the whole output cost O(grid) per output on the event loop)."""

    def __init__(self, service: ImageService, job: ImageJob) -> None:
        layout, decoding = job.layout, job.decoding
        cells = plan_shape(layout, decoding.window, decoding.uncond_prompt_len).output_cells
        if decoding.drafts:
            # A draft image's output holds guesses and superseded tokens; its grid is known when it is done
            # (ImageStats.tokens), so its partial images stay blank.
            cells = ()
        # For each output token, the raster index of the cell it carries (None: a proxy, a twin, an EOL).
        self._slots = [None if p is None else layout.image_index(p) for p in cells]
        self._shape = (layout.height, layout.width)
        self._cells: list[int] = [-1] * (layout.height * layout.width)
        # Any visual token will do for cells not decoded yet: they are painted over.
        self._fill = int(service.model.visual_tokens.code_to_id(torch.zeros(1, dtype=torch.long))[0])
        self._seen = 0
        self.filled = 0

    def update(self, token_ids: Sequence[int]) -> PartialGrid:
        """Take the output so far (cumulative token ids); reads only those not seen before."""
        end = min(len(token_ids), len(self._slots))
        for i in range(self._seen, end):
            slot = self._slots[i]
            if slot is not None:
                if self._cells[slot] < 0:
                    self.filled += 1
                self._cells[slot] = token_ids[i]
        self._seen = max(self._seen, end)
        return self

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid of vocabulary ids, mask of the cells still missing), both [H, W]."""
        grid = torch.tensor(self._cells, dtype=torch.long).view(self._shape)
        missing = grid < 0
        grid[missing] = self._fill
        return grid, missing


def partial_grid(
    service: ImageService, job: ImageJob, token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid decoded so far from a request's output tokens, and the mask of cells still missing."""
    return PartialGrid(service, job).update(token_ids).snapshot()


def decoding_progress(
    job: ImageJob, missing: torch.Tensor | None = None, stats: ImageStats | None = None
) -> dict[str, Any]:
    """Extension field `zipar` of stream events: engine passes and cells decoded so far (docs/serving.md).
    A partial image's passes are those its decoded cells needed (the plan's order); the completed image's
    are the engine's count."""
    order = plan_shape(job.layout, job.decoding.window, job.decoding.uncond_prompt_len).sampled_at
    decoded = None if missing is None else (~missing).flatten().tolist()
    passes = stats.passes if stats is not None else passes_for(order, decoded)
    cells = len(order) if decoded is None else sum(decoded)
    return {"passes": passes, "cells_decoded": cells, "cells": len(order)}


def stream_event(
    req: ImageGenerationRequest,
    job: ImageJob,
    b64: str,
    *,
    index: int | None = None,
    usage: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One image event: a partial image (`index`: its number) or, given `usage`, the completed image."""
    event: dict[str, Any] = {
        "type": "image_generation.partial_image" if usage is None else "image_generation.completed",
        "b64_json": b64,
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": req.output_format,
        "quality": "auto",
        "size": job.size.name,
        "image_index": job.index,  # extension: which of the request's n images
    }
    if usage is None:
        event["partial_image_index"] = index
    else:
        event["usage"] = usage
    if progress is not None:
        event["zipar"] = progress
    return event
