"""LlamaGen class-to-image GPT as a vLLM model, built from vLLM's tensor-parallel layers.

Follows the authors' architecture (autoregressive/models/gpt.py in FoundationVision/LlamaGen): pre-norm
Llama blocks with RMSNorm, SwiGLU, a fused `wqkv` projection, no biases, and a 2D rotary embedding whose
table is indexed by raster position, with all-zero rows for the class-token prefix (so the class token's q
and k are zero in every layer, exactly as in their code). Prompt ids at and above `codebook_size` are class
tokens looked up in the authors' label table; the head predicts image tokens only.

Weights load from the authors' `.pt` file named in config.json, in any of their layouts
(`llamagen_checkpoint.py`), checked key by key before anything is copied.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.utils import PPMissingLayer

from vllm_zipar.models.llama_decoder import DecoderSpec, LlamaStyleDecoder, ParamLoader
from vllm_zipar.models.llamagen_checkpoint import check_gpt_state_dict, unwrap_authors_layout
from vllm_zipar.models.llamagen_config import LlamaGenConfig


def llamagen_rope_table(config: LlamaGenConfig) -> torch.Tensor:
    """cos/sin table [cls_token_num + grid², head_dim/2, 2] of the authors' `precompute_freqs_cis_2d`.

    The first half of each head's rotation pairs turns with the row index, the second half with the column
    index; the class-token rows are zeros (not the identity rotation), as the authors wrote it.
    """
    head_dim, grid = config.rope_head_dim, config.grid_size
    half = head_dim // 2
    freqs = 1.0 / (config.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)  # [grid, head_dim/4]
    grid_angles = torch.cat(
        [angles[:, None, :].expand(-1, grid, -1), angles[None, :, :].expand(grid, -1, -1)], dim=-1
    )  # [grid, grid, head_dim/2]: (row angles, column angles)
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(config.cls_token_num, head_dim // 2, 2), table])


def apply_llamagen_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [tokens, heads, head_dim] by cos_sin [tokens, head_dim/2, 2]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = cos_sin[:, None, :, 0]
    sin = cos_sin[:, None, :, 1]
    rotated = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1
    )
    return rotated.flatten(-2).type_as(x)


@functools.cache
def vllm_has_rotary_op() -> bool:
    return hasattr(torch.ops._C, "rotary_embedding")


class LlamaGenRotaryEmbedding(nn.Module):
    """The 2D rotary embedding as a rotary module of the shared decoder: `(positions, q, k) -> (q, k)` on flat
    `[tokens, heads * head_dim]` views, rotating by the table rows of the positions (raster indices, class
    prefix first). One instance serves every layer.

    In float32 it runs as vLLM's fused `rotary_embedding` op (GPT-J style: interleaved pairs, as the authors
    rotate), in place on the q and k views of the fused projection, bit-identical to `apply_llamagen_rope`
    (tests/models). Other dtypes keep the authors' formula, which rotates in float32 (vLLM's op would round
    the table to the activations' dtype).
    """

    def __init__(self, config: LlamaGenConfig) -> None:
        super().__init__()
        self.head_dim = config.rope_head_dim
        self.register_buffer("table", llamagen_rope_table(config), persistent=False)
        # The same table as vLLM's rotary op reads it: [positions, head_dim] = (cos..., sin...).
        self.register_buffer(
            "cos_sin_cache", torch.cat([self.table[..., 0], self.table[..., 1]], -1), persistent=False
        )

    def uses_fused_op(self, dtype: torch.dtype) -> bool:
        return dtype == torch.float32 and vllm_has_rotary_op()

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uses_fused_op(q.dtype):
            torch.ops._C.rotary_embedding(positions, q, k, self.head_dim, self.cos_sin_cache, False)
            return q, k
        cos_sin = self.table[positions]
        tokens = q.shape[0]
        return (
            apply_llamagen_rope(q.reshape(tokens, -1, self.head_dim), cos_sin).reshape(tokens, -1),
            apply_llamagen_rope(k.reshape(tokens, -1, self.head_dim), cos_sin).reshape(tokens, -1),
        )


def llamagen_decoder_spec(config: LlamaGenConfig) -> DecoderSpec:
    """LlamaGen's GPT as a Llama-style `DecoderSpec` (no biases; heads padded to a kernel size if needed)."""
    return DecoderSpec(
        hidden_size=config.dim,
        num_layers=config.n_layer,
        num_heads=config.n_head,
        num_kv_heads=config.n_kv_head,
        head_dim=config.rope_head_dim,
        intermediate_size=config.ffn_hidden_dim,
        rms_norm_eps=config.norm_eps,
        kernel_head_dim=config.head_dim,
    )


# The authors' parameter names inside a block -> ours (the shared decoder's Hugging Face Llama names).
_BLOCK_NAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


class LlamaGenForImageGeneration(LlamaStyleDecoder):
    """vLLM model class for the authors' LlamaGen c2i checkpoints, on the shared Llama decoder."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if not isinstance(config, LlamaGenConfig):
            config = LlamaGenConfig(**config.to_dict())
        self.config = config
        # Tell vLLM's default loader to read only the GPT file (the VQ `.pt` sits in the same directory).
        self.allow_patterns_overrides = [config.gpt_checkpoint]
        pp = get_pp_group()
        if pp.is_first_rank:
            self.tok_embeddings = VocabParallelEmbedding(config.codebook_size, config.dim)
            self.cls_embedding = VocabParallelEmbedding(config.num_class_embeddings, config.dim)
        else:
            self.tok_embeddings, self.cls_embedding = PPMissingLayer(), PPMissingLayer()
        self.build_decoder(
            llamagen_decoder_spec(config), LlamaGenRotaryEmbedding(config), vllm_config, prefix
        )
        if pp.is_last_rank:
            self.output = ParallelLMHead(config.codebook_size, config.dim, prefix=f"{prefix}output")
        else:
            self.output = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.codebook_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_class = input_ids >= self.config.codebook_size
        image_ids = input_ids.masked_fill(is_class, 0)
        class_ids = (input_ids - self.config.codebook_size).masked_fill(~is_class, 0)
        return torch.where(is_class[:, None], self.cls_embedding(class_ids), self.tok_embeddings(image_ids))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.output, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # vLLM's `.pt` iterator yields the file's top-level entries; regroup them to undo the authors'
        # layouts.
        path = self.config.gpt_checkpoint
        state = unwrap_authors_layout(dict(weights), path)
        check_gpt_state_dict(state, self.config, path)
        params = ParamLoader(self)
        head_dim, n_head, n_kv = self.config.rope_head_dim, self.config.n_head, self.config.n_kv_head
        for name, tensor in state.items():
            if name.startswith("layers."):
                layer, local = name.split(".", 2)[1:]
                block = f"layers.{layer}."
                if local == "attention.wqkv.weight":
                    q, k, v = tensor.split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim], dim=0)
                    for shard, part in (("q", q), ("k", k), ("v", v)):
                        params.load(block + "self_attn.qkv_proj.weight", part, shard)
                elif local == "feed_forward.w1.weight":  # gate, then up: silu(w1·x) * w3·x
                    params.load(block + "mlp.gate_up_proj.weight", tensor, 0)
                elif local == "feed_forward.w3.weight":
                    params.load(block + "mlp.gate_up_proj.weight", tensor, 1)
                else:
                    params.load(block + _BLOCK_NAMES[local], tensor)
            elif name == "cls_embedding.embedding_table.weight":
                params.load("cls_embedding.weight", tensor)
            else:
                params.load(name, tensor)
        return params.loaded
