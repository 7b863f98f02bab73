"""The pass that samples each grid cell (what partial images and `animate` report), and `partial_frames`."""

from __future__ import annotations

import json

import pytest

from vllm_zipar.serving.decode_order import passes_for, sampled_at
from vllm_zipar.serving.images_protocol import ImageAPIError, parse_request
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import zipar_steps


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


def parse(body):
    return parse_request(json.dumps(body).encode(), "32x32")


def test_partial_frames_is_partial_images_beyond_openais_three():
    assert parse({"prompt": "1", "stream": True, "partial_frames": 40}).partial_images == 40
    for body, message in [
        ({"prompt": "1", "partial_frames": 4}, "needs 'stream'"),
        ({"prompt": "1", "stream": True, "partial_frames": 257}, "between 0 and 256"),
        ({"prompt": "1", "stream": True, "partial_frames": 4, "partial_images": 2}, "not both"),
    ]:
        with pytest.raises(ImageAPIError, match=message) as err:
            parse(body)
        assert err.value.param == "partial_frames"
