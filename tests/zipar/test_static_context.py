"""The static context (``zipar/static_context.py``) equals the feed-time rule's mask over real ZipAR plans.

Each random plan (grid, window or NTP, LlamaGen or EOL layout, guided or not) is driven pass by pass as the
engine drives it: feed the pass, record its tokens. For every input, the (stream, position) set of the keys
it may attend under ``plan.visible`` over everything fed so far must equal the closed form for its role:
the predictor of a cell, a KV-only last cell, or a prompt token. This equivalence is what lets a draft pass
(docs/exact_drafts.md) use the closed form where the feed-time rule no longer applies.
"""

from __future__ import annotations

import random

import pytest

from vllm_zipar.zipar.guidance import UNCONDITIONAL, image_plan
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import FeedKind, visible
from vllm_zipar.zipar.static_context import StaticContext, in_stream

EOL_TOKEN = 99_999
PLANS = 240


def _random_case(rng: random.Random):
    H, W = rng.randint(1, 9), rng.randint(1, 9)
    eol = rng.random() < 0.5
    P = rng.randint(1, 3)
    layout = GridLayout(P, H, W, eol=eol, eol_token=EOL_TOKEN if eol else None)
    window = rng.choice([None, *range(1, W + 2)])
    uncond = rng.choice([None, rng.randint(1, 4)])
    return layout, window, uncond


def _expected(ctx: StaticContext, layout: GridLayout, uncond: int | None, f) -> frozenset[tuple[int, int]]:
    """The closed-form (stream, position) set of one fed input, from its role alone."""
    shift = 0 if uncond is None else uncond - layout.prompt_len
    own = f.position if f.stream != UNCONDITIONAL else f.position - shift  # in stream 0's positions
    prompt_len = uncond if f.stream == UNCONDITIONAL else layout.prompt_len
    if f.position < prompt_len:
        return frozenset((f.stream, k) for k in range(f.position + 1))  # a prompt token: causal
    if f.predicts is not None:
        r, c = layout.cell(f.predicts)
        assert ctx.predictor(r, c) == (own, f.kind), f"wrong predictor for {(r, c)}: {f}"
        positions = ctx.predictor_context(r, c)
        if f.kind is FeedKind.REAL:  # a real predictor's keys are its own context: the two roles agree
            assert positions == ctx.token_context(own)
    else:
        assert f.kind is FeedKind.KV_ONLY
        positions = ctx.token_context(own)
    if f.stream == UNCONDITIONAL:
        assert uncond is not None
        positions = in_stream(positions, layout, uncond)
    return frozenset((f.stream, k) for k in positions)


def _check_plan(layout: GridLayout, window: int | None, uncond: int | None) -> int:
    """Drive one plan to its end; returns the number of inputs checked."""
    ctx = StaticContext(layout, window)
    plan = image_plan(layout, window, uncond)
    prompt = list(range(1000, 1000 + layout.prompt_len + (uncond or 0)))
    inputs = plan.prefill_inputs(prompt)
    checked = 0
    token = 0
    while inputs:
        history = plan.history
        start = len(history) - len(inputs)
        for i in range(start, len(history)):
            query = history[i]
            seen = [(k.stream, k.position) for j, k in enumerate(history) if visible(k, query, j, i)]
            assert len(seen) == len(set(seen)), f"{query} sees two tokens at one position"
            case = f"H={layout.height} W={layout.width} eol={layout.eol} window={window} uncond={uncond}"
            assert set(seen) == _expected(ctx, layout, uncond, query), f"{case}: {query}"
            checked += 1
        predicted = [f for f in inputs if f.predicts is not None and f.stream != UNCONDITIONAL]
        plan.record(list(range(token, token + len(predicted))))
        token += len(predicted)
        inputs = plan.next_inputs()
    assert plan.done
    return checked


def test_static_context_equals_the_feed_time_mask_over_random_plans():
    rng = random.Random(24)
    cases = [_random_case(rng) for _ in range(PLANS)]
    checked = sum(_check_plan(*case) for case in cases)
    # The sample covers every kind of plan: both layouts, NTP and windows, guided and not, proxies.
    assert {layout.eol for layout, _, _ in cases} == {False, True}
    assert {uncond is None for _, _, uncond in cases} == {False, True}
    assert any(w is None for _, w, _ in cases) and any(w is not None and w < lay.width for lay, w, _ in cases)
    assert checked > 10 * PLANS


@pytest.mark.parametrize("eol", [False, True])
def test_closed_form_rows_on_an_example(eol):
    # 4x6 grid, window 2: the predictor of (3, 1) sees 1 + (3 - r') * 2 leading cells of rows r' >= 1
    # (and of row 0 on EOL layouts), all of LlamaGen's row 0.
    layout = GridLayout(2, 4, 6, eol=eol, eol_token=EOL_TOKEN if eol else None)
    ctx = StaticContext(layout, 2)
    assert [ctx.row_limit(r, 3, 1) for r in range(3)] == [6, 5, 3]
    assert ctx.row_limit(0, 1, 0) == (2 if eol else 6)
    row_start = (layout.pos(1, 6), FeedKind.REAL) if eol else (layout.pos(1, 5), FeedKind.PROXY)
    assert ctx.predictor(2, 0) == row_start
    assert ctx.predictor(1, 0)[1] is FeedKind.REAL  # LlamaGen's row 1 starts from row 0's real last token
    assert StaticContext(layout, None).row_limit(1, 2, 0) == 6  # NTP sees every row above whole
