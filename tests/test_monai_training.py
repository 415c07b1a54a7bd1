"""The MONAI training tutorial (tutorials/monai_training.py), run in its quick CI version for both losses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_losses.losses import DiceSinkhornLoss

TUTORIAL = Path(__file__).resolve().parents[1] / "tutorials" / "monai_training.py"


@pytest.fixture(scope="module")
def tutorial():
    spec = importlib.util.spec_from_file_location("monai_training", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_is_metatensors_in_world_mm(tutorial):
    sample = tutorial.hippocampus_sample()
    image, label = sample["image"], sample["label"]
    assert image.shape == label.shape == (1, 92, 53, 52)
    np.testing.assert_array_equal(image.affine.numpy(), label.affine.numpy())
    assert sorted(torch.unique(label).tolist()) == [0.0, 1.0]
    assert int(label.sum()) == 6947 + 6561, "both hippocampi, every voxel"
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-3
    assert isinstance(tutorial.make_loss("dice_sinkhorn"), DiceSinkhornLoss)
    with pytest.raises(ValueError, match="unknown loss 'ce'"):
        tutorial.make_loss("ce")


@pytest.mark.slow
def test_quick_training_decreases_both_losses_with_finite_gradients(tutorial):
    iterations, crop, val_every = tutorial.QUICK
    for name in tutorial.LOSSES:
        history = tutorial.train(name, iterations, crop=crop, val_every=val_every, seed=0, progress=False)
        losses = np.asarray(history["train_loss"])
        third = iterations // 3
        assert len(losses) == iterations and np.isfinite(losses).all()
        assert losses[-third:].mean() < losses[:third].mean(), f"{name}: {losses.round(3)}"
        assert np.isfinite(history["grad_norm"]).all() and min(history["grad_norm"]) > 0
        for parameter in history["network"].parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert history["val_iteration"] == list(range(val_every, iterations + 1, val_every))
        dice = np.asarray(history["val_dice"])
        assert dice.shape == (iterations // val_every,) and ((dice >= 0) & (dice <= 1)).all()
        assert len(history["val_hd95"]) == len(dice)
