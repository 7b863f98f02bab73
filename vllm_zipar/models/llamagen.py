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


class LlamaGenRotary:
    """One step's 2D rotary embedding for every layer: the table rows of the step's raster positions.

    In float32 it runs as vLLM's fused `rotary_embedding` op (GPT-J style: interleaved pairs, as the authors
    rotate), in place on the q and k views of the fused projection: one call per layer instead of ~16
    tensor ops, bit-identical to `apply_llamagen_rope` (tests/models). Other dtypes keep the authors'
    formula, which rotates in float32 (vLLM's op would round the table to the activations' dtype).
    """

    def __init__(
        self, positions: torch.Tensor, table: torch.Tensor, cos_sin_cache: torch.Tensor, dtype
    ) -> None:
        self.fused = dtype == torch.float32 and vllm_has_rotary_op()
        self.positions = positions
        self.cos_sin_cache = cos_sin_cache
        self.cos_sin = None if self.fused else table[positions]

    def rotate(self, q: torch.Tensor, k: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q [tokens, heads * head_dim], k [tokens, kv_heads * head_dim] -> rotated, [tokens, heads, dim]."""
        tokens = q.shape[0]
        if self.fused:
            torch.ops._C.rotary_embedding(self.positions, q, k, head_dim, self.cos_sin_cache, False)
            return q.view(tokens, -1, head_dim), k.view(tokens, -1, head_dim)
        return (
            apply_llamagen_rope(q.view(tokens, -1, head_dim), self.cos_sin),
            apply_llamagen_rope(k.view(tokens, -1, head_dim), self.cos_sin),
        )


class LlamaGenAttention(nn.Module):
    def __init__(self, config: LlamaGenConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if config.n_head % tp or config.n_kv_head % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide n_head {config.n_head} "
                f"and n_kv_head {config.n_kv_head}"
            )
        self.num_heads = config.n_head // tp
        self.num_kv_heads = config.n_kv_head // tp
        self.head_dim = config.rope_head_dim
        # Heads of unsupported sizes (GPT-3B: 100) run padded with zero channels: zeros add nothing to q·k,
        # the padded v channels come out zero and are cut off, and the scale stays the real head dim's.
        self.kernel_head_dim = config.head_dim
        self.wqkv = QKVParallelLinear(
            config.dim, self.head_dim, config.n_head, config.n_kv_head, bias=False, prefix=f"{prefix}.wqkv"
        )
        self.wo = RowParallelLinear(
            config.n_head * self.head_dim, config.dim, bias=False, prefix=f"{prefix}.wo"
        )
        self.attn = Attention(
            self.num_heads,
            self.kernel_head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
            attn_backend=zipar_attention_backend(),
        )

    def _to_kernel_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        if self.kernel_head_dim == self.head_dim:
            return x.reshape(x.shape[0], -1)
        x = nn.functional.pad(x, (0, self.kernel_head_dim - self.head_dim))
        return x.reshape(x.shape[0], heads * self.kernel_head_dim)

    def forward(self, hidden: torch.Tensor, rotary: LlamaGenRotary) -> torch.Tensor:
        qkv, _ = self.wqkv(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        tokens = hidden.shape[0]
        q, k = rotary.rotate(q, k, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        out = self.attn(
            self._to_kernel_heads(q, self.num_heads),
            self._to_kernel_heads(k, self.num_kv_heads),
            self._to_kernel_heads(v, self.num_kv_heads),
        )
        if self.kernel_head_dim != self.head_dim:
            out = out.view(tokens, self.num_heads, self.kernel_head_dim)[..., : self.head_dim]
        out, _ = self.wo(out.reshape(tokens, q_size))
        return out


class LlamaGenFeedForward(nn.Module):
    def __init__(self, config: LlamaGenConfig, prefix: str) -> None:
        super().__init__()
        hidden = config.ffn_hidden_dim
        # w1 (gate) and w3 (up) fused in that order, so SiluAndMul computes silu(w1·x) * w3·x.
        self.w13 = MergedColumnParallelLinear(
            config.dim, [hidden, hidden], bias=False, prefix=f"{prefix}.w13"
        )
        self.w2 = RowParallelLinear(hidden, config.dim, bias=False, prefix=f"{prefix}.w2")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.w13(x)
        out, _ = self.w2(self.act(gate_up))
        return out


class LlamaGenBlock(nn.Module):
    def __init__(self, config: LlamaGenConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.attention = LlamaGenAttention(config, vllm_config, prefix=f"{prefix}.attention")
        self.feed_forward = LlamaGenFeedForward(config, prefix=f"{prefix}.feed_forward")
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, rotary: LlamaGenRotary) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotary)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaGenForImageGeneration(nn.Module, SupportsPP):
    """vLLM model class for the authors' LlamaGen c2i checkpoints.

    Pipeline parallel: each rank builds only its slice of the blocks (vLLM's `make_layers`); the embeddings
    live on the first rank, the final norm and head on the last, and ranks hand over `hidden_states`.
    """

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
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.n_layer,
            lambda prefix: LlamaGenBlock(config, vllm_config, prefix=prefix),
            prefix=f"{prefix}layers",
        )
        if pp.is_last_rank:
            self.norm = RMSNorm(config.dim, eps=config.norm_eps)
            self.output = ParallelLMHead(config.codebook_size, config.dim, prefix=f"{prefix}output")
        else:
            self.norm, self.output = PPMissingLayer(), PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.dim
        )
        self.logits_processor = LogitsProcessor(config.codebook_size)
        self.register_buffer("rope_table", llamagen_rope_table(config), persistent=False)
        # The same table as vLLM's rotary op reads it: [positions, head_dim] = (cos..., sin...).
        self.register_buffer(
            "rope_cos_sin_cache",
            torch.cat([self.rope_table[..., 0], self.rope_table[..., 1]], -1),
            persistent=False,
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_class = input_ids >= self.config.codebook_size
        image_ids = input_ids.masked_fill(is_class, 0)
        class_ids = (input_ids - self.config.codebook_size).masked_fill(~is_class, 0)
        return torch.where(is_class[:, None], self.cls_embedding(class_ids), self.tok_embeddings(image_ids))

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
        # Positions are raster indices (class prefix first); the table row holds that cell's 2D rotation.
        rotary = LlamaGenRotary(positions, self.rope_table, self.rope_cos_sin_cache, hidden.dtype)
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden = layer(hidden, rotary)
        if not pp.is_last_rank:
            return IntermediateTensors({"hidden_states": hidden})
        return self.norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.output, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # vLLM's `.pt` iterator yields the file's top-level entries; regroup them to undo the authors'
        # layouts.
        path = self.config.gpt_checkpoint
        state = unwrap_authors_layout(dict(weights), path)
        check_gpt_state_dict(state, self.config, path)
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def load(param_name: str, tensor: torch.Tensor, shard: object = None) -> None:
            if is_pp_missing_parameter(param_name, self):
                return  # another pipeline rank holds it
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(param_name)

        head_dim, n_head, n_kv = self.config.rope_head_dim, self.config.n_head, self.config.n_kv_head
        for name, tensor in state.items():
            if name.endswith("attention.wqkv.weight"):
                q, k, v = tensor.split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim], dim=0)
                for shard, part in (("q", q), ("k", k), ("v", v)):
                    load(name, part, shard)
            elif name.endswith("feed_forward.w1.weight"):
                load(name.replace("w1", "w13"), tensor, 0)
            elif name.endswith("feed_forward.w3.weight"):
                load(name.replace("w3", "w13"), tensor, 1)
            elif name == "cls_embedding.embedding_table.weight":
                load("cls_embedding.weight", tensor)
            else:
                load(name, tensor)
        return loaded
