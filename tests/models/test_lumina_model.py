"""Lumina-mGPT through vLLM's real engine equals a reference built from transformers' Chameleon modules.

The tiny directories are written in Lumina's on-disk format (`vllm_zipar/testing/lumina_dirs.py`: Lumina's
key layout, q/k norms stored `[model_parallel_size, head_dim]`, image tokens at shuffled non-contiguous ids).
The reference (`tests/reference/lumina_hf.py`, checked there against an independent re-implementation)
loads them into transformers' `ChameleonForConditionalGeneration` with the q/k norms expanded to its
`[heads, head_dim]` by `repeat_interleave` as Lumina's `ChameleonLayerNorm.repeat_param` does, calls its
decoder and `lm_head` directly (transformers' forward masks image-token logits; Lumina's does not for
generation) and runs Lumina's generation constraints (inference_solver.py): the prompt ends with the forced
BOI and resolution tokens, only image tokens in cells, EOL forced after each row, and guidance against a
context that starts at BOI. NTP greedy tokens of the engine equal the reference's, unguided and guided, for
a plain directory and one with `model_parallel_size` 2, grouped-query attention and `swin_norm`; TP=2 equals
TP=1.
"""

from __future__ import annotations

import pytest
import torch

from tests.reference.lumina_hf import LuminaHF, lumina_generate
from tests.reference.lumina_model import LuminaImageIds
from vllm_zipar.models.lumina_checkpoint import (
    BOI_TOKEN,
    BOS_TOKEN,
    END_OF_TURN_TOKEN,
    EOL_TOKEN,
    image_token,
    image_token_code,
    resolution_token,
)

PROMPTS = ["a red cat", "a high quality photo of a small blue bird on a tree, detailed"]
# Directories: Lumina's defaults (model_parallel_size 1, multi-head), and the shapes Lumina-mGPT's code also
# handles: q/k norms of two model-parallel shards over 2 heads each, 2 KV heads (k-norm over KV heads), and
# Chameleon's swin_norm blocks.
VARIANTS = {
    "mp1": dict(seed=3),
    "mp2-gqa-swin": dict(seed=4, model_parallel_size=2, num_key_value_heads=2, swin_norm=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def lumina_dir(request, tmp_path_factory):
    from vllm_zipar.testing.lumina_dirs import write_tiny_lumina_dir

    return write_tiny_lumina_dir(
        tmp_path_factory.mktemp("lumina") / f"tiny-lumina-{request.param}", **VARIANTS[request.param]
    )


@pytest.fixture(scope="module")
def reference(lumina_dir):
    return LuminaHF.from_dir(lumina_dir)


@pytest.fixture(scope="module")
def engine(lumina_dir):
    from vllm_zipar.serving.offline import ImageGenerator

    generator = ImageGenerator(lumina_dir, max_num_seqs=8, kv_cache_memory_bytes=8 << 20)
    yield generator
    generator.close()


def reference_codes(reference, model, prompt: str, size, *, cfg_scale: float) -> torch.Tensor:
    """Lumina's cached greedy generate on transformers' Chameleon (tests/reference/lumina_hf.py), as codes;
    the forced layout around them (the prompt's [BOI, h, w], an EOL per row, EOI) is checked."""
    ids = model.prompt_ids(prompt, size)
    prefix = model.unconditional_prompt_ids(None, size, ids)  # [BOI, h, w]: Lumina's unconditional context
    assert ids[-3:] == prefix
    rows, cols = size.grid
    image_ids = LuminaImageIds.from_vocabulary_map(model.hf_config.vocabulary_map)
    out = lumina_generate(reference, ids[:-3], prefix, rows, cols, image_ids, cfg_scale=cfg_scale)
    grid = torch.tensor(out[3 : 3 + rows * (cols + 1)]).view(rows, cols + 1)
    assert (grid[:, cols] == model.tokens.eol).all() and out[-1] == model.tokens.eoi
    return model.visual_tokens.id_to_code(grid[:, :cols])


# --- the directory and the token layout -------------------------------------------------------------------


def test_the_directory_is_in_lumina_format(lumina_dir):
    import json

    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    raw = json.loads((lumina_dir / "config.json").read_text())
    assert raw["model_type"] == "chameleon"
    assert raw["architectures"] == ["ChameleonXLLMXForConditionalGeneration"]
    assert raw["mask_image_logits"] is False and "rope_theta" in raw
    config = AutoConfig.from_pretrained(lumina_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    with safe_open(str(lumina_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        norm = f.get_tensor("model.layers.0.self_attn.k_norm.weight")
    assert tuple(norm.shape) == (config.model_parallel_size, head_dim)
    assert "lm_head.weight" in keys and not any(".vqmodel." in k for k in keys)
    tokenizer = AutoTokenizer.from_pretrained(lumina_dir)
    assert tokenizer.get_vocab() == config.vocabulary_map and len(tokenizer) == config.vocab_size
    image_ids = sorted(i for name, i in config.vocabulary_map.items() if image_token_code(name) is not None)
    assert image_ids != list(range(image_ids[0], image_ids[0] + len(image_ids)))  # not contiguous
    # Lumina's own offsets: <reserved08799> is EOL and <reserved{8800 + n}> follows it (ids n + EOL + 1).
    vocab = config.vocabulary_map
    assert all(vocab[resolution_token(n)] == vocab[EOL_TOKEN] + 1 + n for n in range(8))


def test_image_token_names_are_chameleons():
    assert image_token(0) == "IMGIMGAZ" and image_token(8191) == "IMGIMGIBJBZ"
    assert image_token_code("IMGIMGIBJBZ") == 8191 and image_token_code("<eoss>") is None
    assert resolution_token(24) == "<reserved08824>"


def test_prompt_layout_follows_lumina(lumina_dir):
    from vllm_zipar.models.registry import load_image_model

    model = load_image_model(lumina_dir)
    tokenizer = model.tokenizer
    size = model.size("256x64")
    assert size.grid == (4, 16)
    ids = model.prompt_ids("a red cat", size)
    names = tokenizer.convert_ids_to_tokens(ids)
    text = "Generate an image of 256x64 according to the following prompt:\na red cat"
    assert names[0] == BOS_TOKEN
    assert names[-5:] == ["Ġcat", END_OF_TURN_TOKEN, BOI_TOKEN, resolution_token(2), resolution_token(8)]
    assert tokenizer.decode(ids[1:-4]) == text
    assert model.unconditional_prompt_ids(None, size, ids) == ids[-3:]
    assert model.native_size.name == "128x128" and model.sampling_defaults.cfg_scale == 4.0


# --- the engine against the reference ---------------------------------------------------------------------


@pytest.mark.engine
def test_ntp_greedy_unguided_equals_the_reference(engine, reference):
    model = engine.model
    images = engine.generate(PROMPTS, decoding="ntp", temperature=0.0, cfg_scale=1.0)
    for prompt, image in zip(PROMPTS, images, strict=True):
        codes = model.visual_tokens.id_to_code(image.tokens)
        assert torch.equal(codes, reference_codes(reference, model, prompt, model.native_size, cfg_scale=1.0))
        assert image.passes == 8 * 8
        assert len(set(codes.flatten().tolist())) > 12  # not collapsed to a few codes


@pytest.mark.engine
def test_ntp_greedy_guided_equals_the_reference_at_two_sizes(engine, reference):
    model = engine.model
    for size_name in ("128x128", "64x256"):
        size = model.size(size_name)
        # No cfg_scale given: the family default, Lumina's 4.0.
        images = engine.generate(PROMPTS, decoding="ntp", temperature=0.0, size=size_name)
        for prompt, image in zip(PROMPTS, images, strict=True):
            assert image.cfg_scale == 4.0 and image.stats.uncond_prompt_len == 3
            expected = reference_codes(reference, model, prompt, size, cfg_scale=4.0)
            assert torch.equal(model.visual_tokens.id_to_code(image.tokens), expected), (prompt, size_name)


@pytest.mark.engine
def test_zipar_runs_on_the_eol_grid_with_no_engine_change(engine):
    """Not the oracle check (tests/engine has it): ZipAR passes are the EOL closed form `(H-1)w + W`, and a
    window of the full width decodes the NTP tokens."""
    ntp = engine.generate(PROMPTS[:1], decoding="ntp", temperature=0.0)[0]
    for window in (2, 8):
        image = engine.generate(PROMPTS[:1], zipar_window=window, temperature=0.0)[0]
        assert image.passes == (8 * 8 if window >= 8 else 7 * window + 8)
    assert torch.equal(image.tokens, ntp.tokens)


@pytest.mark.engine
@pytest.mark.parallel
@pytest.mark.timeout(900)
def test_tensor_parallel_2_equals_tp1(lumina_dir, engine):
    """TP=2 over vLLM's `mp` executor: each rank holds two query heads with their q-norm rows (one shard of
    `model_parallel_size` 2 each, or both from the single shard), its KV heads with their k-norm rows, and
    half of the MLP; NTP greedy tokens, guided and not, equal TP=1's."""
    from vllm import envs

    from vllm_zipar.serving.offline import ImageGenerator

    expected = {}
    for scale in (1.0, 4.0):
        images = engine.generate(PROMPTS, decoding="ntp", temperature=0.0, cfg_scale=scale)
        expected[scale] = [image.tokens for image in images]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one OpenMP core list per rank
        envs.disable_envs_cache()  # an earlier engine in this process froze vLLM's env reads
        tp2 = ImageGenerator(
            lumina_dir,
            max_num_seqs=8,
            kv_cache_memory_bytes=8 << 20,
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
        )
    with tp2:
        assert tp2.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
        for scale in (1.0, 4.0):
            images = tp2.generate(PROMPTS, decoding="ntp", temperature=0.0, cfg_scale=scale)
            for image, grid in zip(images, expected[scale], strict=True):
                assert torch.equal(image.tokens, grid), scale


# --- the q/k norm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_head_layer_norm_expands_each_shard_over_its_heads(mp):
    """`HeadLayerNorm` (each rank of a TP=2 split) equals transformers' `ChameleonLayerNorm` holding the
    `repeat_interleave`-expanded parameters; the other expansion (`repeat`) does not (for mp < heads)."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

    from vllm_zipar.models.llama_decoder import HeadLayerNorm

    heads, head_dim, tokens = 4, 32, 5
    generator = torch.Generator().manual_seed(mp)
    weight = 1 + 0.3 * torch.randn(mp, head_dim, generator=generator)
    bias = 0.3 * torch.randn(mp, head_dim, generator=generator)
    x = torch.randn(tokens, heads * head_dim, generator=generator)
    hf = ChameleonLayerNorm((heads, head_dim))
    with torch.no_grad():
        hf.weight.copy_(weight.repeat_interleave(heads // mp, dim=0))
        hf.bias.copy_(bias.repeat_interleave(heads // mp, dim=0))
        expected = hf(x.view(tokens, heads, head_dim)).reshape(tokens, -1)
    ranks = []
    for rank in range(2):
        norm = HeadLayerNorm(heads, heads // 2, rank * heads // 2, head_dim, eps=1e-5)
        norm.weight_loader(norm.weight, weight)
        norm.weight_loader(norm.bias, bias)
        with torch.no_grad():
            ranks.append(norm(x[:, rank * heads * head_dim // 2 : (rank + 1) * heads * head_dim // 2]))
    assert torch.equal(torch.cat(ranks, dim=1), expected)
    if 1 < mp < heads:
        wrong = HeadLayerNorm(heads, heads, 0, head_dim, eps=1e-5)
        wrong.weight.data.copy_(weight.repeat(heads // mp, 1))
        wrong.bias.data.copy_(bias.repeat(heads // mp, 1))
        assert not torch.allclose(wrong(x), expected, atol=1e-3)
    with pytest.raises(ValueError, match=r"expected \[n, 32\] with n dividing the 4 heads"):
        HeadLayerNorm(heads, heads, 0, head_dim, eps=1e-5).weight_loader(norm.weight, torch.ones(3, head_dim))


# --- the adapter's errors ----------------------------------------------------------------------------------


def test_negative_prompts_are_refused_and_vqgan_files_named(lumina_dir, tmp_path):
    import json
    import shutil

    from vllm_zipar.models.prompt_error import PromptError
    from vllm_zipar.models.registry import load_image_model

    model = load_image_model(lumina_dir)
    with pytest.raises(PromptError) as refused:
        model.unconditional_prompt_ids("blurry", model.native_size)
    assert refused.value.param == "negative_prompt"

    bare = tmp_path / "Lumina-mGPT-7B-768"
    shutil.copytree(lumina_dir, bare)
    (bare / "zipar.json").unlink()
    for name in ("vqgan.yaml", "vqgan.ckpt"):
        (bare / name).unlink(missing_ok=True)
    model = load_image_model(bare)
    assert model.native_size.grid == (48, 48) and model.native_size.name == "768x768"
    with pytest.raises(FileNotFoundError, match=r"vqgan\.yaml.*vqgan\.ckpt.*zipar\.json.*vqgan_checkpoint"):
        model.load_decoder()
    renamed = tmp_path / "tiny"
    shutil.copytree(bare, renamed)
    with pytest.raises(ValueError, match=r'\{"image_size": 768\}'):
        load_image_model(renamed).sizes()
    (renamed / "zipar.json").write_text(json.dumps({"image_size": 512}))
    assert load_image_model(renamed).native_size.grid == (32, 32)
