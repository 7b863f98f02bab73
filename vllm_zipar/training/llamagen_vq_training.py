"""LlamaGen's VQ quantizer in training mode: its losses and usage history, and the args its trainer saves.

The inference port (``models/vq/llamagen_vq.py``) quantizes as the authors' ``VectorQuantizer`` does in
eval mode. Training adds, as their ``tokenizer/tokenizer_image/vq_model.py`` does in train mode: the
codebook and commitment losses, the entropy regulariser (``compute_entropy_loss``) and the ``codebook_used``
ring buffer of recent codes. ``vq_training_args`` is the part of ``vq_train.py``'s argparse namespace that
it pickles beside the weights, so our checkpoints read like theirs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from vllm_zipar.models.vq.llamagen_vq import (
    LlamaGenVQConfig,
    LlamaGenVQModel,
    QuantizerOutput,
    VectorQuantizer,
)


@dataclass
class TrainingQuantizerOutput(QuantizerOutput):
    """A quantizer pass with its losses. They are ``None`` in eval mode, as in the authors' code;
    ``codebook_usage`` is the fraction of codes seen in the usage history (0.0 unless training with
    codebook_show_usage)."""

    codebook_loss: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None
    entropy_loss: torch.Tensor | None = None
    codebook_usage: float = 0.0


def codebook_entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """The authors' entropy regulariser (``compute_entropy_loss``, softmax variant): per-sample
    entropy minus the entropy of the batch-average code distribution, which rewards confident
    assignments spread across the codebook."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = torch.softmax(logits, dim=-1)
    log_probs = torch.log_softmax(logits + 1e-5, dim=-1)
    mean_probs = probs.mean(dim=0)
    batch_entropy = -torch.sum(mean_probs * torch.log(mean_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - batch_entropy


class TrainingVectorQuantizer(VectorQuantizer):
    """The quantizer with the authors' train-mode extras; same parameters and state-dict keys."""

    def __init__(self, config: LlamaGenVQConfig) -> None:
        super().__init__(config)
        self.commit_loss_beta = config.commit_loss_beta
        self.entropy_loss_ratio = config.entropy_loss_ratio

    def forward(self, latent: torch.Tensor) -> TrainingQuantizerOutput:
        z, z_q, flat_codes, distances = self.nearest(latent)
        output = TrainingQuantizerOutput(
            quantized=self.straight_through(z, z_q), codes=flat_codes.view(z.shape[:-1])
        )
        if not self.training:
            return output
        if self.show_usage:
            with torch.no_grad():
                count = flat_codes.shape[0]
                self.codebook_used[:-count] = self.codebook_used[count:].clone()
                self.codebook_used[-count:] = flat_codes.to(self.codebook_used.dtype)
                output.codebook_usage = len(torch.unique(self.codebook_used)) / self.codebook_size
        output.codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        output.commitment_loss = self.commit_loss_beta * torch.mean((z_q.detach() - z) ** 2)
        # The authors compute the entropy term even at ratio 0 (and multiply by 0): skipping a
        # [N, codebook_size] softmax gives the same value.
        output.entropy_loss = (
            self.entropy_loss_ratio * codebook_entropy_loss(-distances)
            if self.entropy_loss_ratio
            else distances.new_zeros(())
        )
        return output


def training_vq_model(config: LlamaGenVQConfig) -> LlamaGenVQModel:
    """A VQ model whose forward returns the training losses (in train mode); its weights load and save
    like the inference model's."""
    return LlamaGenVQModel(config, quantizer=TrainingVectorQuantizer)


def vq_training_args(
    config: LlamaGenVQConfig,
    seed: int,
    *,
    ema: bool = False,
    image_size: int = 256,
    mixed_precision: str = "bf16",
) -> argparse.Namespace:
    """The subset of vq_train.py's argparse flags that describe the model, as it pickles them."""
    return argparse.Namespace(
        vq_model=f"VQ-{config.downsample}",
        vq_ckpt=None,
        ema=ema,
        codebook_size=config.codebook_size,
        codebook_embed_dim=config.codebook_embed_dim,
        codebook_l2_norm=config.codebook_l2_norm,
        commit_loss_beta=config.commit_loss_beta,
        entropy_loss_ratio=config.entropy_loss_ratio,
        dropout_p=config.dropout_p,
        image_size=image_size,
        global_seed=seed,
        mixed_precision=mixed_precision,
    )
