"""Exact drafts (ZIPAR.md §9, docs/exact_drafts.md): one image's Jacobi plan over ZipAR-w's static graph.

``DraftPlan`` has ``ZipARPlan``'s loop (``prefill_inputs``, then ``next_inputs`` / ``record`` until
``done``) but every pass may also feed up to ``drafts`` guessed tokens per chain, and every fed token is a
new logical token with its own KV slot. ``attends`` is the mask over the logical tokens (static context,
newest logical token per position at or before the query's pass, proxies query-only). ``record`` takes the
output of every predicting input and runs the finality walk: which cells' values are now final, which
positions' keys and values are final, and the guesses the next pass drafts. With ``drafts=0`` the passes
are exactly ZipAR-w's. Tokens equal ZipAR-w's whatever ``drafts`` is, provided the sampler is a function of
(logits, seed, cell position) alone.
"""

from __future__ import annotations

import enum
import functools
import operator
from dataclasses import dataclass, field

from .layout import GridLayout
from .plan import FeedKind, ZipARPlan
from .static_context import StaticContext

CONDITIONAL = 0
UNCONDITIONAL = 1


@functools.lru_cache(maxsize=64)
def zipar_feed_passes(layout: GridLayout, window: int | None) -> dict[tuple[int, bool], int]:
    """The pass in which ZipAR-w feeds each (position, is proxy) of the conditional stream (a dry run)."""
    plan = ZipARPlan(layout, window)
    plan.prefill_inputs([0] * layout.prompt_len)
    plan.record([0])
    while inputs := plan.next_inputs():
        plan.record([0] * sum(f.predicts is not None for f in inputs))
    return {(f.position, f.kind is FeedKind.PROXY): f.step for f in plan.history}


@dataclass(frozen=True, slots=True)
class LogicalToken:
    """One fed input of a draft pass: like ``plan.FedInput`` plus ``draft``.

    ``draft`` is True when the token's value was a guess when fed (not yet known final). ``predicts`` is
    the raster position (stream 0) of the cell this input's logits guess or decide; None for KV-only
    inputs and prompt tokens other than the last. Not a ``FedInput`` on purpose: ``plan.visible`` (the
    feed-time rule) is wrong for draft passes; ``DraftPlan.attends`` is their mask.
    """

    token: int
    position: int
    kind: FeedKind
    predicts: int | None
    step: int
    stream: int = CONDITIONAL
    draft: bool = False


@dataclass(frozen=True, slots=True)
class DraftMaskFields:
    """``DraftPlan.attends`` as per-token fields an attention kernel can vectorise (docs/exact_drafts.md §3).

    Query ``q`` attends key ``k`` iff ``k`` is ``q``, or: same stream, ``k`` not a proxy,
    ``step[k] <= step[q] < dead_from[k]`` (``dead_from``: the pass of the next real token fed at ``k``'s
    position, from ``supersedes``), and ``k`` lies in ``q``'s static context. A context is "every position
    at or before the query's own" when ``context_rows[q] < 0`` (prompt tokens), else that of the predictor
    of cell ``(context_rows[q], context_cols[q])`` = (R, C): the stream's prompt (``key_rows[k] < 0``), cells
    ``(R, c) c < C``, and in each row ``kr < R`` its EOL (``key_cols[k] == W``) and the cells ``c < W`` if
    ``kr == 0`` on a layout without EOL (LlamaGen decodes row 0 whole first), else ``c < min(W, C + (R - kr)
    * w)``. Key cells are in the token's own stream (its prompt length subtracted).
    """

    context_rows: list[int]
    context_cols: list[int]
    key_rows: list[int]
    key_cols: list[int]
    supersedes: list[int]  # the history index of the real token this one replaced at its position, or -1


class _Role(enum.Enum):
    PROMPT = "prompt"  # causal over its stream's prompt
    TOKEN = "token"  # a real grid token (cell or EOL): StaticContext.token_sees
    PROXY = "proxy"  # a LlamaGen row start: StaticContext.predictor_sees(row, 0, .)


