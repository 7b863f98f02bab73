"""The ZipAR scheduler: vLLM's own V1 scheduler, told which grid cells each image feeds per step.

Every image request is driven by a pure-Python `ZipARPlan` (layer 1). Each step:
- `schedule()` runs vLLM's scheduler, then attaches to the `SchedulerOutput` the raster positions, feed
  steps, proxy flags and sampled indices of each image's scheduled tokens (`ImageStepInputs`); it keeps a
  pass from being split across steps by the token budget (see `_hold_back_unfittable` / `_trim_chunks`).
- `update_from_output()` hands the sampled cells to the decoder and replaces them, in the runner's output,
  by the *inputs of the next pass*, so vLLM appends those as output tokens and schedules exactly them next
  step, like a small chunked prefill. KV allocation, preemption and freeing stay vLLM's.

When an image is complete its last pass's sampled cells are appended as the final output tokens and the
request stops at `max_tokens`, which `add_request` sets to the exact length of the image's feed sequence.

An image with exact drafts (`zipar_drafts` > 0, docs/exact_drafts.md) is driven by a `DraftPlan`. Its feed
sequence depends on which guesses were right, so `max_tokens` starts at the engine's longest sequence and
is set to the exact length in the step the plan finishes; every pass's drafts are cut so that the sequence,
and finishing without drafts, fit `max_model_len` (and the pass fits the token budget): cutting drafts never
changes a token. Superseded tokens keep their KV slots (append-only; vLLM allocates and frees their blocks
like any other token's). The grid is read from the plan, not from the output tokens, and travels in the
image's stats. Preemption: vLLM recomputes the whole logical history, superseded tokens included, with the
feed steps and mask fields they were first fed with, so every key and value comes back bit for bit (the
mask is a function of the history alone) and the plan goes on where it stood.
"""

from __future__ import annotations

import random
from copy import copy
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request

from vllm_zipar.engine.request_config import Guidance, image_decoding_for, image_model_of
from vllm_zipar.engine.step_inputs import DraftStepInputs, ImageStepInputs
from vllm_zipar.zipar.draft_plan import DraftPlan, LogicalToken
from vllm_zipar.zipar.guidance import UNCONDITIONAL, GuidedPlan, guidance_applies
from vllm_zipar.zipar.image_stats import KEY as STATS_KEY
from vllm_zipar.zipar.image_stats import ImageStats
from vllm_zipar.zipar.plan import FedInput, FeedKind, ZipARPlan


@dataclass
class ImageRequestState:
    plan: ZipARPlan | GuidedPlan | DraftPlan
    decoding: str = "ntp"
    window: int | None = None
    guidance: Guidance | None = None
    cells_per_pass: list[int] = field(default_factory=list)
    # Index in the feed history where the pass now waiting to run begins; the indices of its conditional
    # inputs whose logits are sampled, and for each the index of its unconditional twin (-1: not guided).
    pending_start: int = 0
    pending_sampled: list[int] = field(default_factory=list)
    pending_guides: list[int] = field(default_factory=list)

    def set_pending(self, inputs: list[FedInput] | list[LogicalToken]) -> None:
        end = self.plan.num_fed
        self.pending_start = end - len(inputs)
        self.pending_sampled = []
        twins: dict[int, int] = {}
        for i, fed in enumerate(inputs):
            if fed.predicts is None:
                continue
            if fed.stream == UNCONDITIONAL:
                twins[fed.predicts] = self.pending_start + i
            else:
                self.pending_sampled.append(self.pending_start + i)
        guidance = self.guidance
        self.pending_guides = []
        if guidance is not None:
            layout = self.plan.layout
            for index in self.pending_sampled:
                cell = inputs[index - self.pending_start].predicts
                r, c = layout.cell(cell)
                guided = guidance_applies(r * layout.width + c, guidance.interval)
                self.pending_guides.append(twins[cell] if guided else -1)

    @property
    def first_logits_index(self) -> int:
        """The first feed index whose logits the pending pass needs (a sampled cell or its unconditional
        twin): its KV must be computed in this step, never taken from the prefix cache."""
        needed = self.pending_sampled + [twin for twin in self.pending_guides if twin >= 0]
        return min(needed) if needed else self.plan.num_fed

    @property
    def first_split_point(self) -> int:
        """Chunks may end at or before this index (or at the end of the history), never inside the pass."""
        return self.pending_sampled[0] if self.pending_sampled else self.plan.num_fed


