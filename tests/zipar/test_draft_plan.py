"""DraftPlan (exact drafts, docs/exact_drafts.md) against ZipARPlan with a pure-Python stand-in model.

The stand-in is a transformer with a KV cache reduced to its dependency structure: a fed token's state is a
hash of its id, its position and the states of the keys it attends (fixed when it is fed, as keys and
values are), and a predicting input's output is a hash of its state (both streams' under guidance) and the
predicted cell's position, modulo a small vocabulary so that drafts are often right and the acceptance
paths run. Sequential ZipAR (``plan.visible``) and the draft plan (``DraftPlan.attends``) must then give the
same tokens, the draft plan in no more passes; with no drafts, the very same passes.
"""

from __future__ import annotations

import random

import pytest

from vllm_zipar.zipar.draft_plan import DraftPlan
from vllm_zipar.zipar.guidance import image_plan
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import visible, zipar_steps

EOL_TOKEN = 7


class HashModel:
    """Keys and values as hashes: ``state(i) = hash(token, position, sorted states of what i attends)``."""

    def __init__(self, vocab: int, salt: int) -> None:
        self.vocab, self.salt = vocab, salt
        self.states: list[int] = []

    def feed(self, history, attends) -> None:
        """Compute the states of the tokens fed since the last call (their keys precede them or share
        their pass; a pass's keys are computed in position order, and a key sits at or below its query)."""
        new = range(len(self.states), len(history))
        self.states.extend([0] * len(new))
        for i in sorted(new, key=lambda i: (history[i].stream, history[i].position, history[i].kind.value)):
            keys = sorted(self.states[j] for j in range(len(history)) if j != i and attends(i, j))
            f = history[i]
            self.states[i] = hash((self.salt, f.token, f.position, tuple(keys)))

    def outputs(self, history, start: int) -> list[int]:
        """One token per conditional predicting input of the pass starting at ``start``."""
        cond = [
            i
            for i in range(start, len(history))
            if history[i].predicts is not None and history[i].stream == 0
        ]
        uncond = [
            i for i in range(start, len(history)) if history[i].predicts is not None and history[i].stream
        ]
        out = []
        for n, i in enumerate(cond):
            guide = self.states[uncond[n]] if uncond else 0
            out.append(hash((self.salt, self.states[i], guide, history[i].predicts)) % self.vocab)
        return out


def run(plan, prompt, model: HashModel, attends):
    """Drive a plan to its end; returns the per-pass inputs."""
    passes = [plan.prefill_inputs(prompt)]
    while True:
        history = plan.history
        model.feed(history, lambda i, j, h=history: attends(plan, h, i, j))
        plan.record(model.outputs(history, len(history) - len(passes[-1])))
        if plan.done:
            return passes
        passes.append(plan.next_inputs())
        assert len(passes) <= plan.layout.num_cells + 1


def zipar_attends(plan, history, i, j):
    return visible(history[j], history[i], j, i)


def draft_attends(plan, history, i, j):
    return plan.attends(i, j)


def _case(rng: random.Random):
    H, W = rng.randint(1, 7), rng.randint(1, 7)
    eol = rng.random() < 0.5
    layout = GridLayout(rng.randint(1, 3), H, W, eol=eol, eol_token=EOL_TOKEN if eol else None)
    return layout, rng.choice([None, *range(1, W + 2)]), rng.choice([None, rng.randint(1, 3)])


def _zipar(layout, window, uncond, vocab, salt):
    plan = image_plan(layout, window, uncond)
    prompt = list(range(100, 100 + layout.prompt_len + (uncond or 0)))
    passes = run(plan, prompt, HashModel(vocab, salt), zipar_attends)
    return plan, passes, prompt


