"""Emu3's text decoder as a vLLM model for image generation, built from vLLM's tensor-parallel layers.

Follows transformers' `Emu3TextModel` (models/emu3/modeling_emu3.py): pre-norm Llama blocks with RMSNorm,
SwiGLU, grouped-query attention, biases only where the config asks, and a 1D rotary embedding over the
`rope_parameters` of `text_config` whose `rotate_half` pairs channel i with i + head_dim/2 (neox style).
Positions are used as the runner gives them, so ZipAR can feed raster positions. The head scores the full
vocabulary; restricting it to visual tokens is the engine's job. The VQ in the same checkpoint is skipped here
(`vq/emu3_vq.py` loads it). Engines select this class with `hf_overrides={"architectures":
["Emu3ForImageGeneration"]}`: vLLM's own registry sends the checkpoint's `Emu3ForConditionalGeneration` to its
transformers backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.config import VllmConfig

from vllm_zipar.models.llama_decoder import DecoderSpec, TokenLMDecoder, load_hf_layout

ARCHITECTURE = "Emu3ForImageGeneration"

# Checkpoint key prefixes -> our parameter names. The Hub's Emu3-Gen-hf has `text_model.model.*` +
# `text_model.lm_head.*` (and transformers 5's save_pretrained still writes that layout); transformers 5's
# module names are `model.text_model.*` + `lm_head.*` (a raw state_dict); transformers maps one to the
# other (conversion_mapping.py, "emu3"). The VQ's keys (`vqmodel.*` / `model.vqmodel.*`) are not ours.
_TEXT_PREFIXES = (("model.text_model.", ""), ("text_model.model.", ""), ("text_model.lm_head.", "lm_head."))
_VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")


def emu3_text_config(config: Any) -> Any:
    """The text config of an `Emu3Config` (or the config itself when vLLM already handed the text part)."""
    return getattr(config, "text_config", None) or config


def emu3_engine_overrides(hf_config: Any, max_model_len: int) -> dict[str, Any]:
    """Engine kwargs (`vllm.LLM(**kwargs)`, `EngineArgs`) that run an Emu3 directory on this model class.

    vLLM caps `max_model_len` at `text_config.max_position_embeddings` (9,216 by default); a guided image
    holds both prompts and both copies of the grid in one request, about twice that. Each stream keeps its
    own positions (the runner supplies them), so a longer request needs no new positions: raising the text
    config's `max_position_embeddings` through `hf_overrides` lifts the cap for this engine only (no global
    VLLM_ALLOW_LONG_MAX_MODEL_LEN) and sizes the rotary table to match.
    """
    text = emu3_text_config(hf_config)
    overrides: dict[str, Any] = {"architectures": [ARCHITECTURE]}
    if max_model_len > text.max_position_embeddings:
        overrides["text_config"] = {"max_position_embeddings": max_model_len}
    return {"hf_overrides": overrides, "max_model_len": max_model_len}


class Emu3ForImageGeneration(TokenLMDecoder):
    """vLLM model class for Emu3's text decoder (Emu3-Gen checkpoints in the Hugging Face layout).

    Pipeline parallel: each rank builds only its slice of the layers (vLLM's `make_layers`); the embedding
    lives on the first rank, the final norm and head on the last, and ranks hand over `hidden_states`.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        text = emu3_text_config(config)
        self.config = config
        self.text_config = text
        tie = bool(
            getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
        )
        spec = DecoderSpec.from_llama_config(text)
        if spec.hidden_act != "silu":
            raise ValueError(f"Emu3 text model: hidden_act {spec.hidden_act!r} is not supported (only silu)")
        self.build_token_lm(spec, text, vllm_config, prefix, tie_word_embeddings=tie)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_hf_layout(
            self,
            weights,
            checkpoint_key_to_param,
            skip=_VQ_PREFIXES,  # the VQ decoder: vq/emu3_vq.py
            tied=("lm_head.weight",) if self.tie_word_embeddings else (),
            checkpoint="Emu3 checkpoint",
            nouns=("text-model weights", "text-model weights"),
            expected=(
                f"keys under {[p for p, _ in _TEXT_PREFIXES[:2]]}, 'lm_head.weight' or the VQ's "
                f"{list(_VQ_PREFIXES)} (num_hidden_layers={self.text_config.num_hidden_layers})"
            ),
        )


def checkpoint_key_to_param(key: str) -> str | None:
    """Our parameter name (before q/k/v and gate/up fusion) for a text-model checkpoint key, else None."""
    if key == "lm_head.weight":
        return key
    for old, new in _TEXT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None
