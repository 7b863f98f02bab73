"""EOL layouts (Emu3) in the ZipAR plan: row starts from the EOL token, pass counts, guided twin streams.

tests/zipar/test_plan.py already sweeps both layouts with tokens equal to their raster positions. This file
adds what it leaves out for EOL grids: arbitrary recorded tokens, longer prompts, the guided plan with an
unconditional prompt of another length (twin positions shifted by ``U - P``), and a pass-by-pass comparison
with the independent Emu3 oracle (tests/reference/emu3_decoders.py) on a tiny transformers Emu3.
"""

from __future__ import annotations

import random

import pytest

from tests.reference import decoders as llamagen_oracle
from tests.zipar.row_start_steps import simulate_zipar_steps
from vllm_zipar.zipar.guidance import CONDITIONAL, UNCONDITIONAL, GuidedPlan
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import FeedKind, ZipARPlan, zipar_steps

EOL = 7  # recorded tokens are drawn from 100..199, so every fed EOL is a row start or a bug
SIZES = range(1, 11)


def _expected_steps(H: int, W: int, window: int | None) -> int:
    if window is None or window >= W:
        return H * W
    return (H - 1) * window + W


def _drive(plan, prompt: list[int], rng: random.Random):
    """Run a plan to the end recording random tokens; returns (passes, {cell position: token})."""
    passes = [plan.prefill_inputs(prompt)]
    recorded = {}
    while True:
        predicting = [f for f in passes[-1] if f.predicts is not None and f.stream == CONDITIONAL]
        tokens = [rng.randrange(100, 200) for _ in predicting]
        recorded.update({f.predicts: t for f, t in zip(predicting, tokens, strict=True)})
        plan.record(tokens)
        if plan.done:
            return passes, recorded
        passes.append(plan.next_inputs())
        assert len(passes) <= plan.layout.num_cells, "more passes than NTP"


def _check_stream(layout: GridLayout, passes: list[list], recorded: dict, stream: int, shift: int, case: str):
    """EOL properties of one stream's inputs (positions mapped back by ``shift`` to the conditional ones)."""
    H, W, P = layout.height, layout.width, layout.prompt_len
    fed = [f for p in passes[1:] for f in p if f.stream == stream]
    positions = [f.position - shift for f in fed]
    assert len(positions) == len(set(positions)), f"{case}: a position fed twice in stream {stream}"
    starts = [f for f in fed if f.predicts is not None and layout.cell(f.predicts)[1] == 0]
    assert [(f.token, f.position - shift, f.kind, f.predicts) for f in starts] == [
        (EOL, layout.pos(r - 1, W), FeedKind.REAL, layout.pos(r, 0)) for r in range(1, H)
    ], f"{case}: row starts"
    assert sum(f.token == EOL for f in fed) == H - 1, case
    assert layout.pos(H - 1, W - 1) not in positions and layout.pos(H - 1, W) not in positions, case
    assert all(f.kind is not FeedKind.PROXY for f in fed), case
    for f, p in zip(fed, positions, strict=True):
        r, c = layout.cell(p)
        assert f.token == (EOL if c == W else recorded[p]), f"{case}: {f} carries a wrong token"
        if f.kind is FeedKind.KV_ONLY:
            assert c == W - 1 and f.predicts is None, case
        else:
            assert f.predicts == p + 1 + (c == W - 1), case  # the next cell; the EOL column is skipped
    expected = {layout.pos(r, c) for r in range(H) for c in range(W + 1)}
    assert set(positions) == expected - {layout.pos(H - 1, W - 1), layout.pos(H - 1, W)}, case
    assert P <= min(positions, default=P), case