class ZipARScheduler(Scheduler):
    """vLLM 0.32 `Scheduler` that schedules image requests pass by pass from their ZipAR plans."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.image_model = image_model_of(self.vllm_config)
        self.images: dict[str, ImageRequestState] = {}
        # Stats of images that finished in the step being processed, until attached to their outputs.
        self.finished_images: dict[str, ImageStats] = {}
        self.num_preempted_images = 0
        # Seeds of requests that sample without one (see `_seed_if_unseeded`), drawn from the engine's `seed`.
        self.unseeded_seeds = random.Random(self.vllm_config.model_config.seed)
        self._cache_lookup = self.kv_cache_manager.get_computed_blocks
        self.kv_cache_manager.get_computed_blocks = self._computed_blocks_before_logits

    # -- admission -------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        decoding = image_decoding_for(request.sampling_params, self.vllm_config)
        if decoding.grid is not None:
            self.image_model.check_grid(decoding.grid)
        layout = decoding.layout(self.image_model, len(request.prompt_token_ids))
        decoding.check_fits(layout, self.max_num_scheduled_tokens)
        self._salt_prefix_cache(request, decoding.cache_salt)
        plan = decoding.plan(layout)
        state = ImageRequestState(plan, decoding.decoding, decoding.window, decoding.guidance)
        state.set_pending(plan.prefill_inputs(list(request.prompt_token_ids)))
        # The request's output tokens are every input fed after the prompt plus the last pass's cells. With
        # drafts that length is known when the plan finishes (`update_from_output`); until then the
        # sequence cap (`max_model_len`) bounds it.
        num_outputs = decoding.num_output_tokens(layout)
        request.max_tokens = self.max_model_len if num_outputs is None else num_outputs
        self.images[request.request_id] = state
        self._seed_if_unseeded(request)
        if decoding.drafts:
            self._salt_prefix_cache(request, sampling_salt(request, decoding))
        super().add_request(request)

    def _seed_if_unseeded(self, request: Request) -> None:
        """Give a randomly sampled request without a seed one of its own, once, at admission.

        Sampling noise is keyed by (seed, cell); one seed per request (not per cell or step) makes an unseeded
        image exactly what a seeded one would be, whatever its batch, preemption or number of workers.
        Drawn from the engine's `seed`, like vLLM's own sampler's noise, so a rerun reproduces it.
        """
        params = request.sampling_params
        if params is None or params.seed is not None or params.temperature <= 0.0:
            return
        # A copy: vLLM's parallel sampling hands the n children of an unseeded request one shared object.
        request.sampling_params = copy(params)
        request.sampling_params.seed = self.unseeded_seeds.getrandbits(63)

    @staticmethod
    def _salt_prefix_cache(request: Request, salt: str) -> None:
        """Make sure KV computed under one decoding never serves another (same ids, other positions/masks).

        Front-ends salt the prompt already; this covers requests that reach the engine without it. Block
        hashes already computed (prompts of at least one full block) are recomputed with the salt.
        """
        if request.cache_salt is not None and salt in request.cache_salt:
            return
        request.cache_salt = salt if request.cache_salt is None else f"{request.cache_salt}|{salt}"
        if request.block_hashes:
            request.block_hashes = []
            request.update_block_hashes()

    def _computed_blocks_before_logits(self, request: Request):
        """vLLM's prefix-cache lookup, cut so that every token whose logits the image's pending pass samples
        is computed in this step.

        vLLM only keeps the prompt's *last* token out of a hit. A guided image's conditional stream ends
        mid-prompt (its twin's prompt follows), so a second request with the same prompts (`n` > 1, or a
        repeat) could take the conditional prompt's last token from the cache and have no logits row for
        cell (0, 0): the step's sample offsets then pointed outside the scheduled tokens (an IndexError that
        killed the engine). After a preemption the same holds for the pass being recomputed.
        """
        blocks, num_hit, boundary = self._cache_lookup(request)
        state = self.images.get(request.request_id)
        if state is None or num_hit <= state.first_logits_index:
            return blocks, num_hit, boundary
        keep = state.first_logits_index // self.block_size
        cut = KVCacheBlocks(tuple(group[:keep] for group in blocks.blocks))
        return cut, keep * self.block_size, min(boundary, keep * self.block_size)

    # -- scheduling ------------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        held, budget = self._hold_back_unfittable()
        held_waiting = self._hold_back_waiting(budget)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self._restore_held(held)
            for request in held_waiting:
                self.waiting.add_request(request)
        self._trim_chunks(output)
        output.zipar_inputs = self._step_inputs(output)  # type: ignore[attr-defined]
        return output

    def _hold_back_unfittable(self) -> tuple[list[tuple[int, Request]], int]:
        """Take out of `running`, for this step only, images whose next pass would not fit the budget.

        vLLM's scheduler gives a running request `min(needed, budget left)` tokens; for an image that would
        cut a pass in two and lose the samples of its first part. Held requests keep their KV blocks.
        Also returns the budget the running requests leave (at least what vLLM will leave them).
        """
        budget = self.max_num_scheduled_tokens
        held: list[tuple[int, Request]] = []
        kept: list[Request] = []
        for index, request in enumerate(self.running):
            needed = request.num_tokens_with_spec - request.num_computed_tokens
            state = self.images.get(request.request_id)
            if state is not None and needed > budget:
                cut = request.num_computed_tokens + budget
                # A chunk that starts before the pass runs and is trimmed to end there (`_trim_chunks`):
                # holding it would stall an image whose tokens before its pass outgrow the budget.
                splits = cut < state.plan.num_fed and cut > state.first_split_point
                if budget <= 0 or splits and request.num_computed_tokens >= state.first_split_point:
                    held.append((index, request))
                    continue
            budget -= min(needed, budget)
            kept.append(request)
        if held:
            self.running[:] = kept
        return held, budget

    def _hold_back_waiting(self, budget: int) -> list[Request]:
        """Take out of `waiting`, for this step only, the first image whose chunk could start at its pending
        pass and not reach the pass's end (and every request after it, as vLLM stops at a request that does
        not fit).

        A waiting image's first chunk starts at its prefix-cache hit, which may be the pass's first sampled
        input (a guided class prompt's pass starts at token 0): then no trim leaves a token in the chunk.
        `budget` is what the running requests leave; earlier waiting requests are counted whole (their hits
        are not known yet), so the estimate errs towards holding back.
        """
        queued = list(self.waiting)
        for position, request in enumerate(queued):
            if budget <= 0:
                return []
            state = self.images.get(request.request_id)
            if state is not None and request.num_tokens - state.first_split_point > budget:
                held = queued[position:]
                self.waiting.remove_requests(held)
                return held
            budget -= min(request.num_tokens - request.num_computed_tokens, budget)
        return []

    def _restore_held(self, held: list[tuple[int, Request]]) -> None:
        for index, request in held:
            self.running.insert(min(index, len(self.running)), request)

    def _trim_chunks(self, output: SchedulerOutput) -> None:
        """End a (re)computed image's chunk before its pending pass when the budget would cut the pass."""
        for req_id, num in list(output.num_scheduled_tokens.items()):
            state = self.images.get(req_id)
            if state is None:
                continue
            request = self.requests[req_id]
            end = request.num_computed_tokens
            start = end - num
            if end >= state.plan.num_fed or end <= state.first_split_point:
                continue
            keep = state.first_split_point - start
            if keep <= 0:
                raise RuntimeError(
                    f"request {req_id}: a ZipAR pass of {state.plan.num_fed - state.pending_start} tokens "
                    f"does not fit max_num_batched_tokens={self.max_num_scheduled_tokens}"
                )
            cut = num - keep
            output.num_scheduled_tokens[req_id] = keep
            output.total_num_scheduled_tokens -= cut
            request.num_computed_tokens -= cut
            request.num_in_flight_tokens -= cut
            request.is_prefill_chunk = True

    def _step_inputs(self, output: SchedulerOutput) -> dict[str, ImageStepInputs]:
        plans: dict[str, ImageStepInputs] = {}
        for req_id, num in output.num_scheduled_tokens.items():
            state = self.images.get(req_id)
            if state is None:
                continue
            end = self.requests[req_id].num_computed_tokens
            start = end - num
            fed = state.plan.fed(start, end)
            completes_pass = end == state.plan.num_fed
            if not completes_pass and end > state.first_split_point:
                raise RuntimeError(
                    f"request {req_id}: step would split a ZipAR pass at token {end} "
                    f"(start {start}, fed {state.plan.num_fed}, pass starts {state.pending_start}, "
                    f"first sampled {state.first_split_point}, status {self.requests[req_id].status})"
                )
            sampled = state.pending_sampled if completes_pass else []
            guides = state.pending_guides if completes_pass else []
            guided = state.guidance is not None
            plan = state.plan
            drafts = DraftStepInputs.of_plan(plan, start, end) if isinstance(plan, DraftPlan) else None
            plans[req_id] = ImageStepInputs(
                start=start,
                token_ids=[f.token for f in fed],
                positions=[f.position for f in fed],
                steps=[f.step for f in fed],
                proxy=[f.kind is FeedKind.PROXY for f in fed],
                sample_offsets=[i - start for i in sampled],
                sample_positions=[fed[i - start].predicts for i in sampled],
                masked_decoding=state.window is not None or guided or drafts is not None,
                streams=[f.stream for f in fed] if guided else None,
                guide_offsets=[i - start if i >= 0 else -1 for i in guides],
                cfg_scale=state.guidance.scale if guided else 1.0,
                drafts=drafts,
            )
        return plans

    # -- results ---------------------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput):
        plans: dict[str, ImageStepInputs] = getattr(scheduler_output, "zipar_inputs", {})
        sampled_all = model_runner_output.sampled_token_ids
        for req_id, plan in plans.items():
            state = self.images.get(req_id)
            index = model_runner_output.req_id_to_index.get(req_id)
            if state is None or index is None or not sampled_all:
                continue
            if not plan.sample_offsets:
                # A chunk that completes no pass (a recompute after preemption): the runner may still have
                # sampled from its last token, which is meaningless here.
                sampled_all[index] = []
                continue
            cells = list(sampled_all[index])
            if len(cells) != len(plan.sample_offsets):
                continue  # discarded (e.g. the request was aborted while running)
            plan_of = state.plan
            plan_of.record(cells)
            if isinstance(plan_of, DraftPlan):
                next_inputs: list[FedInput] | list[LogicalToken] = plan_of.next_inputs(
                    # vLLM schedules at most max_model_len - 1 tokens of a sequence (one slot for a sample).
                    kv_room=self.max_model_len - 1 - plan_of.num_fed,
                    pass_room=self.max_num_scheduled_tokens,
                )
            else:
                state.cells_per_pass.append(len(cells))
                next_inputs = plan_of.next_inputs()
            if next_inputs:
                state.set_pending(next_inputs)
                sampled_all[index] = [f.token for f in next_inputs]
            else:
                sampled_all[index] = cells  # the last pass's cells end the request at max_tokens
                request = self.requests[req_id]
                request.max_tokens = request.num_output_tokens + len(cells)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.finished_images:
            for engine_outputs in outputs.values():
                for output in engine_outputs.outputs:
                    stats = self.finished_images.pop(output.request_id, None)
                    if stats is not None and output.finish_reason is not None:
                        # The only free-form per-request channel from the engine core to the request output.
                        output.kv_transfer_params = {
                            **(output.kv_transfer_params or {}),
                            STATS_KEY: stats.to_dict(),
                        }
            self.finished_images.clear()
        return outputs

    def _preempt_request(self, request: Request, *args, **kwargs) -> None:
        if request.request_id in self.images:
            self.num_preempted_images += 1
        super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Request, *args, **kwargs):
        state = self.images.pop(request.request_id, None)
        if state is not None and state.plan.done:
            self.finished_images[request.request_id] = image_stats(state)
        return super()._free_request(request, *args, **kwargs)


