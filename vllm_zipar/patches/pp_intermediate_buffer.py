"""Pipeline parallel on vLLM's CPU runner: the receive buffer for the previous stage's hidden states.

`GPUModelRunner.sync_and_gather_intermediate_tensors` copies what the previous pipeline stage sent into
`self.intermediate_tensors`, a buffer created only by `_dummy_run`. vLLM's CPU runner skips that dummy run
under `enforce_eager` (and with an explicit KV cache size), so every rank but the first fails with an
`AssertionError` on its first step (under Ray it surfaces as a `KeyError` in the scheduler). The wrapper
creates the buffer on first use exactly as `_dummy_run` does (`model.make_empty_intermediate_tensors` of
`max_num_tokens` rows), then calls vLLM's method.
"""

from __future__ import annotations

import functools

WRITTEN_FOR = "0.32.0"


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_zipar.patches import check_vllm_version

    check_vllm_version("pp_intermediate_buffer", WRITTEN_FOR)
    stock = GPUModelRunner.sync_and_gather_intermediate_tensors

    @functools.wraps(stock)
    def sync_and_gather_intermediate_tensors(self, num_tokens, intermediate_tensors, sync_self):
        if self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device
            )
        return stock(self, num_tokens, intermediate_tensors, sync_self)

    GPUModelRunner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors
