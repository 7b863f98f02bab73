"""Tests of the Janus-Pro reference oracle against transformers' own Janus and against ZIPAR.md.

A tiny random float32 ``JanusForConditionalGeneration`` is built in memory; prompts are plain id lists laid
out like ``JanusProcessor(..., generation_mode="image")`` (BOS, text, ``<begin_of_image>``). transformers'
``generate(generation_mode="image")`` is the NTP ground truth, guided as it is and unguided through a logits
processor keeping the conditional half of its doubled batch (see ``janus_hf.py``); transformers' KV cache
with a custom 4D mask is the ground truth for the ZipAR passes, proxies included.
"""

from __future__ import annotations

import pytest
import torch

from vllm_zipar.zipar.plan import zipar_steps

from .decoders import closed_form_steps, simulate_zipar_steps
from .janus_decoders import (
    KV_ONLY,
    PROXY,
    REAL,
    janus_ntp_decode,
    janus_teacher_forced_gaps,
    janus_zipar_decode,
)
from .janus_hf import hf_generate_janus_image
from .janus_model import ReferenceJanus, reference_from_hf_dir
from .janus_tiny import TINY_IDS as IDS
from .janus_tiny import make_tiny_janus
from .sampling import sample_cell

TEXT = [1, 2, 3, 4, 5]
CFG = 5.0
SHAPES = [(4, 4), (5, 3), (3, 6)]  # generate() makes square grids only; the oracle takes any H x W


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny ops: intra-op threads only spin on the shared 2-core machine (see test_oracle.py).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf():
    return make_tiny_janus(2)


@pytest.fixture(scope="module")
def ref(hf) -> ReferenceJanus:
    return ReferenceJanus.from_hf(hf)


def _prompts() -> tuple[list[int], list[int]]:
    prompt = IDS.image_prompt(TEXT)
    return prompt, IDS.unconditional_prompt(prompt)


