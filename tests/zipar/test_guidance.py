"""GuidedPlan: a conditional ZipAR plan plus an unconditional twin stream in one KV sequence."""

from __future__ import annotations

import pytest

from vllm_zipar.zipar.guidance import CONDITIONAL, UNCONDITIONAL, GuidedPlan, guidance_applies, image_plan
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import FeedKind, ZipARPlan, visible


def drive(plan, prompt):
    """Run a plan to the end, sampling each cell's raster position as its token; returns the passes."""
    passes = [plan.prefill_inputs(prompt)]
    while True:
        predicted = [f.predicts for f in passes[-1] if f.predicts is not None and f.stream == CONDITIONAL]
        plan.record(predicted)
        if plan.done:
            return passes
        passes.append(plan.next_inputs())


@pytest.mark.parametrize("H, W", [(1, 1), (2, 3), (4, 4), (5, 7), (8, 8)])
@pytest.mark.parametrize("window", [None, 1, 2, 3, 8])
@pytest.mark.parametrize("P, U", [(1, 1), (3, 1), (1, 4)])
def test_the_twin_stream_mirrors_every_pass_at_its_own_positions(H, W, window, P, U):
    layout = GridLayout(P, H, W)
    plain = drive(ZipARPlan(layout, window), list(range(100, 100 + P)))
    guided_plan = GuidedPlan(layout, window, U)
    guided = drive(guided_plan, list(range(100, 100 + P)) + list(range(200, 200 + U)))
    assert len(guided) == len(plain)  # guidance costs no extra pass
    assert guided_plan.steps == len(plain) and guided_plan.done
    assert guided_plan.grid() == [[P + r * W + c for c in range(W)] for r in range(H)]
    for k, (plain_pass, guided_pass) in enumerate(zip(plain, guided, strict=True)):
        if k == 0:
            cond, uncond = guided_pass[:P], guided_pass[P:]
            assert [f.token for f in uncond] == list(range(200, 200 + U))
            assert [f.position for f in uncond] == list(range(U))
            assert [f.predicts for f in uncond] == [None] * (U - 1) + [P]
        else:
            n = len(plain_pass)
            cond, uncond = guided_pass[:n], guided_pass[n:]
            assert len(uncond) == n
            for c, u in zip(cond, uncond, strict=True):
                assert (u.token, u.kind, u.predicts, u.step) == (c.token, c.kind, c.predicts, c.step)
                assert u.position == c.position - P + U
        assert cond == plain_pass
        assert all(f.stream == CONDITIONAL for f in cond)
        assert all(f.stream == UNCONDITIONAL for f in uncond)
    assert guided_plan.history == [f for p in guided for f in p]


def test_no_query_ever_sees_the_other_stream():
    plan = GuidedPlan(GridLayout(2, 4, 4), 2, 1)
    drive(plan, [7, 8, 9])
    history = plan.history
    for i, query in enumerate(history):
        for j, key in enumerate(history):
            if key.stream != query.stream:
                assert not visible(key, query, j, i)
    # Within a stream the mask is the plain ZipAR one: the unconditional query sees its own keys.
    last_uncond = max(i for i, f in enumerate(history) if f.stream == UNCONDITIONAL)
    seen = [j for j, k in enumerate(history) if visible(k, history[last_uncond], j, last_uncond)]
    assert seen and all(history[j].stream == UNCONDITIONAL for j in seen)


def test_next_inputs_is_idempotent_until_recorded():
    plan = GuidedPlan(GridLayout(1, 3, 3), 1, 1)
    plan.prefill_inputs([5, 6])
    plan.record([1])
    first = plan.next_inputs()
    assert plan.next_inputs() == first
    assert plan.num_fed == 2 + len(first)


def test_prompt_length_and_uncond_length_are_checked():
    with pytest.raises(ValueError, match="expected 1 conditional \\+ 1 unconditional"):
        GuidedPlan(GridLayout(1, 2, 2), None, 1).prefill_inputs([1, 2, 3])
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="uncond_prompt_len"):
            GuidedPlan(GridLayout(1, 2, 2), None, bad)
    assert isinstance(image_plan(GridLayout(1, 2, 2), None, None), ZipARPlan)
    assert isinstance(image_plan(GridLayout(1, 2, 2), None, 1), GuidedPlan)


def test_guidance_interval_follows_the_authors_generate():
    # generate(): the prefill's cell is always guided; decode step i (cell i + 1) while i <= cfg_interval.
    assert all(guidance_applies(n, -1) for n in range(600))
    assert [guidance_applies(n, 0) for n in range(4)] == [True, True, False, False]
    assert [guidance_applies(n, 2) for n in range(5)] == [True, True, True, True, False]


def test_kinds_survive_in_the_twin():
    plan = GuidedPlan(GridLayout(1, 3, 4), 1, 1)
    passes = drive(plan, [1, 2])
    kinds = {f.kind for p in passes for f in p if f.stream == UNCONDITIONAL}
    assert kinds == {FeedKind.REAL, FeedKind.PROXY, FeedKind.KV_ONLY}
