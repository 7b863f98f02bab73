"""The ZipAR plan of one image (ZIPAR.md §3-4): which inputs each forward pass feeds, and step counts.

``ZipARPlan`` holds one image's decoding state (tokens sampled per row, rows in flight, completed rows whose
last token still has to be written to the cache) and answers, every engine step, the inputs of the next
pass: token, raster position, kind (real, proxy, KV-only) and the cell whose logits it predicts. The engine
feeds them, samples the predicting inputs' logits and hands the tokens back with ``record``. ``visible`` is
the one definition of the attention mask over the fed inputs. ``zipar_steps`` gives the §4 closed forms.

Conventions resolved here (ZIPAR.md leaves them implicit):

* Within one pass, inputs are ordered by raster position (ascending); positions within a pass are distinct.
  ``record`` takes the sampled tokens of the predicting inputs (``predicts is not None``) in that order.
* The image is done once its ``H*W`` cells are sampled. The last sampled token (bottom-right cell) is never
  fed back: no query needs its keys and values. On EOL layouts the plan feeds nothing after the last row;
  the final EOL and any closing tokens (Emu3: EOL, EOF, image end, EOS) are forced, and feeding or
  emitting them is the model adapter's business.
* On EOL layouts the row-start input is the EOL token at ``pos(r, W)`` of the row above, a real token. So
  in NTP order (``window >= W``) the pass that starts a row also carries the row above's last token as a
  KV-only input: one *predicting* input per pass, two inputs in the pass after a row completes. LlamaGen
  NTP feeds exactly one input per pass (the row above's real last token predicts the next row's first cell).
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import SupportsIndex

from .layout import GridLayout


class FeedKind(enum.Enum):
    REAL = "real"  # a real token: keys/values are kept and later queries at positions >= its own see it
    PROXY = "proxy"  # query-only stand-in (LlamaGen row start); no other input ever attends to it
    KV_ONLY = "kv_only"  # a real token fed only to write its keys/values; its logits are discarded


@dataclass(frozen=True, slots=True)
class FedInput:
    """One input of one forward pass.

    ``position`` is the raster position the model sees (RoPE). ``predicts`` is the raster position of the
    cell this input's logits predict (None for KV-only inputs and for prompt tokens other than the last); it
    also keys the cell's sampling seed. ``step`` is the pass that feeds it (the prefill is pass 0).
    ``stream`` tells the sequences of a guided image apart (0: conditional, 1: unconditional; see
    ``guidance.GuidedPlan``); ``predicts`` is always in stream 0's positions, the cell's identity.
    """

    token: int
    position: int
    kind: FeedKind
    predicts: int | None
    step: int
    stream: int = 0


def visible(key: FedInput, query: FedInput, key_index: int, query_index: int) -> bool:
    """ZIPAR.md §3 mask: may ``query`` attend to ``key``? Indices are their places in the fed sequence.

    A key is visible when it belongs to the query's sequence (stream), sits at or before the query's raster
    position, was fed in the query's pass or earlier (keys and values are computed once, when fed), and is
    not a proxy (unless it is the query itself). Storage order does not matter.
    """
    return (
        key.stream == query.stream
        and key.position <= query.position
        and key.step <= query.step
        and (key.kind is not FeedKind.PROXY or key_index == query_index)
    )


def check_window(window: object) -> int | None:
    """``window`` as an int >= 1, or None (next-token prediction); anything else raises ValueError."""
    if window is None:
        return None
    # SupportsIndex is what operator.index takes: numpy ints too, not 2.5 or "3".
    if isinstance(window, bool) or not isinstance(window, SupportsIndex):
        raise ValueError(f"window={window!r} must be an int >= 1, or None for next-token prediction")
    value = operator.index(window)
    if value < 1:
        raise ValueError(f"window={value} must be >= 1 (or None for next-token prediction)")
    return value


def _check_grid(H: int, W: int) -> None:
    for name, value in (("H", H), ("W", W)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")


def zipar_steps(H: int, W: int, window: int | None, eol: bool) -> int:
    """Forward passes for one image, prefill included (ZIPAR.md §4). ``window`` None or >= W: NTP, ``H*W``."""
    _check_grid(H, W)
    w = check_window(window)
    if w is None or w >= W:
        return H * W
    if eol:
        return (H - 1) * w + W
    if H == 1:
        return W  # the table's 2W + (H-2)w assumes a second row; one row is plain raster order
    return 2 * W + (H - 2) * w


@dataclass(slots=True)
class _Pass:
    """A pass handed out by ``next_inputs`` (or the prefill) and not yet recorded."""

    inputs: list[FedInput]
    predicting_rows: list[int]  # row of each predicting input, in input order
    starts_row: int | None
    kv_fed_rows: list[int]  # completed rows whose last token this pass writes


class ZipARPlan:
    """One image's ZipAR decoding state: hands out each pass's inputs and takes back the sampled tokens.

    Use: ``prefill_inputs(prompt)``, feed them, ``record([token for (0, 0)])``; then repeat
    ``next_inputs()`` / ``record(tokens)`` until ``done``. ``next_inputs`` is idempotent until the pass is
    recorded. ``window`` None (or >= W) is next-token prediction in raster order. Rows start and complete
    in order, so the rows in flight are a contiguous range; each call costs O(rows in flight).
    """

    def __init__(self, layout: GridLayout, window: int | None) -> None:
        if not isinstance(layout, GridLayout):
            raise ValueError(f"layout={layout!r} must be a GridLayout")
        self.layout = layout
        self.window = check_window(window)
        W = layout.width
        # A row above must hold this many tokens before the next row starts (ZIPAR.md §3).
        self.effective_window = W if self.window is None else min(self.window, W)
        self._tokens = [-1] * layout.num_cells
        self._n = [0] * layout.height
        self._row_lo = 0  # first incomplete row
        self._row_hi = 0  # rows started by recorded passes
        self._kv_pending: list[int] = []  # completed rows whose last token is not yet fed
        self._history: list[FedInput] = []
        self._steps = 0
        self._cells_done = 0
        self._issued: _Pass | None = None

    # ------------------------------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        """All ``H*W`` cells sampled."""
        return self._cells_done == self.layout.num_cells

    @property
    def steps(self) -> int:
        """Passes recorded so far, prefill included (equals ``zipar_steps(...)`` once done)."""
        return self._steps

    @property
    def history(self) -> list[FedInput]:
        """Every input handed out so far (the pass in flight included), in feed order: vLLM's KV order.

        A copy. Proxies are included: the pass feeds them like any other input; ``visible`` hides them
        from every query but their own.
        """
        return list(self._history)

    @property
    def num_fed(self) -> int:
        """Length of ``history`` without copying it."""
        return len(self._history)

    def fed(self, start: int, end: int) -> list[FedInput]:
        """``history[start:end]`` without copying the rest: the scheduler asks for it every step."""
        return self._history[start:end]

    @property
    def rows_in_flight(self) -> range:
        """Rows started (by a recorded pass or the one in flight) whose last token is not yet sampled."""
        hi = self._row_hi
        if self._issued is not None and self._issued.starts_row is not None:
            hi = self._issued.starts_row + 1
        return range(self._row_lo, hi)

    def grid(self) -> list[list[int]]:
        """The ``H x W`` sampled tokens in raster order, -1 where not yet sampled."""
        W = self.layout.width
        return [self._tokens[r * W : (r + 1) * W] for r in range(self.layout.height)]

    # ------------------------------------------------------------------------------------------ passes
    def prefill_inputs(self, prompt_token_ids: list[int]) -> list[FedInput]:
        """Pass 0: the prompt at positions 0..P-1, all real; the last token predicts cell (0, 0)."""
        if self._steps or self._issued is not None:
            raise RuntimeError("prefill_inputs() may be called once, before any other pass")
        P = self.layout.prompt_len
        if len(prompt_token_ids) != P:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens, the layout says prompt_len={P}")
        first = self.layout.pos(0, 0)
        inputs = [
            FedInput(int(t), i, FeedKind.REAL, first if i == P - 1 else None, 0)
            for i, t in enumerate(prompt_token_ids)
        ]
        self._issue(_Pass(inputs, [0], 0, []))
        return list(inputs)

    def next_inputs(self) -> list[FedInput]:
        """The inputs of the next pass, ordered by raster position; empty once the image is done."""
        if self._issued is not None:
            if self._steps == 0:
                raise RuntimeError("the prefill pass is not recorded yet; call record() first")
            return list(self._issued.inputs)
        if self._steps == 0:
            raise RuntimeError("call prefill_inputs() first")
        if self.done:
            return []
        layout = self.layout
        W = layout.width
        step = self._steps
        tokens = self._tokens
        n = self._n
        pos = layout.pos
        # (input, row whose next cell it predicts, or None)
        entries: list[tuple[FedInput, int | None]] = []
        for r in range(self._row_lo, self._row_hi):
            c = n[r] - 1  # active rows hold 1..W-1 tokens
            entries.append((FedInput(tokens[r * W + c], pos(r, c), FeedKind.REAL, pos(r, c + 1), step), r))
        kv_fed = list(self._kv_pending)
        starts: int | None = None
        s = self._row_hi
        if s < layout.height:
            above = n[s - 1]
            needed = W if (s - 1 == 0 and not layout.eol) else self.effective_window
            if above >= needed:
                starts = s
                first = pos(s, 0)
                if layout.eol_token is not None:  # an EOL layout (GridLayout: eol <=> eol_token)
                    entry = FedInput(layout.eol_token, pos(s - 1, W), FeedKind.REAL, first, step)
                elif above == W:
                    # The row above is complete: its real last token predicts the new row's first cell,
                    # fed once (it also writes that token's keys/values, so no KV-only feed for it).
                    entry = FedInput(tokens[s * W - 1], pos(s - 1, W - 1), FeedKind.REAL, first, step)
                    kv_fed.remove(s - 1)
                else:
                    newest = tokens[(s - 1) * W + above - 1]
                    entry = FedInput(newest, pos(s - 1, W - 1), FeedKind.PROXY, first, step)
                entries.append((entry, s))
        for r in kv_fed:
            last = FedInput(tokens[r * W + W - 1], pos(r, W - 1), FeedKind.KV_ONLY, None, step)
            entries.append((last, None))
        entries.sort(key=lambda e: e[0].position)
        inputs = [e[0] for e in entries]
        predicting_rows = [row for _, row in entries if row is not None]
        self._issue(_Pass(inputs, predicting_rows, starts, list(self._kv_pending)))
        return list(inputs)

    def record(self, sampled: list[int]) -> None:
        """Tokens sampled for the pass in flight, one per predicting input, in the pass's input order."""
        issued = self._issued
        if issued is None:
            raise RuntimeError("record() without a pass in flight; call prefill_inputs()/next_inputs() first")
        if len(sampled) != len(issued.predicting_rows):
            raise ValueError(
                f"pass {self._steps} predicts {len(issued.predicting_rows)} cells, got {len(sampled)} tokens"
            )
        values = []
        for t in sampled:
            if isinstance(t, bool):
                raise ValueError(f"sampled token {t!r} must be an int >= 0")
            try:
                v = operator.index(t)
            except TypeError:
                raise ValueError(f"sampled token {t!r} must be an int >= 0") from None
            if v < 0:
                raise ValueError(f"sampled token {v} must be >= 0")
            values.append(v)
        W = self.layout.width
        n = self._n
        for row, v in zip(issued.predicting_rows, values, strict=True):
            self._tokens[row * W + n[row]] = v
            n[row] += 1
            if n[row] == W:
                self._kv_pending.append(row)
        self._cells_done += len(values)
        for row in issued.kv_fed_rows:
            self._kv_pending.remove(row)
        if issued.starts_row is not None:
            self._row_hi = issued.starts_row + 1
        while self._row_lo < self._row_hi and n[self._row_lo] == W:
            self._row_lo += 1
        self._steps += 1
        self._issued = None

    def _issue(self, p: _Pass) -> None:
        self._issued = p
        self._history.extend(p.inputs)
