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

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
)
from vllm.sequence import IntermediateTensors

from vllm_zipar.engine.attention_backends import zipar_attention_backend

ARCHITECTURE = "Emu3ForImageGeneration"

# Checkpoint key prefixes -> our parameter names. The Hub's Emu3-Gen-hf has `text_model.model.*` +
# `text_model.lm_head.*` (and transformers 5's save_pretrained still writes that layout); transformers 5's
# module names are `model.text_model.*` + `lm_head.*` (a raw state_dict); transformers maps one to the
# other (conversion_mapping.py, "emu3"). The VQ's keys (`vqmodel.*` / `model.vqmodel.*`) are not ours.
_TEXT_PREFIXES = (("model.text_model.", ""), ("text_model.model.", ""), ("text_model.lm_head.", "lm_head."))
_VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")
# Unfused projections in the checkpoint -> (our fused parameter, shard id).
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_STACKED_KEY = re.compile(r"^(layers\.\d+\.(?:self_attn|mlp)\.)(\w+)(\.(?:weight|bias))$")


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


class Emu3Attention(nn.Module):
    def __init__(self, text: Any, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads
        # KV heads split over the ranks, or each replicated on several when there are fewer than ranks
        # (QKVParallelLinear loads the replicas), as vLLM's llama.py does.
        if heads % tp or (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
            raise ValueError(
                f"tensor_parallel_size {tp} must divide num_attention_heads {heads} and divide or be a "
                f"multiple of num_key_value_heads {kv_heads}"
            )
        self.num_heads = heads // tp
        self.num_kv_heads = max(1, kv_heads // tp)
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(text, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            text.hidden_size, self.head_dim, heads, kv_heads, bias=bias, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(
            heads * self.head_dim, text.hidden_size, bias=bias, prefix=f"{prefix}.o_proj"
        )
        # Positions can reach max_model_len when an engine raises it past the config (emu3_engine_overrides).
        max_position = max(text.max_position_embeddings, vllm_config.model_config.max_model_len)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=max_position,
            is_neox_style=True,  # transformers' rotate_half: channel i turns with channel i + head_dim/2
            rope_parameters=text.rope_parameters,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
            attn_backend=zipar_attention_backend(),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class Emu3MLP(nn.Module):
    def __init__(self, text: Any, prefix: str) -> None:
        super().__init__()
        if text.hidden_act != "silu":
            raise ValueError(f"Emu3 text model: hidden_act {text.hidden_act!r} is not supported (only silu)")
        bias = bool(getattr(text, "mlp_bias", False))
        inner = text.intermediate_size
        # gate then up, so SiluAndMul computes silu(gate·x) * up·x.
        self.gate_up_proj = MergedColumnParallelLinear(
            text.hidden_size, [inner, inner], bias=bias, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(inner, text.hidden_size, bias=bias, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act(gate_up))
        return out


class Emu3DecoderLayer(nn.Module):
    def __init__(self, text: Any, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.self_attn = Emu3Attention(text, vllm_config, prefix=f"{prefix}.self_attn")
        self.mlp = Emu3MLP(text, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(positions, self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class Emu3ForImageGeneration(nn.Module, SupportsPP):
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
        self.vocab_size = text.vocab_size
        self.tie_word_embeddings = bool(
            getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
        )
        pp = get_pp_group()
        if pp.is_first_rank or (self.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size)
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            text.num_hidden_layers,
            lambda prefix: Emu3DecoderLayer(text, vllm_config, prefix=prefix),
            prefix=f"{prefix}layers",
        )
        if pp.is_last_rank:
            self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
            self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, prefix=f"{prefix}lm_head")
            if self.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.embed_tokens)
        else:
            self.norm, self.lm_head = PPMissingLayer(), PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], text.hidden_size
        )
        self.logits_processor = LogitsProcessor(text.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        pp = get_pp_group()
        if not pp.is_first_rank:
            assert intermediate_tensors is not None
            hidden = intermediate_tensors["hidden_states"]
        elif inputs_embeds is not None:
            hidden = inputs_embeds
        else:
            hidden = self.embed_input_ids(input_ids)
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden = layer(positions, hidden)
        if not pp.is_last_rank:
            return IntermediateTensors({"hidden_states": hidden})
        return self.norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()  # checkpoint names (unfused, without the layout's prefix)
        unexpected: list[str] = []
        for key, tensor in weights:
            if key.startswith(_VQ_PREFIXES):
                continue  # the VQ decoder: vq/emu3_vq.py
            name = checkpoint_key_to_param(key)
            if name is None:
                unexpected.append(key)
                continue
            param_name, shard = fused_param_name(name)
            if param_name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied to embed_tokens
            if is_pp_missing_parameter(param_name, self):
                continue  # another pipeline rank holds it
            if param_name not in params:
                unexpected.append(key)
                continue
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(name)
        if unexpected:
            raise ValueError(
                f"Emu3 checkpoint: {len(unexpected)} unexpected text-model weights {sorted(unexpected)[:8]}; "
                f"expected keys under {[p for p, _ in _TEXT_PREFIXES[:2]]}, 'lm_head.weight' or the VQ's "
                f"{list(_VQ_PREFIXES)} (num_hidden_layers={self.text_config.num_hidden_layers})"
            )
        missing = sorted(
            name for param_name in params for name in unfused_names(param_name) if name not in loaded
        )
        if missing:
            raise ValueError(
                f"Emu3 checkpoint: text-model weights missing for {missing[:8]} ({len(missing)})"
            )
        return set(params)


def fused_param_name(name: str) -> tuple[str, object]:
    """(our parameter, shard id or None) for an unfused checkpoint name (q/k/v -> qkv_proj, gate/up ->
    gate_up_proj)."""
    stacked = _STACKED_KEY.match(name)
    if stacked and stacked.group(2) in _STACKED:
        fused, shard = _STACKED[stacked.group(2)]
        return f"{stacked.group(1)}{fused}{stacked.group(3)}", shard
    return name, None


def unfused_names(param_name: str) -> list[str]:
    """The checkpoint names (after the layout prefix) that fill our parameter `param_name`."""
    stacked = _STACKED_KEY.match(param_name)
    if stacked is None:
        return [param_name]
    parts = [orig for orig, (fused, _) in _STACKED.items() if fused == stacked.group(2)]
    return [f"{stacked.group(1)}{orig}{stacked.group(3)}" for orig in parts] or [param_name]


def checkpoint_key_to_param(key: str) -> str | None:
    """Our parameter name (before q/k/v and gate/up fusion) for a text-model checkpoint key, else None."""
    if key == "lm_head.weight":
        return key
    for old, new in _TEXT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None
