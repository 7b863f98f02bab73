"""The token grid of one image request (ZIPAR.md §1): raster positions of grid cells and back.

A request is ``prompt_len`` prompt tokens followed by ``height`` rows of ``width`` image tokens; EOL models
(Emu3, Lumina-mGPT) end every row with a fixed end-of-line token, which occupies column ``width`` of the
row. ``pos(r, c) = prompt_len + r * (width + eol) + c`` is the position the model sees (RoPE), so every
other layer derives positions from here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_int(name: str, value: object, low: int) -> None:
    # bool is an int subclass; True as a grid size is always a bug upstream.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")


@dataclass(frozen=True, slots=True)
class GridLayout:
    """Where the cells of an ``height`` x ``width`` image sit in the token sequence.

    ``prompt_len`` must be at least 1: the last prompt token's logits predict cell (0, 0). With ``eol``,
    ``eol_token`` is the id fed at column ``width`` of every row; without it, ``eol_token`` must be None.
    """

    prompt_len: int
    height: int
    width: int
    eol: bool = False
    eol_token: int | None = None

    def __post_init__(self) -> None:
        _check_int("prompt_len", self.prompt_len, 1)
        _check_int("height", self.height, 1)
        _check_int("width", self.width, 1)
        if not isinstance(self.eol, bool):
            raise ValueError(f"eol={self.eol!r} must be a bool")
        if self.eol:
            if self.eol_token is None:
                raise ValueError("eol=True needs eol_token (the end-of-line token id), got None")
            _check_int("eol_token", self.eol_token, 0)
        elif self.eol_token is not None:
            raise ValueError(f"eol_token={self.eol_token!r} given but eol=False; pass eol=True or drop it")

    @property
    def num_cells(self) -> int:
        """Image cells to sample (EOL cells excluded: they are forced, not sampled)."""
        return self.height * self.width

    @property
    def row_stride(self) -> int:
        """Positions per row: ``width``, plus one for the EOL cell."""
        return self.width + self.eol

    @property
    def end(self) -> int:
        """One past the last grid position (the last row's EOL cell included)."""
        return self.prompt_len + self.height * self.row_stride

    def pos(self, r: int, c: int) -> int:
        """Raster position of cell ``(r, c)``; ``c == width`` is the row's EOL cell (EOL layouts only)."""
        if not 0 <= r < self.height:
            raise ValueError(f"row r={r} outside [0, {self.height})")
        if not 0 <= c < self.row_stride:
            raise ValueError(f"column c={c} outside [0, {self.row_stride}) (eol={self.eol})")
        return self.prompt_len + r * self.row_stride + c

    def cell(self, position: int) -> tuple[int, int]:
        """The ``(r, c)`` at raster ``position``; ``c == width`` for an EOL cell."""
        if not self.prompt_len <= position < self.end:
            raise ValueError(f"position={position} outside the grid [{self.prompt_len}, {self.end})")
        r, c = divmod(position - self.prompt_len, self.row_stride)
        return r, c

    def image_index(self, position: int) -> int | None:
        """Raster index ``r * width + c`` of the image cell at ``position``; None for an EOL cell."""
        r, c = self.cell(position)
        return None if c == self.width else r * self.width + c
