"""Emu3 model directories: the token strings and ids Emu3's image layout needs.

A real Emu3-Gen directory (Hugging Face layout, as `Emu3ForConditionalGeneration.save_pretrained` and the
Hub's Emu3-Gen-hf write it) holds `config.json` (text and VQ configs plus `vocabulary_map`, the tokenizer's
vocab), safetensors with the text model and the VQ, a byte-level BPE tokenizer whose special tokens the
processor reads (`image_token`, `boi_token`, `eoi_token`, `image_wrapper_token`, `eof_token`) and the image
processor's config. `Emu3Tokens` reads the ids of the visual codes and of the row/image closing tokens from
any such config; `vllm_zipar/testing/emu3_dirs.py` writes the same files at toy sizes for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
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
