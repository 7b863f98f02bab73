"""The plan's dry run: the pass that samples each grid cell (what partial images and `animate` report)."""

from __future__ import annotations

import pytest

from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import zipar_steps
from vllm_zipar.zipar.shape import passes_for, plan_shape


def sampled_at(layout: GridLayout, window: int | None, uncond: int | None = None) -> tuple[int, ...]:
    return plan_shape(layout, window, uncond).sampled_at


@pytest.mark.parametrize("window", [None, 1, 2, 4, 8, 16])
@pytest.mark.parametrize("uncond", [None, 1])
def test_every_cell_has_a_pass_and_the_last_one_is_the_engines_count(window, uncond):
    layout = GridLayout(prompt_len=1, height=16, width=16)
    order = sampled_at(layout, window, uncond)
    assert len(order) == 256 and order[0] == 0
    assert passes_for(order) == zipar_steps(16, 16, window, False)
    for row in range(16):  # a row fills left to right, one cell per pass
        steps = order[row * 16 : (row + 1) * 16]
        assert list(steps) == list(range(steps[0], steps[0] + 16))


@pytest.mark.parametrize("window", [None, 1, 3, 5])
@pytest.mark.parametrize("uncond", [None, 4])
def test_eol_grids_start_each_row_window_passes_after_the_row_above(window, uncond):
    # Emu3's layout: an EOL column the plan feeds but never samples; a different unconditional length.
    layout = GridLayout(prompt_len=7, height=4, width=5, eol=True, eol_token=99)
    order = sampled_at(layout, window, uncond)
    assert len(order) == 20 and passes_for(order) == zipar_steps(4, 5, window, True)
    w = 5 if window is None else window
    assert [order[row * 5] for row in range(4)] == [row * w for row in range(4)]


def test_ntp_samples_cell_n_in_pass_n_and_zipar_starts_rows_window_passes_apart():
    layout = GridLayout(prompt_len=1, height=6, width=6)
    assert sampled_at(layout, None) == tuple(range(36))
    order = sampled_at(layout, 2)
    starts = [order[row * 6] for row in range(6)]
    assert starts == [0, 6, 8, 10, 12, 14]  # the first row whole, then a row every 2 passes (ZIPAR.md §3)
    assert passes_for(order, [step <= 9 for step in order]) == 10
    assert passes_for(order, [False] * 36) == 0