def sampling_salt(request: Request, decoding) -> str:
    """A draft image's tokens sit at positions that depend on its sampled values, so two requests may share
    KV blocks only if they sample alike: same seed (given at admission when missing), temperature, top-k,
    top-p and guidance, and so the same values, drafts and positions throughout."""
    params = request.sampling_params
    assert params is not None
    guidance = decoding.guidance
    cfg = "" if guidance is None else f"-c{guidance.scale!r}i{guidance.interval}"
    return f"draws-s{params.seed}t{params.temperature!r}k{params.top_k}p{params.top_p!r}{cfg}"


def image_stats(state: ImageRequestState) -> ImageStats:
    """What the request output reports about how an image was decoded."""
    plan = state.plan
    layout = plan.layout
    guidance = state.guidance
    common: dict[str, Any] = dict(
        decoding=state.decoding,
        window=state.window,
        cfg_scale=guidance.scale if guidance is not None else 1.0,
        grid=(layout.height, layout.width),
        prompt_len=layout.prompt_len,
        uncond_prompt_len=guidance.uncond_prompt_len if guidance is not None else None,
        passes=plan.steps,
    )
    if isinstance(plan, DraftPlan):
        stats = plan.stats
        return ImageStats(
            **common,
            cells_per_pass=tuple(stats.cells_per_pass),
            drafts=plan.drafts,
            fed=stats.fed,
            draft_tokens=stats.drafts,
            accepted=stats.accepted,
            superseded=stats.superseded,
            tokens=tuple(token for row in plan.grid() for token in row),
        )
    return ImageStats(**common, cells_per_pass=tuple(state.cells_per_pass))
