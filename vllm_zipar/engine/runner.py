"""Model-runner subclasses: vLLM's own CPU and GPU runners, feeding image requests pass by pass.

For each image request our scheduler sends `ImageStepInputs` on the `SchedulerOutput`. The runner then:
- writes the scheduled input ids into the persistent batch (`_update_states`): vLLM's runner only knows
  the tokens it sampled, but an image feeds the *plan's* inputs (newest token per row, proxies, ...);
- overwrites the positions of those tokens with their raster positions after vLLM computed the slot
  mapping from the contiguous ones (`_prepare_inputs`), so KV stays in feed order and RoPE sees the grid;
- samples exactly the planned cells, several per request (`logits_indices`, `_sample`), each with
  position-keyed noise so a seeded image never depends on batch composition;
- hands the attention backend, per step, what the ZipAR mask needs (`_build_attention_metadata`).
Requests without a plan (none today) keep vLLM's behaviour, with position-keyed sampling.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_zipar.engine.attention_backends import attention_choice, layers_without_zipar_attention
from vllm_zipar.engine.attention_mask import ImageKeyMetadata, ZipARAttentionInputs
from vllm_zipar.engine.request_config import image_model_of
from vllm_zipar.engine.sampling import sample_cells
from vllm_zipar.engine.step_inputs import ImageStepInputs

PLACEHOLDER_TOKEN_ID = -1


class ZipARRunnerMixin:
    """Overrides of GPUModelRunner (vLLM 0.32): `_update_states`, `_prepare_inputs`, `_sample`,
    `_build_attention_metadata`. See vllm_zipar/patches/README.md for the internals relied on."""

    def _zipar_init(self) -> None:
        self.image_keys: dict[str, ImageKeyMetadata] = {}
        self._step_plans: dict[str, ImageStepInputs] = {}
        self._step_samples: list[tuple[int, int, int]] = []  # (request index, logits row, cell position)
        self._step_guides: list[tuple[int, int, float]] = []  # (sample, unconditional token row, cfg scale)
        self._step_attention: ZipARAttentionInputs | None = None
        self._finished_images: tuple[str, ...] = ()
        # Grid cells are sampled from the visual tokens' logits columns only, then returned as their
        # vocabulary ids; text, EOL and closing ids are forced.
        self._visual_tokens = image_model_of(self.vllm_config).visual_tokens  # type: ignore[attr-defined]
        choice = attention_choice()
        # Filled by load_model: attention layers that would decode a masked step causally (must be none).
        self._unmasked_layers = [] if choice is not None else ["(no ZipAR backend on this platform)"]
        # FlexAttention takes the ZipAR mask as device buffers the runner fills per step; the CPU backend
        # reads the step's `ZipARAttentionInputs` from the metadata.
        self._flex_masks = None
        if choice == "flex":
            from vllm_zipar.engine.flex_attention import ZipARFlexMasks

            self._flex_masks = ZipARFlexMasks(self.max_num_reqs, self.max_model_len)  # type: ignore[attr-defined]

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        self._unmasked_layers = layers_without_zipar_attention(self.vllm_config)  # type: ignore[attr-defined]

    def _update_states(self, scheduler_output):  # type: ignore[override]
        result = super()._update_states(scheduler_output)  # type: ignore[misc]
        # Our sampler keys its noise by (seed, cell), never by vLLM's per-request generators; dropping them
        # also keeps vLLM from rewinding them after a partial chunk (`set_offset`), which CPU generators
        # do not support.
        self.input_batch.generators.clear()  # type: ignore[attr-defined]
        for req_id in scheduler_output.finished_req_ids:
            self.image_keys.pop(req_id, None)
        self._finished_images = tuple(scheduler_output.finished_req_ids)
        plans: dict[str, ImageStepInputs] = getattr(scheduler_output, "zipar_inputs", {})
        self._step_plans = plans
        batch = self.input_batch  # type: ignore[attr-defined]
        for req_id, plan in plans.items():
            index = batch.req_id_to_index[req_id]
            end = plan.start + len(plan.token_ids)
            batch.token_ids_cpu[index, plan.start : end] = plan.token_ids
            batch.is_token_ids[index, plan.start : end] = True
            batch.num_tokens_no_spec[index] = end
            state = self.requests[req_id]  # type: ignore[attr-defined]
            num_prompt = len(state.prompt_token_ids)
            if end > num_prompt:
                outputs = state.output_token_ids
                first = max(plan.start, num_prompt)
                del outputs[first - num_prompt :]
                outputs.extend(plan.token_ids[first - plan.start :])
            keys = self.image_keys.setdefault(req_id, ImageKeyMetadata())
            keys.write(plan.start, plan.positions, plan.steps, plan.proxy, plan.streams, plan.drafts)
        return result

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):  # type: ignore[override]
        logits_indices, spec_decode_metadata, max_sampled = super()._prepare_inputs(  # type: ignore[misc]
            scheduler_output, num_scheduled_tokens
        )
        plans = self._step_plans
        if not plans or spec_decode_metadata is not None:
            self._step_samples = []
            self._step_guides = []
            self._step_attention = None
            return logits_indices, spec_decode_metadata, max_sampled
        batch = self.input_batch  # type: ignore[attr-defined]
        num_reqs = batch.num_reqs
        query_start = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(num_scheduled_tokens[:num_reqs], out=query_start[1:])
        positions = self.positions  # type: ignore[attr-defined]
        rows: list[int] = []
        samples: list[tuple[int, int, int]] = []
        # Guided cells: (index in samples, the unconditional twin's token row in the batch, scale). Their
        # logits rows go after every sampled row, so logits[:len(samples)] stay one row per sample.
        guides: list[tuple[int, int, float]] = []
        attention = ZipARAttentionInputs()
        for index, req_id in enumerate(batch.req_ids[:num_reqs]):
            plan = plans.get(req_id)
            first = int(query_start[index])
            if plan is None:
                rows.append(int(query_start[index + 1]) - 1)
                samples.append((index, len(rows) - 1, int(batch.num_tokens_no_spec[index])))
                continue
            count = len(plan.token_ids)
            positions[first : first + count] = torch.as_tensor(plan.positions, dtype=positions.dtype)
            for offset, cell in zip(plan.sample_offsets, plan.sample_positions, strict=True):
                rows.append(first + offset)
                samples.append((index, len(rows) - 1, cell))
            for sample, twin in enumerate(plan.guide_offsets, start=len(samples) - len(plan.sample_offsets)):
                if twin >= 0:
                    guides.append((sample, first + twin, plan.cfg_scale))
            if not plan.sample_offsets:
                # A chunk that completes no pass: vLLM discards whatever is sampled for it.
                rows.append(first + count - 1)
                samples.append((index, len(rows) - 1, -1))
            if plan.masked_decoding:
                attention.add(index, req_id, first, plan.start, count, self.image_keys[req_id])
        rows.extend(row for _, row, _ in guides)
        attention.finished = self._finished_images
        self._step_samples = samples
        self._step_guides = guides
        self._step_attention = attention if attention.requests or attention.finished else None
        max_cells = int(np.bincount([index for index, _, _ in samples]).max())
        device_indices = torch.tensor(rows, dtype=logits_indices.dtype, device=logits_indices.device)
        return device_indices, None, max_cells

    def _build_attention_metadata(self, *args, **kwargs):  # type: ignore[override]
        attn_metadata, spec_common = super()._build_attention_metadata(*args, **kwargs)  # type: ignore[misc]
        attention = self._step_attention
        if attention is not None and attention.masked and self._unmasked_layers:
            # Front-ends refuse such requests on platforms without the mask; this guards direct engine use
            # (extra_args) and a model whose layers did not get the ZipAR backend: never decode causally.
            raise RuntimeError(
                f"a ZipAR-masked step reached attention layers without the ZipAR mask "
                f"({', '.join(self._unmasked_layers[:4])}; {len(self._unmasked_layers)} in all): its tokens "
                "would be wrong. Image engines need vllm-zipar's worker (worker_cls) on vLLM's CPU platform "
                "or CUDA"
            )
        if attention is not None and isinstance(attn_metadata, dict):
            for metadata in {id(m): m for m in attn_metadata.values()}.values():
                if self._flex_masks is not None:
                    self._flex_masks.attach(metadata, attention)
                else:
                    metadata.zipar = attention
        return attn_metadata, spec_common

    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: object) -> SamplerOutput:
        if spec_decode_metadata is not None or logits is None:
            return super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        batch = self.input_batch  # type: ignore[attr-defined]
        num_reqs = batch.num_reqs
        samples = self._step_samples or [(i, i, int(batch.num_tokens_no_spec[i])) for i in range(num_reqs)]
        visual = self._visual_tokens
        logits = visual.visual_logits(logits)  # column c scores VQ code c
        if self._step_guides:
            logits = guided_logits(logits, len(samples), [(s, scale) for s, _, scale in self._step_guides])
        params = [self.requests[req_id].sampling_params for req_id in batch.req_ids[:num_reqs]]  # type: ignore
        tokens = sample_cells(
            logits,
            [float(params[i].temperature) for i, _, _ in samples],
            [int(params[i].top_k) if params[i].top_k and params[i].top_k > 0 else 0 for i, _, _ in samples],
            [float(params[i].top_p) for i, _, _ in samples],
            [params[i].seed for i, _, _ in samples],
            [cell for _, _, cell in samples],
        )
        per_request: list[list[int]] = [[] for _ in range(num_reqs)]
        token_ids = visual.code_to_id(torch.tensor(tokens, dtype=torch.long)).tolist()
        for (index, _, _), token_id in zip(samples, token_ids, strict=True):
            per_request[index].append(token_id)
        width = max((len(row) for row in per_request), default=1)
        sampled = torch.full((num_reqs, width), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
        for index, row in enumerate(per_request):
            sampled[index, : len(row)] = torch.tensor(row, dtype=torch.int32)
        logprobs = None
        num_logprobs = batch.sampling_metadata.max_num_logprobs
        if num_logprobs is not None:
            if width != 1:
                raise NotImplementedError("logprobs are supported for one sampled cell per step only")
            # vLLM's default logprobs mode: raw log-probabilities of the model, before any processing.
            raw = logits.float().log_softmax(dim=-1)
            if num_logprobs == -1:
                num_logprobs = raw.shape[-1]
            # Over the visual tokens: indices are VQ codes (`VisualTokens.id_to_code` of the ids).
            logprobs = self.sampler.gather_logprobs(  # type: ignore[attr-defined]
                raw, num_logprobs, token_ids=torch.tensor(tokens, dtype=torch.int64)
            )
        return SamplerOutput(sampled_token_ids=sampled.to(logits.device), logprobs_tensors=logprobs)


def guided_logits(logits: torch.Tensor, num_samples: int, guides: list[tuple[int, float]]) -> torch.Tensor:
    """Classifier-free guidance: rows `[0, num_samples)` are the sampled cells' conditional logits, row
    `num_samples + k` the unconditional logits of `guides[k] = (sample, scale)`; returns one row per sample,
    `u + scale * (c - u)` in float32 for the guided ones (the reference's formula and operation order)."""
    scales = {scale for _, scale in guides}
    if len(scales) == 1 and len(guides) == num_samples and all(g[0] == k for k, g in enumerate(guides)):
        # Every sample guided, in order, at one scale (the usual step): no gather, scatter or copy.
        (scale,) = scales
        cond, uncond = logits[:num_samples].float(), logits[num_samples:].float()
        return torch.sub(cond, uncond).mul_(scale).add_(uncond)  # u + scale * (c - u), bit for bit
    mixed = logits[:num_samples].float().clone()
    uncond = logits[num_samples:].float()
    for scale in sorted({scale for _, scale in guides}):
        ks = [k for k, (_, s) in enumerate(guides) if s == scale]
        rows = torch.tensor([guides[k][0] for k in ks], device=logits.device)
        u = uncond[torch.tensor(ks, device=logits.device)]
        mixed[rows] = u + scale * (mixed[rows] - u)
    return mixed


class ZipARCPUModelRunner(ZipARRunnerMixin, CPUModelRunner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._zipar_init()


class ZipARGPUModelRunner(ZipARRunnerMixin, GPUModelRunner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._zipar_init()
