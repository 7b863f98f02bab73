"""A Lumina-mGPT reference built from transformers' Chameleon modules, and Lumina's cached generation loop.

``LuminaHF.from_dir`` loads a Lumina HF directory (``config.json`` with ``model_type: chameleon``, safetensors
in Lumina's key layout) into transformers' ``ChameleonForConditionalGeneration`` (float32, eager attention).
Two things differ from transformers' own use of such a directory, both from Lumina's vendored
``lumina_mgpt/model/chameleon/modeling_chameleon.py``: Lumina stores each q/k-norm weight and bias as
``[model_parallel_size, head_dim]`` and its ``ChameleonLayerNorm.repeat_param`` expands them to the heads with
``repeat_interleave(heads // model_parallel_size, dim=0)`` (shard m's row serves heads m*per..(m+1)*per-1), so
they are expanded here to transformers' ``[heads, head_dim]`` the same way; and transformers'
``ChameleonForConditionalGeneration.forward`` always sets image-token logits to the float minimum (Lumina
gates that on ``config.mask_image_logits``, off for generation), so ``forward_tokens`` calls the decoder
(``model.model``) and ``lm_head`` itself. The VQ-VAE transformers builds inside ``ChameleonModel`` (an
encoder only) is not used; a tiny one replaces the directory's ``vq_config`` to keep loading cheap.

``lumina_generate`` is Lumina's own NTP loop (``lumina_mgpt/inference_solver.py``) on this model with
transformers' KV cache, one forward pass per token as ``generate()`` spends them: the prompt, then the forced
BOI and the two resolution tokens, then per row W sampled image tokens and a forced EOL, then the forced EOI.
CFG as ``LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor`` does it: an unconditional
context that starts at BOI (``input_ids[:, boi_index:]``, so ``[BOI, h, w]`` at positions 0..2, no text),
fed the same tokens afterwards with its own cache, and ``s * (cond - uncond) + uncond`` on the raw logits;
then ``MultiModalLogitsProcessor`` keeps only image tokens (EOL and EOI forced at their cells) and
``InterleavedTopKLogitsWarper`` keeps the image top-k. The draw is ``sampling.sample_cell`` keyed by the
cell's position in the conditional sequence (the engine's position-keyed sampling, ZIPAR.md §5) instead of
Lumina's ``torch.multinomial``, so seeded runs are comparable with the oracle decoders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .lumina_model import LuminaImageIds, read_safetensors_dir
from .sampling import cfg_logits, sample_cell

# A VQ-VAE small enough to build in milliseconds: transformers' ChameleonModel always builds one, and the
# decoder path never reads it.
_TINY_VQ = {
    "embed_dim": 4,
    "num_embeddings": 8,
    "latent_channels": 32,
    "resolution": 32,
    "base_channels": 32,
    "channel_multiplier": [1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
}


def expand_head_norm(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Lumina's ``[model_parallel_size, head_dim]`` q/k-norm parameter as transformers' ``[heads, head_dim]``:
    ``repeat_interleave(heads // model_parallel_size, dim=0)``, as Lumina's ``ChameleonLayerNorm`` does."""
    mp = weight.shape[0]
    if heads % mp:
        raise ValueError(f"{heads} heads do not split over model_parallel_size={mp}")
    return weight.repeat_interleave(heads // mp, dim=0)


class LuminaHF:
    """transformers' ``ChameleonForConditionalGeneration`` holding a Lumina directory's weights."""

    def __init__(self, model) -> None:
        self.model = model.eval()
        self.config = model.config

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, _expand=expand_head_norm) -> LuminaHF:
        """``_expand`` (test hook) replaces the q/k-norm expansion, to show a wrong one is caught."""
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration

        raw = json.loads((Path(model_dir) / "config.json").read_text())
        if raw.get("model_type") != "chameleon":
            raise ValueError(f"{model_dir}: model_type={raw.get('model_type')!r}, want 'chameleon'")
        config = ChameleonConfig.from_pretrained(model_dir)
        config.vq_config = type(config.vq_config)(**_TINY_VQ)
        config._attn_implementation = "eager"
        model = ChameleonForConditionalGeneration(config).to(torch.float32)

        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        state = {}
        for key, value in read_safetensors_dir(model_dir).items():
            if ".vqmodel." in key:
                continue
            value = value.to(torch.float32)
            if ".self_attn.q_norm." in key:
                value = _expand(value, heads)
            elif ".self_attn.k_norm." in key:
                value = _expand(value, kv_heads)
            state[key] = value
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("model.vqmodel.")]
        if missing or unexpected:
            raise KeyError(f"{model_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return cls(model)

    @torch.no_grad()
    def forward_tokens(self, ids, pos, attend: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``float32[n, vocab]`` of ``ids[n]`` at positions ``pos[n]`` under the
        boolean mask ``attend[i, j]`` (query i may read key j), image-token logits unmasked."""
        n = len(ids)
        if attend.shape != (n, n) or attend.dtype != torch.bool:
            raise ValueError(f"attend {tuple(attend.shape)} {attend.dtype}: want bool [{n}, {n}]")
        mask = torch.zeros(n, n).masked_fill(~attend, float("-inf"))[None, None]
        hidden = self.model.model(
            input_ids=torch.as_tensor(ids, dtype=torch.long)[None],
            position_ids=torch.as_tensor(pos, dtype=torch.long)[None],
            attention_mask=mask,
            use_cache=False,
        ).last_hidden_state
        return self.model.lm_head(hidden)[0].float()

    @torch.no_grad()
    def step(self, cache, ids: list[int], pos: list[int]) -> torch.Tensor:
        """Append ``ids`` at ``pos`` to a transformers ``DynamicCache`` (causal over cache + new) and return
        their logits ``[len(ids), vocab]``."""
        out = self.model.model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.tensor([pos]),
            past_key_values=cache,
            use_cache=True,
        )
        return self.model.lm_head(out.last_hidden_state)[0].float()


@torch.no_grad()
def lumina_generate(
    ref: LuminaHF,
    prompt_ids: list[int],
    image_prefix: list[int],
    H: int,
    W: int,
    ids: LuminaImageIds,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[int]:
    """Lumina's cached NTP generation of one ``H x W`` image after ``prompt_ids``; ``image_prefix`` is
    ``[BOI, h, w]`` (forced). Returns the generated ids after the prompt: the prefix, ``H`` rows of ``W``
    image ids + EOL, then EOI."""
    from transformers import DynamicCache

    P = len(prompt_ids)
    cond_cache = DynamicCache()
    ref.step(cond_cache, list(prompt_ids), list(range(P)))  # its logits would predict BOI: forced instead
    seq = list(prompt_ids)
    for token in image_prefix:
        cond = ref.step(cond_cache, [token], [len(seq)])[-1]
        seq.append(token)
    uncond_cache = uncond = None
    if cfg_scale != 1.0:
        # Lumina's first unconditional pass: input_ids[:, boi_index:] = [BOI, h, w] at positions 0.., no text.
        uncond_cache = DynamicCache()
        uncond = ref.step(uncond_cache, list(image_prefix), list(range(len(image_prefix))))[-1]

    def feed(token: int) -> None:
        nonlocal cond, uncond
        cond = ref.step(cond_cache, [token], [len(seq)])[-1]
        if uncond_cache is not None:
            uncond = ref.step(uncond_cache, [token], [len(seq) - P])[-1]
        seq.append(token)

    out = list(image_prefix)
    visual = torch.tensor(ids.visual)
    for r in range(H):
        for _ in range(W):
            guided = cond if uncond is None else cfg_logits(cond, uncond, cfg_scale)
            code = sample_cell(guided[visual], temperature=temperature, top_k=top_k, seed=seed, pos=len(seq))
            out.append(ids.visual[code])
            feed(ids.visual[code])
        out.append(ids.eol)
        if r < H - 1:
            feed(ids.eol)
    out.append(ids.eoi)
    return out
