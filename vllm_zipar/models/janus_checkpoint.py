"""Janus-Pro model directories: the token strings and ids Janus's image-generation prompt needs.

A real Janus-Pro directory in the Hugging Face layout (`deepseek-community/Janus-Pro-1B`, as transformers'
`JanusForConditionalGeneration.save_pretrained` and its conversion script write it) holds `config.json`
(`text_config` a Llama config, `vision_config`, `vq_config`), `generation_config.json` (guidance 5,
temperature 1, the pad id and `generation_kwargs.boi_token_id`), safetensors under `model.language_model.*`,
`model.generation_{embeddings,aligner,head}.*`, `model.vqmodel.*` and the understanding path's
`model.vision_model.*` / `model.aligner.*`, a byte-level BPE tokenizer that adds BOS, and the processor's
files with its chat template. `JanusTokens` reads the ids the generation prompt and its unconditional twin
use; `vllm_zipar/testing/janus_dirs.py` writes the same files at toy sizes for tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The strings of DeepSeek's tokenizer (transformers' models/janus/convert_janus_weights_to_hf.py).
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"  # an input image (understanding), unused by generation
BOI_TOKEN = "<begin_of_image>"  # ends a generation prompt; its hidden state predicts cell (0, 0)
EOI_TOKEN = "<end_of_image>"
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"
# The tokenizer attributes `JanusProcessor.__init__` reads.
EXTRA_SPECIAL_TOKENS = {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN}


# Set by `janus_engine_overrides` (models/janus.py): the checkpoint's text vocabulary, beside the engine's
# `text_config.vocab_size`, which is raised to hold the image ids.
TEXT_VOCAB_KEY = "zipar_text_vocab_size"


def janus_text_vocab_size(config: Any) -> int:
    """How many text ids the checkpoint embeds (image code c is id `text vocab + c`), with or without the
    engine's raised `text_config.vocab_size`."""
    value = getattr(config, TEXT_VOCAB_KEY, None)
    return int(value) if value is not None else int(config.text_config.vocab_size)


@dataclass(frozen=True)
class JanusTokens:
    """Token ids of Janus's prompt, BOS ... BOI; the unconditional prompt pads what lies between."""

    bos: int
    boi: int
    pad: int

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: Any) -> JanusTokens:
        """From the directory's `generation_config.json` (what transformers' `generate(generation_mode=
        "image")` reads: `bos_token_id`, `pad_token_id`, `generation_kwargs.boi_token_id`), falling back to
        the text config's BOS and pad ids."""
        path = Path(model_dir) / "generation_config.json"
        generation = json.loads(path.read_text()) if path.is_file() else {}
        text = config.text_config
        boi = (generation.get("generation_kwargs") or {}).get("boi_token_id", generation.get("boi_token_id"))
        if boi is None:
            raise ValueError(
                f"{path}: no generation_kwargs.boi_token_id (Janus's image generation needs the "
                "<begin_of_image> id there)"
            )
        bos = generation.get("bos_token_id", text.bos_token_id)
        pad = generation.get("pad_token_id", text.pad_token_id)
        if bos is None or pad is None:
            raise ValueError(
                f"{model_dir}: the generation or text config needs bos_token_id and pad_token_id"
            )
        return cls(bos=_single_id(bos, "bos_token_id"), boi=_single_id(boi, "boi_token_id"), pad=int(pad))


def _single_id(value: int | list[int], name: str) -> int:
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"the Janus config needs exactly one {name}, got {value}")
        value = value[0]
    return int(value)
