"""Emu3's text decoder in vLLM equals transformers, token for token, on tiny random Hugging Face directories.

The directories are written in the real on-disk format (config.json, safetensors, tokenizer and processor
files) and read back by transformers' own classes; vLLM's stock engine (stock scheduler and worker) decodes
greedily over the full vocabulary with our model class, and transformers' `generate()` on the same weights is
the reference. The VQ decodes through transformers' `Emu3VQVAE` exactly as its own image path does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.conftest import TEST_KV_CACHE_BYTES, close_llm, rewrite_in_state_dict_layout
from vllm_zipar.models.emu3_checkpoint import (
    BOI_TOKEN,
    BOS_TOKEN,
    IMAGE_WRAPPER_TOKEN,
    Emu3Tokens,
    emu3_visual_tokens,
    visual_token,
)

PROMPTS = ["a red cat", "a high quality photo of a small blue bird on a tree, detailed"]
NEW_TOKENS = 24


def image_prompt_ids(model_dir, prompts=PROMPTS) -> list[list[int]]:
    from transformers import Emu3Processor

    processor = Emu3Processor.from_pretrained(model_dir)
    return [processor(text=p, return_for_image_generation=True)["input_ids"][0] for p in prompts]


def transformers_greedy(model_dir, prompt_ids) -> list[list[int]]:
    """transformers' greedy `generate()`, one prompt at a time; asserts none stopped early at EOS."""
    from transformers import Emu3ForConditionalGeneration

    model = Emu3ForConditionalGeneration.from_pretrained(model_dir).eval()
    out = []
    for ids in prompt_ids:
        with torch.no_grad():
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(tokens[0, len(ids) :].tolist())
        assert len(out[-1]) == NEW_TOKENS  # no EOS: vLLM (ignore_eos) and transformers see the same logits
    return out


# --- the directory in the Hugging Face format ---------------------------------------------------------------


def test_the_tiny_directory_loads_with_transformers_own_classes(emu3_dir):
    from transformers import AutoTokenizer, Emu3ForConditionalGeneration, Emu3Processor

    tokenizer = AutoTokenizer.from_pretrained(emu3_dir)
    processor = Emu3Processor.from_pretrained(emu3_dir)
    model, info = Emu3ForConditionalGeneration.from_pretrained(emu3_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    config = model.config
    assert config.vocabulary_map == tokenizer.get_vocab()
    assert config.text_config.vocab_size == len(tokenizer)

    # BOS + text + <|image start|> + "16*16" + <|image token|> (the default area 128x128 = 16x16 codes).
    batch = processor(text=["a red cat"], return_for_image_generation=True)
    assert batch["image_sizes"] == [[16, 16]]
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens == [BOS_TOKEN, "a", "Ġred", "Ġcat", BOI_TOKEN, "1", "6", "*", "1", "6", IMAGE_WRAPPER_TOKEN]
    wide = processor(text="a cat", return_for_image_generation=True, ratio="2:1", image_area=128 * 128)
    assert wide["image_sizes"] == [[11, 23]]

    ids = Emu3Tokens.from_config(config)
    assert (ids.codebook_size, ids.visual_stop) == (config.vq_config.codebook_size, len(tokenizer))
    assert tokenizer.convert_tokens_to_ids(visual_token(5)) == ids.visual_start + 5
    assert (ids.bos, ids.eos, ids.pad) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert tokenizer.convert_ids_to_tokens([ids.eol, ids.eof, ids.eoi]) == [
        "<|extra_200|>",
        "<|extra_201|>",
        "<|image end|>",
    ]
    assert (tokenizer.image_token, tokenizer.eof_token, tokenizer.image_wrapper_token) == (
        "<image>",
        "<|extra_201|>",
        IMAGE_WRAPPER_TOKEN,
    )


def test_visual_tokens_must_be_contiguous_in_code_order():
    vocab = {"a": 0, **{visual_token(i): 10 + i for i in range(4)}}
    assert emu3_visual_tokens(vocab) == (10, 14)
    with pytest.raises(ValueError, match="not codes 0..3 at contiguous ids"):
        emu3_visual_tokens({**vocab, visual_token(2): 30})
    with pytest.raises(ValueError, match="no '<|visual token"):
        emu3_visual_tokens({"a": 0})


def test_random_weights_do_not_collapse_greedy_decoding(emu3_dir):
    tokens = transformers_greedy(emu3_dir, image_prompt_ids(emu3_dir, PROMPTS[:1]))[0]
    assert len(set(tokens)) > NEW_TOKENS // 2


def test_both_key_layouts_load_into_transformers_as_the_same_model(emu3_dir, emu3_state_dict_dir):
    """save_pretrained writes the Hub's layout; the rewrite uses the module names; transformers reads both."""
    from safetensors import safe_open
    from transformers import Emu3ForConditionalGeneration

    def keys(model_dir):
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            return set(f.keys())

    hub_keys, module_keys = keys(emu3_dir), keys(emu3_state_dict_dir)
    assert {"text_model.lm_head.weight", "text_model.model.norm.weight"} <= hub_keys
    assert {k.split(".")[0] for k in hub_keys} == {"text_model", "vqmodel"}
    assert {"lm_head.weight", "model.text_model.norm.weight"} <= module_keys
    assert {k.split(".")[0] for k in module_keys} == {"lm_head", "model"}
    hub, hub_info = Emu3ForConditionalGeneration.from_pretrained(emu3_dir, output_loading_info=True)
    ours, info = Emu3ForConditionalGeneration.from_pretrained(emu3_state_dict_dir, output_loading_info=True)
    assert not any(info.values()) and not any(hub_info.values()), (info, hub_info)
    assert set(ours.state_dict()) == set(hub.state_dict()) == module_keys
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in hub.state_dict().items())


