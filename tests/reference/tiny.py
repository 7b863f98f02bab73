"""Tiny random LlamaGen reference models for fast oracle tests.

The authors' init (std 0.02, zero output layer) makes every logit 0, so greedy decoding would repeat one
token and no mask error could show. Weights here are drawn wider (std ``init_std``, non-zero output layer,
norm gains around 1) so that logits differ by order 1 between cells and contexts.
"""

from __future__ import annotations

import torch

from .llamagen_gpt import ReferenceLlamaGen, ReferenceLlamaGenConfig

TINY_DEFAULTS = {
    "dim": 64,
    "n_layer": 2,
    "n_head": 2,
    "multiple_of": 32,
    "num_classes": 10,
    "vocab_size": 128,
    "block_size": 64,
}


def make_tiny_reference_model(seed: int, init_std: float = 0.3, **cfg) -> ReferenceLlamaGen:
    """A float32 ``ReferenceLlamaGen`` (default dim 64, 2 heads of 64, 2 layers, vocab 128, 8x8 grid)."""
    config = ReferenceLlamaGenConfig(**{**TINY_DEFAULTS, **cfg})
    model = ReferenceLlamaGen(config)
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embedding_table.weight") or name == "tok_embeddings.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))
    return model.eval()
