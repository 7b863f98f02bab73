"""Janus-Pro's image-generation path as a vLLM model, built from vLLM's tensor-parallel layers.

Follows transformers' `JanusForConditionalGeneration.generate(generation_mode="image")`
(models/janus/modeling_janus.py): the Llama language model (`text_config`: pre-norm blocks, RMSNorm, SwiGLU,
grouped-query attention, 1D rotary over `rope_parameters` whose `rotate_half` pairs channel i with
i + head_dim/2, neox style) on the shared decoder; prompt ids below the text vocabulary enter through
`embed_tokens`; image codes enter through `generation_embeddings` -> `generation_aligner` (Linear, act,
Linear) at ids `text_vocab_size + code`, so one batch mixes both; logits come from `generation_head`
(Linear, act, Linear: one column per code, `vq_config.num_embeddings`), never from `lm_head`. The LM is
tensor-parallel (vLLM's parallel layers); the generation embeddings, aligner and head are replicated on every
rank (small: 16384 x 8 embeddings and three hidden-size matrices for Janus-Pro-1B) so every rank computes
them exactly as transformers does. Not loaded, by design: the understanding path (`model.vision_model.*`,
`model.aligner.*`), `lm_head` (text generation) and the VQ (`model.vqmodel.*`, decoded by
`vq/janus_vq.py`). Engines select this class with `hf_overrides={"architectures":
["JanusForImageGeneration"]}` (`janus_engine_overrides`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.utils import PPMissingLayer

from vllm_zipar.models.janus_checkpoint import TEXT_VOCAB_KEY, janus_text_vocab_size
from vllm_zipar.models.llama_decoder import DecoderSpec, LlamaStyleDecoder, load_hf_layout

ARCHITECTURE = "JanusForImageGeneration"

# Checkpoint keys (what transformers 5's save_pretrained writes, the deepseek-community layout).
_LM_PREFIX = "model.language_model."
_GENERATION_PREFIXES = ("model.generation_embeddings.", "model.generation_aligner.", "model.generation_head.")
# Keys this class never loads: the understanding path, the text head (tied to embed_tokens), the VQ.
SKIPPED_PREFIXES = ("model.vision_model.", "model.aligner.", "model.vqmodel.", "lm_head.")


def janus_engine_overrides(hf_config: Any, max_model_len: int) -> dict[str, Any]:
    """Engine kwargs (`vllm.LLM(**kwargs)`, `EngineArgs`) that run a Janus directory on this model class.

    vLLM keeps only sampled ids below `model_config.get_vocab_size()` (`text_config.vocab_size`) when a
    request samples several tokens in one step (`RejectionSampler.parse_output` in the runner's
    bookkeeping): ZipAR's image ids, above the text vocabulary, would be dropped. So the engine's
    `text_config.vocab_size` is raised to text + codebook, and the checkpoint's text vocabulary is kept in
    `zipar_text_vocab_size` (`janus_text_vocab_size`), which this class and the adapter read.

    vLLM caps `max_model_len` at `text_config.max_position_embeddings`; a guided image holds both streams in
    one request. Each stream keeps its own positions (the runner supplies them), so raising the text config's
    `max_position_embeddings` through `hf_overrides` lifts the cap for this engine only, as for Emu3.
    """
    text = hf_config.text_config
    text_vocab = janus_text_vocab_size(hf_config)
    text_overrides: dict[str, Any] = {"vocab_size": text_vocab + int(hf_config.vq_config.num_embeddings)}
    if max_model_len > text.max_position_embeddings:
        text_overrides["max_position_embeddings"] = max_model_len
    overrides: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "text_config": text_overrides,
        TEXT_VOCAB_KEY: text_vocab,
    }
    return {"hf_overrides": overrides, "max_model_len": max_model_len}


def _activation(name: str) -> nn.Module:
    # transformers' own activation table: the generation MLPs must match its arithmetic exactly.
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class JanusGenerationAligner(nn.Module):
    """Code embedding -> LM width: `fc1`, then (act, Linear) per hidden layer (transformers'
    `JanusVQVAEAlignerMLP`, parameter names kept)."""

    def __init__(self, vq: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vq.embed_dim, vq.projection_dim)
        self.hidden_layers = nn.ModuleList(
            [nn.Linear(vq.projection_dim, vq.projection_dim) for _ in range(1, vq.num_hidden_layers)]
        )
        self.activation_fn = _activation(vq.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(self.activation_fn(x))
        return x


class JanusGenerationHead(nn.Module):
    """LM hidden state -> one logit per VQ code (transformers' `JanusVQVAEHead`, parameter names kept)."""

    def __init__(self, vq: Any) -> None:
        super().__init__()
        self.proj_out = nn.Linear(vq.image_token_embed_dim, vq.projection_dim)
        self.activation_fn = _activation(vq.hidden_act)
        self.vision_head = nn.Linear(vq.projection_dim, vq.num_embeddings)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.activation_fn(self.proj_out(hidden)))


