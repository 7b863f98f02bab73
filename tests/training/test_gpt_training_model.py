"""The training GPT is the authors' architecture: its weights load strictly into the reference oracle and give
the same teacher-forced logits; its state dict passes the serving side's key check; a few steps learn."""

from __future__ import annotations

import torch

from tests.reference.llamagen_gpt import ReferenceLlamaGen, ReferenceLlamaGenConfig
from vllm_zipar.models.llamagen_checkpoint import check_gpt_state_dict, load_gpt_state_dict
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.training.gpt import LlamaGenC2I
from vllm_zipar.training.train_gpt import save_gpt, train_gpt

GRID = 4


def tiny_config(**overrides) -> LlamaGenConfig:
    fields = dict(
        dim=64,
        n_layer=2,
        n_head=2,
        multiple_of=32,
        num_classes=10,
        codebook_size=48,
        grid_size=GRID,
        downsample=2,
    )
    fields.update(overrides)
    return LlamaGenConfig(**fields)


def random_model(config: LlamaGenConfig, seed: int = 0) -> LlamaGenC2I:
    torch.manual_seed(seed)
    model = LlamaGenC2I(config)
    with torch.no_grad():  # the authors' init zeroes the head (all logits 0): randomise everything instead
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3 if "embedding" not in name else 1.0)
    return model.eval()


def reference_for(config: LlamaGenConfig) -> ReferenceLlamaGen:
    return ReferenceLlamaGen(ReferenceLlamaGenConfig.matching(config))


def test_state_dict_is_the_authors_layout_and_loads_strictly_into_the_reference():
    for config in (tiny_config(), tiny_config(n_head=2, n_kv_head=1)):
        model = random_model(config)
        state = model.state_dict()
        assert "freqs_cis" not in state
        check_gpt_state_dict(state, config, "<training model>")
        reference = reference_for(config)
        reference.load_state_dict(state, strict=True)


def test_teacher_forced_logits_match_the_reference():
    for config in (tiny_config(), tiny_config(n_head=2, n_kv_head=1)):
        model = random_model(config, seed=1)
        reference = reference_for(config)
        reference.load_state_dict(model.state_dict(), strict=True)
        reference.eval()
        gen = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, config.codebook_size, (3, GRID * GRID), generator=gen)
        labels = torch.tensor([0, 7, config.num_classes])  # the null class row too
        with torch.no_grad():
            logits, _ = model(tokens[:, :-1], labels)
        assert logits.shape == (3, GRID * GRID, config.codebook_size)
        n = GRID * GRID  # class token + the first grid² - 1 image tokens
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        for row in range(3):
            expected = reference.forward_tokens(
                int(labels[row]), tokens[row, :-1], torch.arange(1, n), causal
            )
            torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-5)


def test_cached_sampler_agrees_with_teacher_forcing():
    config = tiny_config()
    model = random_model(config, seed=3)
    labels = torch.tensor([1, 4])
    grids = model.sample(labels, temperature=0.0)
    assert grids.shape == (2, GRID, GRID)
    flat = grids.reshape(2, -1)
    with torch.no_grad():
        logits, _ = model(flat[:, :-1], labels)
    assert torch.equal(logits.argmax(-1), flat)


def test_a_few_steps_reduce_the_loss_and_save_in_the_authors_layout(tmp_path):
    config = tiny_config(codebook_size=32)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (1, 4, GRID, GRID), generator=gen)
    labels = torch.tensor([0, 1, 2, 3])
    model, log = train_gpt(
        codes, labels, config, steps=40, batch_size=4, lr=3e-3, log_every=10, progress=False, bf16=False
    )
    assert log[-1]["loss"] < log[0]["loss"] - 0.3, log
    path = tmp_path / "gpt.pt"
    save_gpt(model, path, config)
    state = load_gpt_state_dict(path)
    check_gpt_state_dict(state, config, path)
    assert torch.equal(state["output.weight"], model.state_dict()["output.weight"])


def test_cca_alignment_separates_right_and_wrong_classes():
    from vllm_zipar.training.train_gpt import align_cca, sequence_logp

    config = tiny_config(codebook_size=32)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 32, (1, 8, GRID, GRID), generator=gen)
    labels = torch.arange(8)
    base, _ = train_gpt(codes, labels, config, steps=20, batch_size=8, lr=3e-3, progress=False, bf16=False)
    flat = codes[0].reshape(8, -1)

    def margin(model) -> float:  # log p(x | own class) - log p(x | other class), averaged
        with torch.no_grad():
            right = sequence_logp(model, flat, labels)
            gaps = [right - sequence_logp(model, flat, (labels + k) % 8) for k in range(1, 8)]
        return float(torch.stack(gaps).mean())

    before = margin(base)
    aligned, _ = align_cca(
        base, codes, labels, steps=15, batch_size=8, lr=1e-3, uncond_ratio=0.0, progress=False, bf16=False
    )
    assert margin(aligned) > before + 5.0
    check_gpt_state_dict(aligned.state_dict(), config, "<aligned>")


def test_guided_sampler_is_cfg_on_teacher_forced_logits():
    """``cfg_scale`` guides with the null class (u + s(c - u)); a tiny ``top_p`` keeps only the top token."""
    config = tiny_config()
    model = random_model(config).eval()
    labels = torch.tensor([3, 7])
    scale = 2.5
    greedy = model.sample(labels, temperature=0, cfg_scale=scale)
    nucleus = model.sample(labels, top_p=1e-6, cfg_scale=scale, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, nucleus)
    flat = greedy.reshape(2, -1)
    null = torch.full_like(labels, config.num_classes)
    with torch.no_grad():
        cond, _ = model(flat[:, :-1], labels)
        uncond, _ = model(flat[:, :-1], null)
    guided = uncond + scale * (cond - uncond)
    assert torch.equal(guided.argmax(-1), flat)


def test_cca_can_continue_against_the_original_reference():
    import copy

    from vllm_zipar.training.train_gpt import align_cca

    config = tiny_config(codebook_size=32)
    codes = torch.randint(0, 32, (1, 8, GRID, GRID), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8)
    base, _ = train_gpt(codes, labels, config, steps=5, batch_size=8, lr=3e-3, progress=False, bf16=False)
    seen = []
    first, _ = align_cca(
        copy.deepcopy(base), codes, labels, steps=4, batch_size=8, lr=1e-3, progress=False, bf16=False
    )
    second, log2 = align_cca(
        first,
        codes,
        labels,
        steps=4,
        batch_size=8,
        lr=1e-3,
        progress=False,
        bf16=False,
        reference=base,
        log_every=2,
        on_log=lambda entry, model: seen.append(entry["step"]),
    )
    assert seen == [2, 4] and [entry["step"] for entry in log2] == [2, 4]
    assert not torch.equal(second.output.weight, base.output.weight)
