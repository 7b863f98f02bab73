"""`ImageStats` crosses the engine-core boundary as plain data: its wire form is fixed (served bodies and
logs read it), and `from_dict` reads back exactly what `to_dict` wrote."""

from __future__ import annotations

import json

from vllm_zipar.zipar.image_stats import KEY, ImageStats

STATS = ImageStats("zipar", 4, 2.0, (8, 9), 3, 1, 12, (1, 1, 2, 3))


def test_the_wire_form_is_plain_json_with_the_keys_front_ends_read():
    data = STATS.to_dict()
    assert data == {
        "decoding": "zipar",
        "window": 4,
        "cfg_scale": 2.0,
        "grid": [8, 9],
        "prompt_len": 3,
        "uncond_prompt_len": 1,
        "passes": 12,
        "cells_per_pass": [1, 1, 2, 3],
    }
    assert json.loads(json.dumps(data)) == data


def test_from_dict_reads_what_to_dict_wrote():
    assert ImageStats.from_dict(json.loads(json.dumps(STATS.to_dict()))) == STATS
    unguided = ImageStats("ntp", None, 1.0, (2, 2), 1, None, 4, (1, 1, 1, 1))
    assert ImageStats.of_output({"other": 1, KEY: unguided.to_dict()}) == unguided
    assert ImageStats.of_output(None) is None and ImageStats.of_output({}) is None