# --- vLLM's engine against transformers' generate() ---------------------------------------------------------


@pytest.fixture(scope="module", params=["hub-layout", "state-dict-layout"])
def emu3_engine(request, emu3_dir, emu3_state_dict_dir):
    """vLLM's stock engine on our model class. The state-dict-layout directory also lifts max_model_len
    (256) above its max_position_embeddings (32) with `emu3_engine_overrides`: positions run past 32."""
    from transformers import AutoConfig
    from vllm import LLM

    from vllm_zipar.models.emu3 import emu3_engine_overrides

    if request.param == "hub-layout":
        model_dir = emu3_dir
        engine_kwargs = {"hf_overrides": {"architectures": ["Emu3ForImageGeneration"]}, "max_model_len": 512}
    else:
        model_dir = emu3_state_dict_dir
        engine_kwargs = emu3_engine_overrides(AutoConfig.from_pretrained(model_dir), 256)
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
        max_num_seqs=4,
        seed=0,
        **engine_kwargs,
    )
    yield model_dir, llm
    close_llm(llm)


def vllm_greedy(llm, prompt_ids) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.engine
def test_vllm_greedy_tokens_equal_transformers_generate(emu3_engine):
    model_dir, llm = emu3_engine
    prompt_ids = image_prompt_ids(model_dir)
    assert len(prompt_ids[0]) != len(prompt_ids[1])
    assert vllm_greedy(llm, prompt_ids) == transformers_greedy(model_dir, prompt_ids)


@pytest.mark.engine
def test_the_stock_engine_runs_our_model_class(emu3_engine):
    # Which attention backend the layers get is the engine's choice (tests/engine/test_attention_seam.py).
    from vllm_zipar.models.emu3 import Emu3ForImageGeneration

    model_dir, llm = emu3_engine
    core = llm.llm_engine.engine_core.engine_core
    model_config = core.vllm_config.model_config
    assert model_config.architectures == ["Emu3ForImageGeneration"]
    runner = core.model_executor.driver_worker.worker.model_runner
    assert isinstance(runner.model, Emu3ForImageGeneration)
    context = core.vllm_config.compilation_config.static_forward_context
    layers = [layer for layer in context.values() if hasattr(layer, "impl")]
    assert len(layers) == 2  # one per decoder layer
    if model_dir.name.endswith("state-dict"):
        # 32 on disk; raised with max_model_len (the rotary table follows), prompts + 24 tokens run past 32.
        assert model_config.max_model_len == model_config.hf_config.text_config.max_position_embeddings == 256


def test_vllm_refuses_a_max_model_len_above_the_config_without_the_overrides(emu3_state_dict_dir):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(emu3_state_dict_dir),
        hf_overrides={"architectures": ["Emu3ForImageGeneration"]},
        dtype="float32",
        max_model_len=256,
    )
    with pytest.raises(Exception, match="max_model_len"):
        args.create_engine_config()


