"""Reference NTP and ZipAR decoders for Janus-Pro (no-EOL grid after a text prompt), from ZIPAR.md §2-5.

API for engine tests (``ref`` a ``janus_model.ReferenceJanus``; prompts are plain id lists ending with
``<begin_of_image>``; ``uncond_prompt_ids`` may be None when ``cfg_scale == 1``):

- ``janus_ntp_decode(ref, prompt_ids, uncond_prompt_ids, H, W, *, cfg_scale, temperature, top_k, top_p, seed)
  -> (codes LongTensor[H, W], passes = H * W)``
- ``janus_zipar_decode(ref, prompt_ids, uncond_prompt_ids, H, W, window, *, ...same...) -> (codes, passes)``,
  passes ``2W + (H - 2) * min(window, W)`` for ``window < W`` and ``H >= 2`` (``H * W`` otherwise)
- ``janus_teacher_forced_gaps(ref, prompt_ids, uncond_prompt_ids, codes, window, *, cfg_scale)``: per cell,
  the oracle's best logit minus the logit of ``codes[r, c]`` when fed those codes (ZIPAR.md §6).

Codes are VQ codebook indices (columns of ``generation_head``), not vocabulary ids. Layout: a prompt of ``P``
ids whose last token, ``<begin_of_image>``, predicts cell (0, 0); cell ``(r, c)`` sits at
``pos(r, c) = P + r * W + c``; every image token, proxies included, enters through the generation embeddings.
ZipAR with window ``w`` (ZIPAR.md §3, the LlamaGen no-EOL rules, planned by ``decoders.plan_llamagen_pass``):
row 0 completes before row 1 starts; later rows start in the first pass after the row above holds ``>= w``
codes, from a proxy (the row above's newest code at ``pos(r - 1, W - 1)``, query-only) or, if the row above
is complete, from its real last code; every active row feeds its newest code; a completed row's last code is
fed once to write its keys and values. Each pass recomputes the stream under the exact §3 mask with feed
time (query i reads key j iff ``pos_j <= pos_i``, j was fed in i's pass or earlier, and j is not a proxy
unless j == i). CFG: two streams, each at its own positions (``U - P`` apart), the same image codes fed to
both, logits mixed ``u + s * (c - u)`` on the raw generation-head logits, then ``sampling.sample_cell`` keyed
by ``(seed, pos(r, c))`` of the conditional stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoders import KV_ONLY, PROXY, REAL, FedInput, plan_llamagen_pass, zipar_mask
from .janus_model import ReferenceJanus
from .sampling import cfg_logits, sample_cell

__all__ = [
    "KV_ONLY",
    "PROXY",
    "REAL",
    "FedInput",
    "janus_ntp_decode",
    "janus_teacher_forced_gaps",
    "janus_zipar_decode",
]


@dataclass(frozen=True)
class _Sampling:
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    seed: int | None


def _check(ref: ReferenceJanus, prompt_ids, uncond_prompt_ids, H, W, cfg_scale, temperature, seed) -> None:
    if H <= 0 or W <= 0:
        raise ValueError(f"grid {H}x{W} must have positive sides")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: the last prompt token (<begin_of_image>) predicts cell (0, 0)")
    for name, ids in (("prompt_ids", prompt_ids), ("uncond_prompt_ids", uncond_prompt_ids or [])):
        if any(not 0 <= int(t) < ref.config.vocab_size for t in ids):
            raise ValueError(f"{name} holds ids outside [0, {ref.config.vocab_size})")
    if cfg_scale != 1.0 and not uncond_prompt_ids:
        raise ValueError(f"cfg_scale={cfg_scale} needs uncond_prompt_ids (the unconditional prompt)")
    if temperature > 0 and seed is None:
        raise ValueError("the reference oracle samples only with a seed when temperature > 0")


def _sample(cond: torch.Tensor, uncond: torch.Tensor | None, s: _Sampling, cell_pos: int) -> int:
    logits = cond if uncond is None else cfg_logits(cond, uncond, s.cfg_scale)
    return sample_cell(
        logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, pos=cell_pos
    )


def janus_ntp_decode(
    ref: ReferenceJanus,
    prompt_ids: list[int],
    uncond_prompt_ids: list[int] | None,
    H: int,
    W: int,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Raster-order NTP (ZIPAR.md §2) with a plain causal mask: pass t runs ``prompt + codes[:t]`` and its
    last logits predict cell t. Returns (codes ``LongTensor[H, W]``, passes = ``H * W``)."""
    _check(ref, prompt_ids, uncond_prompt_ids, H, W, cfg_scale, temperature, seed)
    s = _Sampling(cfg_scale, temperature, top_k, top_p, seed)
    P = len(prompt_ids)
    codes: list[int] = []

    def last_logits(prompt: list[int]) -> torch.Tensor:
        ids = list(prompt) + codes
        n = len(ids)
        is_image = [False] * len(prompt) + [True] * len(codes)
        return ref.forward_tokens(ids, is_image, list(range(n)), torch.ones(n, n, dtype=torch.bool).tril())[
            -1
        ]

    for t in range(H * W):
        cond = last_logits(prompt_ids)
        uncond = last_logits(uncond_prompt_ids) if cfg_scale != 1.0 else None
        codes.append(_sample(cond, uncond, s, P + t))
    return torch.tensor(codes, dtype=torch.long).view(H, W), H * W


