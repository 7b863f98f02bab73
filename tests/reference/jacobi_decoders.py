"""Reference exact-draft (Jacobi) decoder, written from ZIPAR.md §9 and docs/exact_drafts.md, not from
``vllm_zipar/zipar/draft_plan.py``.

Every pass recomputes every logical token fed so far (no KV reuse) under an explicit mask: a query sees
itself, and each real token at a position of its static context that is the newest real token fed there
at or before the query's pass. The static context here is not the closed form of ``static_context.py``: it
is the feed-time rule applied to ZipAR-w's own schedule (a key at position ``k`` is in the context of a
token whose role ZipAR feeds in pass ``F`` iff ``k`` is at or below it and ZipAR feeds ``k`` by pass
``F``), the definition the closed form was proven equal to. Finality is recomputed from scratch every pass
by its recursive definition (a token's keys and values are final iff its value is final and every position
of its context holds a newest token whose keys and values are final; a cell's value is final iff a token
that predicts it has final keys and values) instead of the plan's incremental walk. The feed policy (chains,
``L`` drafts each, row opening, draft initialisation) is the spec's, coded again here. Cells are sampled
position-keyed, so the result must equal sequential ZipAR-w (``decoders.zipar_decode``,
``emu3_decoders.zipar_decode_eol``) token for token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .sampling import cfg_logits, sample_cell

CELL, EOL, PROXY = "cell", "eol", "proxy"
NEVER = 1 << 30  # the ZipAR feed pass of a token ZipAR never feeds (the image's last cell)

# (grid tokens, their positions, attend[n, n] over them, rows: grid indices or -1 = the last prompt token)
# -> guidance-mixed logits [len(rows), V] restricted to what is sampled.
LogitsFn = Callable[[list[int], list[int], torch.Tensor, list[int]], torch.Tensor]
SampleFn = Callable[[torch.Tensor, int], int]  # (logits of one cell, the cell's position) -> token


@dataclass
class Token:
    """One logical grid token (prompt tokens are implicit: always attended, always final)."""

    token: int
    pos: int
    role: str  # CELL (a real image token), EOL, PROXY
    carries: tuple[int, int] | None  # the cell whose value it holds (a proxy: the row above's newest)
    predicts: tuple[int, int] | None
    step: int
    zipar_pass: int  # the pass in which ZipAR feeds this role: its context is what ZipAR fed by then
    draft: bool
    output: int | None = None


@dataclass
class JacobiRun:
    grid: torch.Tensor  # [H, W] final tokens
    passes: int  # prefill included
    tokens: list[Token]
    prefill_output: int = -1  # the token the prompt's last logits gave cell (0, 0)
    trace: list[dict] = field(default_factory=list)  # per pass: "fed" (indices into tokens), "attend"


def zipar_schedule(H: int, W: int, window: int, eol: bool) -> list[list[int]]:
    """``t[r][c]``: the ZipAR-w pass that samples cell (r, c) (prefill = 0), by playing ZIPAR.md §3."""
    w = min(window, W)
    t = [[-1] * W for _ in range(H)]
    n = [0] * H
    step = 0
    while min(n) < W:
        before = list(n)
        for r in range(H):
            start = r == 0 and step == 0
            if r > 0 and before[r] == 0 and before[r - 1] >= (W if r == 1 and not eol else w):
                start = True
            if start or 0 < before[r] < W:
                t[r][n[r]] = step
                n[r] += 1
        step += 1
    return t


def jacobi_decode(
    logits_fn: LogitsFn,
    sample_fn: SampleFn,
    P: int,
    H: int,
    W: int,
    window: int,
    drafts: int,
    *,
    eol_id: int | None = None,
    on_pass: Callable[[JacobiRun, list[int]], None] | None = None,
    _accept_any_final_value: bool = False,
) -> JacobiRun:
    """Exact drafts: ``drafts`` guessed cells per chain per pass over ZipAR-``window``'s static graph.

    ``on_pass(run, fed)`` is called after each pass's inputs and mask are fixed and its outputs recorded.
    ``_accept_any_final_value`` is a wrong finality rule for the tests: a token whose value is final counts
    as having final keys and values even when its context held a guess.
    """
    eol = eol_id is not None
    w = min(window, W)
    stride = W + eol
    t = zipar_schedule(H, W, window, eol)

    def pos(r: int, c: int) -> int:
        return P + r * stride + c

    # ZipAR's feed pass of the real token at each grid position.
    zipar_feed: dict[int, int] = {}
    for r in range(H):
        for c in range(W):
            last = r == H - 1 and c == W - 1
            zipar_feed[pos(r, c)] = NEVER if last else t[r][c] + 1
        if eol and r + 1 < H:
            zipar_feed[pos(r, W)] = t[r + 1][0]

    def joins(r: int) -> bool:  # row r starts from the real last token of row r - 1
        return r > 0 and (w == W or (r == 1 and not eol))

    # Chains of (role, position, carries, predicts, zipar_pass).
    chains: list[list[tuple]] = []
    for r in range(H):
        if not joins(r):
            chains.append([])
            if r > 0:
                if eol:
                    chains[-1].append((EOL, pos(r - 1, W), None, (r, 0), t[r][0]))
                else:
                    chains[-1].append((PROXY, pos(r - 1, W - 1), (r - 1, w - 1), (r, 0), t[r][0]))
        for c in range(W):
            if r == H - 1 and c == W - 1:
                break
            nxt = (r, c + 1) if c + 1 < W else ((r + 1, 0) if joins(r + 1) and not eol else None)
            chains[-1].append((CELL, pos(r, c), (r, c), nxt, zipar_feed[pos(r, c)]))
        if eol and r + 1 < H and joins(r + 1):
            chains[-1].append((EOL, pos(r, W), None, (r + 1, 0), zipar_feed[pos(r, W)]))

    run = JacobiRun(torch.full((H, W), -1, dtype=torch.long), 0, [])
    toks = run.tokens
    prefill_out = sample_fn(logits_fn([], [], torch.zeros(0, 0, dtype=torch.bool), [-1])[0], pos(0, 0))
    run.prefill_output = prefill_out
    latest: dict[tuple[int, int], int] = {(0, 0): prefill_out}  # newest output per cell
    step = 1

    at: dict[int, list[int]] = {}  # position -> real tokens fed there, in feed order

    def newest(position: int, at_step: int) -> int | None:
        found = None
        for i in at.get(position, []):
            if toks[i].step <= at_step:
                found = i
        return found

    contexts: dict[tuple[int, int, bool], list[int]] = {}

    def context(q: Token) -> list[int]:
        key = (q.pos, q.zipar_pass, q.role == PROXY)
        if key not in contexts:
            below = [k for k, f in zipar_feed.items() if k < q.pos and f <= q.zipar_pass]
            contexts[key] = below + ([q.pos] if q.role != PROXY else [])
        return contexts[key]

    def attend_matrix() -> torch.Tensor:
        n = len(toks)
        a = torch.zeros(n, n, dtype=torch.bool)
        for i, q in enumerate(toks):
            a[i, i] = True
            for k in context(q):
                j = newest(k, q.step)
                if j is not None:
                    a[i, j] = True
        return a

    def analyse():
        """Brute-force finality over every token so far: (kv_final(i), final_value(cell))."""
        kv_memo: dict[int, bool] = {}
        cell_memo: dict[tuple[int, int], int | None] = {}

        def final_value(cell: tuple[int, int]) -> int | None:
            if cell == (0, 0):
                return prefill_out
            if cell not in cell_memo:
                values = [k.output for i, k in enumerate(toks) if k.predicts == cell and kv_final(i)]
                # Final outputs agree by construction; the wrong-rule hook keeps the first one.
                assert _accept_any_final_value or len(set(values)) <= 1, f"cell {cell}: final values {values}"
                cell_memo[cell] = values[0] if values else None
            return cell_memo[cell]

        def value_final(i: int) -> bool:
            k = toks[i]
            if k.role == EOL:
                return True
            assert k.carries is not None
            return final_value(k.carries) == k.token

        def kv_final(i: int) -> bool:
            if i not in kv_memo:
                q = toks[i]
                ok = value_final(i)
                if ok and not _accept_any_final_value:
                    for k in context(q):
                        if k == q.pos:
                            continue
                        j = newest(k, q.step)
                        if j is None or not kv_final(j):
                            ok = False
                            break
                kv_memo[i] = ok
            return kv_memo[i]

        return kv_final, final_value

    while True:
        kv_final, final_value = analyse()
        finals = {(r, c): final_value((r, c)) for r in range(H) for c in range(W)}
        if all(v is not None for v in finals.values()):
            break
        current: dict[tuple[int, int], int] = {}  # a cell's value as the planning of this pass goes on
        for cell in finals:
            value = finals[cell] if finals[cell] is not None else latest.get(cell)
            if value is not None:
                current[cell] = value
        fed: list[Token] = []
        for k, chain in enumerate(chains):
            if k > 0:
                r = chain[0][3][0]
                if sum(finals[(r - 1, c)] is not None for c in range(W)) < w:
                    continue
            guessed = 0
            for role, p, carries, predicts, zp in chain:
                if role == PROXY:
                    if finals[predicts] is not None:
                        continue  # settled: its row's first cell is final
                else:
                    j = newest(p, step)
                    if j is not None and kv_final(j):
                        continue  # settled: final keys and values at this position
                is_draft = role == CELL and finals[carries] is None
                if is_draft and guessed == drafts:
                    break
                if role == EOL:
                    value = eol_id
                elif is_draft:
                    r, c = carries
                    value = current.get(carries)
                    if value is None and r > 0:
                        value = current.get((r - 1, c))
                    if value is None and c > 0:
                        value = current.get((r, c - 1))
                    assert value is not None, f"no guess for {carries}"
                    current[carries] = value
                else:
                    value = finals[carries]
                    assert value is not None
                fed.append(Token(value, p, role, carries, predicts, step, zp, is_draft))
                guessed += is_draft
            # A chain is fed from its first unsettled element on: the loop above skipped settled ones,
            # and settled elements form a prefix (each element sees the one before it, or is predicted by it).
        assert fed, f"pass {step} feeds nothing"
        fed.sort(key=lambda k: (k.pos, k.role == PROXY))
        first = len(toks)
        for k in fed:
            if k.role != PROXY:
                at.setdefault(k.pos, []).append(len(toks))
            toks.append(k)
        attend = attend_matrix()
        rows = [i for i in range(first, len(toks)) if toks[i].predicts is not None]
        logits = logits_fn([k.token for k in toks], [k.pos for k in toks], attend, rows)
        for row, i in enumerate(rows):
            k = toks[i]
            assert k.predicts is not None
            k.output = sample_fn(logits[row], pos(*k.predicts))
            latest[k.predicts] = k.output
        run.trace.append({"fed": list(range(first, len(toks))), "attend": attend})
        run.passes = step + 1
        if on_pass is not None:
            on_pass(run, list(range(first, len(toks))))
        step += 1
    for (r, c), v in finals.items():
        run.grid[r, c] = v
    run.passes = step
    return run


# ---------------------------------------------------------------------------------------------- models
def llamagen_logits(model, class_label: int, cfg_scale: float = 1.0) -> LogitsFn:
    """Logits of a ``ReferenceLlamaGen``: the class prefix, then the grid tokens (null class: unconditional,
    the same tokens and mask); guidance on every cell (``cfg_interval = -1``)."""
    P = model.config.cls_token_num

    def run(tok, pos, attend, rows):
        n = len(tok)
        full = torch.zeros(P + n, P + n, dtype=torch.bool)
        full[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        full[P:, :P] = True
        full[P:, P:] = attend
        idx = [P - 1 if r < 0 else P + r for r in rows]
        ids, positions = torch.tensor(tok, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
        cond = model.forward_tokens(class_label, ids, positions, full)[idx]
        if cfg_scale == 1.0:
            return cond
        uncond = model.forward_tokens(model.config.null_class, ids, positions, full)[idx]
        return torch.stack([cfg_logits(c, u, cfg_scale) for c, u in zip(cond, uncond, strict=True)])

    return run


def emu3_logits(
    model, prompt_ids: list[int], negative_prompt_ids: list[int] | None, cfg_scale: float
) -> LogitsFn:
    """Logits of a ``ReferenceEmu3``: each stream is its own prompt then the grid tokens, the unconditional
    one at positions shifted by its prompt's extra length."""
    P = len(prompt_ids)

    def stream(prompt, tok, pos, attend, rows):
        U, n = len(prompt), len(tok)
        full = torch.zeros(U + n, U + n, dtype=torch.bool)
        full[:U, :U] = torch.ones(U, U, dtype=torch.bool).tril()
        full[U:, :U] = True
        full[U:, U:] = attend
        positions = list(range(U)) + [p + U - P for p in pos]
        logits = model.forward_tokens(list(prompt) + list(tok), positions, full)
        return logits[[U - 1 if r < 0 else U + r for r in rows]]

    def run(tok, pos, attend, rows):
        cond = stream(prompt_ids, tok, pos, attend, rows)
        if cfg_scale == 1.0:
            return cond
        uncond = stream(negative_prompt_ids, tok, pos, attend, rows)
        return torch.stack([cfg_logits(c, u, cfg_scale) for c, u in zip(cond, uncond, strict=True)])

    return run


def sampler(
    temperature: float,
    seed: int | None,
    top_k: int = 0,
    top_p: float = 1.0,
    visual: tuple[int, int] | None = None,
) -> SampleFn:
    """Position-keyed sampling (``sampling.sample_cell``); with ``visual``, over that id range (Emu3)."""

    def sample(logits: torch.Tensor, cell_pos: int) -> int:
        start, stop = visual if visual is not None else (0, logits.numel())
        code = sample_cell(
            logits[start:stop], temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, pos=cell_pos
        )
        return start + code

    return sample
