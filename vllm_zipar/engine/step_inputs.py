"""What one engine step feeds for one image request: the message from our scheduler to our runner.

It rides on vLLM's `SchedulerOutput` (attribute `zipar_inputs`), so it reaches worker processes under every
executor; scheduler and workers share no other state. Plain data only: no torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ImageStepInputs:
    """The scheduled tokens `[start, start + len(token_ids))` of one request's KV sequence.

    `steps` are plan pass indices (feed time); `proxy` marks query-only inputs; `sample_offsets` index the
    scheduled tokens whose logits are sampled this step, and `sample_positions` are the raster positions of
    the cells they predict (the key of each cell's random draw).
    """

    start: int
    token_ids: list[int]
    positions: list[int]
    steps: list[int]
    proxy: list[bool]
    sample_offsets: list[int]
    sample_positions: list[int]
    masked_decoding: bool = False  # ZipAR (not NTP): its attention will need the mask at some point
