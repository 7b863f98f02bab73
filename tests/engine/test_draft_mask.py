"""The exact-draft mask as the engine computes it equals the plan's own definition (``DraftPlan.attends``).

Draft plans of many grids, windows (NTP included), layouts (EOL and LlamaGen), guided and not, driven pass by
pass with the hash stand-in model of ``tests/zipar/test_draft_plan.py`` (a small vocabulary, so guesses are
often right, often wrong: accepted and superseded tokens both occur), are written into the engine's key
metadata pass by pass as the runner writes them; every pass's queries must then see exactly the keys
``attends`` allows, on the CPU backend's matrix (``ImageKeyMetadata.mask``) and on the FlexAttention rule
(``flex_mask.zipar_visible``). A rule without ``dead_from`` (superseded tokens stay visible) fails.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.zipar.test_draft_plan import HashModel
from vllm_zipar.engine.attention_mask import ImageKeyMetadata
from vllm_zipar.engine.flex_mask import NEVER, ZipARMaskBuffers, zipar_visible
from vllm_zipar.engine.step_inputs import DraftStepInputs
from vllm_zipar.zipar.draft_plan import DraftPlan
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import FeedKind

SLOT = 1


def drive(layout: GridLayout, window, drafts: int, uncond, seed: int):
    """Yield (plan, pass start, pass end) for every pass, after the pass is fed and before it is recorded."""
    plan = DraftPlan(layout, window, drafts, uncond)
    model = HashModel(3, seed)
    inputs = plan.prefill_inputs(list(range(50, 50 + layout.prompt_len + (uncond or 0))))
    while True:
        start = plan.num_fed - len(inputs)
        yield plan, start, plan.num_fed
        history = plan.history
        model.feed(history, lambda i, j: plan.attends(i, j))
        plan.record(model.outputs(history, start))
        if plan.done:
            return
        inputs = plan.next_inputs()


def write(keys: ImageKeyMetadata, buffers: ZipARMaskBuffers, plan: DraftPlan, start: int, end: int) -> None:
    fed = plan.fed(start, end)
    drafts = DraftStepInputs.of_plan(plan, start, end)
    keys.write(
        start,
        [f.position for f in fed],
        [f.step for f in fed],
        [f.kind is FeedKind.PROXY for f in fed],
        [f.stream for f in fed],
        drafts,
    )
    fields = keys.drafts
    assert fields is not None
    slots = torch.full((end - start,), SLOT)
    tokens = torch.arange(start, end)
    buffers.write_tokens(
        slots,
        tokens,
        torch.from_numpy(keys.positions[start:end]),
        torch.from_numpy(keys.steps[start:end]),
        torch.tensor([f.stream for f in fed]),
        torch.from_numpy(keys.proxy[start:end]),
    )
    index = torch.tensor([*fields.touched, *range(start, end)], dtype=torch.long)
    buffers.write_draft_fields(
        torch.full((len(index),), SLOT),
        index,
        *(
            torch.from_numpy(getattr(fields, name)[index.numpy()].astype(np.int64))
            for name in ("context_rows", "context_cols", "key_rows", "key_cols", "dead_from")
        ),
    )
    buffers.set_slot_rule(SLOT, drafts.width, drafts.window, drafts.row0_whole)


def cases():
    rng = random.Random(3)
    out = []
    for n in range(36):
        H, W = rng.randint(1, 6), rng.randint(1, 6)
        eol = n % 2 == 1
        layout = GridLayout(rng.randint(1, 3), H, W, eol=eol, eol_token=7 if eol else None)
        out.append(
            (layout, rng.choice([None, *range(1, W + 1)]), rng.choice([1, 2, 4]), rng.choice([None, 2]), n)
        )
    return out


@pytest.mark.parametrize(("layout", "window", "drafts", "uncond", "seed"), cases())
def test_the_engine_masks_equal_the_plan(layout, window, drafts, uncond, seed):
    keys = ImageKeyMetadata()
    buffers = ZipARMaskBuffers.allocate(slots=3, tokens=4096, rows=2, device="cpu")
    buffers.set_batch_slots(torch.tensor([SLOT]))
    for plan, start, end in drive(layout, window, drafts, uncond, seed):
        write(keys, buffers, plan, start, end)
        expected = np.array([[plan.attends(i, j) for j in range(end)] for i in range(start, end)])
        assert np.array_equal(keys.mask(start, end - start), expected), f"pass {plan.steps}"
        q = torch.arange(start, end)[:, None]
        kv = torch.arange(end)[None, :]
        flex = zipar_visible(buffers, torch.zeros_like(q), q, kv).numpy()
        assert np.array_equal(flex, expected), f"pass {plan.steps}"
    assert plan.done


def test_superseded_tokens_must_be_hidden():
    """Without dead_from (a superseded key stays visible) the masks differ from the plan's."""
    layout = GridLayout(1, 4, 4)
    differs = False
    for plan, start, end in drive(layout, None, 3, None, 5):
        keys = ImageKeyMetadata()
        for s, e in [(0, end)]:
            keys.write(
                s,
                [f.position for f in plan.fed(s, e)],
                [f.step for f in plan.fed(s, e)],
                [f.kind is FeedKind.PROXY for f in plan.fed(s, e)],
                None,
                DraftStepInputs.of_plan(plan, s, e),
            )
        keys.drafts.dead_from[:] = NEVER
        expected = np.array([[plan.attends(i, j) for j in range(end)] for i in range(start, end)])
        differs |= not np.array_equal(keys.mask(start, end - start), expected)
    assert differs
