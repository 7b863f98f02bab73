"""Tiny random Emu3-Gen directories in the real Hugging Face layout, for tests and benchmarks.

`write_random_emu3_dir` writes what `Emu3ForConditionalGeneration.save_pretrained` and `Emu3Processor` write
(config, safetensors, tokenizer, processor configs) at toy sizes, nothing downloaded; the tokenizer is a
byte-level BPE shaped like Emu3's (`build_tiny_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_zipar.models.emu3_checkpoint import (
    BOI_TOKEN,
    BOS_TOKEN,
    EOF_TOKEN,
    EOI_TOKEN,
    EOL_TOKEN,
    EOS_TOKEN,
    EXTRA_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    IMAGE_WRAPPER_TOKEN,
    PAD_TOKEN,
    visual_token,
)

# A few dozen words the tiny tokenizer learns as whole tokens (byte-level BPE falls back to bytes otherwise).
_WORDS = (
    "a an the of with and in on at red blue green yellow black white small large cat dog bird fish tree "
    "house car boat flower mountain river sky sun moon photo painting picture realistic detailed quality "
    "high low blurry ugly beautiful masterpiece cartoon"
).split()


def build_tiny_tokenizer(codebook_size: int):
    """A byte-level BPE tokenizer shaped like Emu3's: text (bytes + `_WORDS`), special tokens, then codes.

    Layout as in the real vocabulary (151,643 text tokens, specials, 32,768 visual tokens last), at toy size:
    byte-level so any prompt tokenizes, digits and `*` are single bytes (the prompt's "{h}*{w}").
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Enough merges to spell every word (with and without its leading space) as one token.
    merges = sum(len(w) for w in _WORDS) * 2
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False, min_frequency=1
    )
    backend.train_from_iterator([" ".join(_WORDS)] * 4 + _WORDS, trainer)
    specials = [PAD_TOKEN, EOL_TOKEN, EOF_TOKEN, BOS_TOKEN, EOS_TOKEN, BOI_TOKEN, EOI_TOKEN]
    specials += [IMAGE_WRAPPER_TOKEN, IMAGE_TOKEN]
    backend.add_special_tokens(specials + [visual_token(code) for code in range(codebook_size)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def write_random_emu3_dir(
    model_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 128,
    codebook_size: int = 64,
    max_position_embeddings: int = 2048,
    rope_theta: float = 1_000_000.0,
    std: float = 0.25,
    image_area: int = 128 * 128,
    vq_base_channels: int = 32,
    vq_embed_dim: int = 4,
    vq_num_res_blocks: int = 0,
    vq_temporal_downsample: int = 1,
) -> Any:
    """Write a complete random Emu3 directory in the Hugging Face layout; returns its `Emu3Config`.

    Files: config.json, generation_config.json, model.safetensors (save_pretrained's keys, which are the Hub's
    Emu3-Gen-hf layout: `text_model.model.*`, `text_model.lm_head.weight`, `vqmodel.*`), the tokenizer
    (`build_tiny_tokenizer`), the processor and image processor configs. Text weights are normal(0, `std`),
    float32 (transformers' default 0.02 makes every logit tie, so greedy decoding repeats one token); the VQ
    keeps transformers' own init. `image_area` (pixels) becomes the processor's default generation size:
    128×128 → a 16×16 grid. The VQ has four levels (downsample 8, as the real one) of `vq_base_channels`
    channels (GroupNorm's 32 groups need a multiple of 32) and no attention, so a 16×16 grid decodes quickly.
    """
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor

    if vq_base_channels % 32:
        raise ValueError(f"vq_base_channels {vq_base_channels}: Emu3's VQ GroupNorms need a multiple of 32")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    # The tokenizer carries `image_area`: Emu3Processor takes tokenizer init kwargs as its call defaults.
    tokenizer = build_tiny_tokenizer(codebook_size)
    tokenizer.init_kwargs["image_area"] = image_area
    vocab = tokenizer.get_vocab()
    config = Emu3Config(
        vocabulary_map=vocab,
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "bos_token_id": vocab[BOS_TOKEN],
            "eos_token_id": vocab[EOS_TOKEN],
            "pad_token_id": vocab[PAD_TOKEN],
            "initializer_range": std,
        },
        vq_config={
            "codebook_size": codebook_size,
            "embed_dim": vq_embed_dim,
            "latent_channels": vq_embed_dim,
            "base_channels": vq_base_channels,
            "channel_multiplier": [1, 1, 1, 1],
            "num_res_blocks": vq_num_res_blocks,
            "temporal_downsample_factor": vq_temporal_downsample,
            "attn_resolutions": [],
            "hidden_size": vq_base_channels,  # the middle block's attention width: channels at the last level
        },
    )
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # Normal weights on every text matrix; RMSNorm gains stay ones.
        for name, param in model.named_parameters():
            if not name.startswith("model.vqmodel") and param.ndim == 2:
                param.normal_(0.0, std)
    model.save_pretrained(model_dir)
    image_processor = Emu3ImageProcessor(
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=image_area // 4,
        max_pixels=image_area * 4,
        spatial_factor=8,
    )
    Emu3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)
    return config