def _hf_causal(
    hf, prompt: list[int], codes: list[int], position_ids=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' hidden states and image logits over ``prompt + codes`` embedded as generate() does."""
    with torch.no_grad():
        embeds = torch.cat(
            [
                hf.get_input_embeddings()(torch.tensor(prompt)),
                hf.prepare_embeddings_for_image_generation(torch.tensor(codes)),
            ]
        )
        hidden = hf.model.language_model(
            inputs_embeds=embeds[None], position_ids=position_ids
        ).last_hidden_state[0]
        return hidden, hf.model.generation_head(hidden)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
def test_forward_equals_transformers_on_causal_sequences(hf, ref):
    prompt = IDS.image_prompt(TEXT)
    codes = [3, 7, 11, 40, 0, 47, 5, 1, 2, 3]  # codes < 6 are also prompt text ids: routing must differ
    ids = prompt + codes
    is_image = [False] * len(prompt) + [True] * len(codes)
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    theirs_hidden, theirs = _hf_causal(hf, prompt, codes)
    gapped_pos = [p + 7 * (p >= n // 2) for p in range(n)]  # RoPE is relative: a gap changes the logits
    _, gapped = _hf_causal(hf, prompt, codes, position_ids=torch.tensor([gapped_pos]))
    ours_hidden = ref.hidden_states(ids, is_image, list(range(n)), causal)
    ours = ref.forward_tokens(ids, is_image, list(range(n)), causal)
    assert ours.dtype == torch.float32 and ours.shape == (n, IDS.codebook)
    # Measured: hidden states 1.7e-5 off at magnitude 3.3, logits 5.5e-5 off at magnitude 13 (~5e-6 relative).
    assert (ours_hidden - theirs_hidden).abs().max() < 2e-5 * theirs_hidden.abs().max()
    assert (ours - theirs).abs().max() < 2e-5 * theirs.abs().max()
    assert (ref.forward_tokens(ids, is_image, gapped_pos, causal) - gapped).abs().max() < 1e-4
    assert (ours - gapped).abs().max() > 1e-2  # positions matter
    as_text = ref.forward_tokens(ids, [False] * n, list(range(n)), causal)
    assert (ours[len(prompt) :] - as_text[len(prompt) :]).abs().max() > 1e-1  # codes are not text ids
    assert ref.config.num_kv_heads == 1 < ref.config.num_heads  # GQA exercised


def test_forward_equals_transformers_with_two_kv_groups():
    """4 query heads over 2 KV heads: query head h must read KV head h // 2 (1 KV head cannot show it)."""
    hf = make_tiny_janus(1, num_attention_heads=4, num_key_value_heads=2)
    ref = ReferenceJanus.from_hf(hf)
    prompt, codes = IDS.image_prompt(TEXT), [9, 8, 7, 6, 30, 31]
    n = len(prompt) + len(codes)
    ours = ref.forward_tokens(
        prompt + codes,
        [False] * len(prompt) + [True] * len(codes),
        list(range(n)),
        torch.ones(n, n, dtype=torch.bool).tril(),
    )
    assert ref.config.head_dim == 16 and ref.config.num_kv_heads == 2
    assert (ours - _hf_causal(hf, prompt, codes)[1]).abs().max() < 1e-4


def test_forward_rejects_bad_inputs(ref):
    with pytest.raises(ValueError, match="want"):
        ref.forward_tokens([1, 2], [False, True], [0, 1], torch.ones(2, 2))
    with pytest.raises(ValueError, match="allows no key"):
        ref.forward_tokens([1, 2], [False, True], [0, 1], torch.tensor([[True, False], [False, False]]))
    eye = torch.eye(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="image codes outside"):
        ref.forward_tokens([IDS.codebook], [True], [0], eye)
    with pytest.raises(ValueError, match="text ids outside"):
        ref.forward_tokens([IDS.vocab_size], [False], [0], eye)


# ----------------------------------------------------------------------------------------------------------
# NTP against transformers' generate(generation_mode="image")
# ----------------------------------------------------------------------------------------------------------
def _hf_generate(hf, prompt: list[int], side: int, cfg: float, capture: list | None = None) -> torch.Tensor:
    return hf_generate_janus_image(
        hf,
        prompt,
        side,
        bos_id=IDS.bos,
        pad_id=IDS.pad,
        boi_id=IDS.boi,
        guidance_scale=cfg,
        capture_prefill=capture,
    )


def test_unconditional_prompt_is_the_one_generate_builds(hf):
    prompt = [IDS.bos, 7, IDS.bos, 8, 9, IDS.boi, 4, IDS.boi]  # BOS and BOI kept wherever they stand
    captured: list = []
    _hf_generate(hf, prompt, 2, CFG, captured)
    uncond = IDS.unconditional_prompt(prompt)
    assert uncond == [IDS.bos, IDS.pad, IDS.bos, IDS.pad, IDS.pad, IDS.boi, IDS.pad, IDS.boi]
    with torch.no_grad():
        expected = hf.get_input_embeddings()(torch.tensor([prompt, uncond]))
    assert torch.equal(captured[0], expected)


@pytest.mark.parametrize("cfg", [1.0, CFG])
@pytest.mark.parametrize("side", [4, 5])
def test_ntp_greedy_equals_transformers_generate(hf, ref, side, cfg):
    prompt, uncond = _prompts()
    generated = _hf_generate(hf, prompt, side, cfg)
    codes, passes = janus_ntp_decode(ref, prompt, uncond, side, side, cfg_scale=cfg)
    assert passes == side * side
    # Exact (measured: every code, both sides, with and without CFG).
    assert torch.equal(codes, generated)
    assert codes.unique().numel() >= side * side // 2  # not collapsed (measured 11 to 18 distinct codes)
    # The teacher-forced verdict (ZIPAR.md §6) on generate()'s codes agrees.
    assert janus_teacher_forced_gaps(ref, prompt, uncond, generated, side, cfg_scale=cfg).max() < 1e-3


def test_guidance_changes_the_image(ref):
    prompt, uncond = _prompts()
    plain, _ = janus_ntp_decode(ref, prompt, None, 4, 4)
    guided, _ = janus_ntp_decode(ref, prompt, uncond, 4, 4, cfg_scale=CFG)
    assert (plain != guided).sum() > 0
    with pytest.raises(ValueError, match="needs uncond_prompt_ids"):
        janus_ntp_decode(ref, prompt, None, 4, 4, cfg_scale=CFG)


# ----------------------------------------------------------------------------------------------------------
# ZipAR
# ----------------------------------------------------------------------------------------------------------
SAMPLINGS = [
    {"temperature": 0.0},
    {"temperature": 1.0, "top_k": 0, "seed": 11},
    {"temperature": 1.0, "top_k": 0, "seed": 12},
    {"temperature": 1.0, "top_k": 10, "top_p": 0.9, "seed": 11},
]


@pytest.mark.parametrize("cfg", [1.0, CFG])
@pytest.mark.parametrize(("H", "W"), SHAPES)
def test_window_at_least_width_is_ntp(ref, H, W, cfg):
    prompt, uncond = _prompts()
    for sampling in SAMPLINGS[:2] + SAMPLINGS[3:]:
        ntp, ntp_passes = janus_ntp_decode(ref, prompt, uncond, H, W, cfg_scale=cfg, **sampling)
        assert ntp_passes == H * W
        for window in (W, W + 1):
            codes, passes = janus_zipar_decode(ref, prompt, uncond, H, W, window, cfg_scale=cfg, **sampling)
            assert torch.equal(codes, ntp), (window, sampling)
            assert passes == H * W


def test_small_windows_pass_counts_change_tokens_and_are_deterministic(ref):
    prompt, uncond = _prompts()
    changed = {}  # (window, sampling index) -> cells that differ from NTP, over the shapes and CFG settings
    for H, W in SHAPES:
        for cfg in (1.0, CFG):
            for k, sampling in enumerate(SAMPLINGS):
                ntp, _ = janus_ntp_decode(ref, prompt, uncond, H, W, cfg_scale=cfg, **sampling)
                for window in (w for w in (1, 2, 3) if w < W):
                    codes, passes = janus_zipar_decode(
                        ref, prompt, uncond, H, W, window, cfg_scale=cfg, **sampling
                    )
                    case = (H, W, window, cfg, sampling)
                    assert passes == 2 * W + (H - 2) * window == zipar_steps(H, W, window, eol=False), case
                    assert passes == closed_form_steps(H, W, window, eol=False), case
                    assert passes == simulate_zipar_steps(H, W, window, eol=False), case
                    changed[window, k] = changed.get((window, k), 0) + int((codes != ntp).sum())
                    # Rows 0 and 1 see exactly NTP's context (row 0 completes first) and position-keyed draws.
                    assert torch.equal(codes[:2], ntp[:2]), case
                    assert bool(((codes >= 0) & (codes < IDS.codebook)).all()), case
                    if window == 1:
                        again, _ = janus_zipar_decode(ref, prompt, uncond, H, W, 1, cfg_scale=cfg, **sampling)
                        assert torch.equal(again, codes), f"{case}: not deterministic"
    assert len(changed) == 3 * len(SAMPLINGS)
    assert all(v > 0 for v in changed.values()), changed


def test_seeds_key_the_draws(ref):
    prompt, uncond = _prompts()
    draws = [
        janus_zipar_decode(ref, prompt, uncond, 4, 4, 2, cfg_scale=CFG, temperature=1.0, seed=s)[0]
        for s in (1, 1, 2)
    ]
    assert torch.equal(draws[0], draws[1])
    assert (draws[0] != draws[2]).sum() > 0


def test_draws_are_keyed_by_the_conditional_raster_position(ref):
    """The sampling contract engines must meet: cell (r, c) is ``sample_cell(u + s (c - u), pos=P + r*W + c)``
    with P the conditional prompt's length, whatever pass decoded it and whatever the unconditional length."""
    H, W, window = 4, 5, 2
    prompt = IDS.image_prompt(TEXT)
    uncond = IDS.image_prompt(TEXT[:1])  # shorter: its own positions must not key the draws
    P = len(prompt)
    kw = {"temperature": 1.0, "top_k": 10, "top_p": 0.9, "seed": 7}
    trace: list = []
    # CFG 2, not 5: guidance 5 makes these tiny logits so peaked that almost any noise picks the max.
    codes, _ = janus_zipar_decode(ref, prompt, uncond, H, W, window, cfg_scale=2.0, _trace=trace, **kw)
    cells = {cell: logits for entry in trace for cell, logits in entry["cells"].items()}
    shifted = 0
    for (r, c), logits in cells.items():
        assert int(codes[r, c]) == sample_cell(logits, pos=P + r * W + c, **kw)
        shifted += int(codes[r, c]) != sample_cell(logits, pos=len(uncond) + r * W + c, **kw)
    assert shifted > 0  # the key is not a formality (measured 6 of 20 cells would change)


@pytest.mark.parametrize(("H", "W"), [(1, 4), (3, 1), (1, 1), (2, 3)])
def test_one_row_one_column_and_two_row_grids(ref, H, W):
    prompt, uncond = _prompts()
    ntp, passes = janus_ntp_decode(ref, prompt, uncond, H, W, cfg_scale=CFG)
    assert passes == H * W
    for window in (1, 2):
        codes, passes = janus_zipar_decode(ref, prompt, uncond, H, W, window, cfg_scale=CFG)
        # Two rows or fewer: row 1 waits for row 0, so this is NTP order with NTP's passes.
        assert torch.equal(codes, ntp) and passes == H * W == zipar_steps(H, W, window, eol=False)


def test_trace_follows_the_no_eol_rules(ref):
    H, W, window = 5, 4, 2
    prompt = IDS.image_prompt(TEXT)
    uncond = IDS.image_prompt(TEXT[:2])  # a shorter unconditional prompt: its own positions
    P, U = len(prompt), len(uncond)
    trace: list = []
    codes, passes = janus_zipar_decode(ref, prompt, uncond, H, W, window, cfg_scale=CFG, _trace=trace)

    def pos(r: int, c: int) -> int:
        return P + r * W + c

    fed = [f for entry in trace for f in entry["inputs"]]
    starts = {
        f.target[0]: (f, entry["step"])
        for entry in trace
        for f in entry["inputs"]
        if f.target and f.target[1] == 0
    }
    # Row 1 starts from row 0's real last code, after row 0 is complete.
    first, step = starts[1]
    assert (first.token, first.pos, first.kind) == (int(codes[0, W - 1]), pos(0, W - 1), REAL) and step == W
    for r in range(2, H):  # later rows from a proxy: the row above's newest code at its last cell's position
        f, step = starts[r]
        newest = step - starts[r - 1][1] - 1  # the row above decoded one cell per pass since it started
        assert newest == window - 1
        assert (f.token, f.pos, f.kind) == (int(codes[r - 1, newest]), pos(r - 1, W - 1), PROXY)
    real = [f.pos for f in fed if f.kind != PROXY]
    assert len(real) == len(set(real))  # every real code is fed once
    assert set(real) == {pos(r, c) for r in range(H) for c in range(W)} - {pos(H - 1, W - 1)}
    for f in fed:
        r, c = divmod(f.pos - P, W)
        if f.kind != PROXY:
            assert f.token == int(codes[r, c])
        assert (f.kind == KV_ONLY) == (f.target is None)
    for entry in trace[1:]:
        assert entry["uncond_positions"] == [f.pos + U - P for f in entry["inputs"]]
    assert passes == len(trace) == 2 * W + (H - 2) * window


def _replay_with_kv_cache(hf, prompt: list[int], trace: list, shift: int) -> dict:
    """Feed the traced passes to transformers' language model with a real KV cache: the prompt through
    ``embed_tokens``, every code (proxies too) through ``prepare_embeddings_for_image_generation``, each at
    its position, under a 4D additive mask ``pos_key <= pos_query`` over the cache plus this pass, proxy keys
    hidden (except from themselves). Keys and values are computed once, when fed, so feed time needs no rule
    here. Returns cell -> image logits."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cached_pos: list[int] = []
    cached_proxy: list[bool] = []
    cells = {}
    lm = hf.model.language_model
    for entry in trace:
        with torch.no_grad():
            if entry["step"] == 0:
                embeds = hf.get_input_embeddings()(torch.tensor(prompt))
                pos, proxy, targets = (
                    list(range(len(prompt))),
                    [False] * len(prompt),
                    [None] * (len(prompt) - 1) + [(0, 0)],
                )
            else:
                embeds = hf.prepare_embeddings_for_image_generation(
                    torch.tensor([f.token for f in entry["inputs"]])
                )
                pos = [f.pos + shift for f in entry["inputs"]]
                proxy = [f.kind == PROXY for f in entry["inputs"]]
                targets = [f.target for f in entry["inputs"]]
            keys = torch.tensor(cached_pos + pos)
            key_proxy = torch.tensor(cached_proxy + proxy)
            visible = (keys[None, :] <= torch.tensor(pos)[:, None]) & ~key_proxy[None, :]
            visible[:, len(cached_pos) :] |= torch.eye(len(pos), dtype=torch.bool)
            mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[None, None]
            out = lm(
                inputs_embeds=embeds[None],
                position_ids=torch.tensor([pos]),
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
            logits = hf.model.generation_head(out.last_hidden_state[0])
        cached_pos += pos
        cached_proxy += proxy
        for i, target in enumerate(targets):
            if target is not None:
                cells[target] = logits[i]
    return cells


def _replay_gaps(hf, ref, prompt, uncond, H, W, window, **hooks) -> tuple[float, float]:
    """Largest difference, over cells, between the oracle's logits and the KV-cache replay's: per stream, and
    of the guided logits."""
    trace: list = []
    janus_zipar_decode(ref, prompt, uncond, H, W, window, cfg_scale=CFG, _trace=trace, **hooks)
    replayed = [
        _replay_with_kv_cache(hf, prompt, trace, 0),
        _replay_with_kv_cache(hf, uncond, trace, len(uncond) - len(prompt)),
    ]
    oracle = [
        {cell: logits for entry in trace for cell, logits in entry[key].items()}
        for key in ("cond_cells", "uncond_cells")
    ]
    guided = {cell: logits for entry in trace for cell, logits in entry["cells"].items()}
    every_cell = {(r, c) for r in range(H) for c in range(W)}
    assert (
        set(guided) == set(oracle[0]) == set(oracle[1]) == set(replayed[0]) == set(replayed[1]) == every_cell
    )
    stream_gap = max(
        (o[k] - rep[k]).abs().max().item()
        for o, rep in zip(oracle, replayed, strict=True)
        for k in every_cell
    )
    cond, unc = replayed
    guided_gap = max((unc[k] + CFG * (cond[k] - unc[k]) - v).abs().max().item() for k, v in guided.items())
    return stream_gap, guided_gap


@pytest.mark.parametrize("uncond_text", [None, TEXT[:2]])
def test_every_zipar_pass_equals_a_kv_cache_run_in_transformers(hf, ref, uncond_text):
    """The oracle's recompute-with-feed-time mask equals transformers' own KV-cache forward, pass by pass, for
    both CFG streams (each at its own positions: Janus's same-length pad prompt, and a shorter one)."""
    prompt = IDS.image_prompt(TEXT)
    uncond = IDS.unconditional_prompt(prompt) if uncond_text is None else IDS.image_prompt(uncond_text)
    for window in (1, 2):
        stream_gap, guided_gap = _replay_gaps(hf, ref, prompt, uncond, 5, 4, window)
        # Measured ~4e-5 per stream (logits of order 20); CFG 5 amplifies the rounding about tenfold.
        assert stream_gap < 1e-4 and guided_gap < 1e-3, (window, stream_gap, guided_gap)


@pytest.mark.parametrize("cfg", [1.0, CFG])
def test_wrong_masks_change_tokens_and_fail_the_checks(hf, ref, cfg):
    """Dropping feed time, or letting later queries read proxies, changes codes, and the teacher-forced check
    sees order-1 gaps there (a near-tie flip would show ~1e-4); the KV-cache replay sees changed logits."""
    H, W = 6, 5
    prompt, uncond = _prompts()
    uncond = uncond if cfg != 1.0 else None
    changed = {"feed_time": 0, "proxies": 0}
    for window in (1, 2, 3):
        codes, _ = janus_zipar_decode(ref, prompt, uncond, H, W, window, cfg_scale=cfg)
        assert janus_teacher_forced_gaps(ref, prompt, uncond, codes, window, cfg_scale=cfg).max() == 0
        wrong = {
            "feed_time": janus_zipar_decode(
                ref, prompt, uncond, H, W, window, cfg_scale=cfg, _feed_time=False
            )[0],
            "proxies": janus_zipar_decode(
                ref, prompt, uncond, H, W, window, cfg_scale=cfg, _attend_proxies=True
            )[0],
        }
        for name, grid in wrong.items():
            changed[name] += int((grid != codes).sum())
            if not torch.equal(grid, codes):
                gaps = janus_teacher_forced_gaps(ref, prompt, uncond, grid, window, cfg_scale=cfg)
                assert gaps.max() > 1e-2, (name, window)
    # Measured: feed time 0 (unguided: logits move by up to 0.5 but no pick flips) / 22 cells (CFG 5);
    # proxies 25 / 37 cells.
    assert changed["proxies"] > 0, changed
    if cfg != 1.0:
        assert changed["feed_time"] > 0, changed
        prompt_u = IDS.unconditional_prompt(prompt)
        for hook in ({"_feed_time": False}, {"_attend_proxies": True}):
            assert _replay_gaps(hf, ref, prompt, prompt_u, 5, 4, 1, **hook)[0] > 1e-2, hook


def test_bad_arguments_raise(ref):
    prompt, _ = _prompts()
    with pytest.raises(ValueError, match="window=0"):
        janus_zipar_decode(ref, prompt, None, 2, 2, 0)
    with pytest.raises(ValueError, match="seed"):
        janus_zipar_decode(ref, prompt, None, 2, 2, 1, temperature=1.0)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        janus_ntp_decode(ref, [], None, 2, 2)
    with pytest.raises(ValueError, match="outside"):
        janus_ntp_decode(ref, [IDS.vocab_size], None, 2, 2)
    with pytest.raises(ValueError, match="codes outside"):
        janus_teacher_forced_gaps(ref, prompt, None, torch.full((2, 2), IDS.codebook), 1)


def test_reference_from_hf_dir_round_trips(hf, ref, tmp_path):
    hf.save_pretrained(tmp_path)
    loaded = reference_from_hf_dir(tmp_path)
    assert loaded.config == ref.config
    assert loaded.w.keys() == ref.w.keys()
    assert all(torch.equal(loaded.w[k], ref.w[k]) for k in ref.w)
