"""ZipARPlan against ZIPAR.md §3-4, property-style over many grids and windows, and against the oracle.

Fake sampled tokens are the raster position of the cell they fill, so every fed token is checkable: a real
image token fed at position p must be p, a proxy carries the newest token of the row above.
"""

from __future__ import annotations

import pytest

from tests.reference import decoders as oracle
from tests.zipar.row_start_steps import simulate_zipar_steps
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import (
    FedInput,
    FeedKind,
    ZipARPlan,
    visible,
    zipar_steps,
)

EOL_TOKEN = 99_999
SIZES = range(1, 13)


def _layout(H: int, W: int, eol: bool, P: int = 1) -> GridLayout:
    return GridLayout(P, H, W, eol=eol, eol_token=EOL_TOKEN if eol else None)


def _windows(W: int):
    return [None, *range(1, W + 4)]


def _needed(r_above: int, W: int, window: int | None, eol: bool) -> int:
    """Tokens row ``r_above`` must hold before the next row starts (ZIPAR.md §3)."""
    if window is None or (r_above == 0 and not eol):
        return W
    return min(window, W)


def _drive(layout: GridLayout, window: int | None, tokens_for=None):
    """Run a plan to the end; returns (plan, passes), passes[k] = inputs of pass k (prefill = pass 0).

    ``tokens_for(pass_index, predicting_inputs)`` gives the sampled tokens; default: the predicted position.
    """
    plan = ZipARPlan(layout, window)
    prompt = [1000 + i for i in range(layout.prompt_len)]
    passes = [plan.prefill_inputs(prompt)]
    while True:
        inputs = passes[-1]
        predicting = [f for f in inputs if f.predicts is not None]
        sampled = [f.predicts for f in predicting] if tokens_for is None else tokens_for(len(passes) - 1)
        plan.record(sampled)
        if plan.done:
            break
        passes.append(plan.next_inputs())
        assert len(passes) <= layout.num_cells, "more passes than NTP"
    return plan, passes


