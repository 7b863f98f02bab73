"""Few-step training of the demo VQ and the classifier, the data pipeline's fixed transforms, and the
Fréchet distance, on tiny synthetic data (scikit-learn is not needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_zipar.models.vq.llamagen_vq import load_llamagen_vq
from vllm_zipar.training import classifier as clf
from vllm_zipar.training.data import DigitSplit, shift_images, split_indices, upscale_digits
from vllm_zipar.training.train_vq import demo_vq_config, save_vq_checkpoint, train_vq


def synthetic_digits(count: int = 16, seed: int = 0) -> DigitSplit:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 17, (count, 8, 8), generator=gen).float()
    return DigitSplit(upscale_digits(raw), torch.arange(count) % 10)


def test_upscale_and_shift_are_fixed_transforms():
    raw = torch.zeros(1, 8, 8)
    raw[0, 3:5, 3:5] = 16
    image = upscale_digits(raw, digit_size=24)
    assert image.shape == (1, 3, 32, 32)
    assert float(image.min()) >= -1 and float(image.max()) == 1.0
    assert torch.all(image[..., :4, :] == 1.0)  # the white margin
    assert torch.equal(image, upscale_digits(raw, digit_size=24))
    shifted = shift_images(image, 2, -2)
    assert torch.equal(shifted[..., 2:, :-2], image[..., :-2, 2:])
    assert torch.all(shifted[..., :2, :] == 1.0)


def test_split_is_fixed_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 30)
    train, heldout = split_indices(labels)
    again_train, again_heldout = split_indices(labels)
    assert np.array_equal(train, again_train) and np.array_equal(heldout, again_heldout)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == len(labels)
    assert np.all(np.bincount(labels[heldout]) == 6)


def test_vq_few_steps_reduce_the_loss_and_save_in_the_authors_layout(tmp_path):
    torch.set_num_threads(1)
    data = synthetic_digits(8)
    model, log = train_vq(data, steps=12, batch_size=4, lr=2e-3, log_every=4, progress=False)
    assert log[-1]["loss"] < log[0]["loss"], log
    path = tmp_path / "vq.pt"
    save_vq_checkpoint(model, path, steps=12, seed=0, image_size=32)
    loaded = load_llamagen_vq(path, demo_vq_config())
    codes = loaded.encode(data.images[:2])
    assert codes.shape == (2, 16, 16)
    assert torch.equal(codes, model.encode(data.images[:2]))


def test_classifier_learns_and_round_trips(tmp_path):
    data = synthetic_digits(20)
    model, log = clf.train_classifier(data, steps=60, batch_size=20, lr=3e-3, progress=False)
    assert log[-1]["loss"] < 1.9, log  # chance is ln(10) = 2.30
    path = tmp_path / "classifier.pt"
    clf.save_classifier(model, path, heldout_accuracy=0.0)
    loaded = clf.load_classifier(path)
    assert torch.equal(clf.predict(loaded, data.images), clf.predict(model, data.images))
    assert clf.features(loaded, data.images).shape == (20, clf.FEATURE_DIM)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert clf.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, mean moved by (1, 2, 0): the distance is the squared shift.
    assert clf.frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, abs=1e-6)
    # Isotropic scale s: tr(S + s²S - 2sS) = 3 (1 - s)² for unit covariance.
    b = rng.normal(size=(200000, 3)) * 2.0
    assert clf.frechet_distance(rng.normal(size=(200000, 3)), b) == pytest.approx(3.0, rel=0.05)
