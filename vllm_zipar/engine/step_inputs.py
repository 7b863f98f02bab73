"""What one engine step feeds for one image request: the message from our scheduler to our runner.

It rides on vLLM's `SchedulerOutput` (attribute `zipar_inputs`), so it reaches worker processes under every
executor; scheduler and workers share no other state. Plain data only: no torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
