"""Independent reference forward of Lumina-mGPT's decoder: plain torch, float32, explicit mask, no cache.

Written from Lumina-mGPT's own vendored model (Alpha-VLLM/Lumina-mGPT
``lumina_mgpt/model/chameleon/modeling_chameleon.py``: ``ChameleonLayerNorm``, ``ChameleonAttention``,
``ChameleonDecoderLayer`` / ``ChameleonSwinDecoderLayer``, ``ChameleonModel``,
``ChameleonForConditionalGeneration``)
and ``ChameleonImageVocabularyMapping`` (the BPE id <-> VQ code table), not from transformers. It reads a
Lumina HF directory directly: ``config.json`` and the safetensors weights in Lumina's key layout, where each
q/k-norm weight and bias is stored ``[model_parallel_size, head_dim]`` and shard ``m``'s row serves that
shard's consecutive heads (Lumina's ``repeat_interleave(heads // model_parallel_size)``). Per layer: RMSNorm,
q/k/v projections, q/k layer norm over ``head_dim`` (eps 1e-5, hard-coded in Lumina, not the config's), 1D
rotate-half RoPE, grouped-query attention ``softmax(q k^T / sqrt(hd)) v``, o projection, SwiGLU MLP, with
Lumina's two residual orders (``swin_norm`` puts each norm after its block). A final RMSNorm and ``lm_head``;
image-token logits are never masked (Lumina's ``mask_image_logits`` is off for generation), so
``forward_tokens`` returns full-vocabulary logits for any ids, positions and boolean mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

_IMAGE_PREFIX = "IMGIMG"  # Chameleon's image-token names: IMGIMG + the code in letters A-J + a final letter


@dataclass(frozen=True)
class LuminaDecoderConfig:
    """The decoder's shape as Lumina's ``ChameleonConfig`` reads it from ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_parallel_size: int
    swin_norm: bool
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_json(cls, config: dict) -> LuminaDecoderConfig:
        if config.get("rope_scaling"):
            raise ValueError(
                f"rope_scaling={config['rope_scaling']!r}: the reference implements plain RoPE only"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"hidden_act={config['hidden_act']!r}: the reference implements SwiGLU (silu) only"
            )
        heads = int(config.get("num_attention_heads", 32))
        kv_heads = int(config.get("num_key_value_heads") or heads)
        hidden = int(config.get("hidden_size", 4096))
        mp = int(config.get("model_parallel_size", 1))
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"hidden_size={hidden}, heads={heads}, kv heads={kv_heads} do not divide")
        if heads % mp or kv_heads % mp:
            raise ValueError(f"model_parallel_size={mp} must divide heads={heads} and kv heads={kv_heads}")
        return cls(
            vocab_size=int(config.get("vocab_size", 65536)),
            hidden_size=hidden,
            intermediate_size=int(config.get("intermediate_size", 11008)),
            num_layers=int(config.get("num_hidden_layers", 32)),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=hidden // heads,  # Lumina derives it; there is no head_dim key
            model_parallel_size=mp,
            swin_norm=bool(config.get("swin_norm", False)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
        )


def image_code_ids(vocabulary_map: dict[str, int]) -> tuple[int, ...]:
    """The BPE id of each VQ code, in code order (entry ``c`` is code ``c``'s id), decoded from the names the
    way Lumina's ``ChameleonImageVocabularyMapping.bpe2img`` does: ``IMGIMG`` + digits spelled A-J + one
    trailing letter."""
    letters = {chr(ord("A") + d): str(d) for d in range(10)}
    by_code: dict[int, int] = {}
    for name, token in vocabulary_map.items():
        if name.startswith(_IMAGE_PREFIX):
            code = int("".join(letters.get(ch, ch) for ch in name[len(_IMAGE_PREFIX) : -1]))
            if code in by_code:
                raise ValueError(f"two image tokens decode to code {code}")
            by_code[code] = int(token)
    if sorted(by_code) != list(range(len(by_code))) or not by_code:
        raise ValueError(f"image codes are not 0..{len(by_code) - 1}")
    return tuple(by_code[c] for c in range(len(by_code)))


@dataclass(frozen=True)
class LuminaImageIds:
    """The ids of one Lumina image's tokens, from the tokenizer's ``vocabulary_map`` (names from Lumina's
    ``FlexARItemProcessor``): BOI ``<racm3:break>``, EOL ``<reserved08799>``, EOI ``<eoss>``, the size tokens
    ``<reserved{8800 + n:05d}>`` (``n`` 32-px units, ``get_n_grids_token``) and the image tokens in code
    order."""

    boi: int
    eol: int
    eoi: int
    visual: tuple[int, ...]  # BPE id of VQ code c at index c
    size_tokens: tuple[tuple[int, int], ...]  # (32-px units, id) for every size token the vocabulary has

    @classmethod
    def from_vocabulary_map(cls, vocabulary_map: dict[str, int]) -> LuminaImageIds:
        sizes = []
        for n in range(1, 200):
            token = vocabulary_map.get(f"<reserved{8800 + n:05d}>")
            if token is not None:
                sizes.append((n, int(token)))
        return cls(
            boi=int(vocabulary_map["<racm3:break>"]),
            eol=int(vocabulary_map["<reserved08799>"]),
            eoi=int(vocabulary_map["<eoss>"]),
            visual=image_code_ids(vocabulary_map),
            size_tokens=tuple(sizes),
        )

    def image_prefix(self, H: int, W: int) -> list[int]:
        """``[BOI, height token, width token]`` of an ``H x W`` latent grid: two latent cells per 32-px unit
        (Lumina's ``h_latent_dim = h_grids * 2``), so both sides must be even."""
        if H % 2 or W % 2 or H < 2 or W < 2:
            raise ValueError(f"grid {H}x{W}: Lumina's sides are whole 32-px units (even, >= 2 cells)")
        size = dict(self.size_tokens)
        if H // 2 not in size or W // 2 not in size:
            raise ValueError(f"grid {H}x{W}: the vocabulary has size tokens for {sorted(size)} units only")
        return [self.boi, size[H // 2], size[W // 2]]


def read_safetensors_dir(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's ``*.safetensors`` files (one file or the shards of an index)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class ReferenceLumina:
    """Lumina-mGPT's decoder as plain float32 tensors (``w[name]`` in Lumina's key layout), cache-free."""

    def __init__(self, config: LuminaDecoderConfig, weights: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.w = {k: v.detach().to(torch.float32).clone() for k, v in weights.items() if ".vqmodel." not in k}
        hd, mp = config.head_dim, config.model_parallel_size
        for i in range(config.num_layers):
            for norm in ("q_norm", "k_norm"):
                for part in ("weight", "bias"):
                    name = f"model.layers.{i}.self_attn.{norm}.{part}"
                    if name not in self.w:
                        raise KeyError(f"missing weight {name!r}")
                    if tuple(self.w[name].shape) != (mp, hd):
                        raise ValueError(
                            f"{name} has shape {tuple(self.w[name].shape)}, Lumina stores {(mp, hd)}"
                        )
        # Lumina's ChameleonRotaryEmbedding: 1 / base^(arange(0, hd, 2) / hd), in float32.
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ReferenceLumina:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return cls(LuminaDecoderConfig.from_json(config), read_safetensors_dir(model_dir))

    # ----------------------------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = (x * x).mean(-1, keepdim=True)
        return self.w[name + ".weight"] * (x * torch.rsqrt(var + self.config.rms_norm_eps))

    def _head_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Lumina's ``ChameleonLayerNorm`` on ``x[n, heads, hd]``: statistics over ``hd`` (biased variance,
        eps 1e-5), then shard ``m``'s gamma/beta on heads ``m * per .. (m + 1) * per - 1``."""
        per = x.shape[1] // self.config.model_parallel_size
        centred = x - x.mean(-1, keepdim=True)
        normed = centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + 1e-5)
        shard_of_head = torch.arange(x.shape[1]) // per
        return normed * self.w[name + ".weight"][shard_of_head] + self.w[name + ".bias"][shard_of_head]

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def _attention(self, h: torch.Tensor, p: str, cos, sin, blocked: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n, hd, nh, nkv = h.shape[0], cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = self._head_norm(self._linear(h, p + "q_proj").view(n, nh, hd), p + "q_norm")
        k = self._head_norm(self._linear(h, p + "k_proj").view(n, nkv, hd), p + "k_norm")
        v = self._linear(h, p + "v_proj").view(n, nkv, hd)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        kv_of_head = torch.arange(nh) // (
            nh // nkv
        )  # Lumina's repeat_kv: query head h reads kv head h // group
        q, k, v = q.transpose(0, 1), k[:, kv_of_head].transpose(0, 1), v[:, kv_of_head].transpose(0, 1)
        scores = (q @ k.transpose(1, 2)) / hd**0.5
        probs = torch.softmax(scores.masked_fill(blocked[None], float("-inf")), dim=-1)
        return self._linear((probs @ v).transpose(0, 1).reshape(n, nh * hd), p + "o_proj")

    def _mlp(self, h: torch.Tensor, p: str) -> torch.Tensor:
        gated = torch.nn.functional.silu(self._linear(h, p + "gate_proj"))
        return self._linear(gated * self._linear(h, p + "up_proj"), p + "down_proj")

    @torch.no_grad()
    def forward_tokens(self, ids, pos, attend: torch.Tensor) -> torch.Tensor:
        """Logits ``float32[n, vocab]`` of tokens ``ids[n]`` at positions ``pos[n]``; ``attend[i, j]``: query
        ``i`` may read key ``j``. Every row must allow at least one key (its own, normally)."""
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
        angles = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        blocked = ~attend

        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            if self.config.swin_norm:  # ChameleonSwinDecoderLayer: norm after each block, inside the residual
                x = x + self._rms(
                    self._attention(x, p + "self_attn.", cos, sin, blocked), p + "input_layernorm"
                )
                x = x + self._rms(self._mlp(x, p + "mlp."), p + "post_attention_layernorm")
            else:
                x = x + self._attention(
                    self._rms(x, p + "input_layernorm"), p + "self_attn.", cos, sin, blocked
                )
                x = x + self._mlp(self._rms(x, p + "post_attention_layernorm"), p + "mlp.")
        return self._linear(self._rms(x, "model.norm"), "lm_head")
