"""Janus-Pro's generation path on tiny random Hugging Face directories: files, prompts, VQ and loading.

The directory is written in the real on-disk format (config.json, generation_config.json, safetensors,
tokenizer, processor files with the chat template) and read back by transformers' own classes. The family
adapter's prompts must equal what `JanusProcessor` and `generate(generation_mode="image")` feed the model;
the VQ decoder must give transformers' pixels; the vLLM model class must name the weights it misses or does
not know, and refuse an engine whose vocabulary cannot hold the image ids.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.models.conftest import TEST_KV_CACHE_BYTES
from vllm_zipar.models.janus_checkpoint import BOI_TOKEN, BOS_TOKEN, JanusTokens
from vllm_zipar.models.prompt_error import PromptError
from vllm_zipar.models.registry import load_image_model
from vllm_zipar.testing.janus_dirs import write_random_janus_dir

PROMPTS = ["a red cat", "  a high quality photo of a small blue bird on a tree, detailed "]


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("janus") / "tiny-janus"
    write_random_janus_dir(model_dir, seed=0)
    return model_dir


@pytest.fixture(scope="module")
def hf_model(janus_dir):
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(janus_dir).eval()


def processor_ids(model_dir, text: str) -> list[int]:
    """transformers' documented image-generation input: the chat template, then `generation_mode="image"`."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    conversation = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(text=[prompt], generation_mode="image")["input_ids"][0].tolist()


# --- the directory in the Hugging Face format ---------------------------------------------------------------


