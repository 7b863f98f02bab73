"""Images of a burst reach the engine one per loop turn (serving/admission.py), in arrival order, so the
API server's loop polls its sockets (`/health`, `/metrics`, new requests) between any two submissions."""

from __future__ import annotations

import asyncio

from tests.serving.test_image_stream import DECODINGS, job_of
from vllm_zipar.serving.admission import AdmissionTurnstile
from vllm_zipar.serving.image_service import ImageService


class RecordingEngine:
    """`generate` records its submission, then waits for outputs that never come (as a queued image)."""

    def __init__(self, timeline: list[str]) -> None:
        self.timeline = timeline

    async def generate(self, prompt, params, request_id):
        self.timeline.append(request_id)
        await asyncio.Event().wait()
        yield  # an async generator, as vLLM's


def test_each_image_is_submitted_on_its_own_loop_turn_in_arrival_order():
    async def scenario() -> list[str]:
        timeline: list[str] = []
        service = object.__new__(ImageService)  # only what `run` needs before the engine answers
        service.engine, service.admission = RecordingEngine(timeline), AdmissionTurnstile()

        async def turns() -> None:  # marks every turn of the loop
            while True:
                timeline.append("turn")
                await asyncio.sleep(0)

        ticker = asyncio.create_task(turns())
        jobs = [job_of(DECODINGS[0]) for _ in range(6)]
        for i, job in enumerate(jobs):
            job.request_id = f"img-{i}"
        images = [asyncio.create_task(service.run(job)) for job in jobs]  # all ready at once
        while len([t for t in timeline if t != "turn"]) < len(jobs):
            await asyncio.sleep(0)
        for task in (*images, ticker):
            task.cancel()
        await asyncio.gather(*images, ticker, return_exceptions=True)
        return timeline

    timeline = asyncio.run(scenario())
    submitted = [t for t in timeline if t != "turn"]
    assert submitted == [f"img-{i}" for i in range(6)]
    positions = [timeline.index(request_id) for request_id in submitted]
    for before, after in zip(positions, positions[1:], strict=False):
        assert "turn" in timeline[before + 1 : after], timeline  # the loop turned between two submissions
