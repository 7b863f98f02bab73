"""The pre-norm Llama decoder every Llama-style family is built from: attention, gated MLP, block, the
pipeline-parallel layer stack and the weight-loading helper.

A family describes its decoder with a `DecoderSpec` and a rotary module (anything called as
`rotary(positions, q, k) -> (q, k)` on flat `[tokens, heads * head_dim]` views, like vLLM's `get_rope`
objects), and supplies its own embedding and head. Parameter names follow Hugging Face's Llama
(`self_attn.qkv_proj`, `mlp.gate_up_proj`, `input_layernorm`, ...), fused as vLLM fuses them. Attention layers
are plain vLLM `Attention`: the engine chooses their backend (and so the ZipAR mask) once per engine.
Follows vLLM's `model_executor/models/llama.py` (whose `LlamaMLP` is used as is); the residual adds stay
unfused so every family keeps its reference's exact float32 arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
)
from vllm.sequence import IntermediateTensors

Rotary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of a Llama-style decoder (whole model, before tensor-parallel splitting)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # Heads run padded with zero channels to this size where the attention kernel lacks `head_dim` (zeros
    # add nothing to q·k; padded v channels come out zero and are cut off; the scale stays head_dim's).
    kernel_head_dim: int | None = None
    # Chameleon's q/k norm: each head's q and k layer-normed over its own channels, then scaled and shifted
    # by that head's weight and bias, before the rotary embedding (`HeadLayerNorm`).
    qk_norm: bool = False
    qk_norm_eps: float = 1e-5
    # Chameleon's swin_norm blocks: the norms move after attention and MLP (x + norm(attn(x)), ...).
    post_norm: bool = False

    @classmethod
    def from_llama_config(cls, text: Any) -> DecoderSpec:
        """The decoder a transformers Llama-style text config describes (`LlamaConfig`, `Emu3TextConfig`)."""
        heads = text.num_attention_heads
        return cls(
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=text.num_key_value_heads or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
            rms_norm_eps=text.rms_norm_eps,
            attention_bias=bool(getattr(text, "attention_bias", False)),
            mlp_bias=bool(getattr(text, "mlp_bias", False)),
            hidden_act=text.hidden_act,
        )


class HeadLayerNorm(nn.Module):
    """Layer norm over each head's channels with a weight and bias per head, for this rank's heads.

    Statistics are taken per head (no reduction across heads), as Chameleon's `ChameleonLayerNorm` does.
    Checkpoints store the affine parameters `[n, head_dim]` for `n` groups of consecutive heads (Lumina keeps
    Chameleon's training layout, `n = model_parallel_size`; transformers' Chameleon stores one row per head):
    the loader repeats each row over its group (`repeat_interleave`) and keeps this rank's heads.
    """

    def __init__(
        self, total_heads: int, local_heads: int, first_head: int, head_dim: int, eps: float
    ) -> None:
        super().__init__()
        self.total_heads, self.local_heads, self.first_head = total_heads, local_heads, first_head
        self.head_dim, self.eps = head_dim, eps
        self.weight = nn.Parameter(torch.ones(local_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(local_heads, head_dim))
        for param in (self.weight, self.bias):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        groups = loaded.shape[0]
        if loaded.ndim != 2 or loaded.shape[1] != self.head_dim or self.total_heads % groups:
            raise ValueError(
                f"q/k-norm parameter of shape {tuple(loaded.shape)}: expected [n, {self.head_dim}] with n "
                f"dividing the {self.total_heads} heads"
            )
        per_head = loaded.repeat_interleave(self.total_heads // groups, dim=0)
        param.data.copy_(per_head[self.first_head : self.first_head + self.local_heads])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.reshape(x.shape[0], self.local_heads, self.head_dim)
        heads = nn.functional.layer_norm(heads, (self.head_dim,), None, None, eps=self.eps)
        return (heads * self.weight + self.bias).reshape(x.shape[0], -1)


class DecoderAttention(nn.Module):
    """Grouped-query self-attention with a fused q/k/v projection, tensor-parallel over heads."""

    def __init__(self, spec: DecoderSpec, rotary: Rotary, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = spec.num_heads, spec.num_kv_heads
        # KV heads split over the ranks, or each replicated on several when there are fewer than ranks
        # (QKVParallelLinear loads the replicas), as vLLM's llama.py does.
        if heads % tp or (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
            raise ValueError(
                f"tensor_parallel_size {tp} must divide the attention heads ({heads}) and divide or be a "
                f"multiple of the key/value heads ({kv_heads})"
            )
        self.num_heads = heads // tp
        self.num_kv_heads = max(1, kv_heads // tp)
        self.head_dim = spec.head_dim
        self.kernel_head_dim = spec.kernel_head_dim or spec.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.rotary_emb = rotary
        if spec.qk_norm:
            rank = get_tensor_model_parallel_rank()
            # This rank's KV head: its own slice, or (fewer KV heads than ranks) the replica it holds, as
            # QKVParallelLinear assigns them.
            kv_first = rank * self.num_kv_heads if kv_heads >= tp else rank // (tp // kv_heads)
            eps = spec.qk_norm_eps
            self.q_norm = HeadLayerNorm(heads, self.num_heads, rank * self.num_heads, self.head_dim, eps)
            self.k_norm = HeadLayerNorm(kv_heads, self.num_kv_heads, kv_first, self.head_dim, eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size,
            self.head_dim,
            heads,
            kv_heads,
            bias=spec.attention_bias,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            heads * self.head_dim, spec.hidden_size, bias=spec.attention_bias, prefix=f"{prefix}.o_proj"
        )
        self.attn = Attention(
            self.num_heads,
            self.kernel_head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
        )

    def _to_kernel_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        if self.kernel_head_dim == self.head_dim:
            return x
        x = x.reshape(x.shape[0], heads, self.head_dim)
        x = nn.functional.pad(x, (0, self.kernel_head_dim - self.head_dim))
        return x.reshape(x.shape[0], heads * self.kernel_head_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(
            self._to_kernel_heads(q.reshape(q.shape[0], -1), self.num_heads),
            self._to_kernel_heads(k.reshape(k.shape[0], -1), self.num_kv_heads),
            self._to_kernel_heads(v, self.num_kv_heads),
        )
        if self.kernel_head_dim != self.head_dim:
            tokens = hidden.shape[0]
            out = out.view(tokens, self.num_heads, self.kernel_head_dim)[..., : self.head_dim]
            out = out.reshape(tokens, self.q_size)
        out, _ = self.o_proj(out)
        return out


class DecoderLayer(nn.Module):
    """One pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)) (SwiGLU); post-norm if the spec says."""

    def __init__(self, spec: DecoderSpec, rotary: Rotary, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(spec, rotary, vllm_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(
            spec.hidden_size,
            spec.intermediate_size,
            spec.hidden_act,
            bias=spec.mlp_bias,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        self.post_norm = spec.post_norm

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:  # Chameleon's ChameleonSwinDecoderLayer: the same norms, after each sublayer
            h = x + self.input_layernorm(self.self_attn(positions, x))
            return h + self.post_attention_layernorm(self.mlp(h))
        h = x + self.self_attn(positions, self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaStyleDecoder(nn.Module, SupportsPP):
    """Base of a family's vLLM model class: the decoder layers of this pipeline rank and the final norm.

    Pipeline parallel: each rank builds only its slice of the layers (vLLM's `make_layers`); the family's
    embedding lives on the first rank, the final norm and its head on the last, and ranks hand over
    `hidden_states`. A subclass calls `build_decoder`, defines `embed_input_ids`, `compute_logits` and
    `load_weights`; `forward` is shared.
    """

    def build_decoder(self, spec: DecoderSpec, rotary: Rotary, vllm_config: VllmConfig, prefix: str) -> None:
        self.decoder_spec = spec
        self.start_layer, self.end_layer, self.layers = make_layers(
            spec.num_layers,
            lambda prefix: DecoderLayer(spec, rotary, vllm_config, prefix=prefix),
            prefix=f"{prefix}layers",
        )
        last = get_pp_group().is_last_rank
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps) if last else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], spec.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
        # Positions are what the runner gives: raster positions under ZipAR (the rotary reads them as is).
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden = layer(positions, hidden)
        if not pp.is_last_rank:
            return IntermediateTensors({"hidden_states": hidden})
        return self.norm(hidden)


class TokenLMDecoder(LlamaStyleDecoder):
    """A decoder whose vocabulary embedding feeds every token and whose vocabulary head scores them (Emu3,
    Lumina-mGPT): the embedding on the first pipeline rank (and the last, when tied), a 1D rotary embedding
    whose `rotate_half` pairs channel i with i + head_dim/2 (neox style), the head on the last rank."""

    def build_token_lm(
        self,
        spec: DecoderSpec,
        lm_config: Any,
        vllm_config: VllmConfig,
        prefix: str,
        *,
        tie_word_embeddings: bool,
    ) -> None:
        """`lm_config` gives vocab_size, hidden_size, max_position_embeddings and rope_parameters."""
        vocab, hidden = lm_config.vocab_size, lm_config.hidden_size
        self.vocab_size = vocab
        self.tie_word_embeddings = tie_word_embeddings
        pp = get_pp_group()
        if pp.is_first_rank or (tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(vocab, hidden)
        else:
            self.embed_tokens = PPMissingLayer()
        # Positions reach max_model_len when an engine raises it past the config (the families' overrides).
        rotary = get_rope(
            spec.head_dim,
            max_position=max(lm_config.max_position_embeddings, vllm_config.model_config.max_model_len),
            is_neox_style=True,
            rope_parameters=lm_config.rope_parameters,
        )
        self.build_decoder(spec, rotary, vllm_config, prefix)
        if pp.is_last_rank:
            self.lm_head = ParallelLMHead(vocab, hidden, prefix=f"{prefix}lm_head")
            if tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(vocab)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)


class ParamLoader:
    """Copies checkpoint tensors into a model's parameters through their vLLM weight loaders (tensor-parallel
    shards, fused q/k/v and gate/up), skipping parameters another pipeline rank holds."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.loaded: set[str] = set()

    def __contains__(self, param_name: str) -> bool:
        return param_name in self.params

    def held_elsewhere(self, param_name: str) -> bool:
        return is_pp_missing_parameter(param_name, self.model)

    def load(self, param_name: str, tensor: torch.Tensor, shard: object = None) -> None:
        if self.held_elsewhere(param_name):
            return
        param = self.params[param_name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard)
        self.loaded.add(param_name)


