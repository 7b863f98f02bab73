"""The API server's engine-output task lets other tasks run between engine messages (`engine_output_yield`).

vLLM's own `AsyncMPClient._ensure_output_queue_task` on a real ZMQ socket pair, with no engine: 200 engine
messages wait on the socket before the task starts; a competing task (standing for `/health`, a new request,
the SIGTERM handler) must get the loop before the task has drained them. Without the patch it ran only once
all 200 were taken (pyzmq resolves a receive at once when a message waits, and awaiting a finished future
does not yield).
"""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

pytestmark = pytest.mark.serving

MESSAGES = 200


async def messages_taken_before_another_task_ran(client_class) -> int:
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.engine.core_client import BackgroundResources
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    ctx = zmq.asyncio.Context()
    address = "inproc://engine-outputs"
    pull = ctx.socket(zmq.PULL)
    pull.bind(address)
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    encoder = MsgpackEncoder()
    for i in range(MESSAGES):
        outputs = EngineCoreOutputs(outputs=[EngineCoreOutput(request_id=f"r{i}", new_token_ids=[i])])
        await push.send_multipart(encoder.encode(outputs), copy=False)
    while not pull.get(zmq.EVENTS) & zmq.POLLIN:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # every message queued on the receiving side

    # The attributes `_ensure_output_queue_task` reads, as MPClient/AsyncMPClient set them.
    client = client_class.__new__(client_class)
    client.resources = BackgroundResources(ctx=ctx)
    client.resources.output_socket = pull
    client.decoder = MsgpackDecoder(EngineCoreOutputs)
    client.utility_results = {}
    client.outputs_queue = asyncio.Queue()

    taken_when_competitor_ran: list[int] = []

    async def competitor() -> None:
        taken_when_competitor_ran.append(client.outputs_queue.qsize())

    client._ensure_output_queue_task()  # creates the task; it starts at the next turn of the loop
    await asyncio.sleep(0)  # the output task runs first ...
    await asyncio.create_task(competitor())  # ... then, once it yields, the competitor
    while client.outputs_queue.qsize() < MESSAGES:
        await asyncio.sleep(0.01)
    client.resources.output_queue_task.cancel()
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()
    return taken_when_competitor_ran[0]


def test_other_tasks_run_between_engine_messages():
    from vllm.v1.engine.core_client import AsyncMPClient

    from vllm_zipar.patches import apply_image_serving_patches
    from vllm_zipar.patches.engine_output_yield import yield_to_the_loop

    apply_image_serving_patches()
    assert AsyncMPClient.process_engine_outputs is yield_to_the_loop
    taken = asyncio.run(messages_taken_before_another_task_ran(AsyncMPClient))
    assert taken <= 2, f"the output task took {taken} of {MESSAGES} waiting messages before yielding"