@dataclass(frozen=True, slots=True)
class _Element:
    """One link of a chain: a position fed in chain order; its output (if any) predicts the next cell."""

    position: int
    kind: FeedKind  # REAL or PROXY
    cell: int | None  # image index whose value it carries (proxy: the cell its token comes from); None: EOL
    predicts: int | None  # image index of the cell its logits predict
    row: int  # the row whose chain it belongs to (a proxy's: the row it starts)


@dataclass(slots=True)
class DraftStats:
    """Per-image accounting, conditional stream only (a guided image feeds every token twice)."""

    passes: int = 0  # prefill included
    fed: int = 0  # logical tokens fed after the prefill
    drafts: int = 0  # fed with a guessed value
    accepted: int = 0  # drafts whose value turned out final
    superseded: int = 0  # KV slots holding a token that a later token at its position replaced
    proxies: int = 0  # query-only tokens (their KV slots are never read either)
    # Cells whose value became final in each pass (prefill included): ZipAR's sampled cells per pass.
    cells_per_pass: list[int] = field(default_factory=list)


class DraftPlan:
    """One image's exact-draft decoding state (``drafts`` = L, guesses fed per chain per pass).

    A chain is a run of positions decoded left to right, each fed token predicting the next cell: one row
    under ZipAR-w, except that a row that starts from the real last token of the row above joins its chain
    (NTP: the whole raster order; LlamaGen: rows 0 and 1). A chain that starts a row opens when the row
    above has ``window`` final cells (ZipAR's row-start rule on final values), so passes never exceed
    ZipAR-w's. ``uncond_prompt_len`` adds guidance's unconditional stream (``guidance.GuidedPlan``).
    """

    def __init__(
        self, layout: GridLayout, window: int | None, drafts: int, uncond_prompt_len: int | None = None
    ) -> None:
        if isinstance(drafts, bool) or not isinstance(drafts, int) or drafts < 0:
            raise ValueError(f"drafts={drafts!r} must be an int >= 0 (0: plain ZipAR)")
        if uncond_prompt_len is not None and (
            isinstance(uncond_prompt_len, bool)
            or not isinstance(uncond_prompt_len, int)
            or uncond_prompt_len < 1
        ):
            raise ValueError(f"uncond_prompt_len={uncond_prompt_len!r} must be an int >= 1, or None")
        self.context = StaticContext(layout, window)
        self.layout = layout
        self.window = self.context.window
        self.drafts = drafts
        self.uncond_prompt_len = uncond_prompt_len
        self._shift = 0 if uncond_prompt_len is None else uncond_prompt_len - layout.prompt_len
        self._chains = self._build_chains()
        self._settled = [0] * len(self._chains)  # leading elements of each chain that are settled
        cells = layout.num_cells
        self._value: list[int | None] = [None] * cells  # final value, else the latest guess
        self._final = [False] * cells
        self._final_in_row = [0] * layout.height
        self._kv_final: dict[int, bool] = {}  # position (stream 0) -> its newest real token's KV is final
        # Per row: leading cells whose position holds a token with final keys and values (KV-final cells
        # form a prefix of each row: a cell's context holds the cell to its left), and the row's EOL.
        self._kv_prefix = [0] * layout.height
        self._eol_kv_final = [False] * layout.height
        self._num_final = 0
        self._history: list[LogicalToken] = []
        self._roles: list[tuple[_Role, int]] = []  # per history entry: role, and the row a proxy starts
        self._supersedes: list[int] = []  # per history entry: the real token it replaced at its position
        self._at: dict[tuple[int, int], list[int]] = {}  # (stream, position) -> real tokens fed there
        self._issued: list[tuple[int, _Element | None]] | None = None  # (history index, element) of stream 0
        self._steps = 0
        self.stats = DraftStats()
        self._zipar_end = self._zipar_end_passes()

    # ------------------------------------------------------------------------------------------ chains
    def _build_chains(self) -> list[list[_Element]]:
        layout, ctx = self.layout, self.context
        H, W, w = layout.height, layout.width, ctx.effective_window
        last = layout.num_cells - 1  # the image's last cell is never fed: no query needs it

        def joins(row: int) -> bool:  # row starts from the real last token of the row above
            return row > 0 and (w == W or (row == 1 and not layout.eol))

        chains: list[list[_Element]] = []
        for r in range(H):
            if r == 0 or not joins(r):
                chain: list[_Element] = []
                chains.append(chain)
                if r > 0:
                    position, kind = ctx.predictor(r, 0)
                    source = None if layout.eol else (r - 1) * W + w - 1
                    chain.append(_Element(position, kind, source, r * W, r))
            for c in range(W):
                cell = r * W + c
                if cell == last:
                    break
                nxt: int | None = cell + 1 if c + 1 < W else None
                if c + 1 == W and joins(r + 1) and not layout.eol:
                    nxt = cell + 1
                chain.append(_Element(layout.pos(r, c), FeedKind.REAL, cell, nxt, r))
            if layout.eol and r + 1 < H and joins(r + 1):
                chain.append(_Element(layout.pos(r, W), FeedKind.REAL, None, (r + 1) * W, r))
        return chains

    def _chain_open(self, k: int) -> bool:
        if k == 0:
            return True  # the first chain: (0, 0) comes from the prefill
        row = self._chains[k][0].row  # a chain that starts a row: ZipAR's row-start rule, on final values
        return self._final_in_row[row - 1] >= self.context.effective_window

    def _settled_element(self, e: _Element) -> bool:
        if e.kind is FeedKind.PROXY:
            assert e.predicts is not None
            return self._final[e.predicts]
        return self._kv_final.get(e.position, False)

    def _zipar_end_passes(self) -> list[int]:
        """Per chain, the ZipAR-w pass that feeds its last element: the chain is settled after it, whatever
        was drafted before (docs/exact_drafts.md §4, passes never exceed ZipAR-w's)."""
        fed_at = zipar_feed_passes(self.layout, self.window)
        return [
            max((fed_at[(e.position, e.kind is FeedKind.PROXY)] for e in chain), default=0)
            for chain in self._chains
        ]

    @property
    def max_base_pass(self) -> int:
        """The most tokens (both streams) a pass feeds without drafts: one per chain, two on a chain that
        carries EOL tokens inside it (NTP on an EOL layout: a row's last cell and its EOL ride together)."""
        per_chain = [1 + any(e.cell is None for e in chain[1:]) for chain in self._chains if chain]
        return sum(per_chain) * (1 if self.uncond_prompt_len is None else 2)

    # ------------------------------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        """Every cell's value is final (no query is left that needs a key)."""
        return self.stats.passes > 0 and self._num_final == self.layout.num_cells

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def history(self) -> list[LogicalToken]:
        """Every logical token fed so far (the pass in flight included), in feed order: the KV order."""
        return list(self._history)

    @property
    def num_fed(self) -> int:
        return len(self._history)

    def fed(self, start: int, end: int) -> list[LogicalToken]:
        """``history[start:end]`` without copying the rest: the scheduler asks for it every step."""
        return self._history[start:end]

    def grid(self) -> list[list[int]]:
        """The ``H x W`` final tokens, -1 where not yet final."""
        W = self.layout.width
        vals = [v if f and v is not None else -1 for v, f in zip(self._value, self._final, strict=True)]
        return [vals[r * W : (r + 1) * W] for r in range(self.layout.height)]

    def final_cells(self) -> list[bool]:
        """Per image cell (raster index), whether its value is final."""
        return list(self._final)

    # ------------------------------------------------------------------------------------------ passes
    def prefill_inputs(self, prompt_token_ids: list[int]) -> list[LogicalToken]:
        """Pass 0: the prompt(s); the last token of each stream's prompt predicts (0, 0)."""
        if self._steps or self._issued is not None:
            raise RuntimeError("prefill_inputs() may be called once, before any other pass")
        P, U = self.layout.prompt_len, self.uncond_prompt_len or 0
        if len(prompt_token_ids) != P + U:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens, expected {P} + {U}")
        first = self.layout.pos(0, 0)
        inputs = [
            LogicalToken(int(t), i, FeedKind.REAL, first if i == P - 1 else None, 0)
            for i, t in enumerate(prompt_token_ids[:P])
        ]
        if U:
            inputs += [
                LogicalToken(int(t), i, FeedKind.REAL, first if i == U - 1 else None, 0, UNCONDITIONAL)
                for i, t in enumerate(prompt_token_ids[P:])
            ]
        issued: list[tuple[int, _Element | None]] = []
        for f in inputs:
            index = self._append(f, (_Role.PROMPT, 0))
            if f.stream == CONDITIONAL:
                self._kv_final[f.position] = True
                issued.append((index, None))
        self._issued = issued
        return inputs

    def next_inputs(self, kv_room: int | None = None, pass_room: int | None = None) -> list[LogicalToken]:
        """The next pass: per open chain its first unsettled element (value final), then up to ``drafts``
        guessed cells (EOLs ride along free); stream 0 by position, then the unconditional twins.

        ``kv_room``: logical tokens (both streams) this pass and every later one may still feed, e.g. what
        the engine's longest sequence leaves; drafts are cut so that finishing without them always fits
        (``tokens_to_finish``). ``pass_room``: the most tokens this pass may feed (the engine's token
        budget). Cutting drafts never changes a token (finality does not depend on them); top chains, the
        critical path, keep theirs first. Raises RuntimeError if even the draft-free pass does not fit.
        """
        if self._issued is not None:
            if self._steps == 0:
                raise RuntimeError("the prefill pass is not recorded yet; call record() first")
            return [self._history[i] for i in self._pass_indices()]
        if self._steps == 0:
            raise RuntimeError("call prefill_inputs() first")
        if self.done:
            return []
        step = self._steps
        streams = 1 if self.uncond_prompt_len is None else 2
        # Per open chain with work left: the elements it feeds without drafts, then the ones drafts add.
        base: list[tuple[int, list[_Element], list[_Element]]] = []
        for k, chain in enumerate(self._chains):
            if self._settled[k] == len(chain) or not self._chain_open(k):
                continue
            rest = chain[self._settled[k] :]
            i = 0
            while i < len(rest) and not self._is_draft(rest[i]):
                i += 1
            base.append((k, rest[:i], rest[i:]))
        if not base:
            raise AssertionError(f"pass {step} feeds nothing but the image is not done")
        num_base = sum(len(b) for _, b, _ in base)
        top_settling = len(base[0][1]) if base[0][0] == 0 else 0  # the top chain's draft-free feeds settle
        gains = {k: sum(e.predicts is not None for e in b) for k, b, _ in base}
        extra = {k: self._draft_run(rest) for k, _, rest in base}
        allowance: int | None = None
        if pass_room is not None:
            allowance = pass_room // streams - num_base
        if kv_room is not None:
            optimistic = {k: gains[k] + sum(e.predicts is not None for e in extra[k]) for k in gains}
            left = kv_room // streams - num_base - self._finish_bound(step, optimistic, top_settling)
            if left < sum(len(run) for run in extra.values()):
                left = self._greedy_drafts(step, kv_room // streams - num_base, gains, extra, top_settling)
            allowance = left if allowance is None else min(allowance, left)
        if allowance is not None and allowance < 0:
            raise RuntimeError(
                f"pass {step} needs {num_base * streams} tokens without drafts (and room to finish): more "
                f"than the {kv_room} sequence slots / {pass_room} pass tokens left"
            )
        chosen: list[tuple[LogicalToken, _Element]] = []
        for k, fed, _ in base:
            run = extra[k] if allowance is None else extra[k][:allowance]
            if allowance is not None:
                allowance -= len(run)
            for e in fed + run:
                chosen.append((self._token_for(e, step, self._is_draft(e)), e))
        chosen.sort(key=lambda te: (te[0].position, te[0].kind is FeedKind.PROXY))
        issued: list[tuple[int, _Element | None]] = []
        for f, e in chosen:
            issued.append((self._append(f, self._role_of(e)), e))
            self.stats.fed += 1
            self.stats.drafts += f.draft
            self.stats.proxies += f.kind is FeedKind.PROXY
        if self.uncond_prompt_len is not None:
            for f, e in chosen:
                twin = LogicalToken(
                    f.token, f.position + self._shift, f.kind, f.predicts, step, UNCONDITIONAL, f.draft
                )
                self._append(twin, self._role_of(e))
        self._issued = issued
        return [self._history[i] for i in self._pass_indices()]

    def _is_draft(self, e: _Element) -> bool:
        return e.cell is not None and e.kind is FeedKind.REAL and not self._final[e.cell]

    def _draft_run(self, rest: list[_Element]) -> list[_Element]:
        """The elements after a chain's draft-free part that up to ``drafts`` guesses feed (with the EOLs
        riding between them), ending before the first guess past ``drafts``."""
        run: list[_Element] = []
        guessed = 0
        for e in rest:
            is_draft = self._is_draft(e)
            if is_draft and guessed == self.drafts:
                break
            run.append(e)
            guessed += is_draft
        return run

    def _greedy_drafts(
        self, step: int, room: int, gains: dict[int, int], extra: dict[int, list[_Element]], top_settling: int
    ) -> int:
        """How many draft-run elements (top chains first) fit in ``room`` stream-0 slots together with the
        bound on finishing after this pass, assuming each fed prediction could finalise a cell."""
        optimistic = dict(gains)
        taken = 0
        for k, run in extra.items():
            for e in run:
                optimistic[k] += e.predicts is not None
                if taken + 1 + self._finish_bound(step, optimistic, top_settling) > room:
                    return taken
                taken += 1
        return taken

    def tokens_to_finish(self) -> int:
        """An upper bound on the logical tokens (both streams) the passes after the last recorded one feed
        when they feed no drafts: what the engine must keep room for before it lets a pass draft."""
        streams = 1 if self.uncond_prompt_len is None else 2
        return streams * self._finish_bound(self._steps - 1, {}, 0)

    def _finish_bound(self, step: int, gains: dict[int, int], top_settling: int) -> int:
        """Stream-0 tokens the passes after ``step`` feed without drafts, at most, if pass ``step``
        finalises up to ``gains[k]`` more cells of chain ``k`` (one per predicting input it feeds).

        The top chain (``k = 0``) sees only its own elements and the prompt, so without drafts each of its
        elements settles when fed: it feeds at most its unsettled elements, less the ``top_settling``
        draft-free ones this pass feeds (they settle now). Any other chain feeds one element per pass
        while open, and is settled after the ZipAR-w pass that feeds its last element; it opens once the
        row above holds ``w`` final cells, and without drafts a chain finalises at most one cell per pass,
        so from the (optimistic) final counts after this pass the earliest opening pass of every chain
        follows, row by row. More final cells only open chains earlier, so optimism bounds from above.
        """
        W, w = self.layout.width, self.context.effective_window
        final_in_row = self._final_in_row
        total = 0
        ready = step  # the pass after which the chain above's last row holds w final cells, at the earliest
        for k, chain in enumerate(self._chains):
            if not chain:
                continue
            first, last = chain[0].row, chain[-1].row
            if k == 0:
                open_from = step + 1
                total += max(0, len(chain) - self._settled[0] - top_settling)
            else:
                open_from = step + 1 if self._chain_open(k) else ready + 1
                if self._settled[k] < len(chain):
                    total += max(0, self._zipar_end[k] - open_from + 1)
            finals = sum(final_in_row[first : last + 1]) + gains.get(k, 0)
            need = max(0, (last - first) * W + w - finals)
            ready = max(open_from - 1, step) + need
        return total

    def _role_of(self, e: _Element) -> tuple[_Role, int]:
        return (_Role.PROXY, e.row) if e.kind is FeedKind.PROXY else (_Role.TOKEN, 0)

    def _pass_indices(self) -> range:
        assert self._issued is not None
        return range(self._issued[0][0], len(self._history))

    def _token_for(self, e: _Element, step: int, is_draft: bool) -> LogicalToken:
        layout = self.layout
        predicts = None if e.predicts is None else self._cell_position(e.predicts)
        if e.cell is None:  # an EOL token: fixed, always final
            assert layout.eol_token is not None
            return LogicalToken(layout.eol_token, e.position, FeedKind.REAL, predicts, step)
        value = self._value[e.cell] if not is_draft else self._guess(e.cell)
        if not is_draft and not self._final[e.cell]:
            raise AssertionError(f"chain head at position {e.position} carries a non-final value")
        assert value is not None
        kind = e.kind if predicts is not None or e.kind is FeedKind.PROXY else FeedKind.KV_ONLY
        return LogicalToken(value, e.position, kind, predicts, step, CONDITIONAL, is_draft)

    def _guess(self, cell: int) -> int:
        """A draft's value: the latest output for the cell, else the cell above, else the cell to its left
        (docs/exact_drafts.md, "Draft initialisation"); remembered so the row's next draft can use it."""
        W = self.layout.width
        value = self._value[cell]
        if value is None and cell >= W:
            value = self._value[cell - W]
        if value is None and cell % W:
            value = self._value[cell - 1]
        if value is None:
            raise AssertionError(f"no guess for cell {divmod(cell, W)}")
        self._value[cell] = value
        return value

    def _cell_position(self, cell: int) -> int:
        return self.layout.pos(*divmod(cell, self.layout.width))

    def _append(self, f: LogicalToken, role: tuple[_Role, int]) -> int:
        index = len(self._history)
        self._history.append(f)
        self._roles.append(role)
        replaced = -1
        if f.kind is not FeedKind.PROXY:
            slot = self._at.setdefault((f.stream, f.position), [])
            if slot:
                replaced = slot[-1]
                self.stats.superseded += f.stream == CONDITIONAL
            slot.append(index)
        self._supersedes.append(replaced)
        return index

    # ------------------------------------------------------------------------------------------ the mask
    def attends(self, query_index: int, key_index: int) -> bool:
        """May logical token ``query_index`` attend ``key_index`` (both history indices)?

        Same stream; the key is the query itself, or a real token in the query's static context that is the
        newest real token at its position among those fed at or before the query's pass.
        """
        q, k = self._history[query_index], self._history[key_index]
        if key_index == query_index:
            return True
        if k.stream != q.stream or k.kind is FeedKind.PROXY or k.step > q.step:
            return False
        if not self._role_sees(query_index, k.position):
            return False
        later = [j for j in self._at[(k.stream, k.position)] if j > key_index]
        return all(self._history[j].step > q.step for j in later)

    def mask_fields(self, start: int, end: int) -> DraftMaskFields:
        """Logical tokens ``[start, end)`` in the vectorisable form of ``attends`` (``DraftMaskFields``)."""
        layout, stride = self.layout, self.layout.row_stride
        fields = DraftMaskFields([], [], [], [], self._supersedes[start:end])
        for index in range(start, end):
            f = self._history[index]
            role, row = self._roles[index]
            grid = f.position - (self._shift if f.stream == UNCONDITIONAL else 0) - layout.prompt_len
            key_row, key_col = divmod(grid, stride) if grid >= 0 else (-1, -1)
            if role is _Role.PROMPT:
                context = (-1, -1)
            elif role is _Role.PROXY:
                context = (row, 0)
            elif key_col == layout.width:  # an EOL: the predictor of the next row's first cell
                context = (key_row + 1, 0)
            else:  # the predictor of the next cell; a row's last cell: everything before it (limit W)
                context = (key_row, key_col + 1)
            fields.context_rows.append(context[0])
            fields.context_cols.append(context[1])
            fields.key_rows.append(key_row)
            fields.key_cols.append(key_col)
        return fields

    def _role_sees(self, query_index: int, key_position: int) -> bool:
        q = self._history[query_index]
        role, row = self._roles[query_index]
        prompt_len = self.layout.prompt_len if q.stream == CONDITIONAL else self.uncond_prompt_len
        assert prompt_len is not None
        if role is _Role.PROMPT:
            return key_position <= q.position
        if key_position < prompt_len:
            return True
        shift = 0 if q.stream == CONDITIONAL else self._shift
        own, key = q.position - shift, key_position - shift
        if role is _Role.PROXY:
            return key != own and self.context.predictor_sees(row, 0, key)
        return self.context.token_sees(own, key)

    # ------------------------------------------------------------------------------------------ finality
    def record(self, outputs: list[int]) -> None:
        """The sampled output of every predicting stream-0 input of the pass in flight, in input order.

        Then the finality walk, in position order (every key sits below its query): a token's value is
        final when it is a prompt or EOL token, a proxy of a final cell, or equal to its cell's final value;
        its keys and values are final when its value is and every position of its static context holds a
        token whose keys and values are final; its output is final exactly then. Other outputs are guesses.
        """
        issued = self._issued
        if issued is None:
            raise RuntimeError("record() without a pass in flight")
        predicting = [(i, e) for i, e in issued if self._history[i].predicts is not None]
        if len(outputs) != len(predicting):
            raise ValueError(
                f"pass {self._steps} has {len(predicting)} predicting inputs, got {len(outputs)}"
            )
        values = [self._check_token(t) for t in outputs]
        out = {i: v for (i, _), v in zip(predicting, values, strict=True)}
        finals_before = self._num_final
        if self._steps == 0:
            self._settle(0, values[0])
        else:
            for i, e in issued:  # already in position order
                assert e is not None
                self._walk(i, e, out.get(i))
        for k, chain in enumerate(self._chains):
            while self._settled[k] < len(chain) and self._settled_element(chain[self._settled[k]]):
                self._settled[k] += 1
        self._steps += 1
        self.stats.passes = self._steps
        self.stats.cells_per_pass.append(self._num_final - finals_before)
        self._issued = None

    def _walk(self, index: int, e: _Element, output: int | None) -> None:
        f = self._history[index]
        if e.cell is None or e.kind is FeedKind.PROXY:
            value_final = e.cell is None or self._final[e.cell]
        else:
            value_final = self._final[e.cell] and self._value[e.cell] == f.token
            if f.draft and value_final:
                self.stats.accepted += 1
        kv_final = value_final and self._context_final(index)
        if e.kind is not FeedKind.PROXY:
            self._mark_kv(f.position, kv_final)
        if e.predicts is None or output is None:
            return
        if kv_final:  # the query's own keys and values, and all it read, are final: so is its output
            self._settle(e.predicts, output)
        elif not self._final[e.predicts]:
            self._value[e.predicts] = output  # a guess: the next pass drafts it

    def _context_final(self, index: int) -> bool:
        """Whether every position of the token's static context (its own excepted) holds, now, a newest
        token with final keys and values: per row above, a KV-final prefix reaching the row limit and a
        KV-final EOL; in its own row, the cells before it. O(rows), by the closed form of
        ``StaticContext`` (``_role_sees`` is the same set, position by position)."""
        f = self._history[index]
        role, row = self._roles[index]
        if role is _Role.PROMPT:
            return True
        layout, ctx = self.layout, self.context
        W = layout.width
        own_eol = -1
        if role is _Role.PROXY:  # the predictor of (row, 0): nothing of its own row
            R, C, own_cells = row, 0, 0
        else:
            r, c = layout.cell(f.position)
            if c == W:  # an EOL starts the next row: it is the predictor of (r + 1, 0)
                R, C, own_cells, own_eol = r + 1, 0, 0, r
            else:  # the predictor of (r, c + 1); a row's last cell sees all of the rows above (limit W)
                R, C, own_cells = r, c + 1, c
        for kr in range(R):
            if self._kv_prefix[kr] < ctx.row_limit(kr, R, min(C, W)):
                return False
            if layout.eol and kr != own_eol and not self._eol_kv_final[kr]:
                return False
        return R >= layout.height or self._kv_prefix[R] >= own_cells

    def _mark_kv(self, position: int, kv_final: bool) -> None:
        """Record whether the newest token at ``position`` has final keys and values."""
        self._kv_final[position] = kv_final
        if position < self.layout.prompt_len:
            return
        r, c = self.layout.cell(position)
        if c == self.layout.width:
            self._eol_kv_final[r] = kv_final
            return
        if not kv_final and c < self._kv_prefix[r]:
            raise AssertionError(f"cell {(r, c)} had final keys and values and was fed again")
        W, base = self.layout.width, position - c
        while self._kv_prefix[r] < W and self._kv_final.get(base + self._kv_prefix[r], False):
            self._kv_prefix[r] += 1

    def _settle(self, cell: int, value: int) -> None:
        if self._final[cell]:
            if self._value[cell] != value:
                raise AssertionError(f"cell {cell} was final at {self._value[cell]}, now computed {value}")
            return
        self._final[cell] = True
        self._value[cell] = value
        self._final_in_row[cell // self.layout.width] += 1
        self._num_final += 1

    @staticmethod
    def _check_token(t: object) -> int:
        if isinstance(t, bool):
            raise ValueError(f"sampled token {t!r} must be an int >= 0")
        try:
            v = operator.index(t)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"sampled token {t!r} must be an int >= 0") from None
        if v < 0:
            raise ValueError(f"sampled token {v} must be >= 0")
        return v