def test_the_tiny_directory_loads_with_transformers_own_classes(janus_dir, hf_model):
    from safetensors import safe_open
    from transformers import AutoProcessor, JanusForConditionalGeneration

    _, info = JanusForConditionalGeneration.from_pretrained(janus_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    with safe_open(str(janus_dir / "model.safetensors"), framework="pt") as f:
        prefixes = {".".join(key.split(".")[:2]) for key in f.keys()}
    assert prefixes == {
        "model.language_model",
        "model.generation_embeddings",
        "model.generation_aligner",
        "model.generation_head",
        "model.vqmodel",
        "model.vision_model",
        "model.aligner",
    }
    config = hf_model.config
    assert config.vision_config.image_size // config.vision_config.patch_size == 8
    assert config.vision_config.num_image_tokens == 64 and config.vq_config.num_patches == 8
    processor = AutoProcessor.from_pretrained(janus_dir)
    tokens = JanusTokens.from_model_dir(janus_dir, config)
    assert hf_model.generation_config.generation_kwargs == {"boi_token_id": tokens.boi}
    assert hf_model.generation_config.guidance_scale == 5
    assert (tokens.bos, tokens.pad) == (processor.tokenizer.bos_token_id, processor.tokenizer.pad_token_id)
    ids = processor_ids(janus_dir, "a red cat")
    assert processor.tokenizer.convert_ids_to_tokens(ids) == [
        BOS_TOKEN,
        "<|User|>",
        ":",
        "Ġ",
        "a",
        "Ġred",
        "Ġcat",
        "Ċ",
        "Ċ",
        "<|Assistant|>",
        ":",
        BOI_TOKEN,
    ]


# --- the family adapter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
def test_the_adapters_prompt_is_the_processors(janus_dir, text):
    model = load_image_model(janus_dir)
    assert model.prompt_ids(text, model.native_size) == processor_ids(janus_dir, text)


def test_the_unconditional_prompt_is_the_one_generate_feeds(janus_dir, hf_model):
    """transformers' generate() doubles the batch and pads the second half's prompt: capture what its text
    embedding receives and compare the unconditional row with the adapter's."""
    model = load_image_model(janus_dir)
    size = model.native_size
    for text in PROMPTS:
        cond = model.prompt_ids(text, size)
        seen: list[torch.Tensor] = []

        def record(module, args, out, seen=seen):
            seen.append(args[0].clone())

        hook = hf_model.get_input_embeddings().register_forward_hook(record)
        try:
            with torch.no_grad():
                hf_model.generate(
                    torch.tensor([cond]),
                    attention_mask=torch.ones(1, len(cond), dtype=torch.long),
                    generation_mode="image",
                    do_sample=False,
                )
        finally:
            hook.remove()
        assert seen[0].tolist() == [cond, model.unconditional_prompt_ids(None, size, cond)]
        uncond = model.unconditional_prompt_ids(None, size, cond)
        tokens = model.tokens
        assert uncond[0] == tokens.bos and uncond[-1] == tokens.boi
        assert set(uncond[1:-1]) == {tokens.pad} and len(uncond) == len(cond)


def test_the_adapters_sizes_tokens_and_defaults(janus_dir):
    model = load_image_model(janus_dir)
    assert [(s.name, s.grid) for s in model.sizes()] == [("16x16", (8, 8))]
    assert model.layout(12).eol is False and model.eol_token is None
    text_vocab = model.hf_config.text_config.vocab_size
    assert model.visual_tokens.logits == range(0, 64)
    assert model.visual_tokens.ids == range(text_vocab, text_vocab + 64)
    assert model.input_vocab_size == text_vocab + 64
    defaults = model.sampling_defaults
    assert (defaults.cfg_scale, defaults.temperature, defaults.top_k, defaults.top_p) == (5.0, 1.0, 0, 1.0)
    with pytest.raises(ValueError, match="generates 8x8 only"):
        model.check_grid((8, 9))
    with pytest.raises(PromptError) as refused:
        model.unconditional_prompt_ids("blurry", model.native_size, [1, 2])
    assert refused.value.param == "negative_prompt" and not model.takes_negative_prompt
    with pytest.raises(PromptError, match="at most 512"):
        model.prompt_ids("cat " * 600, model.native_size)


def test_the_engine_overrides_raise_the_vocab_and_keep_the_text_vocab(janus_dir):
    from vllm_zipar.models.janus import janus_engine_overrides

    model = load_image_model(janus_dir)
    text_vocab = model.hf_config.text_config.vocab_size
    args = model.engine_args()
    assert args["max_model_len"] == model.max_model_len() == 2 * (512 + 8 * 10)
    assert args["hf_overrides"] == {
        "architectures": ["JanusForImageGeneration"],
        "text_config": {"vocab_size": text_vocab + 64},
        "zipar_text_vocab_size": text_vocab,
    }
    # A config that already carries the overrides (the engine's) keeps the same image ids.
    engine_config = model.hf_config
    engine_config.update({"zipar_text_vocab_size": text_vocab})
    engine_config.text_config.vocab_size = text_vocab + 64
    engine_side = type(model)(janus_dir, engine_config)
    assert engine_side.visual_tokens == model.visual_tokens
    long = janus_engine_overrides(model.hf_config, 4096)["hf_overrides"]["text_config"]
    assert long == {"vocab_size": text_vocab + 64, "max_position_embeddings": 4096}


# --- the VQ decoder -----------------------------------------------------------------------------------------


def test_pixels_equal_transformers_decode_and_postprocess(janus_dir, hf_model):
    from transformers import AutoProcessor

    model = load_image_model(janus_dir)
    decoder = model.load_decoder().to("cpu")
    assert not decoder.vq.model.training and decoder.vq.downsample == 2
    codes = torch.randint(0, 64, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        images = decoder.to_pil_images(model.visual_tokens.code_to_id(codes))
    assert [image.size for image in images] == [(16, 16)] * 2
    # transformers' path on its own loaded model: `decode_image_tokens` is `vqmodel.decode` then a permute to
    # channels-last, which the processor mistakes for 16 channels at this toy size (fine at 384 px); the
    # channels-first pixels it permutes, then the processor's postprocess.
    with torch.no_grad():
        pixels = hf_model.model.vqmodel.decode(codes.flatten(1))
        assert torch.equal(pixels.permute(0, 2, 3, 1), hf_model.decode_image_tokens(codes.flatten(1)))
    processor = AutoProcessor.from_pretrained(janus_dir)
    expected = processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    for image, reference in zip(images, expected, strict=True):
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(reference))
    assert np.asarray(images[0]).std() > 5  # not a flat image
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_the_decoder_refuses_other_grids_and_text_ids(janus_dir):
    from vllm_zipar.models.vq.janus_vq import codes_to_pil, load_janus_vq

    vq = load_janus_vq(janus_dir)
    with pytest.raises(ValueError, match=r"codes must be \[batch, 8, 8\]"):
        codes_to_pil(vq, torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        codes_to_pil(vq, torch.full((1, 8, 8), 64))
    model = load_image_model(janus_dir)
    with pytest.raises(ValueError, match="not visual tokens"):
        model.load_decoder().to_pil_images(torch.zeros(1, 8, 8, dtype=torch.long))


# --- loading into vLLM --------------------------------------------------------------------------------------


def start_engine(model_dir, engine_kwargs) -> Exception:
    """Start vLLM's engine on `model_dir` with our model class; returns the error it must fail with."""
    from vllm import LLM
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    try:
        with pytest.raises(Exception) as failure:
            LLM(
                model=str(model_dir),
                dtype="float32",
                enforce_eager=True,
                skip_tokenizer_init=True,
                kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
                **engine_kwargs,
            )
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()
    return failure.value


def edited_dir(janus_dir, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "edited"
    shutil.copytree(janus_dir, model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    edit(state)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


@pytest.mark.engine
def test_a_missing_generation_weight_is_named(janus_dir, tmp_path):
    model_dir = edited_dir(
        janus_dir, tmp_path, lambda state: state.pop("model.generation_head.vision_head.bias")
    )
    error = start_engine(model_dir, load_image_model(model_dir).engine_args())
    assert "generation-path weights missing for ['generation_head.vision_head.bias'] (1)" in str(error)


@pytest.mark.engine
def test_an_unexpected_weight_is_named(janus_dir, tmp_path):
    def add_a_third_layer(state):
        state["model.language_model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64)

    model_dir = edited_dir(janus_dir, tmp_path, add_a_third_layer)
    error = start_engine(model_dir, load_image_model(model_dir).engine_args())
    assert "1 unexpected weights ['model.language_model.layers.2.self_attn.q_proj.weight']" in str(error)


@pytest.mark.engine
def test_an_engine_whose_vocab_cannot_hold_the_image_ids_is_refused(janus_dir):
    # Only the architecture: vLLM would drop the image ids of ZipAR's multi-cell steps (the run hangs).
    error = start_engine(
        janus_dir, {"hf_overrides": {"architectures": ["JanusForImageGeneration"]}, "max_model_len": 1024}
    )
    assert "does not hold the image ids" in str(error)