def test_eol_plans_over_all_small_grids_windows_and_prompt_lengths():
    rng = random.Random(0)
    for H in SIZES:
        for W in SIZES:
            for window in [None, *range(1, W + 3)]:
                P, U = rng.randrange(1, 12), rng.randrange(1, 12)
                case = f"H={H} W={W} window={window} P={P} U={U}"
                layout = GridLayout(P, H, W, eol=True, eol_token=EOL)
                plain_passes, recorded = _drive(ZipARPlan(layout, window), [3] * P, random.Random(case))
                guided = GuidedPlan(layout, window, U)
                passes, guided_recorded = _drive(guided, [3] * P + [4] * U, random.Random(case))
                steps = _expected_steps(H, W, window)
                assert len(plain_passes) == len(passes) == guided.steps == steps, case
                assert steps == zipar_steps(H, W, window, True) == simulate_zipar_steps(H, W, window, True)
                oracle_window = W if window is None else window
                assert steps == llamagen_oracle.simulate_zipar_steps(H, W, oracle_window, eol=True), case
                assert recorded == guided_recorded and len(recorded) == H * W, case
                assert guided.grid() == [[recorded[layout.pos(r, c)] for c in range(W)] for r in range(H)]
                _check_stream(layout, plain_passes, recorded, CONDITIONAL, 0, case)
                _check_stream(layout, passes, recorded, CONDITIONAL, 0, case)
                _check_stream(layout, passes, recorded, UNCONDITIONAL, U - P, case)
                for step, (plain, mixed) in enumerate(zip(plain_passes, passes, strict=True)):
                    cond = [f for f in mixed if f.stream == CONDITIONAL]
                    twin = [f for f in mixed if f.stream == UNCONDITIONAL]
                    assert cond == plain, f"{case}: pass {step}"
                    if step == 0:
                        assert [f.position for f in twin] == list(range(U)), case
                        assert twin[-1].predicts == layout.pos(0, 0), case
                        continue
                    assert [(f.token, f.position - U + P, f.kind, f.predicts, f.step) for f in twin] == [
                        (f.token, f.position, f.kind, f.predicts, f.step) for f in cond
                    ], f"{case}: pass {step} twin"


@pytest.fixture(scope="module")
def emu3_reference():
    import torch

    from tests.reference.emu3_text import ReferenceEmu3
    from tests.reference.emu3_tiny import make_tiny_emu3

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ReferenceEmu3.from_hf(make_tiny_emu3(0))
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("H", "W", "window", "cfg", "sampling"),
    [
        (5, 4, 1, 1.0, {}),
        (5, 4, 2, 3.0, {}),
        (4, 5, 3, 3.0, {"temperature": 1.0, "top_k": 10, "seed": 5}),
        (3, 4, None, 3.0, {}),
    ],
)
def test_plan_reproduces_the_emu3_oracle_pass_by_pass(emu3_reference, H, W, window, cfg, sampling):
    """Drive the engine's plan with the tokens the independent oracle sampled: every pass feeds the same
    tokens at the same positions (both streams), with the same kinds and targets, and the counts agree."""
    from tests.reference.emu3_decoders import KV_ONLY, zipar_decode_eol
    from tests.reference.emu3_tiny import TINY_IDS as IDS

    prompt = IDS.image_prompt([1, 2, 3, 4, 5, 6], H, W)
    neg = IDS.image_prompt([30, 31], H, W) if cfg != 1.0 else None
    trace: list = []
    grid, steps = zipar_decode_eol(
        emu3_reference,
        prompt,
        H,
        W,
        W if window is None else window,
        eol_id=IDS.eol,
        visual=IDS.visual,
        negative_prompt_ids=neg,
        cfg_scale=cfg,
        _trace=trace,
        **sampling,
    )
    P = len(prompt)
    layout = GridLayout(P, H, W, eol=True, eol_token=IDS.eol)
    plan = ZipARPlan(layout, window) if neg is None else GuidedPlan(layout, window, len(neg))
    oracle_tokens = grid.tolist()
    inputs = plan.prefill_inputs(prompt + (neg or []))
    for k, entry in enumerate(trace):
        if k > 0:
            inputs = plan.next_inputs()
            cond = [f for f in inputs if f.stream == CONDITIONAL]
            assert [(f.token, f.position, f.kind is FeedKind.KV_ONLY, f.predicts) for f in cond] == [
                (f.token, f.pos, f.kind == KV_ONLY, None if f.target is None else layout.pos(*f.target))
                for f in entry["inputs"]
            ], f"pass {k}"
            if neg is not None:
                twin = [f.position for f in inputs if f.stream == UNCONDITIONAL]
                assert twin == entry["uncond_positions"], f"pass {k}"
        predicted = [layout.cell(f.predicts) for f in inputs if f.predicts is not None and f.stream == 0]
        assert predicted == list(entry["cells"]), f"pass {k}"
        plan.record([oracle_tokens[r][c] for r, c in predicted])
    assert plan.done and plan.steps == steps == zipar_steps(H, W, window, True)
    assert plan.grid() == oracle_tokens
