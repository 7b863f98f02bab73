"""Training the demo model's image tokenizer: a scaled-down LlamaGen VQ on the 32x32 digits.

The model is the authors' ``VQModel`` architecture (``vllm_zipar.models.vq.llamagen_vq``) with a small width
(``ch`` 32), two resolution levels (``ch_mult [1, 2]``, so downsample 2 and a 16x16 token grid, the grid of
LlamaGen's 256-pixel models), one res block per level and a 256-entry, 8-dimensional l2-normalised codebook.
The loss is the authors' ``vq_train.py`` objective without its perceptual and GAN terms (which need a
pretrained VGG and a discriminator, too costly here): squared error plus L1 on pixels, plus the quantizer's
codebook and commitment losses. The result is saved in the authors' VQ training-checkpoint layout
(``{"model", "steps", "args"}``) so ``load_llamagen_vq`` reads it like one of theirs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, LlamaGenVQModel
from vllm_zipar.training.data import DigitSplit, random_shifts
from vllm_zipar.training.llamagen_vq_training import training_vq_model, vq_training_args

L1_WEIGHT = 0.5  # on top of the authors' l2 reconstruction loss: crisper strokes on flat backgrounds


def demo_vq_config() -> LlamaGenVQConfig:
    """The demo tokenizer: 32x32 RGB -> 16x16 codes from a 256-entry codebook of dimension 8."""
    return LlamaGenVQConfig(
        codebook_size=256,
        codebook_embed_dim=8,
        encoder_ch_mult=[1, 2],
        decoder_ch_mult=[1, 2],
        z_channels=64,
        ch=32,
        num_res_blocks=1,
    )


def vq_loss(model: LlamaGenVQModel, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Total training loss of one batch and its parts (for the log)."""
    reconstruction, quantized = model(images)
    l2 = F.mse_loss(reconstruction, images)
    l1 = F.l1_loss(reconstruction, images)
    total = l2 + L1_WEIGHT * l1 + quantized.codebook_loss + quantized.commitment_loss + quantized.entropy_loss
    parts = {
        "loss": total,
        "l2": l2,
        "l1": l1,
        "codebook": quantized.codebook_loss,
        "commitment": quantized.commitment_loss,
    }
    parts = {key: float(value.detach()) for key, value in parts.items()}
    parts["usage"] = float(quantized.codebook_usage)
    return total, parts


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train_vq(
    train: DigitSplit,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 2,
    seed: int = 0,
    config: LlamaGenVQConfig | None = None,
    log_every: int = 50,
    progress: bool = True,
) -> tuple[LlamaGenVQModel, list[dict[str, float]]]:
    """Train a VQ on ``train`` for ``steps`` batches; returns the model (eval mode) and the loss log."""
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    model = training_vq_model(config or demo_vq_config())
    model.train()
    # The authors' VQ optimiser: Adam with betas (0.9, 0.95), no weight decay; a higher peak rate with a
    # cosine schedule because this run is a few thousand steps, not hundreds of thousands.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))
    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="VQ", disable=not progress, mininterval=5.0)
    for step in bar:
        index = torch.randint(0, len(train), (batch_size,), generator=data_gen)
        images = random_shifts(train.images[index], max_shift, data_gen)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        loss, parts = vq_loss(model, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for key, value in parts.items():
            running[key] = running.get(key, 0.0) + value
        if (step + 1) % log_every == 0 or step + 1 == steps:
            count = (step % log_every) + 1
            entry = {"step": step + 1, "seconds": round(time.perf_counter() - start, 1)}
            entry.update({key: round(value / count, 5) for key, value in running.items()})
            history.append(entry)
            running = {}
            bar.set_postfix(
                loss=f"{entry['loss']:.4f}", l2=f"{entry['l2']:.4f}", usage=f"{entry['usage']:.2f}"
            )
    return model.eval(), history


@torch.inference_mode()
def evaluate_vq(model: LlamaGenVQModel, split: DigitSplit, batch_size: int = 256) -> dict[str, float]:
    """Reconstruction error and code usage of ``model`` (eval mode) on ``split``."""
    model.eval()
    l2_sum, l1_sum, used = 0.0, 0.0, set()
    for begin in range(0, len(split), batch_size):
        images = split.images[begin : begin + batch_size]
        quantized = model.quantize_images(images)
        reconstruction = model.decode_latent(quantized.quantized)
        l2_sum += float(F.mse_loss(reconstruction, images, reduction="sum"))
        l1_sum += float(F.l1_loss(reconstruction, images, reduction="sum"))
        used.update(quantized.codes.unique().tolist())
    count = split.images.numel()
    return {
        "l2": round(l2_sum / count, 5),
        "l1": round(l1_sum / count, 5),
        "codes_used": len(used),
        "codebook_size": model.config.codebook_size,
    }


@torch.inference_mode()
def encode_split(model: LlamaGenVQModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Codes ``[N, h, w]`` of ``images`` (eval-mode encoder)."""
    model.eval()
    return torch.cat([model.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def save_vq_checkpoint(
    model: LlamaGenVQModel, path: str | Path, *, steps: int, seed: int, image_size: int
) -> None:
    """Write ``model`` in the authors' ``vq_train.py`` layout: ``{"model", "steps", "args"}``."""
    config = model.config
    args = vq_training_args(config, seed, image_size=image_size, mixed_precision="none")
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "steps": steps, "args": args}, path)


def vq_config_dict(config: LlamaGenVQConfig) -> dict:
    """The ``vq_config`` entry of the model directory's config.json."""
    return asdict(config)