def _check_run(H: int, W: int, window: int | None, eol: bool, P: int = 1, check_visibility: bool = False):
    """Every ZIPAR.md §3 property of one run, checked from the test's own bookkeeping."""
    case = f"H={H} W={W} window={window} eol={eol} P={P}"
    layout = _layout(H, W, eol, P)
    plan = ZipARPlan(layout, window)
    ntp = window is None or window >= W
    n = [0] * H  # the test's own count of sampled cells per row
    completed_at = [None] * H  # pass whose record completed the row
    grid = [[-1] * W for _ in range(H)]

    prefill = plan.prefill_inputs([7] * P)
    assert [(f.position, f.kind, f.predicts, f.step) for f in prefill] == [
        (i, FeedKind.REAL, P if i == P - 1 else None, 0) for i in range(P)
    ], case
    assert list(plan.rows_in_flight) == [0], case
    inputs = prefill
    step = 0
    while True:
        predicting = [f for f in inputs if f.predicts is not None]
        plan.record([f.predicts for f in predicting])
        for f in predicting:
            r, c = layout.cell(f.predicts)
            grid[r][c] = f.predicts
            n[r] += 1
            if n[r] == W:
                completed_at[r] = step
        assert list(plan.rows_in_flight) == [r for r in range(H) if 0 < n[r] < W], case
        assert plan.steps == step + 1, case
        if plan.done:
            break
        step += 1
        inputs = plan.next_inputs()
        assert plan.next_inputs() == inputs, f"{case}: next_inputs is not idempotent"
        assert inputs, f"{case}: empty pass {step} before the image is done"
        assert all(f.step == step for f in inputs), case
        positions = [f.position for f in inputs]
        assert positions == sorted(set(positions)), f"{case}: pass {step} not ordered by position"

        active = [r for r in range(H) if 0 < n[r] < W]
        first_unstarted = next((r for r in range(H) if n[r] == 0), None)
        should_start = (
            first_unstarted is not None
            and first_unstarted > 0
            and n[first_unstarted - 1] >= _needed(first_unstarted - 1, W, window, eol)
        )
        predicted_rows = []
        start_input = None
        for f in inputs:
            if f.kind is FeedKind.KV_ONLY:
                assert f.predicts is None, f"{case}: KV-only input predicts"
                continue
            assert f.predicts is not None, f"{case}: pass {step} feeds a non-predicting {f}"
            r, c = layout.cell(f.predicts)
            assert c < W and n[r] == c, f"{case}: pass {step} predicts {(r, c)} out of order"
            predicted_rows.append(r)
            if c > 0:  # an active row: its newest real token at its own position
                assert (f.kind, f.position, f.token) == (FeedKind.REAL, layout.pos(r, c - 1), grid[r][c - 1])
                continue
            start_input = f
            above = n[r - 1]
            # The row-start rule: the row above holds exactly the tokens it needed (first pass after).
            assert above == _needed(r - 1, W, window, eol), f"{case}: row {r} starts with n[{r - 1}]={above}"
            if not eol:
                assert r > 1 or above == W, f"{case}: row 1 starts before row 0 is complete"
            if eol:
                expected = (FeedKind.REAL, layout.pos(r - 1, W), EOL_TOKEN)
            elif above == W:
                expected = (FeedKind.REAL, layout.pos(r - 1, W - 1), grid[r - 1][W - 1])
            else:
                expected = (FeedKind.PROXY, layout.pos(r - 1, W - 1), grid[r - 1][above - 1])
            assert (f.kind, f.position, f.token) == expected, f"{case}: row {r} start input {f}"
        assert sorted(predicted_rows) == active + ([first_unstarted] if should_start else []), (
            f"{case}: pass {step} advances rows {predicted_rows}; active {active}, start {should_start}"
        )
        # Rows whose last token was sampled in the previous pass are written now, once.
        just_completed = [r for r in range(H) if completed_at[r] == step - 1]
        kv_only = [layout.cell(f.position)[0] for f in inputs if f.kind is FeedKind.KV_ONLY]
        fed_as_start = (
            [layout.cell(start_input.position)[0]]
            if start_input is not None and start_input.kind is FeedKind.REAL and not eol
            else []
        )
        assert sorted(kv_only + fed_as_start) == just_completed, f"{case}: pass {step} KV-only rows"
        for f in inputs:
            if f.kind is FeedKind.KV_ONLY:
                r, c = layout.cell(f.position)
                assert c == W - 1 and f.token == grid[r][W - 1], case
        if ntp:
            # NTP: one predicting input per pass, in raster order of the cells.
            k = step  # pass k predicts the k-th cell
            assert [f.predicts for f in predicting_of(inputs)] == [layout.pos(*divmod(k, W))], case
            if not eol:
                assert len(inputs) == 1, f"{case}: NTP pass {step} feeds {len(inputs)} inputs"

    # Step counts: the engine plan, the closed form, an independent simulation, and the oracle's two.
    expected_steps = zipar_steps(H, W, window, eol)
    assert plan.steps == expected_steps == simulate_zipar_steps(H, W, window, eol), case
    oracle_window = window if window is not None else W
    assert expected_steps == oracle.closed_form_steps(H, W, oracle_window, eol), case
    assert expected_steps == oracle.simulate_zipar_steps(H, W, oracle_window, eol), case
    if ntp:
        assert expected_steps == H * W, case
    assert plan.next_inputs() == [], case
    assert plan.grid() == grid == [[layout.pos(r, c) for c in range(W)] for r in range(H)], case
    assert list(plan.rows_in_flight) == [], case

    # History: every real token fed exactly once; proxies only at a position not yet real.
    history = plan.history
    real_positions = [f.position for f in history if f.kind is not FeedKind.PROXY]
    assert len(real_positions) == len(set(real_positions)), f"{case}: a real position fed twice"
    expected_real = set(range(P)) | {layout.pos(r, c) for r in range(H) for c in range(W)}
    expected_real -= {layout.pos(H - 1, W - 1)}  # the last sampled token is never fed back
    if eol:
        expected_real |= {layout.pos(r, W) for r in range(H - 1)}
    assert set(real_positions) == expected_real, case
    real_step = {f.position: f.step for f in history if f.kind is not FeedKind.PROXY}
    for f in history:
        if f.kind is FeedKind.PROXY:
            assert not eol, case
            assert real_step[f.position] > f.step, f"{case}: proxy {f} at a position already real"
        if f.kind is not FeedKind.PROXY and f.position >= P:
            r, c = layout.cell(f.position)
            assert f.token == (EOL_TOKEN if c == W else f.position), case
    if check_visibility:
        for i, key in enumerate(history):
            if key.kind is FeedKind.PROXY:
                for j, query in enumerate(history):
                    assert visible(key, query, i, j) == (i == j), f"{case}: proxy {key} visible to {query}"
    return plan


def predicting_of(inputs: list[FedInput]) -> list[FedInput]:
    return [f for f in inputs if f.predicts is not None]


@pytest.mark.parametrize("eol", [False, True])
def test_properties_over_all_small_grids_and_windows(eol):
    for H in SIZES:
        for W in SIZES:
            for window in _windows(W):
                _check_run(H, W, window, eol, check_visibility=H <= 6 and W <= 6)


