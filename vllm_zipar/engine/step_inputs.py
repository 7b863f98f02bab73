"""What one engine step feeds for one image request: the message from our scheduler to our runner.

It rides on vLLM's `SchedulerOutput` (attribute `zipar_inputs`), so it reaches worker processes under every
executor; scheduler and workers share no other state. Plain data only: no torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_zipar.zipar.draft_plan import DraftPlan


@dataclass
class ImageStepInputs:
    """The scheduled tokens `[start, start + len(token_ids))` of one request's KV sequence.

    `steps` are plan pass indices (feed time); `proxy` marks query-only inputs; `sample_offsets` index the
    scheduled tokens whose logits are sampled this step, and `sample_positions` are the raster positions of
    the cells they predict (the key of each cell's random draw). With classifier-free guidance, `streams`
    gives each token's sequence (0 conditional, 1 unconditional) and `guide_offsets[i]` the unconditional
    twin of sampled input i (-1: that cell uses the conditional logits alone); the runner samples
    `u + cfg_scale * (c - u)` once per cell.
    """

    start: int
    token_ids: list[int]
    positions: list[int]
    steps: list[int]
    proxy: list[bool]
    sample_offsets: list[int]
    sample_positions: list[int]
    masked_decoding: bool = False  # ZipAR or guided: its attention will need the mask at some point
    streams: list[int] | None = None  # None: one stream
    guide_offsets: list[int] = field(default_factory=list)
    cfg_scale: float = 1.0
    drafts: DraftStepInputs | None = None  # exact drafts: the newest-token mask's per-token fields


@dataclass
class DraftStepInputs:
    """What the exact-draft mask needs beyond `ImageStepInputs` (`zipar.draft_plan.DraftMaskFields`, for
    the same tokens): each token's static context and cell, and the earlier token it supersedes (an index
    in the request's KV sequence, or -1); the grid width, the effective window and whether row 0 is seen
    whole (layouts without EOL) are the request's."""

    context_rows: list[int]
    context_cols: list[int]
    key_rows: list[int]
    key_cols: list[int]
    supersedes: list[int]
    width: int
    window: int
    row0_whole: bool

    @classmethod
    def of_plan(cls, plan: DraftPlan, start: int, end: int) -> DraftStepInputs:
        """Tokens `[start, end)` of a draft plan's history (its KV order)."""
        fields = plan.mask_fields(start, end)
        layout = plan.layout
        return cls(
            context_rows=fields.context_rows,
            context_cols=fields.context_cols,
            key_rows=fields.key_rows,
            key_cols=fields.key_cols,
            supersedes=fields.supersedes,
            width=layout.width,
            window=plan.context.effective_window,
            row0_whole=not layout.eol,
        )
