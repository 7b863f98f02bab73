"""Classifier-free guidance of one image (ZIPAR.md §5) as two streams of one KV sequence.

A guided image runs a conditional sequence (stream 0) and an unconditional one (stream 1) that receive the
same image tokens; only their prompts differ. Both live in *one* engine request: its prompt is the
conditional prompt followed by the unconditional one, and every pass feeds the conditional inputs and then
the same inputs again for the unconditional stream, at that stream's own positions (each stream counts from
its own prompt length). The mask (``plan.visible``) keeps the streams apart, so each sees exactly what it
would see alone.

Why one request rather than a linked pair of requests: the engine's scheduler then admits, schedules,
preempts and frees both sequences together by construction (it cannot split one request's pass), its KV
accounting counts both, and pairing is by request identity; no batch position is involved anywhere. A scale
of 1 uses a plain ``ZipARPlan``: one stream, half the tokens.

Guidance applies to grid cell ``n`` (raster index) iff ``cfg_interval < 0`` or ``n <= cfg_interval + 1``,
as in the authors' ``generate()`` (LlamaGen ``autoregressive/models/generate.py``): the prefill's cell, then
decode steps ``i <= cfg_interval`` (cell ``i + 1``). Other cells use the conditional logits alone.
"""

from __future__ import annotations

import dataclasses

from .layout import GridLayout
from .plan import FedInput, FeedKind, ZipARPlan

CONDITIONAL = 0
UNCONDITIONAL = 1


def guidance_applies(cell_index: int, cfg_interval: int) -> bool:
    """Whether the cell at raster index ``cell_index`` (0-based, prompt excluded) mixes in the
    unconditional logits."""
    return cfg_interval < 0 or cell_index <= cfg_interval + 1


class GuidedPlan:
    """A ``ZipARPlan`` for the cells plus an unconditional twin stream fed in the same passes.

    Same interface as ``ZipARPlan``: ``prefill_inputs(cond_prompt + uncond_prompt)``, then
    ``next_inputs()`` / ``record(tokens)`` until ``done``; ``record`` takes one token per predicted cell
    (the conditional stream's predicting inputs, in order). ``history`` is the request's KV order.
    """

    def __init__(self, layout: GridLayout, window: int | None, uncond_prompt_len: int) -> None:
        if (
            isinstance(uncond_prompt_len, bool)
            or not isinstance(uncond_prompt_len, int)
            or uncond_prompt_len < 1
        ):
            raise ValueError(f"uncond_prompt_len={uncond_prompt_len!r} must be an int >= 1")
        self.inner = ZipARPlan(layout, window)
        self.layout = layout
        self.uncond_prompt_len = uncond_prompt_len
        self._shift = uncond_prompt_len - layout.prompt_len
        self._history: list[FedInput] = []
        self._issued: list[FedInput] | None = None

    @property
    def window(self) -> int | None:
        return self.inner.window

    @property
    def done(self) -> bool:
        return self.inner.done

    @property
    def steps(self) -> int:
        return self.inner.steps

    @property
    def num_fed(self) -> int:
        return len(self._history)

    @property
    def history(self) -> list[FedInput]:
        return list(self._history)

    def fed(self, start: int, end: int) -> list[FedInput]:
        return self._history[start:end]

    def grid(self) -> list[list[int]]:
        return self.inner.grid()

    @property
    def prompt_len(self) -> int:
        """Both prompts: the request's prompt length."""
        return self.layout.prompt_len + self.uncond_prompt_len

    def prefill_inputs(self, prompt_token_ids: list[int]) -> list[FedInput]:
        """Pass 0: the conditional prompt, then the unconditional one; each last token predicts (0, 0)."""
        P, U = self.layout.prompt_len, self.uncond_prompt_len
        if len(prompt_token_ids) != P + U:
            raise ValueError(
                f"guided prompt has {len(prompt_token_ids)} tokens; "
                f"expected {P} conditional + {U} unconditional"
            )
        cond = self.inner.prefill_inputs(list(prompt_token_ids[:P]))
        first = self.layout.pos(0, 0)
        uncond = [
            FedInput(int(t), i, FeedKind.REAL, first if i == U - 1 else None, 0, UNCONDITIONAL)
            for i, t in enumerate(prompt_token_ids[P:])
        ]
        return self._issue(cond + uncond)

    def next_inputs(self) -> list[FedInput]:
        if self._issued is not None and self.steps > 0:
            return list(self._issued)
        cond = self.inner.next_inputs()
        if not cond:
            return []
        twin = [dataclasses.replace(f, position=f.position + self._shift, stream=UNCONDITIONAL) for f in cond]
        return self._issue(cond + twin)

    def record(self, sampled: list[int]) -> None:
        self.inner.record(sampled)
        self._issued = None

    def _issue(self, inputs: list[FedInput]) -> list[FedInput]:
        self._issued = inputs
        self._history.extend(inputs)
        return list(inputs)


def image_plan(
    layout: GridLayout, window: int | None, uncond_prompt_len: int | None
) -> ZipARPlan | GuidedPlan:
    """The plan of one image: guided when it has an unconditional prompt, plain otherwise."""
    if uncond_prompt_len is None:
        return ZipARPlan(layout, window)
    return GuidedPlan(layout, window, uncond_prompt_len)