@pytest.mark.parametrize("eol", [False, True])
def test_longer_prompts(eol):
    for H, W, window in [(3, 4, 2), (5, 5, 1), (4, 6, None), (6, 3, 3)]:
        _check_run(H, W, window, eol, P=120, check_visibility=True)


@pytest.mark.parametrize(
    ("H", "W", "window", "eol", "steps"),
    [
        (24, 24, 16, False, 400),
        (24, 24, 12, False, 312),
        (24, 24, 8, False, 224),
        (24, 24, None, False, 576),
        (24, 24, 24, False, 576),
        (16, 16, None, False, 256),
        (90, 90, 8, True, 802),
        (90, 90, None, True, 8100),
    ],
)
def test_paper_step_counts(H, W, window, eol, steps):
    assert zipar_steps(H, W, window, eol) == steps
    assert simulate_zipar_steps(H, W, window, eol) == steps
    plan, passes = _drive(_layout(H, W, eol), window)
    assert plan.steps == len(passes) == steps
    assert plan.grid() == [[_layout(H, W, eol).pos(r, c) for c in range(W)] for r in range(H)]


@pytest.mark.parametrize("eol", [False, True])
def test_window_at_least_width_is_ntp_exactly(eol):
    for H in (1, 2, 5):
        for W in (1, 3, 7):
            _, ntp = _drive(_layout(H, W, eol), None)
            for window in range(W, W + 4):
                _, passes = _drive(_layout(H, W, eol), window)
                assert passes == ntp, (H, W, window, eol)


def test_llamagen_ntp_feeds_the_raster_sequence():
    layout = _layout(4, 5, False)
    _, passes = _drive(layout, None)
    after_prefill = [(f.token, f.position, f.kind, f.predicts) for p in passes[1:] for f in p]
    assert after_prefill == [(p, p, FeedKind.REAL, p + 1) for p in range(1, 20)]


def test_visible_is_the_oracle_mask():
    """`visible` over a whole fed history equals the oracle's `zipar_mask` (with feed time)."""
    for H, W, window, eol in [(5, 6, 2, False), (6, 4, 1, False), (4, 5, 3, True), (3, 3, None, False)]:
        plan, _ = _drive(_layout(H, W, eol), window)
        history = plan.history
        mask = oracle.zipar_mask(
            [f.position for f in history],
            [f.step for f in history],
            [f.kind is FeedKind.PROXY for f in history],
        )
        ours = [[visible(k, q, j, i) for j, k in enumerate(history)] for i, q in enumerate(history)]
        assert mask.tolist() == ours, (H, W, window, eol)


