"""Exact drafts (`zipar_drafts: L`) for the EOL-layout families, Emu3 and Lumina-mGPT, in vLLM's engine.

tests/engine/test_exact_drafts.py covers LlamaGen's layout (row 0 whole before row 1, proxies, no EOL);
here the grid rows end in a fixed EOL token that rides free in a chain, and NTP's chain runs through it into
the next row. On each attention backend ("cpu", "flex") one staggered batch mixes, per family, ZipAR-2 and
NTP images, greedy and seeded, guided (CFG) and not, each with L = 0, 2 and 4: the draft images must carry
the L = 0 image's tokens in no more passes, and every KV block comes back. L = 0 equals the EOL-grid oracles
(test_emu3_engine.py, test_lumina_engine.py), so equal tokens here are the oracle's tokens.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import kv_cache_usage
from tests.engine.staggered import decoding_kwargs, engine_on, run_staggered
from tests.engine.test_emu3_engine import NEGATIVE
from tests.engine.test_emu3_engine import write_model as write_emu3_dir
from vllm_zipar.testing.lumina_dirs import write_tiny_lumina_dir
from vllm_zipar.zipar.plan import zipar_steps

pytestmark = pytest.mark.engine

SAMPLING = dict(temperature=1.0, top_k=20, top_p=0.95)
DRAFTS = (0, 2, 4)
# (prompt, size, window, seed, cfg scale): ZipAR-2 and NTP (None), each greedy and seeded, guided and not;
# one non-square size per family so a row is not a column.
CASES = {
    "emu3": [
        ("a red cat", "64x64", 2, None, 1.0),
        ("a blue dog", "72x56", 2, 5, 3.0),
        ("a red cat", "64x64", None, None, 2.0),
        ("a small house", "64x64", None, 11, 1.0),
    ],
    "lumina": [
        ("a red cat", "128x128", 2, None, 1.0),
        ("a blue dog", "160x96", 2, 5, 3.0),
        ("a red cat", "128x128", None, None, 2.0),
        ("a small house", "128x128", None, 11, 1.0),
    ],
}
GRIDS = {"64x64": (8, 8), "72x56": (7, 9), "128x128": (8, 8), "160x96": (6, 10)}


def write_family_dir(family: str, tmp_path_factory):
    if family == "emu3":
        return write_emu3_dir(tmp_path_factory.mktemp("emu3-drafts"))
    return write_tiny_lumina_dir(tmp_path_factory.mktemp("lumina-drafts") / "tiny-lumina", seed=3)


@pytest.fixture(
    scope="module",
    params=[("emu3", "cpu"), ("emu3", "flex"), ("lumina", "cpu"), ("lumina", "flex")],
    ids=lambda p: "-".join(p),
)
def engine(request, tmp_path_factory):
    family, backend = request.param
    generator = engine_on(
        backend, write_family_dir(family, tmp_path_factory), max_num_seqs=8, kv_cache_memory_bytes=8 << 20
    )
    yield family, generator
    generator.close()


def requests_of(family: str) -> list[tuple[str, dict]]:
    """Every case with each L, in the order (case, L)."""
    requests = []
    for prompt, size, window, seed, scale in CASES[family]:
        kwargs = dict(size=size, cfg_scale=scale, **decoding_kwargs(window, seed, SAMPLING))
        if family == "emu3" and scale != 1.0:
            kwargs["negative_prompt"] = NEGATIVE
        requests += [(prompt, dict(kwargs, zipar_drafts=drafts)) for drafts in DRAFTS]
    return requests


def test_draft_images_carry_the_plain_images_tokens_in_no_more_passes(engine):
    family, generator = engine
    finished = run_staggered(generator, requests_of(family), every=2, batch=4)
    assert sorted(finished) == list(range(len(CASES[family]) * len(DRAFTS)))
    saved = 0
    for case, (_, size, window, _, _) in enumerate(CASES[family]):
        plain, *drafted = (finished[case * len(DRAFTS) + i] for i in range(len(DRAFTS)))
        rows, cols = GRIDS[size]
        assert plain.tokens.shape == (rows, cols)
        assert plain.passes == zipar_steps(rows, cols, window or cols, eol=True)
        for drafts, image in zip(DRAFTS[1:], drafted, strict=True):
            assert torch.equal(image.tokens, plain.tokens), (CASES[family][case], drafts)
            assert image.passes <= plain.passes, (CASES[family][case], drafts)
            assert image.stats.drafts == drafts and image.stats.draft_tokens > 0
            assert sum(image.stats.cells_per_pass) == rows * cols
            saved += plain.passes - image.passes
    assert saved > 0  # the drafts did something (seeded NTP on random weights accepts some guesses)
    assert kv_cache_usage(generator) == 0.0
