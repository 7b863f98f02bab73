"""Tiny random float32 Janus-Pro models (transformers' ``JanusForConditionalGeneration``) for oracle tests.

The vocabulary mimics Janus-Pro's at toy scale: text ids first, then the special tokens (pad, BOS, EOS,
``<begin_of_image>``, ``<end_of_image>``, ``<image_placeholder>``); the image codes are a separate range
(``codebook`` entries of ``generation_embeddings`` / columns of ``generation_head``), deliberately of another
size than the text vocabulary so that mixing the two shows. Prompts are id lists laid out as
``JanusProcessor(text, generation_mode="image")`` lays them out (the tokenizer's BOS, the text, then
``<begin_of_image>`` appended); the unconditional prompt follows transformers' ``generate(generation_mode=
"image")``: every token that is neither BOS nor BOI becomes pad, same length, attention unchanged. Weights are
drawn wide (embeddings N(0, 1), matrices and biases N(0, ``init_std``), norm gains near 1) so greedy decoding
does not collapse to one code (ZIPAR.md §6). The vision encoder and the VQ-VAE keep transformers' init: the
oracle never uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyJanusIds:
    pad: int = 90  # <｜▁pad▁｜>
    bos: int = 91  # <｜begin▁of▁sentence｜>
    eos: int = 92  # <｜end▁of▁sentence｜>
    boi: int = 93  # <begin_of_image>
    eoi: int = 94  # <end_of_image>
    image: int = 95  # <image_placeholder> (config.image_token_id; the understanding path only)
    vocab_size: int = 100
    codebook: int = 48  # image codes: generation_embeddings rows, generation_head columns

    def image_prompt(self, text: list[int]) -> list[int]:
        """BOS + text + ``<begin_of_image>``: the processor's ids for a (templated) prompt in image mode."""
        if any(t in (self.bos, self.boi) for t in text):
            raise ValueError("text ids must not contain BOS or <begin_of_image>")
        return [self.bos, *text, self.boi]

    def unconditional_prompt(self, prompt: list[int]) -> list[int]:
        """transformers' CFG rule: every token that is neither BOS nor BOI becomes pad (same length)."""
        return [t if t in (self.bos, self.boi) else self.pad for t in prompt]


TINY_IDS = TinyJanusIds()


def make_tiny_janus(
    seed: int, side: int = 4, init_std: float = 0.3, ids: TinyJanusIds = TINY_IDS, **text_overrides
):
    """A float32 ``JanusForConditionalGeneration``: Llama hidden 64, 2 layers, 2 heads of 32, 1 KV head,
    vocab 100; generation path codebook 48 x 8, aligner 8 -> 64 -> 64, head 64 -> 64 -> 48; the vision
    config's ``num_image_tokens`` is ``side ** 2`` (``generate(generation_mode="image")`` makes that grid).
    """
    from transformers import JanusConfig, JanusForConditionalGeneration

    hidden = text_overrides.get("hidden_size", 64)
    text = {
        "model_type": "llama",
        "vocab_size": ids.vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
        "pad_token_id": ids.pad,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "attention_dropout": 0.0,
        **text_overrides,
    }
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "image_size": 32,
        "patch_size": 16,
        "projection_dim": hidden,
        "num_image_tokens": side * side,
    }
    vq = {
        "embed_dim": 8,
        "num_embeddings": ids.codebook,
        "latent_channels": 32,
        "base_channels": 32,
        "channel_multiplier": [1, 1],
        "num_res_blocks": 1,
        "projection_dim": hidden,
        "image_token_embed_dim": hidden,
        "num_hidden_layers": 2,
    }
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids.image)
    torch.manual_seed(seed)  # the vision encoder's and VQ-VAE's own init; the rest is drawn below from `gen`
    model = JanusForConditionalGeneration(config).to(torch.float32).eval()
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("model.vision_model.", "model.aligner.", "model.vqmodel.")):
                continue
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("embed_tokens.weight", "generation_embeddings.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))
    return model
