"""Reference NTP and ZipAR decoders for EOL grids (Emu3), written from ZIPAR.md §1-5, not from the engine.

Grid: a prompt of ``P`` ids, then ``H`` rows of ``W`` visual tokens each ending with the EOL token; cell
``(r, c)`` sits at ``pos(r, c) = P + r * (W + 1) + c`` and ``c == W`` is the row's EOL cell. The last
prompt token predicts (0, 0). ZipAR with window ``w``: row ``r + 1`` starts in the first pass after row
``r`` holds ``>= w`` tokens, fed the EOL token at ``pos(r, W)`` (a real token whose logits predict
``(r + 1, 0)``); every started, incomplete row feeds its newest token; a row whose last token was sampled
feeds it in the next pass only to write its keys and values; the last row's last token (and the closing
EOL, EOF, image end, EOS, all forced) is never fed. ``window >= W`` is NTP order: ``H * W`` passes, a row's
last token and its EOL fed in the same pass. Each pass recomputes every fed token of a stream under the
exact §3 mask with feed time (query i reads key j iff ``pos_j <= pos_i`` and j was fed in i's pass or
earlier). CFG: the unconditional stream has its own prompt and counts positions from its own length; it
receives the same image tokens and EOLs; the streams never see each other. A cell's logits are
``u + s * (c - u)`` over the whole vocabulary, then cut to the visual tokens and sampled with
``sampling.sample_cell`` keyed by ``(seed, cell position in the conditional stream)`` with the code index
as the noise's vocabulary index. Tokens come back as vocabulary ids. ``visual`` is Emu3's contiguous
``(start, stop)`` pair (code ``c`` is id ``start + c``) or, for vocabularies that map codes to ids through a
table (Chameleon / Lumina-mGPT), a ``range`` or ``list`` of ids in code order (code ``c`` is ``visual[c]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .emu3_text import ReferenceEmu3
from .sampling import cfg_logits, sample_cell


class EolModel(Protocol):
    """What the decoders need of a model (``ReferenceEmu3``, the Lumina references): ``config.vocab_size``
    and a cache-free masked forward returning float32 logits ``[n, vocab]``."""

    config: Any

    def forward_tokens(self, ids, pos, attend: torch.Tensor) -> torch.Tensor: ...


REAL = "real"  # predicts a cell (or is a prompt token)
KV_ONLY = "kv_only"  # a completed row's last token, fed only to write its keys/values


@dataclass(frozen=True)
class EolInput:
    """One fed input of a pass, in the conditional stream's positions."""

    token: int
    pos: int
    kind: str
    target: tuple[int, int] | None  # the cell its logits predict


def visual_ids(visual: tuple[int, int] | Sequence[int]) -> range | tuple[int, ...]:
    """The vocabulary ids of the codes in code order: a 2-tuple is Emu3's ``(start, stop)``, any other
    sequence (a ``range`` or ``list``) already lists the ids, code ``c`` at index ``c``."""
    if isinstance(visual, tuple) and len(visual) == 2:
        return range(int(visual[0]), int(visual[1]))
    if isinstance(visual, range):
        return visual
    return tuple(int(i) for i in visual)


@dataclass(frozen=True)
class _Sampling:
    eol_id: int
    visual: range | tuple[int, ...]  # vocabulary id of code c at index c
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    seed: int | None


def _check(model, prompt_ids, H, W, eol_id, visual, negative_prompt_ids, cfg_scale, temperature, seed):
    vocab = model.config.vocab_size
    if H < 1 or W < 1:
        raise ValueError(f"grid {H}x{W} must have positive sides")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: the last prompt token predicts cell (0, 0)")
    ids = visual_ids(visual)
    if isinstance(visual, tuple) and len(visual) == 2 and not 0 <= visual[0] < visual[1] <= vocab:
        raise ValueError(f"visual range {visual} must satisfy 0 <= start < stop <= vocab_size={vocab}")
    if not ids or min(ids) < 0 or max(ids) >= vocab or len(set(ids)) != len(ids):
        raise ValueError(f"visual ids must be distinct vocabulary ids in [0, vocab_size={vocab})")
    if not 0 <= eol_id < vocab or eol_id in ids:
        raise ValueError(f"eol_id={eol_id} must be a vocabulary id outside the visual range {visual}")
    if cfg_scale != 1.0 and not negative_prompt_ids:
        raise ValueError(f"cfg_scale={cfg_scale} needs negative_prompt_ids (the unconditional prompt)")
    if temperature > 0 and seed is None:
        raise ValueError("the reference oracle samples only with a seed when temperature > 0")


