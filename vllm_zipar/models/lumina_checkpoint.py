"""Lumina-mGPT model directories: the token strings and ids of Lumina's image layout, read from the config.

A Lumina-mGPT directory on the Hub (`Alpha-VLLM/Lumina-mGPT-7B-768` and siblings) is a Chameleon directory:
`config.json` with `model_type: "chameleon"` and the tokenizer's vocabulary as `vocabulary_map`, safetensors
in the layout of Lumina's `ChameleonXLLMXForConditionalGeneration`, and the tokenizer Lumina's item processor
loads (`AutoTokenizer` on the directory). Image tokens are vocabulary entries named `IMGIMG<digits>Z` whose
digits, written as letters A-J, are the VQ code (transformers' `ChameleonImageVocabularyMapping`, Lumina's
vendored copy in `lumina_mgpt/model/chameleon/modeling_chameleon.py`); the rest of the image layout are
reserved tokens (`lumina_mgpt/data/item_processor.py`, `FlexARItemProcessor`): BOI `<racm3:break>`, the
height and width in 32-pixel units as `<reserved{8800 + n}>`, rows of image tokens each closed by EOL
`<reserved08799>`, then EOI `<eoss>`. A conversation turn ends with `<reserved08706>` (`data/convertsation.py`
`Conversation.sep_token`; the id `inference_solver.py` stops generation at). `LuminaTokens` reads them all
by name, so no id is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BOS_TOKEN = "<s>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
BOI_TOKEN = "<racm3:break>"  # FlexARItemProcessor.image_start_token
EOI_TOKEN = "<eoss>"  # FlexARItemProcessor.image_end_token
EOL_TOKEN = "<reserved08799>"  # FlexARItemProcessor.new_line_token
END_OF_TURN_TOKEN = "<reserved08706>"  # Conversation.sep_token; generate()'s eos_token_id 8710
IMAGE_PLACEHOLDER_TOKEN = "<image>"  # transformers' Chameleon: where an input image goes (unused here)
IMAGE_TOKEN_PREFIX = "IMGIMG"
IMAGE_TOKEN_SUFFIX = "Z"
RESOLUTION_TOKEN_BASE = 8800  # FlexARItemProcessor.get_n_grids_token: f"<reserved{8800 + n:05d}>"
RESOLUTION_UNIT = 32  # pixels per resolution-token unit (FlexARItemProcessor.patch_size)
DOWNSAMPLE = 16  # pixels per image token along each side (Meta's Chameleon VQGAN; item_processor's // 16)

# Chameleon names a code's decimal digits with letters: 0 -> A, ..., 9 -> J.
_DIGIT_LETTERS = {str(d): chr(ord("A") + d) for d in range(10)}
_LETTER_DIGITS = {letter: digit for digit, letter in _DIGIT_LETTERS.items()}


def image_token(code: int) -> str:
    """The vocabulary name of VQ code `code` ("IMGIMG" + its digits as letters + "Z")."""
    return IMAGE_TOKEN_PREFIX + "".join(_DIGIT_LETTERS[d] for d in str(code)) + IMAGE_TOKEN_SUFFIX


def image_token_code(name: str) -> int | None:
    """The VQ code an `IMGIMG...Z` token name stands for, or None for any other name."""
    if not (name.startswith(IMAGE_TOKEN_PREFIX) and name.endswith(IMAGE_TOKEN_SUFFIX)):
        return None
    letters = name[len(IMAGE_TOKEN_PREFIX) : -len(IMAGE_TOKEN_SUFFIX)]
    if not letters or any(letter not in _LETTER_DIGITS for letter in letters):
        return None
    return int("".join(_LETTER_DIGITS[letter] for letter in letters))


def resolution_token(units: int) -> str:
    """The token of a height or width of `units` x 32 pixels."""
    return f"<reserved{RESOLUTION_TOKEN_BASE + units:05d}>"


def lumina_image_ids(vocabulary_map: dict[str, int]) -> tuple[int, ...]:
    """The vocabulary id of each VQ code, in code order (code c is id `ids[c]`); the codes must be 0..n-1."""
    ids: dict[int, int] = {}
    for name, token_id in vocabulary_map.items():
        code = image_token_code(name)
        if code is not None:
            ids[code] = int(token_id)
    if not ids:
        raise ValueError("vocabulary_map holds no image tokens ('IMGIMG...Z' entries)")
    if sorted(ids) != list(range(len(ids))):
        raise ValueError(f"the {len(ids)} image tokens of vocabulary_map are not codes 0..{len(ids) - 1}")
    return tuple(ids[code] for code in range(len(ids)))


@dataclass(frozen=True)
class LuminaTokens:
    """Token ids of Lumina-mGPT's prompts and image layout, read from a config's `vocabulary_map`."""

    image_ids: tuple[int, ...]  # code c -> vocabulary id image_ids[c]
    bos: int
    boi: int
    eoi: int
    eol: int
    end_of_turn: int
    resolution_ids: dict[int, int]  # units of 32 pixels -> id of its `<reserved{8800 + n}>` token

    @property
    def codebook_size(self) -> int:
        return len(self.image_ids)

    def resolution(self, units: int) -> int:
        """The id of the resolution token for `units` x 32 pixels (ValueError if the vocabulary lacks it)."""
        if units not in self.resolution_ids:
            raise ValueError(f"the vocabulary has no resolution token {resolution_token(units)!r}")
        return self.resolution_ids[units]

    @classmethod
    def from_config(cls, config: Any) -> LuminaTokens:
        """From a Chameleon config (`vocabulary_map`; BOS as the config or the vocabulary names it)."""
        vocab = getattr(config, "vocabulary_map", None)
        if not vocab:
            raise ValueError("the Lumina-mGPT (Chameleon) config has no vocabulary_map")
        needed = (BOI_TOKEN, EOI_TOKEN, EOL_TOKEN, END_OF_TURN_TOKEN)
        missing = [token for token in needed if token not in vocab]
        if missing:
            raise ValueError(f"vocabulary_map lacks Lumina-mGPT's image-layout tokens {missing}")
        bos = getattr(config, "bos_token_id", None)
        if bos is None:
            bos = vocab.get(BOS_TOKEN)
        if bos is None:
            raise ValueError(f"the config names no bos_token_id and vocabulary_map has no {BOS_TOKEN!r}")
        resolution_ids = {}
        for name, token_id in vocab.items():
            if name.startswith("<reserved") and name.endswith(">"):
                number = name[len("<reserved") : -1]
                if number.isdigit() and int(number) >= RESOLUTION_TOKEN_BASE:
                    resolution_ids[int(number) - RESOLUTION_TOKEN_BASE] = int(token_id)
        return cls(
            image_ids=lumina_image_ids(vocab),
            bos=int(bos),
            boi=int(vocab[BOI_TOKEN]),
            eoi=int(vocab[EOI_TOKEN]),
            eol=int(vocab[EOL_TOKEN]),
            end_of_turn=int(vocab[END_OF_TURN_TOKEN]),
            resolution_ids=resolution_ids,
        )