def load_hf_layout(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    key_to_param: Callable[[str], str | None],
    *,
    skip: tuple[str, ...] = (),
    tied: tuple[str, ...] = (),
    checkpoint: str,
    nouns: tuple[str, str] = ("weights", "weights"),
    expected: str,
) -> set[str]:
    """Load a Hugging Face checkpoint whose Llama projections are unfused (q/k/v, gate/up) into `model`.

    `key_to_param` maps a checkpoint key to our (unfused) parameter name, or None for a key that is not ours;
    keys under `skip` are read elsewhere or not at all; parameters in `tied` share another's weight. Every
    unexpected key and every parameter left unfilled is named in a ValueError (`checkpoint`: e.g. "Emu3
    checkpoint"; `nouns`: what the unexpected and the missing keys are called; `expected`: where the keys
    should have been).
    """
    params = ParamLoader(model)
    loaded: set[str] = set()  # unfused names
    unexpected: list[str] = []
    for key, tensor in weights:
        if key.startswith(skip):
            continue
        name = key_to_param(key)
        if name is None:
            unexpected.append(key)
            continue
        param_name, shard = fused_param_name(name)
        if param_name in tied or params.held_elsewhere(param_name):
            continue  # tied to another parameter, or held by another pipeline rank
        if param_name not in params:
            unexpected.append(key)
            continue
        params.load(param_name, tensor, shard)
        loaded.add(name)
    if unexpected:
        raise ValueError(
            f"{checkpoint}: {len(unexpected)} unexpected {nouns[0]} {sorted(unexpected)[:8]}; "
            f"expected {expected}"
        )
    missing = sorted(name for param in params.params for name in unfused_names(param) if name not in loaded)
    if missing:
        raise ValueError(f"{checkpoint}: {nouns[1]} missing for {missing[:8]} ({len(missing)})")
    return set(params.params)


# Hugging Face Llama's unfused projections -> (our fused parameter, shard id), as vLLM's llama.py maps them.
HF_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_STACKED_KEY = re.compile(r"^(.*layers\.\d+\.(?:self_attn|mlp)\.)(\w+)(\.(?:weight|bias))$")


def fused_param_name(name: str) -> tuple[str, object]:
    """(our parameter, shard id or None) for a Hugging Face Llama parameter name (q/k/v -> qkv_proj,
    gate/up -> gate_up_proj)."""
    stacked = _STACKED_KEY.match(name)
    if stacked and stacked.group(2) in HF_STACKED:
        fused, shard = HF_STACKED[stacked.group(2)]
        return f"{stacked.group(1)}{fused}{stacked.group(3)}", shard
    return name, None


def unfused_names(param_name: str) -> list[str]:
    """The Hugging Face Llama names that fill our parameter `param_name`."""
    stacked = _STACKED_KEY.match(param_name)
    if stacked is None:
        return [param_name]
    parts = [orig for orig, (fused, _) in HF_STACKED.items() if fused == stacked.group(2)]
    return [f"{stacked.group(1)}{orig}{stacked.group(3)}" for orig in parts] or [param_name]