class _Stream:
    """One sequence (conditional or unconditional): its fed real tokens with positions and feed steps."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self.P = len(prompt_ids)
        self.tok = [int(t) for t in prompt_ids]
        self.pos = list(range(self.P))
        self.step = [0] * self.P


def _pass_logits(model, stream: _Stream, inputs: list[EolInput], step: int, shift: int, feed_time: bool):
    """Logits of this pass's inputs (rows ``-len(inputs):``) after recomputing the stream, then append them.

    ``shift`` maps conditional positions to this stream's (``U - P`` for the unconditional one)."""
    tok = stream.tok + [f.token for f in inputs]
    pos = stream.pos + [f.pos + shift for f in inputs]
    steps = stream.step + [step] * len(inputs)
    p = torch.tensor(pos)
    s = torch.tensor(steps)
    attend = p[None, :] <= p[:, None]
    if feed_time:
        attend &= s[None, :] <= s[:, None]
    attend |= torch.eye(len(pos), dtype=torch.bool)
    logits = model.forward_tokens(tok, pos, attend)
    stream.tok, stream.pos, stream.step = tok, pos, steps
    return logits[len(logits) - len(inputs) :] if inputs else logits[-1:]


def _sample(cond: torch.Tensor, uncond: torch.Tensor | None, s: _Sampling, cell_pos: int) -> int:
    logits = cond if uncond is None else cfg_logits(cond, uncond, s.cfg_scale)
    code = sample_cell(
        _cut(logits, s.visual),
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=s.seed,
        pos=cell_pos,
    )
    return s.visual[code]


def _cut(logits: torch.Tensor, ids: range | tuple[int, ...]) -> torch.Tensor:
    """The visual logits in code order (entry c scores code c)."""
    if isinstance(ids, range):
        return logits[ids.start : ids.stop]
    return logits[torch.tensor(ids, dtype=torch.long)]


