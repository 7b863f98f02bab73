"""The static context of every input under ZipAR-w (ZIPAR.md §9, docs/exact_drafts.md): which raster
positions it attends, as a closed form of the layout and the window, with no pass history.

The feed-time rule of ZIPAR.md §3 (``plan.visible`` over everything fed so far) is one schedule that realises
these sets; ``tests/zipar/test_static_context.py`` checks the two agree over many plans. Exact drafts need
the closed form because a draft pass feeds tokens out of ZipAR's order, so the feed-time rule no longer says
what a query may see. Positions are the conditional stream's; ``in_stream`` maps a set to the unconditional
stream of a guided image (its own prompt, the same cells shifted by the prompt-length difference).
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import GridLayout
from .plan import FeedKind, check_window


@dataclass(frozen=True, slots=True)
class StaticContext:
    """Closed-form contexts of one image's inputs under ZipAR with ``window`` (None or >= W: NTP).

    A query that predicts cell ``(r, c)`` sees the whole prompt, cells ``(r, c')`` with ``c' < c``, cells
    ``(r', c')`` of each row above with ``c' < row_limit(r', r, c)``, the EOL tokens of the rows above, and
    itself. A real token's own context is that of the query it is fed as: the predictor of the next cell of
    its row, or (a row's last cell, whose logits predict nothing under ZipAR-w) everything before it.
    """

    layout: GridLayout
    window: int | None

    def __post_init__(self) -> None:
        if not isinstance(self.layout, GridLayout):
            raise ValueError(f"layout={self.layout!r} must be a GridLayout")
        check_window(self.window)

    @property
    def effective_window(self) -> int:
        """The window as the plan uses it: ``W`` for NTP, never more than ``W``."""
        W = self.layout.width
        return W if self.window is None else min(self.window, W)

    def row_limit(self, key_row: int, r: int, c: int) -> int:
        """Leading cells of ``key_row`` (< r) that the predictor of ``(r, c)`` sees.

        Row ``r`` runs ``(r - key_row) * w`` passes behind ``key_row`` (ZipAR-w: each active row gains one
        cell per pass and starts ``w`` cells after the row above), and a key is visible once it was fed,
        one pass after it was sampled. LlamaGen finishes row 0 before row 1 starts, so all of row 0 is seen.
        """
        W = self.layout.width
        if not 0 <= key_row < r:
            raise ValueError(f"key_row={key_row} must lie in [0, r={r})")
        if key_row == 0 and not self.layout.eol:
            return W
        return min(W, c + (r - key_row) * self.effective_window)

    def predictor(self, r: int, c: int) -> tuple[int, FeedKind]:
        """Position and kind of the input whose logits predict cell ``(r, c)``.

        ``(0, 0)``: the last prompt token. ``c > 0``: the cell to the left. A row start: EOL layouts feed
        the EOL of the row above; LlamaGen feeds the row above's real last token when that row is complete
        by then (row 1, or NTP), else a proxy at that cell's position.
        """
        layout = self.layout
        layout.pos(r, c)  # range check
        if c == layout.width:
            raise ValueError(f"cell ({r}, {c}) is an EOL cell: forced, never predicted")
        if c > 0:
            return layout.pos(r, c - 1), FeedKind.REAL
        if r == 0:
            return layout.prompt_len - 1, FeedKind.REAL
        if layout.eol:
            return layout.pos(r - 1, layout.width), FeedKind.REAL
        complete = r == 1 or self.effective_window == layout.width
        return layout.pos(r - 1, layout.width - 1), FeedKind.REAL if complete else FeedKind.PROXY

    def predictor_sees(self, r: int, c: int, key: int) -> bool:
        """Whether the predictor of cell ``(r, c)`` attends the real token at position ``key``."""
        layout = self.layout
        if key < layout.prompt_len or key == self.predictor(r, c)[0]:
            return True
        if key >= layout.end:
            return False
        kr, kc = layout.cell(key)
        if kc == layout.width:  # an EOL token: those of the rows above
            return kr < r
        if kr == r:
            return kc < c
        return kr < r and kc < self.row_limit(kr, r, c)

    def token_sees(self, position: int, key: int) -> bool:
        """Whether the real token at ``position`` (prompt, cell or EOL) attends the real token at ``key``.

        This is the context its keys and values are computed from, so it is what makes them final.
        """
        layout = self.layout
        if position < layout.prompt_len:
            return 0 <= key <= position
        r, c = layout.cell(position)
        if c == layout.width:  # the EOL of row r starts row r + 1
            return key <= position if r + 1 == layout.height else self.predictor_sees(r + 1, 0, key)
        if c + 1 < layout.width:
            return self.predictor_sees(r, c + 1, key)
        # A row's last cell: under ZipAR-w it is fed after every earlier cell, so it sees all of them.
        return 0 <= key <= position

    def predictor_context(self, r: int, c: int) -> frozenset[int]:
        """Every position the predictor of ``(r, c)`` sees (its own included)."""
        return frozenset(k for k in range(self.layout.end) if self.predictor_sees(r, c, k))

    def token_context(self, position: int) -> frozenset[int]:
        """Every position the real token at ``position`` sees (its own included)."""
        return frozenset(k for k in range(self.layout.end) if self.token_sees(position, k))


def in_stream(positions: frozenset[int], layout: GridLayout, uncond_prompt_len: int) -> frozenset[int]:
    """A conditional-stream context as the unconditional stream sees it: its own whole prompt, the same
    grid positions shifted by ``uncond_prompt_len - prompt_len``.

    Every grid query sees its stream's whole prompt, so the prompt part maps to the whole other prompt.
    """
    P = layout.prompt_len
    shift = uncond_prompt_len - P
    prompt = range(uncond_prompt_len) if any(p < P for p in positions) else range(0)
    return frozenset(prompt) | frozenset(p + shift for p in positions if p >= P)
