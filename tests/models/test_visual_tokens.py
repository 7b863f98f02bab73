"""`VisualTokens`: logits columns and vocabulary ids are separate maps of the VQ codes (no engine)."""

from __future__ import annotations

import pytest
import torch

from vllm_zipar.models.image_grid import VisualTokens


def test_a_separate_head_scores_codes_at_their_own_columns_while_ids_sit_above_the_text():
    # Janus-Pro's shape: a 6-wide image head, image ids after 100 text ids.
    visual = VisualTokens.contiguous(100, 6, logits_start=0)
    logits = torch.arange(12.0).view(2, 6)
    assert torch.equal(visual.visual_logits(logits), logits)  # the whole head, no copy needed
    assert visual.code_to_id(torch.tensor([0, 5])).tolist() == [100, 105]
    assert visual.id_to_code(torch.tensor([[105, 100]])).tolist() == [[5, 0]]


def test_a_shared_head_is_sliced_at_the_ids():
    visual = VisualTokens.contiguous(3, 4)
    logits = torch.arange(20.0).view(2, 10)
    assert visual.visual_logits(logits).tolist() == [[3, 4, 5, 6], [13, 14, 15, 16]]


def test_a_table_maps_codes_to_ids_in_any_order():
    # Chameleon's shape: codes name ids through a table, not in id order.
    ids = (9, 4, 7, 5)
    visual = VisualTokens(logits=ids, ids=ids)
    logits = torch.arange(10.0).unsqueeze(0)
    assert visual.visual_logits(logits).tolist() == [[9, 4, 7, 5]]  # column c scores code c
    assert visual.code_to_id(torch.tensor([[0, 1], [2, 3]])).tolist() == [[9, 4], [7, 5]]
    assert visual.id_to_code(torch.tensor([5, 9, 4])).tolist() == [3, 0, 1]
    for outside in (6, 10, -1):
        with pytest.raises(ValueError, match="not visual tokens"):
            visual.id_to_code(torch.tensor([4, outside]))


@pytest.mark.parametrize(
    "logits, ids, message",
    [
        (range(0, 4), range(0, 5), "4 visual logits columns for 5 visual ids"),
        (range(0, 0), range(0, 0), "non-empty range"),
        ((1, 1), (2, 3), "distinct"),
        (range(0, 2), (-1, 3), "distinct ints >= 0"),
    ],
)
def test_malformed_maps_are_refused(logits, ids, message):
    with pytest.raises(ValueError, match=message):
        VisualTokens(logits, ids)
