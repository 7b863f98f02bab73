"""The demo model's data: scikit-learn's bundled handwritten digits, upscaled to RGB images in [-1, 1].

``sklearn.datasets.load_digits`` ships 1,797 grey 8x8 digits (ink levels 0..16, 10 classes) inside the
package, so nothing is downloaded. Each digit is upscaled bilinearly (a fixed, deterministic operation) to
24x24 and centred on a 32x32 white page (dark ink, like the 20-in-28 framing of MNIST), which leaves a margin
for shift augmentation without cutting strokes. The train/held-out split is a fixed, per-class stratified
permutation drawn from its own seeded generator, so every script sees the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
DIGIT_SIZE = 24
NUM_CLASSES = 10
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 20240801
SOURCE_LEVELS = 16.0  # load_digits ink levels run 0..16


@dataclass
class DigitSplit:
    """Images ``[N, 3, 32, 32]`` float32 in [-1, 1] (white page = 1, ink = -1) and labels ``[N]`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # the demo extra is optional
        raise ImportError(
            "the demo data needs scikit-learn: pip install -e '.[demo]' (make train-demo installs it)"
        ) from error
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def upscale_digits(
    raw: torch.Tensor, image_size: int = IMAGE_SIZE, digit_size: int = DIGIT_SIZE
) -> torch.Tensor:
    """Raw ink ``[N, 8, 8]`` (0..16) -> RGB ``[N, 3, image_size, image_size]`` in [-1, 1], ink dark."""
    if raw.dim() != 3:
        raise ValueError(f"raw digits must be [N, h, w], got shape {tuple(raw.shape)}")
    if not 0 < digit_size <= image_size or (image_size - digit_size) % 2:
        raise ValueError(
            f"digit_size {digit_size} must be in (0, {image_size}] with an even margin to image_size"
        )
    ink = (raw.float() / SOURCE_LEVELS).clamp(0.0, 1.0)[:, None]
    ink = F.interpolate(ink, size=(digit_size, digit_size), mode="bilinear", align_corners=False)
    margin = (image_size - digit_size) // 2
    ink = F.pad(ink, (margin, margin, margin, margin), value=0.0)
    return (1.0 - 2.0 * ink).expand(-1, 3, -1, -1).contiguous()


def split_indices(labels: np.ndarray, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED):
    """(train, held-out) index arrays: the same fraction of every class held out, fixed by ``seed``."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_heldout = int(round(heldout_fraction * len(members)))
        heldout.append(members[:n_heldout])
        train.append(members[n_heldout:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def load_digit_splits(
    image_size: int = IMAGE_SIZE, digit_size: int = DIGIT_SIZE
) -> tuple[DigitSplit, DigitSplit]:
    """The fixed (train, held-out) splits of the upscaled digits: 1,438 and 359 images."""
    raw, labels = _load_sklearn_digits()
    images = upscale_digits(torch.from_numpy(raw), image_size, digit_size)
    train_idx, heldout_idx = split_indices(labels)
    labels_t = torch.from_numpy(labels)
    return (
        DigitSplit(images[train_idx], labels_t[train_idx]),
        DigitSplit(images[heldout_idx], labels_t[heldout_idx]),
    )


def shift_images(images: torch.Tensor, dy: int, dx: int, fill: float = 1.0) -> torch.Tensor:
    """Translate ``[N, C, H, W]`` images by (dy, dx) pixels, filling the uncovered border with ``fill``
    (the white page). Used for augmentation; the 4-pixel margin means shifts up to 4 never cut ink."""
    if dy == 0 and dx == 0:
        return images
    _, _, height, width = images.shape
    if abs(dy) >= height or abs(dx) >= width:
        raise ValueError(f"shift ({dy}, {dx}) must be smaller than the image ({height}x{width})")
    out = torch.full_like(images, fill)
    src_y = slice(max(0, -dy), height - max(0, dy))
    dst_y = slice(max(0, dy), height - max(0, -dy))
    src_x = slice(max(0, -dx), width - max(0, dx))
    dst_x = slice(max(0, dx), width - max(0, -dx))
    out[:, :, dst_y, dst_x] = images[:, :, src_y, src_x]
    return out


def random_shifts(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by its own (dy, dx) drawn uniformly from [-max_shift, max_shift]."""
    if max_shift <= 0:
        return images
    shifts = torch.randint(-max_shift, max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.cat(
        [shift_images(images[i : i + 1], int(dy), int(dx)) for i, (dy, dx) in enumerate(shifts.tolist())]
    )
