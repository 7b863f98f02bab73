"""A small CNN digit classifier, trained on the real 32x32 digits, to score generated images.

It gives two measurements of the demo model's samples (``benchmarks/quality.py``): class accuracy (does the
sample show the digit it was asked for) and a Fréchet distance between the classifier's 64-dimensional
penultimate features of generated and of real held-out images. That distance is FID-like but uses this
classifier instead of Inception-v3, so its values are comparable only with each other (same classifier file,
same held-out set), never with published FIDs. The weights ship at ``models/digits/classifier.pt`` as a plain
dict (``weights_only`` loadable).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vllm_zipar.training.data import DigitSplit, random_shifts

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """Three conv/pool stages (32 -> 4 px), a 64-unit feature layer and a 10-way head."""

    def __init__(self, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(64 * (image_size // 8) ** 2, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [-1, 1] -> ``[B, 64]`` penultimate features (grey = channel mean)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != self.image_size:
            raise ValueError(
                f"images must be [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
        return self.body(images.float().mean(dim=1, keepdim=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(
    train: DigitSplit,
    *,
    steps: int = 1200,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> tuple[DigitClassifier, list[dict[str, float]]]:
    """Adam on shifted, slightly noised real digits (so VQ-decoded images are in distribution)."""
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    history: list[dict[str, float]] = []
    running, count = 0.0, 0
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="classifier", disable=not progress, mininterval=5.0):
        index = torch.randint(0, len(train), (batch_size,), generator=data_gen)
        images = random_shifts(train.images[index], max_shift, data_gen)
        images = images + 0.05 * torch.randn(images.shape, generator=data_gen)
        loss = F.cross_entropy(model(images), train.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += float(loss.detach())
        count += 1
        if (step + 1) % 100 == 0 or step + 1 == steps:
            history.append(
                {
                    "step": step + 1,
                    "seconds": round(time.perf_counter() - start, 1),
                    "loss": round(running / count, 5),
                }
            )
            running, count = 0.0, 0
    return model.eval(), history


@torch.inference_mode()
def predict(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels ``[N]``."""
    model.eval()
    return torch.cat(
        [model(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)]
    )


@torch.inference_mode()
def features(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Penultimate features ``[N, 64]`` as float64 numpy, the input of ``frechet_distance``."""
    model.eval()
    return (
        torch.cat([model.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        .double()
        .numpy()
    )


def accuracy(model: DigitClassifier, split: DigitSplit) -> float:
    return float((predict(model, split.images) == split.labels).float().mean())


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (the FID formula):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, computed with symmetric square roots
    (no scipy), which equals the usual ``tr sqrtm(S_a S_b)`` for covariance matrices."""
    if (
        features_a.ndim != 2
        or features_a.shape[1] != features_b.shape[1]
        or min(len(features_a), len(features_b)) < 2
    ):
        raise ValueError(
            f"need two [N>=2, D] feature sets of the same D, got {features_a.shape} and {features_b.shape}"
        )
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cross))


def save_classifier(model: DigitClassifier, path: str | Path, *, heldout_accuracy: float) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    torch.save(
        {
            "model": state,
            "image_size": model.image_size,
            "num_classes": model.head.out_features,
            "heldout_accuracy": heldout_accuracy,
        },
        path,
    )


def load_classifier(path: str | Path) -> DigitClassifier:
    """The shipped classifier, in eval mode (read with ``weights_only=True``)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not a classifier checkpoint (expected a dict with 'model')")
    model = DigitClassifier(
        num_classes=int(checkpoint["num_classes"]), image_size=int(checkpoint["image_size"])
    )
    model.load_state_dict(checkpoint["model"], strict=True)
    return model.eval()