def test_without_drafts_the_passes_are_zipars():
    rng = random.Random(0)
    for case in range(120):
        layout, window, uncond = _case(rng)
        plan, passes, prompt = _zipar(layout, window, uncond, 1 << 20, case)
        draft = DraftPlan(layout, window, 0, uncond)
        draft_passes = run(draft, prompt, HashModel(1 << 20, case), draft_attends)
        strip = [
            [(f.token, f.position, f.kind, f.predicts, f.step, f.stream) for f in p] for p in draft_passes
        ]
        assert strip == [
            [(f.token, f.position, f.kind, f.predicts, f.step, f.stream) for f in p] for p in passes
        ]
        assert draft.grid() == plan.grid()
        assert draft.stats.drafts == draft.stats.superseded == draft.stats.accepted == 0


@pytest.mark.parametrize("drafts", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("vocab", [2, 5])
def test_drafts_give_zipars_tokens_in_no_more_passes(drafts, vocab):
    rng = random.Random(drafts * 100 + vocab)
    fewer = accepted = superseded = 0
    for case in range(40):
        layout, window, uncond = _case(rng)
        plan, passes, prompt = _zipar(layout, window, uncond, vocab, case)
        draft = DraftPlan(layout, window, drafts, uncond)
        draft_passes = run(draft, prompt, HashModel(vocab, case), draft_attends)
        where = f"case {case}: {layout}, window={window}, uncond={uncond}"
        assert draft.grid() == plan.grid(), where
        assert (
            len(draft_passes) <= len(passes) == zipar_steps(layout.height, layout.width, window, layout.eol)
        )
        # No pass feeds more than L drafts per chain, nor two real tokens at one position of a stream.
        for p in draft_passes[1:]:
            real = [(f.stream, f.position) for f in p if f.kind.value != "proxy"]
            assert len(real) == len(set(real)), where
            assert sum(f.draft for f in p if f.stream == 0) <= drafts * layout.height
        fewer += len(draft_passes) < len(passes)
        accepted += draft.stats.accepted
        superseded += draft.stats.superseded
    assert fewer and accepted and superseded  # the drafts did something, and cost KV slots


def test_a_wrong_guess_is_superseded_and_a_right_one_accepted():
    # NTP on one 1x4 row, vocab 1: every output is 0, so the first guesses (the cell to the left, 0) are
    # right and one draft pass settles the row: prefill, then one pass with (0,0) final + 2 drafts.
    layout = GridLayout(1, 1, 4)
    plan = DraftPlan(layout, None, 2)
    first = plan.prefill_inputs([5])
    assert [f.position for f in first] == [0]
    plan.record([0])
    inputs = plan.next_inputs()
    assert [(f.position, f.draft, f.token) for f in inputs] == [(1, False, 0), (2, True, 0), (3, True, 0)]
    plan.record([0, 0, 0][: sum(f.predicts is not None for f in inputs)])
    assert plan.done and plan.grid() == [[0, 0, 0, 0]] and plan.steps == 2
    assert plan.stats.accepted == 2 and plan.stats.superseded == 0

    # Same row, but the model says 1 for (0, 1): the draft there (guess 0) is wrong, so the outputs after
    # it are guesses; the next pass re-feeds (0, 1) with its final value and (0, 2) with the new guess,
    # superseding both drafts (two dead KV slots).
    plan = DraftPlan(layout, None, 2)
    plan.prefill_inputs([5])
    plan.record([0])
    plan.next_inputs()
    plan.record([1, 0, 0])  # (0,1) <- 1, final; (0,2) <- 0, a guess: its query's token 0 was not (0,1)'s 1
    assert plan.grid() == [[0, 1, -1, -1]] and not plan.done
    again = plan.next_inputs()
    assert [(f.position, f.draft, f.token) for f in again] == [(2, False, 1), (3, True, 0)]
    assert plan.stats.superseded == 2 and plan.stats.accepted == 0
    plan.record([0, 3])  # (0,2) <- 0 final; the draft 0 at (0,2) is right, so (0,3) <- 3 is final too
    assert plan.done and plan.grid() == [[0, 1, 0, 3]] and plan.stats.accepted == 1