class _Stream:
    """One sequence (conditional or unconditional): every token fed so far, with its position, feed step, and
    whether it is an image code and a proxy. Positions are this stream's own (``shift`` from the
    conditional stream's)."""

    def __init__(self, prompt_ids: list[int], shift: int) -> None:
        P = len(prompt_ids)
        self.shift = shift
        self.ids = [int(t) for t in prompt_ids]
        self.is_image = [False] * P
        self.pos = list(range(P))
        self.step = [0] * P
        self.proxy = [False] * P

    def run_pass(
        self, ref: ReferenceJanus, inputs: list[FedInput], step: int, feed_time: bool, attend_proxies: bool
    ) -> torch.Tensor:
        """Append this pass's inputs, recompute the whole stream under the §3 mask, and return the logits of
        the inputs (of the last prompt token in the prefill, where ``inputs`` is empty)."""
        self.ids += [f.token for f in inputs]
        self.is_image += [True] * len(inputs)
        self.pos += [f.pos + self.shift for f in inputs]
        self.step += [step] * len(inputs)
        # attend_proxies (a test hook) treats proxies as real keys, now and in every later pass.
        self.proxy += [f.kind == PROXY and not attend_proxies for f in inputs]
        attend = zipar_mask(self.pos, self.step, self.proxy, feed_time=feed_time)
        logits = ref.forward_tokens(self.ids, self.is_image, self.pos, attend)
        return logits[len(logits) - len(inputs) :] if inputs else logits[-1:]


