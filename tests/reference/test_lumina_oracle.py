"""Tests of the Lumina-mGPT oracles: the transformers-based reference, the independent model, the decoders.

Tiny random Lumina directories come from ``vllm_zipar.testing.lumina_dirs.write_tiny_lumina_dir`` (Lumina's
real layout: ``vocabulary_map`` with non-contiguous image ids, q/k-norm stored ``[model_parallel_size,
head_dim]``). ``lumina_hf.lumina_generate`` (transformers' KV cache, one pass per token, Lumina's CFG context
starting at BOI) is the NTP ground truth; a transformers KV-cache replay with a 4D mask is the ground truth
for every ZipAR pass; the independent ``ReferenceLumina`` must agree with both models' tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from vllm_zipar.testing.lumina_dirs import write_tiny_lumina_dir

from .decoders import closed_form_steps, simulate_zipar_steps
from .emu3_decoders import KV_ONLY, plan_eol_pass
from .lumina_decoders import (
    lumina_image_sequence,
    lumina_ntp_decode,
    lumina_prompts,
    lumina_teacher_forced_gaps,
    lumina_zipar_decode,
)
from .lumina_hf import LuminaHF, expand_head_norm, lumina_generate
from .lumina_model import LuminaImageIds, ReferenceLumina, image_code_ids

SHAPES = [(4, 6), (6, 4)]
PROMPT = [0, 300, 301, 302, 303, 304, 305]  # BOS + a few text ids; the prefix [BOI, h, w] is added
CFG = 3.0
SAMPLINGS = [
    {"temperature": 0.0},
    {"temperature": 1.0, "top_k": 0, "seed": 11},
    {"temperature": 1.0, "top_k": 10, "seed": 12},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny ops: intra-op threads only spin on the shared 2-core machine (see test_oracle.py).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Directory variants: the writer's defaults (4 heads, 4 KV heads, model_parallel_size 1); two shards of two
# query heads each with 2 KV heads (GQA; a wrong q/k-norm expansion changes the logits); swin_norm.
VARIANTS = {
    "mp1": {"seed": 0},
    "mp2_gqa": {"seed": 1, "model_parallel_size": 2, "num_key_value_heads": 2},
    "swin": {"seed": 2, "swin_norm": True},
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina")
    return {name: write_tiny_lumina_dir(root / name, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def ids(dirs) -> LuminaImageIds:
    config = json.loads((dirs["mp1"] / "config.json").read_text())
    return LuminaImageIds.from_vocabulary_map(config["vocabulary_map"])


@pytest.fixture(scope="module")
def hf(dirs) -> LuminaHF:
    return LuminaHF.from_dir(dirs["mp1"])


@pytest.fixture(scope="module")
def ref(dirs) -> ReferenceLumina:
    return ReferenceLumina.from_dir(dirs["mp1"])


def _masks(n: int) -> list[torch.Tensor]:
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    sparse = causal & (torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.6)
    return [causal, sparse | torch.eye(n, dtype=torch.bool)]


# ----------------------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_independent_model_equals_transformers_reference(dirs, ids, variant):
    ref, hf = ReferenceLumina.from_dir(dirs[variant]), LuminaHF.from_dir(dirs[variant])
    seq = (
        lumina_prompts(PROMPT, 4, 6, ids, 1.0)[0] + list(ids.visual[:6]) + [ids.eol] + list(ids.visual[6:12])
    )
    n = len(seq)
    gapped = [p + 9 * (p >= n // 2) for p in range(n)]  # RoPE sees positions, not indices
    for pos in (list(range(n)), gapped):
        for attend in _masks(n):
            ours, theirs = ref.forward_tokens(seq, pos, attend), hf.forward_tokens(seq, pos, attend)
            assert ours.shape == (n, ref.config.vocab_size) and ours.dtype == torch.float32
            assert (ours - theirs).abs().max() < 1e-4  # measured 1.1e-5 (logits up to 13)
    cut = ours[:, list(ids.visual)]
    assert cut.std() > 1.0  # image logits are not masked to the float minimum
    config = ref.config
    assert config.model_parallel_size == VARIANTS[variant].get("model_parallel_size", 1)
    assert config.swin_norm == VARIANTS[variant].get("swin_norm", False)


def test_wrong_qk_norm_expansion_is_caught(dirs, ids):
    """Lumina expands [model_parallel_size, head_dim] by repeat_interleave (shard m serves consecutive heads);
    ``repeat`` (shard m serves every model_parallel_size-th head) gives other logits on the 2-shard model."""
    d = dirs["mp2_gqa"]
    ref = ReferenceLumina.from_dir(d)
    right, wrong = (
        LuminaHF.from_dir(d),
        LuminaHF.from_dir(d, _expand=lambda w, h: w.repeat(h // w.shape[0], 1)),
    )
    seq = lumina_prompts(PROMPT, 4, 6, ids, 1.0)[0] + list(ids.visual[:8])
    causal = torch.ones(len(seq), len(seq), dtype=torch.bool).tril()
    pos = list(range(len(seq)))
    ours = ref.forward_tokens(seq, pos, causal)
    assert (ours - right.forward_tokens(seq, pos, causal)).abs().max() < 1e-4
    assert (ours - wrong.forward_tokens(seq, pos, causal)).abs().max() > 1e-1  # measured 4.1
    w = torch.arange(6.0).view(2, 3)
    assert expand_head_norm(w, 4).tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]


def test_independent_model_reads_lumina_shapes_only(dirs):
    config = json.loads((dirs["mp1"] / "config.json").read_text())
    model = ReferenceLumina.from_dir(dirs["mp1"])
    weights = dict(model.w)
    name = "model.layers.0.self_attn.q_norm.weight"
    weights[name] = weights[name].repeat(config["num_attention_heads"], 1)  # transformers' [heads, head_dim]
    with pytest.raises(ValueError, match="Lumina stores"):
        ReferenceLumina(model.config, weights)


def test_image_ids_follow_vocabulary_map(dirs, ids):
    vocabulary_map = json.loads((dirs["mp1"] / "config.json").read_text())["vocabulary_map"]
    assert image_code_ids(vocabulary_map) == ids.visual
    assert len(ids.visual) == 64
    assert ids.visual[10] == vocabulary_map["IMGIMGBAZ"] and ids.visual[7] == vocabulary_map["IMGIMGHZ"]
    diffs = {b - a for a, b in zip(ids.visual, ids.visual[1:], strict=False)}
    assert diffs != {1}  # not a contiguous range: the oracle must go through the table
    assert ids.image_prefix(4, 6) == [
        ids.boi,
        vocabulary_map["<reserved08802>"],
        vocabulary_map["<reserved08803>"],
    ]
    with pytest.raises(ValueError, match="32-px"):
        ids.image_prefix(3, 6)


# ----------------------------------------------------------------------------------------------------------
# NTP against Lumina's cached generation loop
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, CFG])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded", "seeded_top10"])
def test_ntp_equals_lumina_cached_generation(hf, ref, ids, cfg, sampling):
    H, W = SHAPES[0]
    generated = lumina_generate(hf, PROMPT, ids.image_prefix(H, W), H, W, ids, cfg_scale=cfg, **sampling)
    assert len(generated) == 3 + H * (W + 1) + 1
    for model in (hf, ref):
        grid, passes = lumina_ntp_decode(model, PROMPT, H, W, ids, cfg_scale=cfg, **sampling)
        assert passes == H * W
        assert lumina_image_sequence(grid, ids) == generated  # exact, EOLs and EOI included
    assert grid.unique().numel() >= H * W // 3  # not collapsed (measured 16-20 distinct codes of 24)


def test_guidance_uses_lumina_unconditional_context(hf, ids):
    """Guided decoding differs from plain, and from guidance with the text prompt as the unconditional
    context: the context starts at BOI."""
    H, W = SHAPES[0]
    plain, _ = lumina_ntp_decode(hf, PROMPT, H, W, ids)
    guided, _ = lumina_ntp_decode(hf, PROMPT, H, W, ids, cfg_scale=CFG)
    assert (plain != guided).sum() > 0
    assert lumina_prompts(PROMPT, H, W, ids, CFG)[1] == ids.image_prefix(H, W)


# ----------------------------------------------------------------------------------------------------------
# ZipAR
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, CFG])
def test_window_at_least_width_is_ntp(hf, ref, ids, cfg):
    for H, W in SHAPES:
        for sampling in SAMPLINGS:
            ntp, _ = lumina_ntp_decode(hf, PROMPT, H, W, ids, cfg_scale=cfg, **sampling)
            for model in (hf, ref):
                for window in (W, W + 3):
                    grid, passes = lumina_zipar_decode(
                        model, PROMPT, H, W, window, ids, cfg_scale=cfg, **sampling
                    )
                    assert torch.equal(grid, ntp), (H, W, window, sampling)
                    assert passes == H * W


def test_small_windows_agree_across_models(hf, ref, ids):
    changed = 0
    for H, W in SHAPES:
        for cfg in (1.0, CFG):
            for sampling in SAMPLINGS:
                ntp, _ = lumina_ntp_decode(ref, PROMPT, H, W, ids, cfg_scale=cfg, **sampling)
                for window in (1, 2, 3):
                    case = (H, W, window, cfg, sampling)
                    grid, passes = lumina_zipar_decode(
                        ref, PROMPT, H, W, window, ids, cfg_scale=cfg, **sampling
                    )
                    theirs, their_passes = lumina_zipar_decode(
                        hf, PROMPT, H, W, window, ids, cfg_scale=cfg, **sampling
                    )
                    assert torch.equal(grid, theirs), case  # the two models give the same tokens
                    assert passes == their_passes == (H - 1) * window + W, case
                    assert (
                        passes
                        == closed_form_steps(H, W, window, eol=True)
                        == simulate_zipar_steps(H, W, window, eol=True)
                    )
                    assert torch.equal(grid[0], ntp[0]), case  # row 0 sees NTP's context
                    assert set(grid.flatten().tolist()) <= set(ids.visual), case
                    changed += int((grid != ntp).sum())
                    if sampling["temperature"] == 0:
                        gaps = lumina_teacher_forced_gaps(hf, PROMPT, grid, window, ids, cfg_scale=cfg)
                        assert gaps.max() < 1e-3, case
    assert changed > 0  # windows change tokens after row 0 (measured 547 cells in all)


def _replay_with_kv_cache(hf: LuminaHF, prompt: list[int], trace: list, shift: int) -> dict:
    """Feed the traced passes to transformers with a real KV cache, each pass's inputs at their positions
    under a 4D mask ``pos_key <= pos_query``; keys/values are computed once, when fed. Returns cell ->
    logits."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cached: list[int] = []
    cells = {}
    for entry in trace:
        if entry["step"] == 0:
            tok, pos, targets = prompt, list(range(len(prompt))), [None] * (len(prompt) - 1) + [(0, 0)]
        else:
            tok = [f.token for f in entry["inputs"]]
            pos = [f.pos + shift for f in entry["inputs"]]
            targets = [f.target for f in entry["inputs"]]
        visible = torch.tensor(cached + pos)[None, :] <= torch.tensor(pos)[:, None]
        mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[None, None]
        with torch.no_grad():
            out = hf.model.model(
                input_ids=torch.tensor([tok]),
                position_ids=torch.tensor([pos]),
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
        logits = hf.model.lm_head(out.last_hidden_state)[0]
        cached += pos
        for i, target in enumerate(targets):
            if target is not None:
                cells[target] = logits[i]
    return cells


@pytest.mark.parametrize("window", [1, 2, 3])
def test_every_zipar_pass_equals_a_kv_cache_run(hf, ref, ids, window):
    """The feed-time rule: the independent model's recompute-with-feed-time mask equals transformers' own
    KV-cache forward pass by pass, for both CFG streams (the unconditional one from BOI at position 0)."""
    H, W = 6, 4
    trace: list = []
    lumina_zipar_decode(ref, PROMPT, H, W, window, ids, cfg_scale=CFG, _trace=trace)
    cond_prompt, uncond_prompt = lumina_prompts(PROMPT, H, W, ids, CFG)
    assert uncond_prompt is not None
    cond = _replay_with_kv_cache(hf, cond_prompt, trace, 0)
    uncond = _replay_with_kv_cache(hf, uncond_prompt, trace, len(uncond_prompt) - len(cond_prompt))
    cells = {cell: logits for entry in trace for cell, logits in entry["cells"].items()}
    assert set(cells) == set(cond) == set(uncond) == {(r, c) for r in range(H) for c in range(W)}
    worst = max((uncond[k] + CFG * (cond[k] - uncond[k]) - v).abs().max().item() for k, v in cells.items())
    assert worst < 1e-3  # measured 4e-5 (guided logits, CFG 3)
    kinds = {f.kind for entry in trace for f in entry["inputs"]}
    assert KV_ONLY in kinds
    eols = [f for entry in trace for f in entry["inputs"] if f.token == ids.eol]
    assert len(eols) == H - 1 and all(f.target is not None and f.target[1] == 0 for f in eols)


def test_wrong_masks_change_tokens(ref, ids):
    """Dropping feed time, or feeding the row-start EOL one position late, changes tokens; the teacher-forced
    verdict sees order-1 gaps where a near-tie flip would show ~1e-4 (measured: feed time changes 8 cells, at
    window 2 only; the late EOL 6-18 cells per window, gaps 0.6-1.8)."""
    H, W = 6, 4
    changed_feed_time = changed_shift = 0
    for window in (1, 2, 3):
        grid, _ = lumina_zipar_decode(ref, PROMPT, H, W, window, ids)
        no_feed_time, _ = lumina_zipar_decode(ref, PROMPT, H, W, window, ids, _feed_time=False)
        shifted, _ = lumina_zipar_decode(ref, PROMPT, H, W, window, ids, _start_pos_shift=1)
        changed_feed_time += int((grid != no_feed_time).sum())
        changed_shift += int((grid != shifted).sum())
        assert lumina_teacher_forced_gaps(ref, PROMPT, grid, window, ids).max() == 0
        assert lumina_teacher_forced_gaps(ref, PROMPT, shifted, window, ids).max() > 1e-2
    assert changed_feed_time > 0 and changed_shift > 0, (changed_feed_time, changed_shift)


# ----------------------------------------------------------------------------------------------------------
# The ZipAR authors' Lumina window, in our terms
# ----------------------------------------------------------------------------------------------------------
def _authors_schedule(H: int, W: int, N: int) -> list[list[tuple[int, int]]]:
    """The cells each forward pass predicts under the bookkeeping of ThisisBillhe/ZipAR
    ``Lumina-mGPT-ZipAR/lumina_mgpt/model/chameleon/modeling_chameleon.py`` (``_sample``, commit 2a5695c):
    ``row_token_num[r]`` counts row r's tokens *including* the token that opens it (the width token for row
    0, the EOL of row r - 1 after), a pass predicts the next cell of every ongoing row in order, and a row
    whose count reaches ``zipar_window_size`` (N) opens the next row by appending its EOL. Generalised from
    their 48x48 constants (``tokens_per_row = 49``, last row 47) to ``H x W``."""
    ongoing, count, passes = [0], [0] * H, []
    count[0] = 1
    while ongoing:
        cells, done = [], []
        for row in list(ongoing):
            cells.append((row, count[row] - 1))
            count[row] += 1
            if count[row] == N and row < H - 1 and row + 1 not in ongoing:
                ongoing.append(row + 1)
                count[row + 1] += 1
            if count[row] == W + 1:
                done.append(row)
        for row in done:
            ongoing.remove(row)
        passes.append(cells)
    return passes


def _our_schedule(H: int, W: int, window: int) -> list[list[tuple[int, int]]]:
    """The cells each pass predicts under this oracle's planner (``plan_eol_pass``), no model needed."""
    n, kv_due, passes, step = [0] * H, [], [], 0
    grid = torch.zeros(H, W, dtype=torch.long)
    while min(n) < W:
        if step == 0:
            targets = [(0, 0)]
        else:
            inputs = plan_eol_pass(step, n, W, window, 10, grid, -1, kv_due)
            targets = [f.target for f in inputs if f.target is not None]
        kv_due = []
        for r, _ in targets:
            n[r] += 1
            if n[r] == W and r < H - 1:
                kv_due.append(r)
        passes.append(sorted(targets))
        step += 1
    return passes


def test_authors_window_is_ours_plus_one():
    """Their ``--zipar_window_size N`` opens row r + 1 once row r holds N - 1 image tokens: our window N - 1
    (their default 16 is our 15)."""
    for H, W in [(4, 6), (6, 4), (5, 5), (8, 8)]:
        for N in range(2, W + 2):
            theirs = [sorted(cells) for cells in _authors_schedule(H, W, N)]
            assert theirs == _our_schedule(H, W, N - 1), (H, W, N)
            assert theirs != _our_schedule(H, W, N) or N - 1 >= W, (H, W, N)
    assert len(_authors_schedule(48, 48, 16)) == closed_form_steps(48, 48, 15, eol=True) == 753


def test_bad_arguments_raise(ref, ids):
    with pytest.raises(ValueError, match="32-px"):
        lumina_ntp_decode(ref, PROMPT, 3, 4, ids)
    with pytest.raises(ValueError, match="empty"):
        lumina_zipar_decode(ref, [], 4, 4, 1, ids)
    with pytest.raises(ValueError, match="window=0"):
        lumina_zipar_decode(ref, PROMPT, 4, 4, 0, ids)
    with pytest.raises(ValueError, match="seed"):
        lumina_zipar_decode(ref, PROMPT, 4, 4, 1, ids, temperature=1.0)
