"""Reference NTP and ZipAR decoders and step counts, written from ZIPAR.md (not from the engine code).

Every forward pass recomputes the whole fed history with ``ReferenceLlamaGen.forward_tokens`` and an
explicit mask, so there is no cache to get wrong. The ZipAR mask is the exact one of ZIPAR.md §3 *with feed
time*: query ``i`` sees key ``j`` iff ``pos_j <= pos_i``, ``j`` was fed in the same pass as ``i`` or
earlier, and ``j`` is not a proxy (unless ``j == i``). That makes a recomputing oracle equal to a KV-cache
run. Cells are sampled position-keyed (``sampling.sample_cell(..., pos=p)``), so NTP and ZipAR differ only
through the context each cell saw. Grid layout: LlamaGen only (no EOL column) for the decoders; the step
simulation covers both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .llamagen_gpt import ReferenceLlamaGen
from .sampling import cfg_logits, sample_cell

# Kinds of fed input in one pass.
REAL = "real"  # a real token whose logits predict a cell
KV_ONLY = "kv_only"  # a row's last token fed only to write its keys/values; logits discarded
PROXY = "proxy"  # query-only stand-in at the row above's last cell; nobody attends to it


@dataclass(frozen=True)
class FedInput:
    token: int
    pos: int
    kind: str
    target: tuple[int, int] | None  # the cell whose logits this input produces, if any


def _check_sampling(
    model: ReferenceLlamaGen,
    class_label: int,
    H: int,
    W: int,
    temperature: float,
    seed: int | None,
    cfg_scale: float,
) -> None:
    cfg = model.config
    if H <= 0 or W <= 0:
        raise ValueError(f"grid {H}x{W} must have positive sides")
    if H * W > cfg.block_size:
        raise ValueError(f"grid {H}x{W} has {H * W} cells, more than block_size={cfg.block_size}")
    if not 0 <= class_label < cfg.num_classes:
        raise ValueError(f"class_label={class_label} outside [0, {cfg.num_classes})")
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} must be >= 1 (1 disables CFG)")
    if cfg_scale > 1.0 and cfg.label_rows == cfg.num_classes:
        raise ValueError("CFG needs the null class row (class_dropout_prob > 0)")
    if temperature > 0 and seed is None:
        raise ValueError("the reference oracle samples only with a seed when temperature > 0")


class _PassLogits:
    """Per-row logits of one pass. With CFG the unconditional sequence (null class) gets the same image
    tokens, and cell ``n`` (raster index) is guided iff ``cfg_interval < 0`` or ``n <= cfg_interval + 1``:
    the authors' ``generate()`` guides the prefill's cell and decode steps ``i <= cfg_interval``
    (cell ``i + 1``), then uses the conditional logits alone."""

    def __init__(self, model, class_label, ids, pos, attend, cfg_scale: float, cfg_interval: int) -> None:
        self.cond = model.forward_tokens(class_label, ids, pos, attend)
        self.uncond = None
        if cfg_scale != 1.0:
            self.uncond = model.forward_tokens(model.config.null_class, ids, pos, attend)
        self.scale = cfg_scale
        self.interval = cfg_interval

    def cell(self, row: int, cell_index: int) -> torch.Tensor:
        guided = self.interval < 0 or cell_index <= self.interval + 1
        if self.uncond is None or not guided:
            return self.cond[row]
        return cfg_logits(self.cond[row], self.uncond[row], self.scale)


def ntp_decode(
    model: ReferenceLlamaGen,
    class_label: int,
    H: int,
    W: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
) -> tuple[torch.Tensor, int]:
    """Raster-order next-token prediction, one pass per token. Returns (tokens [H, W], passes = H*W)."""
    _check_sampling(model, class_label, H, W, temperature, seed, cfg_scale)
    P = model.config.cls_token_num
    seq: list[int] = []
    passes = 0
    for t in range(H * W):
        # Pass t feeds the class prefix (prefill) or token t-1; its last logits predict raster pos P + t.
        n_total = P + len(seq)
        attend = torch.tril(torch.ones(n_total, n_total, dtype=torch.bool))
        ids = torch.tensor(seq, dtype=torch.long)
        pos = torch.arange(P, P + len(seq))
        logits = _PassLogits(model, class_label, ids, pos, attend, cfg_scale, cfg_interval).cell(-1, t)
        seq.append(
            sample_cell(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, pos=P + t)
        )
        passes += 1
    return torch.tensor(seq, dtype=torch.long).view(H, W), passes


def zipar_mask(pos: list[int], step: list[int], proxy: list[bool], *, feed_time: bool = True) -> torch.Tensor:
    """ZIPAR.md §3 mask over one recomputed sequence: ``attend[i, j]``.

    ``pos_j <= pos_i`` and (with ``feed_time``) ``step_j <= step_i`` and ``j`` not a proxy; plus ``i == i``.
    """
    p = torch.tensor(pos)
    s = torch.tensor(step)
    x = torch.tensor(proxy, dtype=torch.bool)
    attend = (p[None, :] <= p[:, None]) & ~x[None, :]
    if feed_time:
        attend &= s[None, :] <= s[:, None]
    attend |= torch.eye(len(pos), dtype=torch.bool)
    return attend


def plan_llamagen_pass(
    step: int, n: list[int], W: int, window: int, P: int, tokens: torch.Tensor, kv_written: list[bool]
) -> list[FedInput]:
    """Inputs of ZipAR pass ``step`` (>= 1) for the LlamaGen layout, from the state after the last pass.

    ``n[r]`` counts row r's decoded tokens; ``kv_written[r]`` says row r's last token has been fed.
    """
    if step < 1:
        raise ValueError(f"step={step}: pass 0 is the prefill, planned by the caller")
    H = len(n)

    def cell_pos(r: int, c: int) -> int:
        return P + r * W + c

    threshold = min(window, W)
    inputs: list[FedInput] = []
    fed_last: set[int] = set()
    # Active rows (started, not complete): newest token predicts the next cell of the row.
    for r in range(H):
        if 0 < n[r] < W:
            c = n[r] - 1
            inputs.append(FedInput(int(tokens[r, c]), cell_pos(r, c), REAL, (r, n[r])))
    # Rows starting in this pass: row r+1 once n[r] >= window (row 0 must be complete, LlamaGen).
    for r in range(H - 1):
        if n[r + 1] > 0 or n[r] == 0:
            continue
        if n[r] < (W if r == 0 else threshold):
            continue
        if n[r] == W:
            # Row above complete: its real last token, fed once, predicts the new row's first cell.
            inputs.append(FedInput(int(tokens[r, W - 1]), cell_pos(r, W - 1), REAL, (r + 1, 0)))
            fed_last.add(r)
        else:
            newest = int(tokens[r, n[r] - 1])
            inputs.append(FedInput(newest, cell_pos(r, W - 1), PROXY, (r + 1, 0)))
    # Rows completed by the previous pass: write their last token's keys/values.
    for r in range(H):
        if n[r] == W and not kv_written[r] and r not in fed_last:
            inputs.append(FedInput(int(tokens[r, W - 1]), cell_pos(r, W - 1), KV_ONLY, None))
    inputs.sort(key=lambda f: f.pos)
    return inputs


def zipar_decode(
    model: ReferenceLlamaGen,
    class_label: int,
    H: int,
    W: int,
    window: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    _feed_time: bool = True,
    _trace: list | None = None,
) -> tuple[torch.Tensor, int]:
    """ZipAR decoding (ZIPAR.md §3, LlamaGen layout). Returns (tokens [H, W], forward passes).

    ``window >= W`` is NTP order. ``_feed_time=False`` drops the feed-time condition from the mask (a test
    hook showing it matters). ``_trace``, if given, receives one dict per pass: the inputs fed (``FedInput``
    list, prefill excluded) and the guided logits of each input that predicts a cell.
    """
    _check_sampling(model, class_label, H, W, temperature, seed, cfg_scale)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    P = model.config.cls_token_num

    def cell_pos(r: int, c: int) -> int:
        return P + r * W + c

    tokens = torch.full((H, W), -1, dtype=torch.long)
    n = [0] * H
    kv_written = [False] * H
    # The real tokens fed so far, in feed order (proxies are never attended, so they are not kept).
    hist_tok: list[int] = []
    hist_pos: list[int] = []
    hist_step: list[int] = []

    step = 0
    while min(n) < W:
        if step == 0:
            inputs: list[FedInput] = []
            targets = {P - 1: (0, 0)}  # prefill: the last prefix token predicts (0, 0)
        else:
            inputs = plan_llamagen_pass(step, n, W, window, P, tokens, kv_written)
            if not any(f.target is not None for f in inputs):
                raise AssertionError(f"pass {step} predicts nothing; state n={n}")
        # Sequence: class prefix (fed at step 0), earlier real tokens, then this pass's inputs.
        ids = hist_tok + [f.token for f in inputs]
        pos = list(range(P)) + hist_pos + [f.pos for f in inputs]
        steps = [0] * P + hist_step + [step] * len(inputs)
        proxy = [False] * (P + len(hist_tok)) + [f.kind == PROXY for f in inputs]
        attend = zipar_mask(pos, steps, proxy, feed_time=_feed_time)
        logits = _PassLogits(
            model,
            class_label,
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(pos[P:], dtype=torch.long),
            attend,
            cfg_scale,
            cfg_interval,
        )
        if step > 0:
            base = P + len(hist_tok)
            targets = {base + i: f.target for i, f in enumerate(inputs) if f.target is not None}
        sampled = {}
        for row_index, (r, c) in targets.items():
            assert n[r] == c and tokens[r, c] < 0, f"cell {(r, c)} predicted out of order"
            sampled[(r, c)] = cell_logits = logits.cell(row_index, r * W + c)
            tokens[r, c] = sample_cell(
                cell_logits,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                pos=cell_pos(r, c),
            )
        for r, _ in sampled:
            n[r] += 1
        for f in inputs:
            if f.kind != PROXY:
                hist_tok.append(f.token)
                hist_pos.append(f.pos)
                hist_step.append(step)
                if (f.pos - P) % W == W - 1:
                    kv_written[(f.pos - P) // W] = True
        if _trace is not None:
            _trace.append({"step": step, "inputs": inputs, "logits": sampled})
        step += 1
    return tokens, step


def closed_form_steps(H: int, W: int, window: int, eol: bool) -> int:
    """ZIPAR.md §4: forward passes (prefill included). ``window >= W`` is NTP (``H*W``)."""
    _check_grid(H, W, window)
    w = min(window, W)
    if eol:
        return (H - 1) * w + W
    if H == 1:
        return W  # the table's 2W + (H-2)w assumes a second row; one row is plain raster order
    return 2 * W + (H - 2) * w


def simulate_zipar_steps(H: int, W: int, window: int, eol: bool = False) -> int:
    """Count passes by playing the row-start rules of ZIPAR.md §3, one pass at a time.

    Pass 0 (prefill) starts row 0. In later passes every started, incomplete row decodes one cell, and row
    r+1 starts (decoding its first cell) in the first pass after ``n[r] >= window``; without EOL, row 1 also
    waits for row 0 to be complete. Forced EOL tokens never cost a pass (they ride along).
    """
    _check_grid(H, W, window)
    n = [0] * H
    passes = 0
    while min(n) < W:
        before = list(n)
        if passes == 0:
            n[0] = 1
        else:
            for r in range(H):
                if 0 < before[r] < W:
                    n[r] += 1
            for r in range(H - 1):
                needed = W if (r == 0 and not eol) else window
                if before[r + 1] == 0 and before[r] > 0 and before[r] >= min(needed, W):
                    n[r + 1] = 1
        passes += 1
    return passes


def _check_grid(H: int, W: int, window: int) -> None:
    if H <= 0 or W <= 0:
        raise ValueError(f"grid {H}x{W} must have positive sides")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