# --- the VQ decoder ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hub-layout", "state-dict-layout"])
def test_codes_to_pil_equals_transformers_decode_path(emu3_dir, tmp_path, layout):
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    from vllm_zipar.models.vq.emu3_vq import codes_to_pil, load_emu3_vq

    model_dir = emu3_dir
    if layout == "state-dict-layout":
        import shutil

        model_dir = tmp_path / "state-dict"
        shutil.copytree(emu3_dir, model_dir)
        rewrite_in_state_dict_layout(model_dir)
    vq = load_emu3_vq(model_dir)
    assert vq.downsample == 8 and not vq.model.training
    assert next(vq.model.parameters()).dtype == torch.float32
    height, width = 6, 10
    codes = torch.randint(0, 64, (2, height, width), generator=torch.Generator().manual_seed(3))
    images = codes_to_pil(vq, codes)
    assert [im.size for im in images] == [(width * 8, height * 8)] * 2
    assert all(im.mode == "RGB" for im in images)

    # transformers' own path: vocabulary ids with an EOL after each row, then EOF, EOI, EOS.
    model = Emu3ForConditionalGeneration.from_pretrained(emu3_dir).eval()
    ids = Emu3Tokens.from_config(model.config)
    rows = torch.cat([codes + ids.visual_start, torch.full((2, height, 1), ids.eol)], dim=-1).flatten(1)
    sequence = torch.cat([rows, torch.tensor([[ids.eof, ids.eoi, ids.eos]] * 2)], dim=1)
    with torch.no_grad():
        pixels = model.decode_image_tokens(image_tokens=sequence, height=height, width=width)
    processor = Emu3Processor.from_pretrained(emu3_dir)
    expected = processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    for image, reference in zip(images, expected, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(reference))
    assert np.asarray(images[0]).std() > 10  # not a flat image
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_codes_to_pil_rejects_vocabulary_ids(emu3_dir):
    from vllm_zipar.models.vq.emu3_vq import codes_to_pil, load_emu3_vq

    vq = load_emu3_vq(emu3_dir)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        codes_to_pil(vq, torch.full((1, 2, 2), 447))


# --- loader errors -----------------------------------------------------------------------------------------


def start_engine_on_edited_weights(emu3_dir, tmp_path, edit) -> Exception:
    """Copy the directory, edit its tensors with `edit(state)`, start an engine on it; returns the error."""
    import shutil

    from safetensors.torch import load_file, save_file
    from vllm import LLM

    model_dir = tmp_path / "edited"
    shutil.copytree(emu3_dir, model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    edit(state)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    try:
        with pytest.raises(Exception) as failure:
            LLM(
                model=str(model_dir),
                hf_overrides={"architectures": ["Emu3ForImageGeneration"]},
                dtype="float32",
                enforce_eager=True,
                kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
                max_model_len=512,
            )
    finally:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    return failure.value


@pytest.mark.engine
def test_a_missing_text_weight_is_named(emu3_dir, tmp_path):
    error = start_engine_on_edited_weights(
        emu3_dir, tmp_path, lambda state: state.pop("text_model.model.layers.1.mlp.up_proj.weight")
    )
    assert "text-model weights missing for ['layers.1.mlp.up_proj.weight'] (1)" in str(error)


@pytest.mark.engine
def test_an_unexpected_text_weight_is_named(emu3_dir, tmp_path):
    def add_a_third_layer(state):
        state["text_model.model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64)

    error = start_engine_on_edited_weights(emu3_dir, tmp_path, add_a_third_layer)
    assert "unexpected text-model weights" in str(error)
    assert "text_model.model.layers.2.self_attn.q_proj.weight" in str(error)


# --- tensor parallel ---------------------------------------------------------------------------------------


@pytest.mark.engine
@pytest.mark.parallel
def test_tensor_parallel_2_equals_transformers_generate(emu3_dir):
    """TP=2 over vLLM's `mp` executor: each rank holds one of the two query heads and a replica of the single
    KV head (fewer KV heads than ranks), and half of the MLP; the tokens still equal transformers'."""
    from vllm import LLM, envs

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one OpenMP core list per rank
        # An earlier engine in this process froze vLLM's env reads (envs.enable_envs_cache): re-read them.
        envs.disable_envs_cache()
        llm = LLM(
            model=str(emu3_dir),
            hf_overrides={"architectures": ["Emu3ForImageGeneration"]},
            dtype="float32",
            enforce_eager=True,
            kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
            max_model_len=512,
            max_num_seqs=4,
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
        )
    try:
        prompt_ids = image_prompt_ids(emu3_dir)
        assert vllm_greedy(llm, prompt_ids) == transformers_greedy(emu3_dir, prompt_ids)
    finally:
        close_llm(llm)
