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
import operator
from dataclasses import dataclass

from .layout import GridLayout
from .plan import FeedKind
from .static_context import StaticContext

CONDITIONAL = 0
UNCONDITIONAL = 1


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
        self._history: list[LogicalToken] = []
        self._roles: list[tuple[_Role, int]] = []  # per history entry: role, and the row a proxy starts
        self._at: dict[tuple[int, int], list[int]] = {}  # (stream, position) -> real tokens fed there
        self._issued: list[tuple[int, _Element | None]] | None = None  # (history index, element) of stream 0
        self._steps = 0
        self.stats = DraftStats()

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

    # ------------------------------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        """Every cell's value is final (no query is left that needs a key)."""
        return self.stats.passes > 0 and all(self._final)

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

    def next_inputs(self) -> list[LogicalToken]:
        """The next pass: per open chain its first unsettled element (value final), then up to ``drafts``
        guessed cells (EOLs ride along free); stream 0 by position, then the unconditional twins."""
        if self._issued is not None:
            if self._steps == 0:
                raise RuntimeError("the prefill pass is not recorded yet; call record() first")
            return [self._history[i] for i in self._pass_indices()]
        if self._steps == 0:
            raise RuntimeError("call prefill_inputs() first")
        if self.done:
            return []
        step = self._steps
        chosen: list[tuple[LogicalToken, _Element]] = []
        for k, chain in enumerate(self._chains):
            if self._settled[k] == len(chain) or not self._chain_open(k):
                continue
            guessed = 0
            for e in chain[self._settled[k] :]:
                is_draft = e.cell is not None and e.kind is FeedKind.REAL and not self._final[e.cell]
                if is_draft and guessed == self.drafts:
                    break
                chosen.append((self._token_for(e, step, is_draft), e))
                guessed += is_draft
        if not chosen:
            raise AssertionError(f"pass {step} feeds nothing but the image is not done")
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
        if f.kind is not FeedKind.PROXY:
            slot = self._at.setdefault((f.stream, f.position), [])
            if slot and f.stream == CONDITIONAL:
                self.stats.superseded += 1
            slot.append(index)
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
        self._issued = None

    def _walk(self, index: int, e: _Element, output: int | None) -> None:
        f = self._history[index]
        if e.cell is None or e.kind is FeedKind.PROXY:
            value_final = e.cell is None or self._final[e.cell]
        else:
            value_final = self._final[e.cell] and self._value[e.cell] == f.token
            if f.draft and value_final:
                self.stats.accepted += 1
        kv_final = value_final and all(
            self._kv_final.get(k, False)
            for k in range(self.layout.end)
            if k != f.position and self._role_sees(index, k)
        )
        if e.kind is not FeedKind.PROXY:
            self._kv_final[f.position] = kv_final
        if e.predicts is None or output is None:
            return
        if kv_final:  # the query's own keys and values, and all it read, are final: so is its output
            self._settle(e.predicts, output)
        elif not self._final[e.predicts]:
            self._value[e.predicts] = output  # a guess: the next pass drafts it

    def _settle(self, cell: int, value: int) -> None:
        if self._final[cell]:
            if self._value[cell] != value:
                raise AssertionError(f"cell {cell} was final at {self._value[cell]}, now computed {value}")
            return
        self._final[cell] = True
        self._value[cell] = value
        self._final_in_row[cell // self.layout.width] += 1

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