def ntp_decode_eol(
    model: EolModel,
    prompt_ids: list[int],
    H: int,
    W: int,
    *,
    eol_id: int,
    visual: tuple[int, int] | Sequence[int],
    negative_prompt_ids: list[int] | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Raster-order NTP (ZIPAR.md §2) with a plain causal mask: pass t runs ``prompt + image so far`` (each
    complete row followed by its EOL, fused into the pass of the row's last token) and its last logits
    predict cell t. Returns (grid ``LongTensor[H, W]`` of vocabulary ids, passes = ``H * W``)."""
    _check(model, prompt_ids, H, W, eol_id, visual, negative_prompt_ids, cfg_scale, temperature, seed)
    s = _Sampling(eol_id, visual_ids(visual), cfg_scale, temperature, top_k, top_p, seed)
    guided = cfg_scale != 1.0
    P = len(prompt_ids)
    image: list[int] = []  # visual tokens and EOLs fed so far
    grid = torch.full((H, W), -1, dtype=torch.long)
    passes = 0

    def last_logits(prompt: list[int]) -> torch.Tensor:
        seq = list(prompt) + image
        n = len(seq)
        return model.forward_tokens(seq, list(range(n)), torch.ones(n, n, dtype=torch.bool).tril())[-1]

    for t in range(H * W):
        r, c = divmod(t, W)
        cond = last_logits(prompt_ids)
        uncond = last_logits(negative_prompt_ids) if guided else None
        grid[r, c] = tok = _sample(cond, uncond, s, P + r * (W + 1) + c)
        passes += 1
        image.append(tok)
        if c == W - 1:
            image.append(eol_id)
    return grid, passes


def plan_eol_pass(
    step: int, n: list[int], W: int, window: int, P: int, grid: torch.Tensor, eol_id: int, kv_due: list[int]
) -> list[EolInput]:
    """Inputs of ZipAR pass ``step >= 1`` for an EOL layout from the state after the previous pass, in
    raster order. ``n[r]``: row r's sampled tokens; ``kv_due``: rows completed by the previous pass."""
    H = len(n)

    def pos(r: int, c: int) -> int:
        return P + r * (W + 1) + c

    inputs = [
        EolInput(int(grid[r, n[r] - 1]), pos(r, n[r] - 1), REAL, (r, n[r])) for r in range(H) if 0 < n[r] < W
    ]
    for r in range(1, H):
        if n[r] == 0 and n[r - 1] >= min(window, W):
            inputs.append(EolInput(eol_id, pos(r - 1, W), REAL, (r, 0)))
    for r in kv_due:
        inputs.append(EolInput(int(grid[r, W - 1]), pos(r, W - 1), KV_ONLY, None))
    return sorted(inputs, key=lambda f: f.pos)


def zipar_decode_eol(
    model: EolModel,
    prompt_ids: list[int],
    H: int,
    W: int,
    window: int,
    *,
    eol_id: int,
    visual: tuple[int, int] | Sequence[int],
    negative_prompt_ids: list[int] | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    _feed_time: bool = True,
    _start_pos_shift: int = 0,
    _trace: list | None = None,
    _forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """ZipAR decoding of an EOL grid (ZIPAR.md §3). Returns (grid ``LongTensor[H, W]`` of vocabulary ids,
    forward passes, prefill included; ``(H - 1) * min(window, W) + W``).

    Test hooks: ``_feed_time=False`` drops the feed-time condition from the mask; ``_start_pos_shift`` moves
    each row-start EOL off ``pos(r, W)``; ``_trace`` receives one dict per pass: ``inputs`` (``EolInput``s,
    prefill excluded), ``uncond_positions`` and ``cells`` (cell -> the guided logits it was sampled from);
    ``_forced`` (``[H, W]`` ids) replaces every sampled token (teacher forcing, see ``teacher_forced_gaps``).
    """
    _check(model, prompt_ids, H, W, eol_id, visual, negative_prompt_ids, cfg_scale, temperature, seed)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    s = _Sampling(eol_id, visual_ids(visual), cfg_scale, temperature, top_k, top_p, seed)
    P = len(prompt_ids)
    cond_stream = _Stream(prompt_ids)
    uncond_stream = _Stream(negative_prompt_ids) if cfg_scale != 1.0 else None
    shift = 0 if uncond_stream is None else uncond_stream.P - P
    grid = torch.full((H, W), -1, dtype=torch.long)
    n = [0] * H
    kv_due: list[int] = []
    step = 0
    while min(n) < W:
        if step == 0:
            inputs: list[EolInput] = []
            targets = [(0, 0)]
        else:
            inputs = plan_eol_pass(step, n, W, window, P, grid, eol_id, kv_due)
            if _start_pos_shift:
                inputs = [
                    EolInput(f.token, f.pos + _start_pos_shift, f.kind, f.target)
                    if f.token == eol_id and f.target is not None
                    else f
                    for f in inputs
                ]
            targets = [f.target for f in inputs]
        cond = _pass_logits(model, cond_stream, inputs, step, 0, _feed_time)
        uncond = None
        if uncond_stream is not None:
            uncond = _pass_logits(model, uncond_stream, inputs, step, shift, _feed_time)
        cells = {}
        kv_due = []
        for i, target in enumerate(targets):
            if target is None:
                continue
            r, c = target
            if n[r] != c:
                raise AssertionError(f"pass {step} predicts {target} out of order (n={n})")
            cells[target] = cond[i] if uncond is None else cfg_logits(cond[i], uncond[i], cfg_scale)
            if _forced is None:
                grid[r, c] = _sample(cond[i], None if uncond is None else uncond[i], s, P + r * (W + 1) + c)
            else:
                grid[r, c] = _forced[r, c]
            n[r] += 1
            if n[r] == W and r < H - 1:
                kv_due.append(r)
        if _trace is not None:
            _trace.append(
                {
                    "step": step,
                    "inputs": inputs,
                    "uncond_positions": [f.pos + shift for f in inputs] if uncond_stream else None,
                    "cells": cells,
                }
            )
        step += 1
    return grid, step


def teacher_forced_gaps(
    model: EolModel,
    prompt_ids: list[int],
    grid: torch.Tensor,
    window: int,
    *,
    eol_id: int,
    visual: tuple[int, int] | Sequence[int],
    negative_prompt_ids: list[int] | None = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """ZIPAR.md §6 teacher forcing for greedy runs: replay ``grid`` (``[H, W]`` vocabulary ids, e.g. an
    engine's) through ``zipar_decode_eol``'s passes and return, per cell, the oracle's best visual logit minus
    the logit of the token in ``grid`` (``float32[H, W]``, 0 where the oracle agrees). A near-tie flip gives
    ~1e-4; a wrong mask or position gives order-1 gaps."""
    H, W = grid.shape
    ids = visual_ids(visual)
    code_of = {token: code for code, token in enumerate(ids)}
    if not all(int(t) in code_of for t in grid.flatten().tolist()):
        raise ValueError(f"grid holds ids outside the visual range {visual}")
    trace: list = []
    zipar_decode_eol(
        model,
        prompt_ids,
        H,
        W,
        window,
        eol_id=eol_id,
        visual=visual,
        negative_prompt_ids=negative_prompt_ids,
        cfg_scale=cfg_scale,
        _trace=trace,
        _forced=grid,
    )
    gaps = torch.full((H, W), float("nan"))
    for entry in trace:
        for (r, c), logits in entry["cells"].items():
            cut = _cut(logits, ids)
            gaps[r, c] = cut.max() - cut[code_of[int(grid[r, c])]]
    return gaps


def reference_from_hf_dir(model_dir) -> ReferenceEmu3:
    """Load ``Emu3ForConditionalGeneration`` from a Hugging Face directory in float32 and wrap its weights."""
    from transformers import Emu3ForConditionalGeneration

    model = Emu3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return ReferenceEmu3.from_hf(model)
