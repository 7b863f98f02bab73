"""Reference forward of Janus-Pro's image-generation path: pure PyTorch, float32, explicit mask, no cache.

Written from transformers' ``models/janus/modeling_janus.py`` (``JanusModel``: ``generation_embeddings``,
``JanusVQVAEAlignerMLP``, ``JanusVQVAEHead``; ``JanusForConditionalGeneration.generate``, which embeds the
prompt with the language model's ``embed_tokens`` and every image code with
``prepare_embeddings_for_image_generation``) and ``models/llama/modeling_llama.py`` (the language model).
Inputs: text ids go through ``embed_tokens``; image codes through ``generation_embeddings`` then the aligner
(``fc1``, then GELU + linear per hidden layer). The Llama decoder: per layer RMSNorm -> attention (q/k/v
projections, 1D rotate-half RoPE, grouped-query heads, softmax(q k^T / sqrt(hd)) v, o projection) -> residual,
RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm. Image logits over the codebook come out of the generation
head (``proj_out``, GELU, ``vision_head``), never ``lm_head``. Only the weights are taken from transformers;
every op is written out here. ``forward_tokens`` recomputes the whole sequence under a boolean mask
``attend[i, j]`` (query i may read key j), so ``janus_decoders.py`` can state any ZipAR mask exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReferenceJanusConfig:
    """Shapes read from ``JanusConfig``: the Llama ``text_config`` and the generation path's ``vq_config``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    mlp_bias: bool
    codebook_size: int  # vq_config.num_embeddings: the image codes
    code_dim: int  # vq_config.embed_dim
    aligner_layers: int  # vq_config.num_hidden_layers: fc1 plus (aligner_layers - 1) hidden linears

    @classmethod
    def from_janus_config(cls, config) -> ReferenceJanusConfig:
        tc, vq = config.text_config, config.vq_config
        if tc.model_type != "llama":
            raise ValueError(f"text_config.model_type={tc.model_type!r}: the reference implements Llama only")
        rope = dict(getattr(tc, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"rope_type={rope.get('rope_type')!r}: the reference implements the default RoPE"
            )
        theta = rope.get("rope_theta", getattr(tc, "rope_theta", None))
        if theta is None:
            raise ValueError("text config has no rope_theta")
        if tc.hidden_act != "silu":
            raise ValueError(
                f"text hidden_act={tc.hidden_act!r}: the reference implements SwiGLU (silu) only"
            )
        if vq.hidden_act != "gelu":
            raise ValueError(f"vq hidden_act={vq.hidden_act!r}: the reference implements exact GELU only")
        if vq.projection_dim != tc.hidden_size or vq.image_token_embed_dim != tc.hidden_size:
            raise ValueError("the generation aligner and head must match the language model's hidden size")
        n_heads = tc.num_attention_heads
        n_kv = tc.num_key_value_heads or n_heads
        if n_heads % n_kv:
            raise ValueError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        return cls(
            vocab_size=tc.vocab_size,
            hidden_size=tc.hidden_size,
            num_layers=tc.num_hidden_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // n_heads,
            rms_norm_eps=float(tc.rms_norm_eps),
            rope_theta=float(theta),
            attention_bias=bool(getattr(tc, "attention_bias", False)),
            mlp_bias=bool(getattr(tc, "mlp_bias", False)),
            codebook_size=vq.num_embeddings,
            code_dim=vq.embed_dim,
            aligner_layers=vq.num_hidden_layers,
        )


_LM = "model.language_model."  # the Llama decoder inside JanusForConditionalGeneration.state_dict()
_GEN = ("model.generation_embeddings.", "model.generation_aligner.", "model.generation_head.")


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, what transformers' ``ACT2FN["gelu"]`` is."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class ReferenceJanus:
    """Janus-Pro's generation path as plain float32 tensors (``w[name]``), with a masked, cache-free forward.

    Weight names: the Llama decoder's without ``model.language_model.`` (``embed_tokens.weight``,
    ``layers.0.self_attn.q_proj.weight``, ``norm.weight``), the generation path's without ``model.``
    (``generation_embeddings.weight``, ``generation_aligner.fc1.weight``,
    ``generation_head.vision_head.bias``).
    """

    def __init__(self, config: ReferenceJanusConfig, weights: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.w = {k: v.detach().to(torch.float32).clone() for k, v in weights.items()}
        for name in self._required():
            if name not in self.w:
                raise KeyError(f"missing weight {name!r}")
        hd = config.head_dim
        # transformers' default RoPE: inv_freq = 1 / theta^(arange(0, hd, 2) / hd), in float32.
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    def _required(self) -> list[str]:
        names = ["embed_tokens.weight", "norm.weight", "generation_embeddings.weight"]
        names += ["generation_aligner.fc1.weight", "generation_aligner.fc1.bias"]
        for i in range(self.config.aligner_layers - 1):
            names += [
                f"generation_aligner.hidden_layers.{i}.weight",
                f"generation_aligner.hidden_layers.{i}.bias",
            ]
        for x in ("proj_out", "vision_head"):
            names += [f"generation_head.{x}.weight", f"generation_head.{x}.bias"]
        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            names += [
                p + "input_layernorm.weight",
                p + "post_attention_layernorm.weight",
                *(p + f"self_attn.{x}_proj.weight" for x in "qkvo"),
                *(p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")),
            ]
        return names

    @classmethod
    def from_hf(cls, model) -> ReferenceJanus:
        """Wrap the weights of a transformers ``JanusForConditionalGeneration`` (vision encoder, VQ-VAE and
        ``lm_head`` are not part of the generation path and are left out)."""
        weights = {}
        for key, value in model.state_dict().items():
            if key.startswith(_LM):
                weights[key[len(_LM) :]] = value
            elif key.startswith(_GEN):
                weights[key[len("model.") :]] = value
        return cls(ReferenceJanusConfig.from_janus_config(model.config), weights)

    # ----------------------------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = (x * x).mean(-1, keepdim=True)
        return self.w[name + ".weight"] * (x * torch.rsqrt(var + self.config.rms_norm_eps))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE: x * cos + [-x2, x1] * sin, with x = [x1, x2] split at head_dim / 2."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def embed(self, ids, is_image) -> torch.Tensor:
        """Input embeddings ``float32[n, hidden]``: ``ids[i]`` is an image code where ``is_image[i]`` (through
        ``generation_embeddings`` and the aligner), else a text id (through ``embed_tokens``)."""
        cfg = self.config
        ids = torch.as_tensor(ids, dtype=torch.long)
        is_image = torch.as_tensor(is_image, dtype=torch.bool)
        if ids.dim() != 1 or is_image.shape != ids.shape:
            raise ValueError(f"ids {tuple(ids.shape)}, is_image {tuple(is_image.shape)}: want [n], [n]")
        codes, text = ids[is_image], ids[~is_image]
        if codes.numel() and not bool(((codes >= 0) & (codes < cfg.codebook_size)).all()):
            raise ValueError(f"image codes outside [0, {cfg.codebook_size})")
        if text.numel() and not bool(((text >= 0) & (text < cfg.vocab_size)).all()):
            raise ValueError(f"text ids outside [0, {cfg.vocab_size})")
        out = torch.empty(ids.numel(), cfg.hidden_size, dtype=torch.float32)
        out[~is_image] = self.w["embed_tokens.weight"][text]
        h = self._linear(self.w["generation_embeddings.weight"][codes], "generation_aligner.fc1")
        for i in range(cfg.aligner_layers - 1):
            h = self._linear(_gelu(h), f"generation_aligner.hidden_layers.{i}")
        out[is_image] = h
        return out

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The generation head: ``vision_head(gelu(proj_out(hidden)))``, ``float32[..., codebook_size]``."""
        return self._linear(
            _gelu(self._linear(hidden, "generation_head.proj_out")), "generation_head.vision_head"
        )

    @torch.no_grad()
    def hidden_states(self, ids, is_image, pos, attend: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``float32[n, hidden]`` of ``ids[n]`` (text ids or image codes, per
        ``is_image[n]``) at positions ``pos[n]``; ``attend[i, j]``: query ``i`` may read key ``j``."""
        cfg = self.config
        x = self.embed(ids, is_image)
        n = x.shape[0]
        pos = torch.as_tensor(pos, dtype=torch.long)
        if pos.shape != (n,) or attend.shape != (n, n) or attend.dtype != torch.bool:
            raise ValueError(
                f"{n} tokens, pos {tuple(pos.shape)}, attend {tuple(attend.shape)} {attend.dtype}: "
                "want [n], bool [n, n]"
            )
        if not bool(attend.any(dim=1).all()):
            raise ValueError("a query row of attend allows no key")
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        angles = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [n, hd/2]
        angles = torch.cat([angles, angles], dim=-1)  # [n, hd]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        kv_of_head = torch.arange(nh) // (nh // nkv)  # query head h reads kv head h // group
        blocked = ~attend
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            h = self._rms(x, p + "input_layernorm")
            q = self._linear(h, p + "self_attn.q_proj").view(n, nh, hd)
            k = self._linear(h, p + "self_attn.k_proj").view(n, nkv, hd)
            v = self._linear(h, p + "self_attn.v_proj").view(n, nkv, hd)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            q, k, v = q.transpose(0, 1), k[:, kv_of_head].transpose(0, 1), v[:, kv_of_head].transpose(0, 1)
            scores = (q @ k.transpose(1, 2)) * hd**-0.5  # [nh, n, n]
            probs = torch.softmax(scores.masked_fill(blocked[None], float("-inf")), dim=-1)
            attn = (probs @ v).transpose(0, 1).reshape(n, nh * hd)
            x = x + self._linear(attn, p + "self_attn.o_proj")
            h = self._rms(x, p + "post_attention_layernorm")
            gated = torch.nn.functional.silu(self._linear(h, p + "mlp.gate_proj"))
            x = x + self._linear(gated * self._linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        return self._rms(x, "norm")

    @torch.no_grad()
    def forward_tokens(self, ids, is_image, pos, attend: torch.Tensor) -> torch.Tensor:
        """Image logits ``float32[n, codebook_size]`` of every row (see ``hidden_states``): row ``i``'s logits
        predict the image cell that follows token ``i``."""
        return self.image_logits(self.hidden_states(ids, is_image, pos, attend))


def reference_from_hf_dir(model_dir) -> ReferenceJanus:
    """Load ``JanusForConditionalGeneration`` from a Hugging Face directory (float32); wrap its weights."""
    from transformers import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return ReferenceJanus.from_hf(model)
