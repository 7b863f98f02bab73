"""An independent pass count for the plan's tests: the row-start rules of ZIPAR.md §3 played alone.

Test-only (it moved here from `zipar/plan.py`): `ZipARPlan` and `zipar_steps` are checked against it, so it
shares nothing with them but the window check.
"""

from __future__ import annotations

from vllm_zipar.zipar.plan import check_window


def simulate_zipar_steps(H: int, W: int, window: int | None, eol: bool) -> int:
    """Count passes by playing only the row-start rules of ZIPAR.md §3 on per-row counts.

    Pass 0 (prefill) starts row 0; in each later pass every started, incomplete row decodes one cell and
    row r+1 decodes its first cell if, after the previous pass, ``n[r] >= window`` (row 0 complete first
    without EOL). Deliberately naive (O(H) per pass), independent of ``ZipARPlan``.
    """
    for name, value in (("H", H), ("W", W)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    w = check_window(window)
    w = W if w is None else min(w, W)
    n = [0] * H
    passes = 0
    while min(n) < W:
        before = list(n)
        if passes == 0:
            n[0] = 1
        for r in range(H):
            if passes > 0 and 0 < before[r] < W:
                n[r] += 1
            if passes > 0 and r + 1 < H and before[r + 1] == 0:
                needed = W if (r == 0 and not eol) else w
                if before[r] >= needed:
                    n[r + 1] = 1
        passes += 1
    return passes
