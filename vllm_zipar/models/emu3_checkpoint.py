"""Emu3 model directories: the token ids Emu3's image layout needs, and tiny random directories for tests.

A real Emu3-Gen directory (Hugging Face layout, as `Emu3ForConditionalGeneration.save_pretrained` and the
Hub's Emu3-Gen-hf write it) holds `config.json` (text and VQ configs plus `vocabulary_map`, the tokenizer's
vocab), safetensors with the text model and the VQ, a byte-level BPE tokenizer whose special tokens the
processor reads (`image_token`, `boi_token`, `eoi_token`, `image_wrapper_token`, `eof_token`) and the image
processor's config. `write_random_emu3_dir` writes the same files at toy sizes, nothing downloaded;
`Emu3Tokens` reads the ids of the visual codes and of the row/image closing tokens from any such config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The strings Emu3's tokenizer and modeling code use (transformers' models/emu3/, the Hub's Emu3-Gen-hf).
PAD_TOKEN = "<|endoftext|>"
EOL_TOKEN = "<|extra_200|>"  # ends every row of visual tokens
EOF_TOKEN = "<|extra_201|>"  # ends the last row
BOS_TOKEN = "<|extra_203|>"
EOS_TOKEN = "<|extra_204|>"
BOI_TOKEN = "<|image start|>"
EOI_TOKEN = "<|image end|>"
IMAGE_WRAPPER_TOKEN = "<|image token|>"  # closes the "{h}*{w}" size text of an image prompt
IMAGE_TOKEN = "<image>"  # placeholder for an input image (understanding), unused by generation
VISUAL_TOKEN_PREFIX = "<|visual token "


def visual_token(code: int) -> str:
    return f"{VISUAL_TOKEN_PREFIX}{code:06d}|>"


# The tokenizer attributes `Emu3Processor.__init__` reads, as the Hub's converter names them.
EXTRA_SPECIAL_TOKENS = {
    "image_token": IMAGE_TOKEN,
    "boi_token": BOI_TOKEN,
    "eoi_token": EOI_TOKEN,
    "image_wrapper_token": IMAGE_WRAPPER_TOKEN,
    "eof_token": EOF_TOKEN,
}

# A few dozen words the tiny tokenizer learns as whole tokens (byte-level BPE falls back to bytes otherwise).
_WORDS = (
    "a an the of with and in on at red blue green yellow black white small large cat dog bird fish tree "
    "house car boat flower mountain river sky sun moon photo painting picture realistic detailed quality "
    "high low blurry ugly beautiful masterpiece cartoon"
).split()


def emu3_visual_tokens(vocabulary_map: dict[str, int]) -> tuple[int, int]:
    """(start, stop): the ids of `<|visual token NNNNNN|>`, code i = id start + i, as one contiguous range."""
    ids = {}
    for name, token_id in vocabulary_map.items():
        if name.startswith(VISUAL_TOKEN_PREFIX):
            ids[int(name[len(VISUAL_TOKEN_PREFIX) : -2])] = token_id
    if not ids:
        raise ValueError("vocabulary_map holds no '<|visual token NNNNNN|>' entries")
    start = ids.get(0)
    if start is None or any(ids.get(code) != start + code for code in range(len(ids))):
        raise ValueError(
            f"the {len(ids)} visual tokens of vocabulary_map are not codes 0..{len(ids) - 1} at contiguous "
            "ids in code order; this model layer maps code i to id start + i"
        )
    return start, start + len(ids)


@dataclass(frozen=True)
class Emu3Tokens:
    """Token ids of Emu3's image layout: rows of visual tokens each closed by EOL, then EOF, EOI, EOS."""

    visual_start: int  # id of code 0
    visual_stop: int  # one past the id of the last code
    eol: int
    eof: int
    boi: int
    eoi: int
    image_wrapper: int
    bos: int
    eos: int
    pad: int

    @property
    def codebook_size(self) -> int:
        return self.visual_stop - self.visual_start

    @classmethod
    def from_config(cls, config: Any) -> Emu3Tokens:
        """From an `Emu3Config` (its `vocabulary_map`; BOS/EOS/pad as the text config states them)."""
        vocab = config.vocabulary_map
        if not vocab:
            raise ValueError("the Emu3 config has no vocabulary_map")
        needed = (EOL_TOKEN, EOF_TOKEN, BOI_TOKEN, EOI_TOKEN, IMAGE_WRAPPER_TOKEN)
        missing = [token for token in needed if token not in vocab]
        if missing:
            raise ValueError(f"vocabulary_map lacks Emu3's image tokens {missing}")
        start, stop = emu3_visual_tokens(vocab)
        text = config.text_config
        return cls(
            visual_start=start,
            visual_stop=stop,
            eol=vocab[EOL_TOKEN],
            eof=vocab[EOF_TOKEN],
            boi=vocab[BOI_TOKEN],
            eoi=vocab[EOI_TOKEN],
            image_wrapper=vocab[IMAGE_WRAPPER_TOKEN],
            bos=_single_id(text.bos_token_id, "bos_token_id"),
            eos=_single_id(text.eos_token_id, "eos_token_id"),
            pad=_single_id(text.pad_token_id, "pad_token_id"),
        )


def _single_id(value: int | list[int] | None, name: str) -> int:
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    if value is None:
        raise ValueError(f"the Emu3 text config needs exactly one {name}")
    return int(value)


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
