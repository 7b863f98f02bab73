"""The exact-draft oracle (``jacobi_decoders.py``) against sequential ZipAR-w, and DraftPlan against it.

Tiny random models (LlamaGen and the EOL model, 8x8): for windows 2, 4 and NTP, drafts L = 1, 2, 4, 8,
greedy and seeded, guided and not, the Jacobi decode must give the tokens of ``zipar_decode`` /
``zipar_decode_eol`` in no more passes (L = 0: the same passes). ``vllm_zipar.zipar.draft_plan.DraftPlan``,
fed the oracle's outputs, must choose the same inputs and the same mask every pass. A wrong finality rule
(a token whose value is final counts as final even when its context held a guess) changes tokens.
"""

from __future__ import annotations

import pytest
import torch

from vllm_zipar.zipar.draft_plan import DraftPlan
from vllm_zipar.zipar.layout import GridLayout
from vllm_zipar.zipar.plan import FeedKind

from .decoders import zipar_decode
from .emu3_decoders import zipar_decode_eol
from .emu3_text import ReferenceEmu3
from .emu3_tiny import TINY_IDS as IDS
from .emu3_tiny import make_tiny_emu3
from .jacobi_decoders import PROXY, emu3_logits, jacobi_decode, llamagen_logits, sampler
from .tiny import make_tiny_reference_model

H = W = 8
CLASS = 3
TEXT, NEG_TEXT = [1, 2, 3, 4, 5, 6], [30, 31, 32]
# (window, drafts, temperature, seed, guided): every window with every L, greedy and seeded, guided and not.
CASES = [
    (window, drafts, *sampling, guided)
    for window in (2, 4, W)
    for n, drafts in enumerate((1, 2, 4, 8))
    for sampling, guided in [(((0.0, None), (1.0, 11))[n % 2], n >= 2)]
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()  # tiny ops: intra-op threads only spin (see test_oracle.py)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llamagen():
    return make_tiny_reference_model(0)


@pytest.fixture(scope="module")
def emu3() -> ReferenceEmu3:
    return ReferenceEmu3.from_hf(make_tiny_emu3(0))


class PlannerCheck:
    """Drives a DraftPlan with the oracle's outputs and checks each pass's inputs and mask against it."""

    def __init__(self, layout: GridLayout, window: int, drafts: int, uncond: int | None, prompt: list[int]):
        self.plan = DraftPlan(layout, window, drafts, uncond)
        self.prompt = prompt
        self.index: list[int] = []  # oracle token -> planner history index

    def __call__(self, run, fed: list[int]) -> None:
        plan = self.plan
        if plan.steps == 0:
            plan.prefill_inputs(self.prompt)
            plan.record([run.prefill_output])
        inputs = plan.next_inputs()
        start = plan.num_fed - len(inputs)
        mine = [start + k for k, f in enumerate(inputs) if f.stream == 0]
        assert len(mine) == len(fed), f"pass {plan.steps}: planner feeds {len(mine)}, oracle {len(fed)}"
        history = plan.history
        for i, j in zip(fed, mine, strict=True):
            o, f = run.tokens[i], history[j]
            kind = FeedKind.PROXY if o.role == PROXY else FeedKind.REAL if o.predicts else FeedKind.KV_ONLY
            predicts = None if o.predicts is None else plan.layout.pos(*o.predicts)
            assert (f.token, f.position, f.kind, f.predicts, f.draft) == (
                o.token,
                o.pos,
                kind,
                predicts,
                o.draft,
            )
        self.index += mine
        # Only the new tokens' rows: a row never changes once fed (later tokens come in later passes).
        attend = run.trace[-1]["attend"]
        n = len(self.index)
        rows = range(n - len(fed), n)
        mask = torch.tensor([[plan.attends(self.index[a], self.index[b]) for b in range(n)] for a in rows])
        assert torch.equal(mask, attend[n - len(fed) :]), f"pass {plan.steps}: masks differ"
        plan.record([run.tokens[i].output for i in fed if run.tokens[i].predicts is not None])


def _llamagen(model, window, drafts, temperature, seed, guided, check=True, **hooks):
    cfg = 2.0 if guided else 1.0
    ref, ref_passes = zipar_decode(
        model, CLASS, H, W, window, temperature=temperature, seed=seed, cfg_scale=cfg
    )
    layout = GridLayout(1, H, W)
    prompt = [CLASS, 10] if guided else [CLASS]  # the planner only counts them: any ids
    checker = PlannerCheck(layout, window, drafts, 1 if guided else None, prompt) if check else None
    run = jacobi_decode(
        llamagen_logits(model, CLASS, cfg),
        sampler(temperature, seed),
        1,
        H,
        W,
        window,
        drafts,
        on_pass=checker,
        **hooks,
    )
    return ref, ref_passes, run, checker


def _emu3(model, window, drafts, temperature, seed, guided, check=True):
    cfg = 3.0 if guided else 1.0
    prompt, neg = IDS.image_prompt(TEXT, H, W), IDS.image_prompt(NEG_TEXT, H, W)
    kw = {"eol_id": IDS.eol, "visual": IDS.visual}
    ref, ref_passes = zipar_decode_eol(
        model,
        prompt,
        H,
        W,
        window,
        negative_prompt_ids=neg,
        cfg_scale=cfg,
        temperature=temperature,
        seed=seed,
        **kw,
    )
    layout = GridLayout(len(prompt), H, W, eol=True, eol_token=IDS.eol)
    checker = PlannerCheck(
        layout, window, drafts, len(neg) if guided else None, prompt + (neg if guided else [])
    )
    logits = emu3_logits(model, prompt, neg, cfg)
    run = jacobi_decode(
        logits,
        sampler(temperature, seed, visual=IDS.visual),
        len(prompt),
        H,
        W,
        window,
        drafts,
        eol_id=IDS.eol,
        on_pass=checker if check else None,
    )
    return ref, ref_passes, run, checker


def _check(ref, ref_passes, run, checker, drafts):
    assert torch.equal(run.grid, ref)
    assert run.passes <= ref_passes
    if drafts == 0:
        assert run.passes == ref_passes
    plan = checker.plan
    assert plan.done and plan.steps == run.passes and plan.grid() == ref.tolist()


@pytest.mark.parametrize("window, drafts, temperature, seed, guided", CASES + [(4, 0, 1.0, 5, True)])
def test_llamagen_drafts_give_zipars_tokens(llamagen, window, drafts, temperature, seed, guided):
    _check(*_llamagen(llamagen, window, drafts, temperature, seed, guided), drafts)


@pytest.mark.parametrize("window, drafts, temperature, seed, guided", CASES + [(2, 0, 0.0, None, True)])
def test_eol_drafts_give_zipars_tokens(emu3, window, drafts, temperature, seed, guided):
    _check(*_emu3(emu3, window, drafts, temperature, seed, guided), drafts)


def test_a_wrong_finality_rule_changes_tokens(llamagen):
    # Counting a token as final once its value is, although its context held a guess, accepts drafts
    # computed from wrong keys: the tokens leave sequential ZipAR's.
    ref, _, run, _ = _llamagen(llamagen, 4, 4, 1.0, 11, False, check=False, _accept_any_final_value=True)
    assert not torch.equal(run.grid, ref)