class JanusForImageGeneration(LlamaStyleDecoder):
    """vLLM model class for Janus-Pro's image generation (Hugging Face `JanusForConditionalGeneration`
    directories, generation path only).

    Input ids: `[0, text_vocab_size)` are text (the prompt), `text_vocab_size + c` is VQ code `c` (what the
    engine feeds back); logits: `[N, num_embeddings]`, column c scoring code c. Pipeline parallel: the
    embeddings (text and generation) live on the first rank, the final norm and generation head on the last.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        text, vq = config.text_config, config.vq_config
        self.config = config
        self.text_config = text
        self.text_vocab_size = janus_text_vocab_size(config)
        self.codebook_size = int(vq.num_embeddings)
        engine_vocab = vllm_config.model_config.get_vocab_size()
        if engine_vocab < self.text_vocab_size + self.codebook_size:
            # vLLM would silently drop image ids of steps that sample several cells (ZipAR): refuse.
            raise ValueError(
                f"Janus: the engine's vocab size {engine_vocab} does not hold the image ids "
                f"[{self.text_vocab_size}, {self.text_vocab_size + self.codebook_size}); start the engine "
                "with janus_engine_overrides' hf_overrides (vllm-zipar's front-ends do)"
            )
        spec = DecoderSpec.from_llama_config(text)
        if spec.hidden_act != "silu":
            raise ValueError(
                f"Janus language model: hidden_act {spec.hidden_act!r} is not supported (only silu)"
            )
        if vq.projection_dim != text.hidden_size or vq.image_token_embed_dim != text.hidden_size:
            raise ValueError(
                f"Janus vq_config: projection_dim {vq.projection_dim} and image_token_embed_dim "
                f"{vq.image_token_embed_dim} must equal the language model's hidden_size {text.hidden_size}"
            )
        pp = get_pp_group()
        if pp.is_first_rank:
            self.embed_tokens = VocabParallelEmbedding(self.text_vocab_size, text.hidden_size)
            self.generation_embeddings = nn.Embedding(vq.num_embeddings, vq.embed_dim)
            self.generation_aligner = JanusGenerationAligner(vq)
        else:
            self.embed_tokens = PPMissingLayer()
            self.generation_embeddings = PPMissingLayer()
            self.generation_aligner = PPMissingLayer()
        # Positions can reach max_model_len when an engine raises it past the config (janus_engine_overrides).
        rotary = get_rope(
            spec.head_dim,
            max_position=max(text.max_position_embeddings, vllm_config.model_config.max_model_len),
            is_neox_style=True,  # transformers' Llama rotate_half: channel i turns with i + head_dim/2
            rope_parameters=text.rope_parameters,
        )
        self.build_decoder(spec, rotary, vllm_config, prefix)
        self.generation_head = JanusGenerationHead(vq) if pp.is_last_rank else PPMissingLayer()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_image = input_ids >= self.text_vocab_size
        # Out-of-range lookups are masked to id 0 and their rows replaced below.
        text = self.embed_tokens(torch.where(is_image, 0, input_ids))
        if not bool(is_image.any()):
            return text
        codes = (input_ids[is_image] - self.text_vocab_size).long()
        image = self.generation_aligner(self.generation_embeddings(codes))
        out = text.clone()
        out[is_image] = image.to(out.dtype)
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.generation_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_hf_layout(
            self,
            weights,
            checkpoint_key_to_param,
            skip=SKIPPED_PREFIXES,  # not the generation path (see the module docstring)
            checkpoint="Janus checkpoint",
            nouns=("weights", "generation-path weights"),
            expected=(
                f"keys under {[_LM_PREFIX, *_GENERATION_PREFIXES]} or the skipped {list(SKIPPED_PREFIXES)} "
                f"(num_hidden_layers={self.text_config.num_hidden_layers})"
            ),
        )


def checkpoint_key_to_param(key: str) -> str | None:
    """Our parameter name (before q/k/v and gate/up fusion) for a generation-path key, else None."""
    if key.startswith(_LM_PREFIX):
        return key[len(_LM_PREFIX) :]
    if key.startswith(_GENERATION_PREFIXES):
        return key[len("model.") :]
    return None
