"""GridLayout: raster positions of cells (ZIPAR.md §1), their inverse, and input validation."""

from __future__ import annotations

import dataclasses

import pytest

from vllm_zipar.zipar.layout import GridLayout


def _layouts():
    for P in (1, 2, 5):
        for H in range(1, 7):
            for W in range(1, 7):
                yield GridLayout(P, H, W)
                yield GridLayout(P, H, W, eol=True, eol_token=9)


def test_positions_tile_the_grid_in_raster_order_and_invert():
    for layout in _layouts():
        P, H, W, eol = layout.prompt_len, layout.height, layout.width, layout.eol
        cells = [(r, c) for r in range(H) for c in range(W + eol)]
        positions = [layout.pos(r, c) for r, c in cells]
        assert positions == list(range(P, layout.end)), layout
        assert [layout.cell(p) for p in positions] == cells
        assert layout.row_stride == W + eol
        assert layout.num_cells == H * W
        assert layout.end == P + H * (W + eol)
        for r, c in cells:
            assert layout.pos(r, c) == P + r * (W + eol) + c


def test_llamagen_and_emu3_sizes():
    c2i = GridLayout(prompt_len=1, height=24, width=24)
    assert c2i.pos(0, 0) == 1 and c2i.pos(23, 23) == 576 and c2i.end == 577
    emu3 = GridLayout(prompt_len=10, height=90, width=90, eol=True, eol_token=151846)
    assert emu3.pos(0, 90) == 100 and emu3.pos(1, 0) == 101 and emu3.cell(100) == (0, 90)
    assert emu3.end == 10 + 90 * 91


@pytest.mark.parametrize(
    ("r", "c", "match"),
    [
        (-1, 0, r"r=-1 outside \[0, 3\)"),
        (3, 0, r"r=3 outside \[0, 3\)"),
        (0, -1, r"c=-1 outside \[0, 4\)"),
        (0, 4, r"c=4 outside \[0, 4\) \(eol=False\)"),
    ],
)
def test_pos_rejects_cells_outside_the_grid(r, c, match):
    with pytest.raises(ValueError, match=match):
        GridLayout(1, 3, 4).pos(r, c)


def test_eol_column_only_with_eol():
    assert GridLayout(1, 3, 4, eol=True, eol_token=0).pos(0, 4) == 5
    with pytest.raises(ValueError, match=r"c=5 outside \[0, 5\) \(eol=True\)"):
        GridLayout(1, 3, 4, eol=True, eol_token=0).pos(0, 5)


@pytest.mark.parametrize("position", [-1, 0, 2, 15, 100])
def test_cell_rejects_positions_outside_the_grid(position):
    layout = GridLayout(3, 3, 4)  # grid positions [3, 15)
    with pytest.raises(ValueError, match=rf"position={position} outside the grid \[3, 15\)"):
        layout.cell(position)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_len": 0, "height": 2, "width": 2}, r"prompt_len=0 must be >= 1"),
        ({"prompt_len": 1, "height": 0, "width": 2}, r"height=0 must be >= 1"),
        ({"prompt_len": 1, "height": 2, "width": -3}, r"width=-3 must be >= 1"),
        ({"prompt_len": 1, "height": 2.0, "width": 2}, r"height=2.0 must be an int >= 1"),
        ({"prompt_len": True, "height": 2, "width": 2}, r"prompt_len=True must be an int >= 1"),
        ({"prompt_len": 1, "height": 2, "width": 2, "eol": True}, r"eol=True needs eol_token"),
        ({"prompt_len": 1, "height": 2, "width": 2, "eol": 1, "eol_token": 3}, r"eol=1 must be a bool"),
        ({"prompt_len": 1, "height": 2, "width": 2, "eol_token": 3}, r"eol_token=3 given but eol=False"),
        (
            {"prompt_len": 1, "height": 2, "width": 2, "eol": True, "eol_token": -1},
            r"eol_token=-1 must be >= 0",
        ),
    ],
)
def test_invalid_layouts_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GridLayout(**kwargs)


def test_layout_is_frozen_and_hashable():
    layout = GridLayout(1, 2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.width = 3  # type: ignore[misc]
    assert {layout: 1}[GridLayout(1, 2, 2)] == 1
