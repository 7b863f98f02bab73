"""DraftPlan under a sequence-length cap (the engine's ``max_model_len``) and a per-pass token budget.

The engine cannot let an image's KV sequence outgrow ``max_model_len`` (vLLM would end the request), so it
hands ``next_inputs`` the slots left (``kv_room``) and its token budget (``pass_room``); the plan cuts drafts
so that finishing without them always fits (``tokens_to_finish``). Cutting drafts must never change a token
or add a pass beyond ZipAR-w's, and ``tokens_to_finish`` must bound what a draft-free continuation feeds
from any state. Same hash stand-in model as ``test_draft_plan.py``.
"""

from __future__ import annotations

import random

import pytest

from vllm_zipar.zipar.draft_plan import DraftPlan
from vllm_zipar.zipar.plan import zipar_steps

from .test_draft_plan import HashModel, _case, _zipar, draft_attends


def _drive(
    plan: DraftPlan,
    prompt: list[int],
    model: HashModel,
    *,
    cap: int | None,
    budget: int | None,
    drafts_off_at: int | None = None,
) -> list[int]:
    """Run to the end; returns ``tokens_to_finish()`` at pass ``drafts_off_at`` and the tokens fed after
    it (drafts switched off from then on), or [] when ``drafts_off_at`` is None."""
    inputs = plan.prefill_inputs(prompt)
    checked: list[int] = []
    fed_at_switch = 0
    while True:
        history = plan.history
        model.feed(history, lambda i, j, h=history: draft_attends(plan, h, i, j))
        plan.record(model.outputs(history, len(history) - len(inputs)))
        if drafts_off_at is not None and plan.steps == drafts_off_at:
            checked = [plan.tokens_to_finish()]
            fed_at_switch = plan.num_fed
            plan.drafts = 0
        if plan.done:
            break
        room = None if cap is None else cap - plan.num_fed
        inputs = plan.next_inputs(kv_room=room, pass_room=budget)
        if budget is not None:
            assert len(inputs) <= budget
        if cap is not None:
            assert plan.num_fed <= cap
    if checked:
        checked.append(plan.num_fed - fed_at_switch)
    return checked


@pytest.mark.parametrize("drafts", [1, 3, 8])
def test_a_tight_cap_cuts_drafts_never_tokens(drafts):
    rng = random.Random(drafts)
    cut = 0
    for case in range(60):
        layout, window, uncond = _case(rng)
        zipar, passes, prompt = _zipar(layout, window, uncond, 3, case)
        needed = zipar.num_fed  # what plain ZipAR feeds: the least a cap may leave
        for slack in (0, 3, 10):
            plan = DraftPlan(layout, window, drafts, uncond)
            _drive(plan, prompt, HashModel(3, case), cap=needed + slack, budget=None)
            where = f"case {case}: {layout}, window={window}, uncond={uncond}, slack={slack}"
            assert plan.grid() == zipar.grid(), where
            assert plan.num_fed <= needed + slack, where
            assert plan.steps <= zipar_steps(layout.height, layout.width, window, layout.eol), where
            unlimited = DraftPlan(layout, window, drafts, uncond)
            _drive(unlimited, prompt, HashModel(3, case), cap=None, budget=None)
            cut += unlimited.num_fed > plan.num_fed
    assert cut  # the cap did bite


def test_a_small_pass_budget_cuts_drafts_never_tokens():
    rng = random.Random(7)
    for case in range(60):
        layout, window, uncond = _case(rng)
        zipar, _, prompt = _zipar(layout, window, uncond, 3, case)
        streams = 2 if uncond else 1
        budget = streams * (layout.height + 1)  # draft-free passes feed one token per chain (+ an EOL)
        plan = DraftPlan(layout, window, 4, uncond)
        _drive(plan, prompt, HashModel(3, case), cap=None, budget=budget)
        assert plan.grid() == zipar.grid(), case


@pytest.mark.parametrize("drafts", [2, 6])
def test_tokens_to_finish_bounds_a_draft_free_continuation(drafts):
    rng = random.Random(100 + drafts)
    tight = 0
    for case in range(80):
        layout, window, uncond = _case(rng)
        zipar, _, prompt = _zipar(layout, window, uncond, 2, case)
        switch = rng.randint(1, max(1, zipar.steps - 1))
        plan = DraftPlan(layout, window, drafts, uncond)
        checked = _drive(plan, prompt, HashModel(2, case), cap=None, budget=None, drafts_off_at=switch)
        assert plan.grid() == zipar.grid(), case
        if checked:
            bound, fed = checked
            assert fed <= bound, f"case {case}: {layout}, window={window}: fed {fed} > bound {bound}"
            tight += fed == bound
    assert tight  # the bound is met exactly somewhere (e.g. NTP, where nothing stalls)
