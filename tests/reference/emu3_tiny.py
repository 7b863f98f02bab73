"""Tiny random float32 Emu3 models (transformers' ``Emu3ForConditionalGeneration``) for fast oracle tests.

The vocabulary mimics Emu3-Gen's layout at toy scale: text ids first, then the special tokens (pad, BOS, EOS,
image start/end, image wrapper, EOL ``<|extra_200|>``, EOF ``<|extra_201|>``, ``<image>``), then a contiguous
range of visual tokens. Prompts are id lists built by ``image_prompt`` the way ``Emu3Processor(...,
return_for_image_generation=True)`` lays them out (BOS, text, image start, "H*W", image wrapper). Weights are
drawn wide (embeddings N(0, 1), matrices N(0, ``init_std``), norm gains near 1) so greedy decoding does not
collapse to one code and context changes show up in the tokens. The VQ-VAE is a minimal random one: the
oracle never uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyEmu3Ids:
    pad: int = 70  # <|endoftext|>
    bos: int = 71
    eos: int = 72
    image_start: int = 73  # <|image start|>
    image_end: int = 74  # <|image end|>
    image_wrapper: int = 75  # <|image token|>
    eol: int = 76  # <|extra_200|>
    eof: int = 77  # <|extra_201|>
    image: int = 78  # <image>
    visual_start: int = 86  # <|visual token 000000|>
    num_visual: int = 64
    star: int = 9  # the text token "*"; digits d are text tokens 10 + d

    @property
    def visual(self) -> tuple[int, int]:
        return (self.visual_start, self.visual_start + self.num_visual)

    @property
    def vocab_size(self) -> int:
        return self.visual_start + self.num_visual

    def special_ids(self):
        """The ids ``emu3_hf.hf_generate_image`` needs."""
        from .emu3_hf import Emu3SpecialIds

        return Emu3SpecialIds(
            self.image_wrapper, self.eol, self.eof, self.image_end, self.eos, self.pad, self.visual
        )

    def image_prompt(self, text: list[int], H: int, W: int) -> list[int]:
        """BOS + text + <|image start|> + "H*W" + <|image token|>, as plain ids."""
        digits = [10 + int(d) for d in str(H)] + [self.star] + [10 + int(d) for d in str(W)]
        return [self.bos, *text, self.image_start, *digits, self.image_wrapper]

    def vocabulary_map(self) -> dict[str, int]:
        names = {
            "<|endoftext|>": self.pad,
            "<|extra_203|>": self.bos,
            "<|extra_204|>": self.eos,
            "<|image start|>": self.image_start,
            "<|image end|>": self.image_end,
            "<|image token|>": self.image_wrapper,
            "<|extra_200|>": self.eol,
            "<|extra_201|>": self.eof,
            "<image>": self.image,
        }
        names.update({f"<|visual token {i:06d}|>": self.visual_start + i for i in range(self.num_visual)})
        return names


TINY_IDS = TinyEmu3Ids()


def make_tiny_emu3(seed: int, init_std: float = 0.3, ids: TinyEmu3Ids = TINY_IDS, **text_overrides):
    """A float32 ``Emu3ForConditionalGeneration``: hidden 64, 2 layers, 2 heads of 32, 1 KV head, V 150."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    text = {
        "vocab_size": ids.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
        "pad_token_id": ids.pad,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "attention_dropout": 0.0,
        **text_overrides,
    }
    vq = {
        "codebook_size": ids.num_visual,
        "embed_dim": 4,
        "latent_channels": 4,
        "base_channels": 32,
        "channel_multiplier": [1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "hidden_size": 32,
        "num_attention_heads": 1,
    }
    config = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=ids.vocabulary_map())
    torch.manual_seed(seed)  # the VQ-VAE's own init; the text weights are drawn below from `gen`
    model = Emu3ForConditionalGeneration(config).to(torch.float32).eval()
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.vqmodel."):
                continue
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))
    return model