def janus_zipar_decode(
    ref: ReferenceJanus,
    prompt_ids: list[int],
    uncond_prompt_ids: list[int] | None,
    H: int,
    W: int,
    window: int,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    _feed_time: bool = True,
    _attend_proxies: bool = False,
    _trace: list | None = None,
    _forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """ZipAR decoding of a Janus grid (ZIPAR.md §3). Returns (codes ``LongTensor[H, W]``, forward passes,
    prefill included). ``window >= W`` is NTP order (``H * W`` passes, the same codes as NTP).

    Test hooks: ``_feed_time=False`` drops the feed-time condition from the mask; ``_attend_proxies=True``
    lets every later query read proxies as if they were real tokens; ``_trace`` receives one dict per pass:
    ``step``, ``inputs`` (``FedInput`` list in conditional positions, prefill excluded), ``uncond_positions``,
    ``cells`` (cell -> the guided logits it was sampled from), ``cond_cells`` and ``uncond_cells`` (cell ->
    each stream's own logits; None unguided); ``_forced`` (``[H, W]`` codes) replaces every sampled code
    (teacher forcing, see ``janus_teacher_forced_gaps``).
    """
    _check(ref, prompt_ids, uncond_prompt_ids, H, W, cfg_scale, temperature, seed)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    s = _Sampling(cfg_scale, temperature, top_k, top_p, seed)
    P = len(prompt_ids)
    guided = cfg_scale != 1.0
    streams = [_Stream(prompt_ids, 0)]
    if guided:
        streams.append(_Stream(list(uncond_prompt_ids or []), len(uncond_prompt_ids or []) - P))
    codes = torch.full((H, W), -1, dtype=torch.long)
    n = [0] * H
    kv_written = [False] * H
    step = 0
    while min(n) < W:
        if step == 0:
            inputs: list[FedInput] = []
            targets: list[tuple[int, int] | None] = [(0, 0)]
        else:
            inputs = plan_llamagen_pass(step, n, W, window, P, codes, kv_written)
            targets = [f.target for f in inputs]
            if not any(t is not None for t in targets):
                raise AssertionError(f"pass {step} predicts nothing; state n={n}")
        logits = [stream.run_pass(ref, inputs, step, _feed_time, _attend_proxies) for stream in streams]
        cells, stream_cells = {}, [{}, {}]
        for i, target in enumerate(targets):
            if target is None:
                continue
            r, c = target
            if n[r] != c or codes[r, c] >= 0:
                raise AssertionError(f"pass {step} predicts {target} out of order (n={n})")
            cond, uncond = logits[0][i], (logits[1][i] if guided else None)
            cells[target] = cond if uncond is None else cfg_logits(cond, uncond, cfg_scale)
            stream_cells[0][target] = cond
            if uncond is not None:
                stream_cells[1][target] = uncond
            codes[r, c] = _sample(cond, uncond, s, P + r * W + c) if _forced is None else _forced[r, c]
        for r, _ in cells:
            n[r] += 1
        for f in inputs:
            if f.kind != PROXY and (f.pos - P) % W == W - 1:
                kv_written[(f.pos - P) // W] = True
        if _trace is not None:
            _trace.append(
                {
                    "step": step,
                    "inputs": inputs,
                    "uncond_positions": [f.pos + streams[1].shift for f in inputs] if guided else None,
                    "cells": cells,
                    "cond_cells": stream_cells[0],
                    "uncond_cells": stream_cells[1] if guided else None,
                }
            )
        step += 1
    return codes, step


def janus_teacher_forced_gaps(
    ref: ReferenceJanus,
    prompt_ids: list[int],
    uncond_prompt_ids: list[int] | None,
    codes: torch.Tensor,
    window: int,
    *,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """ZIPAR.md §6 teacher forcing for greedy runs: replay ``codes`` (``[H, W]``, e.g. an engine's) through
    ``janus_zipar_decode``'s passes (``window >= W``: NTP) and return, per cell, the oracle's best guided
    logit minus the guided logit of the code in ``codes`` (``float32[H, W]``, 0 where the oracle agrees). A
    near-tie flip gives ~1e-4; a wrong mask or position gives order-1 gaps."""
    H, W = codes.shape
    if not bool(((codes >= 0) & (codes < ref.config.codebook_size)).all()):
        raise ValueError(f"codes outside [0, {ref.config.codebook_size})")
    trace: list = []
    janus_zipar_decode(
        ref, prompt_ids, uncond_prompt_ids, H, W, window, cfg_scale=cfg_scale, _trace=trace, _forced=codes
    )
    gaps = torch.full((H, W), float("nan"))
    for entry in trace:
        for (r, c), logits in entry["cells"].items():
            gaps[r, c] = logits.max() - logits[int(codes[r, c])]
    return gaps