def _oracle_plan_run(H: int, W: int, window: int):
    """The oracle's `plan_llamagen_pass`, driven the way `zipar_decode` drives it, with fake tokens."""
    import torch

    P = 1
    tokens = torch.full((H, W), -1, dtype=torch.long)
    n = [0] * H
    kv_written = [False] * H
    passes = []
    step = 0
    while min(n) < W:
        if step == 0:
            inputs = []
            targets = [(0, 0)]
        else:
            inputs = oracle.plan_llamagen_pass(step, n, W, window, P, tokens, kv_written)
            targets = [f.target for f in inputs if f.target is not None]
        for r, c in targets:
            tokens[r, c] = P + r * W + c
            n[r] += 1
        for f in inputs:
            if f.kind != oracle.PROXY and (f.pos - P) % W == W - 1:
                kv_written[(f.pos - P) // W] = True
        passes.append(inputs)
        step += 1
    return passes


def test_feed_plan_equals_the_oracle_plan():
    for H in range(1, 9):
        for W in range(1, 9):
            for window in range(1, W + 2):
                layout = _layout(H, W, False)
                _, ours = _drive(layout, window)
                theirs = _oracle_plan_run(H, W, window)
                assert len(ours) == len(theirs), (H, W, window)
                for step, (mine, ref) in enumerate(zip(ours[1:], theirs[1:], strict=True), start=1):
                    a = [(f.token, f.position, f.kind.value, f.predicts) for f in mine]
                    b = [
                        (f.token, f.pos, f.kind, None if f.target is None else layout.pos(*f.target))
                        for f in ref
                    ]
                    assert a == b, f"H={H} W={W} window={window} pass {step}: ours {a} oracle {b}"


@pytest.mark.parametrize(("H", "W", "window"), [(8, 8, 2), (5, 7, 3), (6, 6, 6)])
def test_plan_reproduces_the_oracle_decode_trace(H, W, window):
    """Drive the plan with the tokens the oracle sampled: the same inputs, tokens and pass count."""
    import torch

    from tests.reference.tiny import make_tiny_reference_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_tiny_reference_model(0)
        trace: list = []
        tokens, steps = oracle.zipar_decode(model, 3, H, W, window, _trace=trace)
    finally:
        torch.set_num_threads(before)
    layout = _layout(H, W, False)
    oracle_tokens = tokens.tolist()

    def sampled(step):
        return [oracle_tokens[r][c] for r, c in trace[step]["logits"]]

    plan, passes = _drive(layout, window, tokens_for=sampled)
    assert plan.steps == steps == len(passes) == zipar_steps(H, W, window, False)
    assert plan.grid() == oracle_tokens
    for step, (mine, entry) in enumerate(zip(passes[1:], trace[1:], strict=True), start=1):
        a = [(f.token, f.position, f.kind.value, f.predicts) for f in mine]
        b = [
            (f.token, f.pos, f.kind, None if f.target is None else layout.pos(*f.target))
            for f in entry["inputs"]
        ]
        assert a == b, f"pass {step}: ours {a} oracle {b}"
        # The oracle samples targets in input order too.
        assert [layout.cell(f.predicts) for f in predicting_of(mine)] == list(entry["logits"])


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_invalid_windows_raise_naming_the_value_and_range(bad):
    for call in (
        lambda: ZipARPlan(_layout(4, 4, False), bad),
        lambda: zipar_steps(4, 4, bad, False),
        lambda: simulate_zipar_steps(4, 4, bad, True),
    ):
        with pytest.raises(ValueError, match=r"window=.*>= 1") as info:
            call()
        assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_numpy_style_integer_windows_are_accepted():
    class IndexLike:
        def __index__(self) -> int:
            return 3

    assert ZipARPlan(_layout(4, 4, False), IndexLike()).window == 3


def test_misuse_raises():
    layout = _layout(3, 3, False, P=2)
    plan = ZipARPlan(layout, 2)
    with pytest.raises(RuntimeError, match="prefill_inputs"):
        plan.next_inputs()
    with pytest.raises(RuntimeError, match="record"):
        plan.record([1])
    with pytest.raises(ValueError, match="prompt has 1 tokens, the layout says prompt_len=2"):
        plan.prefill_inputs([5])
    plan.prefill_inputs([5, 6])
    with pytest.raises(RuntimeError, match="once"):
        plan.prefill_inputs([5, 6])
    with pytest.raises(ValueError, match="predicts 1 cells, got 2 tokens"):
        plan.record([1, 2])
    with pytest.raises(ValueError, match="must be >= 0"):
        plan.record([-1])
    with pytest.raises(ValueError, match="must be an int"):
        plan.record([1.5])
    plan.record([4])
    assert plan.grid()[0] == [4, -1, -1]
    with pytest.raises(ValueError, match="must be a GridLayout"):
        ZipARPlan((1, 3, 3), 2)  # type: ignore[arg-type]


def test_rows_in_flight_counts_the_starting_row_while_its_pass_is_in_flight():
    layout = _layout(4, 4, True)
    plan = ZipARPlan(layout, 2)
    plan.prefill_inputs([0])
    plan.record([5])
    assert list(plan.rows_in_flight) == [0]
    inputs = plan.next_inputs()  # row 0 has 1 token: no start yet
    plan.record([0] * len(predicting_of(inputs)))
    inputs = plan.next_inputs()  # row 0 has 2 >= window: row 1 starts with the EOL token
    assert list(plan.rows_in_flight) == [0, 1]
    assert [(f.kind, f.position, f.token) for f in inputs if f.predicts == layout.pos(1, 0)] == [
        (FeedKind.REAL, layout.pos(0, 4), EOL_TOKEN)
    ]


def test_visible_needs_position_feed_time_and_a_real_key():
    query = FedInput(0, 10, FeedKind.REAL, 11, 5)
    assert visible(FedInput(0, 10, FeedKind.REAL, 11, 5), query, 0, 1)  # same pass, same position
    assert visible(FedInput(0, 3, FeedKind.KV_ONLY, None, 2), query, 0, 1)
    assert not visible(FedInput(0, 11, FeedKind.REAL, 12, 5), query, 0, 1)  # a later cell
    assert not visible(FedInput(0, 4, FeedKind.REAL, 5, 6), query, 0, 1)  # fed after the query's pass
    assert not visible(FedInput(0, 9, FeedKind.PROXY, 20, 5), query, 0, 1)  # someone else's proxy
    proxy = FedInput(0, 9, FeedKind.PROXY, 20, 5)
    assert visible(proxy, proxy, 3, 3)  # a proxy attends to itself
