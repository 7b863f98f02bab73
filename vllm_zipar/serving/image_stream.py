"""Streamed image generation: server-sent events, partial images while the engine decodes, then each image.

Partial images are read from the request's output tokens so far (the plan's feed order) and rendered with
the cells not decoded yet painted grey; every event carries the extension field `zipar` (passes, cells
decoded). A client that disconnects aborts its engine requests; SIGTERM's drain time running out, or the
engine dying, ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request

from vllm_zipar.serving.image_service import ImageJob, ImageService
from vllm_zipar.serving.images_protocol import ImageAPIError, ImageGenerationRequest


async def stream_images(
    service: ImageService,
    req: ImageGenerationRequest,
    jobs: Sequence[ImageJob],
    request: Request | None = None,
) -> AsyncIterator[str]:
    """Server-sent events: `partial_images` partial images per image, then its completed image.

    Starlette's StreamingResponse notices a client that left only when a send fails, which may be long
    after (or, here, never before the images finish), so `request`'s disconnect is watched too."""
    queue: asyncio.Queue = asyncio.Queue()
    sent = [0] * len(jobs)

    def on_output(job: ImageJob, out: Any) -> None:
        tokens = list(out.outputs[0].token_ids)
        grid, missing = service.partial_grid(job, tokens)
        cells = job.layout.num_cells
        filled = cells - int(missing.sum())
        while sent[job.index] < req.partial_images and filled * (req.partial_images + 1) >= cells * (
            sent[job.index] + 1
        ):
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
    abandoned = False

    def abandon() -> None:  # the client left: cancelling the producer aborts the engine requests
        nonlocal abandoned
        if not abandoned and not producer.done():
            abandoned = True
            service.log.info("image request %s: client disconnected, aborted", jobs[0].request_id)
            producer.cancel()

    def on_disconnect(task: asyncio.Task) -> None:
        # Runs on the loop whatever this generator is doing: Starlette may never resume it.
        if not task.cancelled():
            abandon()
            queue.put_nowait(("gone",))

    watcher = None
    if request is not None:
        watcher = asyncio.create_task(until_disconnected(request))
        watcher.add_done_callback(on_disconnect)
    remaining = len(jobs)
    usage = service.usage(jobs[:1])
    try:
        while remaining:
            event = await queue.get()
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
                _, _, index, grid, missing = event
                (b64,) = await service.render(grid[None], req, masks=missing[None])
                payload = service._event(req, job, b64, index=index, progress=service.progress(job, missing))
                yield _sse("image_generation.partial_image", payload)
                continue
            image = event[2]
            while sent[job.index] < req.partial_images:  # the promised count, even if decoding outran us
                (b64,) = await service.render(image.grid[None], req)
                payload = service._event(req, job, b64, index=sent[job.index], progress=service.progress(job))
                yield _sse("image_generation.partial_image", payload)
                sent[job.index] += 1
            (b64,) = await service.render(image.grid[None], req)
            progress = service.progress(job, stats=image.stats)
            payload = service._event(req, job, b64, usage=usage, progress=progress)
            if req.return_tokens:
                payload["tokens"] = image.grid.tolist()
            yield _sse("image_generation.completed", payload)
            remaining -= 1
    except (asyncio.CancelledError, GeneratorExit):
        abandon()  # before any await: inside Starlette's cancelled task group every await raises again
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
        if not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only `http.disconnect` is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
