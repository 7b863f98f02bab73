"""Lumina-mGPT's decoder (Chameleon with q/k norm) as a vLLM model, built from vLLM's tensor-parallel layers.

Follows Lumina's vendored `ChameleonForConditionalGeneration` (lumina_mgpt/model/chameleon/
modeling_chameleon.py): pre-norm Llama blocks (RMSNorm, SwiGLU) whose attention layer-norms each head's q and
k over its channels before the 1D rotary embedding (`rotate_half` pairs channel i with i + head_dim/2, neox
style); the q/k-norm weights and biases are stored `[model_parallel_size, head_dim]` and repeated over
consecutive heads (`HeadLayerNorm` in `llama_decoder.py` expands them and keeps each tensor-parallel rank's
heads). `swin_norm` configs get Chameleon's post-norm blocks. The head scores the whole vocabulary and never
masks image tokens (Lumina serves with `mask_image_logits` off; the engine samples image columns only). The
VQ encoder some Chameleon checkpoints carry (`model.vqmodel.*`) is not read: pixels come from Meta's VQGAN
(`vq/chameleon_vqgan.py`). Engines select this class with `hf_overrides={"architectures":
["LuminaForImageGeneration"]}` (`lumina_engine_overrides`): the directory's own architecture,
`ChameleonXLLMXForConditionalGeneration`, is Lumina's training class, which vLLM does not know.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.config import VllmConfig

from vllm_zipar.models.llama_decoder import DecoderSpec, TokenLMDecoder, load_hf_layout

ARCHITECTURE = "LuminaForImageGeneration"
QK_NORM_EPS = (
    1e-5  # ChameleonLayerNorm's F.layer_norm(..., eps=1e-5), fixed in Lumina's and transformers' code
)

_MODEL_PREFIX = "model."
_VQ_PREFIX = "model.vqmodel."


def lumina_engine_overrides(hf_config: Any, max_model_len: int) -> dict[str, Any]:
    """Engine kwargs (`vllm.LLM(**kwargs)`, `EngineArgs`) that run a Lumina directory on this model class.

    vLLM caps `max_model_len` at the config's `max_position_embeddings`; a guided image holds both streams in
    one request. Each stream keeps its own positions (the runner supplies them), so raising
    `max_position_embeddings` through `hf_overrides` lifts the cap for this engine only, as for Emu3.
    """
    overrides: dict[str, Any] = {"architectures": [ARCHITECTURE]}
    if max_model_len > hf_config.max_position_embeddings:
        overrides["max_position_embeddings"] = max_model_len
    return {"hf_overrides": overrides, "max_model_len": max_model_len}


def lumina_decoder_spec(config: Any) -> DecoderSpec:
    """The decoder a Chameleon config describes: Llama's shape plus q/k norm (and swin_norm's post-norms)."""
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    if config.hidden_size % heads:
        raise ValueError(f"Chameleon: hidden_size {config.hidden_size} is not a multiple of {heads} heads")
    if config.hidden_act != "silu":
        raise ValueError(f"Chameleon: hidden_act {config.hidden_act!r} is not supported (only silu)")
    mp = int(getattr(config, "model_parallel_size", 1) or 1)
    if heads % mp or kv_heads % mp:
        raise ValueError(
            f"Chameleon: model_parallel_size {mp} must divide the heads ({heads}) and KV heads ({kv_heads})"
        )
    return DecoderSpec(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        # Chameleon's attention always splits hidden_size evenly (its head_dim is never configured).
        head_dim=config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        attention_bias=bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        hidden_act=config.hidden_act,
        qk_norm=True,
        qk_norm_eps=QK_NORM_EPS,
        post_norm=bool(getattr(config, "swin_norm", False)),
    )


class LuminaForImageGeneration(TokenLMDecoder):
    """vLLM model class for Lumina-mGPT (Chameleon) directories in the Hugging Face layout.

    Pipeline parallel: each rank builds only its slice of the layers; the embedding lives on the first rank,
    the final norm and the head on the last.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        tie = bool(getattr(config, "tie_word_embeddings", False))
        spec = lumina_decoder_spec(config)
        self.build_token_lm(spec, config, vllm_config, prefix, tie_word_embeddings=tie)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_hf_layout(
            self,
            weights,
            checkpoint_key_to_param,
            skip=(_VQ_PREFIX,),  # Chameleon's VQ encoder, when a checkpoint carries it
            tied=("lm_head.weight",) if self.tie_word_embeddings else (),
            checkpoint="Lumina-mGPT checkpoint",
            nouns=("weights", "decoder weights"),
            expected=(
                f"keys under {_MODEL_PREFIX!r} or 'lm_head.weight' "
                f"(num_hidden_layers={self.config.num_hidden_layers})"
            ),
        )


def checkpoint_key_to_param(key: str) -> str | None:
    """Our parameter name (before q/k/v and gate/up fusion) for a decoder checkpoint key, else None."""
    if key == "lm_head.weight":
        return key
    if key.startswith(_MODEL_PREFIX):
        return key[len(_MODEL_PREFIX) :]
    return None
