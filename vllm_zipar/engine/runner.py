"""Model-runner subclasses: vLLM's own CPU and GPU runners with position-keyed cell sampling.

Only `_sample` changes: every request's predicted cell is sampled by `vllm_zipar.engine.sampling`, keyed by
(request seed, raster position of the cell), so a seeded image never depends on batch composition. The
position of the cell a request predicts this step is its token count so far (prompt + decoded tokens, as
vLLM's input batch records it), which is the raster index of that cell for NTP.
"""

from __future__ import annotations

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_zipar.engine.sampling import sample_cells


class PositionKeyedSamplingMixin:
    """Replaces GPUModelRunner._sample (vLLM 0.32) for requests without speculative drafts."""

    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: object) -> SamplerOutput:
        if spec_decode_metadata is not None or logits is None:
            return super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        batch = self.input_batch  # type: ignore[attr-defined]
        num_reqs = logits.shape[0]
        temperatures, top_ks, top_ps, seeds, positions = [], [], [], [], []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            params = self.requests[req_id].sampling_params  # type: ignore[attr-defined]
            temperatures.append(float(params.temperature))
            top_ks.append(int(params.top_k) if params.top_k and params.top_k > 0 else 0)
            top_ps.append(float(params.top_p))
            seeds.append(params.seed)
            positions.append(int(batch.num_tokens_no_spec[i]))
        tokens = sample_cells(logits, temperatures, top_ks, top_ps, seeds, positions)
        sampled = torch.tensor(tokens, dtype=torch.int64, device=logits.device)
        logprobs = None
        num_logprobs = batch.sampling_metadata.max_num_logprobs
        if num_logprobs is not None:
            # vLLM's default logprobs mode: raw log-probabilities of the model, before any processing.
            raw = logits.float().log_softmax(dim=-1)
            if num_logprobs == -1:
                num_logprobs = raw.shape[-1]
            logprobs = self.sampler.gather_logprobs(raw, num_logprobs, token_ids=sampled)  # type: ignore
        return SamplerOutput(
            sampled_token_ids=sampled.to(torch.int32).unsqueeze(-1), logprobs_tensors=logprobs
        )


class ZipARCPUModelRunner(PositionKeyedSamplingMixin, CPUModelRunner):
    pass


class ZipARGPUModelRunner(PositionKeyedSamplingMixin, GPUModelRunner):
    pass
