"""Reference forward of Emu3's text decoder: pure PyTorch, float32, explicit mask, no cache.

Written from transformers' ``models/emu3/modeling_emu3.py`` (``Emu3TextModel`` and the language-model head of
``Emu3ForConditionalGeneration``): token embedding, then per layer RMSNorm -> attention (q/k/v projections,
1D rotate-half RoPE over the head dimension, grouped-query heads, softmax(q k^T / sqrt(hd)) v) -> residual,
RMSNorm -> SwiGLU MLP ``down(silu(gate x) * up x)`` -> residual; a final RMSNorm and ``lm_head``. Only the
weights are taken from a transformers model; every op is written out here. ``forward_tokens`` recomputes the
whole sequence each call under a boolean mask ``attend[i, j]`` (query i may read key j), so the decoders in
``emu3_decoders.py`` can state any ZipAR mask exactly. The rotary angles are computed like transformers'
default RoPE (float32 inverse frequencies times float32 positions) so causal logits agree to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReferenceEmu3Config:
    """The text decoder's shape, read from ``Emu3TextConfig`` (``text_config`` of ``Emu3Config``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_text_config(cls, tc) -> ReferenceEmu3Config:
        rope = dict(getattr(tc, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_type={rope_type!r}: the reference implements only the default 1D RoPE")
        theta = rope.get("rope_theta", getattr(tc, "rope_theta", None))
        if theta is None:
            raise ValueError("text config has no rope_theta")
        n_heads = tc.num_attention_heads
        n_kv = tc.num_key_value_heads or n_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
        if n_heads % n_kv:
            raise ValueError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        if tc.hidden_act != "silu":
            raise ValueError(f"hidden_act={tc.hidden_act!r}: the reference implements SwiGLU (silu) only")
        return cls(
            vocab_size=tc.vocab_size,
            hidden_size=tc.hidden_size,
            num_layers=tc.num_hidden_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(tc.rms_norm_eps),
            rope_theta=float(theta),
        )


_TEXT = "model.text_model."  # prefix of the text decoder in Emu3ForConditionalGeneration.state_dict()


class ReferenceEmu3:
    """Emu3's text decoder as plain float32 tensors (``w[name]``), with a masked, cache-free forward."""

    def __init__(self, config: ReferenceEmu3Config, weights: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.w = {k: v.detach().to(torch.float32).clone() for k, v in weights.items()}
        for name in self._required():
            if name not in self.w:
                raise KeyError(f"missing weight {name!r}")
        hd = config.head_dim
        # transformers' default RoPE: inv_freq = 1 / theta^(arange(0, hd, 2) / hd), in float32.
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    def _required(self) -> list[str]:
        names = ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
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
    def from_hf(cls, model) -> ReferenceEmu3:
        """Wrap the weights of a transformers ``Emu3ForConditionalGeneration`` (or an ``Emu3ForCausalLM``)."""
        state = model.state_dict()
        text_config = getattr(model.config, "text_config", model.config)
        weights = {}
        for key, value in state.items():
            if key.startswith(_TEXT):
                weights[key[len(_TEXT) :]] = value
            elif key.startswith("model.") and not key.startswith(("model.vqmodel.", "model.text_model.")):
                weights[key[len("model.") :]] = value  # Emu3ForCausalLM: model.layers..., model.norm...
            elif key == "lm_head.weight":
                weights[key] = value
        return cls(ReferenceEmu3Config.from_text_config(text_config), weights)

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

    @torch.no_grad()
    def forward_tokens(self, ids, pos, attend: torch.Tensor) -> torch.Tensor:
        """Logits ``float32[n, vocab]`` of tokens ``ids[n]`` at positions ``pos[n]``; ``attend[i, j]``: query
        ``i`` may read key ``j``. Every row must allow at least one key (its own, normally)."""
        cfg = self.config
        ids = torch.as_tensor(ids, dtype=torch.long)
        pos = torch.as_tensor(pos, dtype=torch.long)
        n = ids.numel()
        if pos.shape != (n,) or attend.shape != (n, n) or attend.dtype != torch.bool:
            raise ValueError(
                f"ids {tuple(ids.shape)}, pos {tuple(pos.shape)}, attend {tuple(attend.shape)} "
                f"{attend.dtype}: want [n], [n], bool [n, n]"
            )
        if not bool(attend.any(dim=1).all()):
            raise ValueError("a query row of attend allows no key")
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        angles = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [n, hd/2]
        angles = torch.cat([angles, angles], dim=-1)  # [n, hd]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        kv_of_head = torch.arange(nh) // (nh // nkv)  # query head h reads kv head h // group
        blocked = ~attend

        x = self.w["embed_tokens.weight"][ids]
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
        return self._linear(self._rms(x, "norm"), "lm_head")
