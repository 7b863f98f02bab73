"""No tracebacks for situations that are expected when serving an image model: logging filters, no patches.

At start vLLM warms up a chat template (`vllm/renderers/base.py`, `BaseRenderer.warmup`), which cannot work
for a model served without a tokenizer, and logged a 20-line traceback as a WARNING on every start; after a
SIGTERM drain, vLLM's output handler logs the stopped engine as a failure with a traceback. At exit
Triton's nanobind extension reports ~500 lines of "nanobind: leaked ..." to stderr while the interpreter
tears down (Triton's objects are alive at exit by design); it is silenced by pointing stderr at /dev/null
after every `atexit` handler has run, so exit status and every earlier line are unchanged.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

WARMUP_LOGGER = "vllm.renderers.base"
WARMUP_MESSAGE = "Chat template warmup failed"


OUTPUT_HANDLER_LOGGER = "vllm.v1.engine.async_llm"
OUTPUT_HANDLER_MESSAGE = "AsyncLLM output_handler failed."


class DropChatTemplateWarmup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != WARMUP_MESSAGE


class DropStoppedEngineOutput(logging.Filter):
    """After our SIGTERM drain has stopped the engine, its output handler's EngineDeadError is expected (an
    engine that died on its own keeps the traceback: it points at the cause)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from vllm_zipar.serving import lifecycle

        return not (lifecycle.stopping and record.getMessage() == OUTPUT_HANDLER_MESSAGE)


def _silence_native_teardown() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)


def install() -> None:
    """Call first thing in the `vllm serve` process: the exit hook must be the first `atexit` registration,
    so that it runs last."""
    atexit.register(_silence_native_teardown)
    logging.getLogger(WARMUP_LOGGER).addFilter(DropChatTemplateWarmup())
    logging.getLogger(OUTPUT_HANDLER_LOGGER).addFilter(DropStoppedEngineOutput())
