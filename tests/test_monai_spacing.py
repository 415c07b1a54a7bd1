"""One voxel-spacing rule for every monai_losses class (monai_losses.spacing): explicit spacing, then the target's
affine, then the prediction's, then 1 mm; 2-D slices of 3-D affines measured in their own plane."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_losses import BoundaryKernelLoss, DiceSinkhornLoss, SinkhornSegmentationLoss
from monai_losses.metrics import SinkhornDistanceMetric
from monai_losses.spacing import item_spacings, plane_affine
from monai_losses.transforms import MaskToMeasure

SPACING = (0.7, 1.2)


def _slice_affine(kind: str, spacing=SPACING) -> np.ndarray:
    """The 4 × 4 affine of a 2-D slice: axial (pixel axes along x, y), sagittal (y, z) or oblique (rotated 30° about
    x and 20° about z), with pixel sizes ``spacing`` and an origin off zero."""
    columns = {"axial": np.eye(3)[:, :2], "sagittal": np.eye(3)[:, 1:]}.get(kind)
    if columns is None:
        a, b = math.radians(30), math.radians(20)
        about_x = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        about_z = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
        columns = (about_z @ about_x)[:, :2]
    affine = np.eye(4)
    affine[:3, :2] = columns * np.asarray(spacing)
    affine[:3, 2] = np.cross(columns[:, 0], columns[:, 1])
    affine[:3, 3] = (5.0, -2.0, 9.0)
    return affine


@pytest.mark.parametrize("kind", ["axial", "sagittal", "oblique"])
def test_plane_affine_keeps_distances_within_the_slice(kind):
    """Pixel sizes are the full column norms and every in-plane distance is kept; an axial slice gets the corner
    that MONAI's to_affine_nd takes."""
    from monai.data.utils import to_affine_nd

    affine = _slice_affine(kind)
    plane = plane_affine(affine)
    np.testing.assert_allclose(np.linalg.norm(plane[:2, :2], axis=0), SPACING)
    indices = np.random.default_rng(0).uniform(-20, 20, (50, 2))
    in_3d = indices @ affine[:3, :2].T + affine[:3, 3]
    in_plane = indices @ plane[:2, :2].T + plane[:2, 2]
    np.testing.assert_allclose(np.linalg.norm(in_plane[1:] - in_plane[:1], axis=1),
                               np.linalg.norm(in_3d[1:] - in_3d[:1], axis=1))
    if kind == "axial":
        np.testing.assert_allclose(plane, to_affine_nd(2, affine))
    with pytest.raises(ValueError, match="span no plane"):
        plane_affine(np.diag([1.0, 0.0, 1.0, 1.0]))


def _disc_pair(items: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft logits of a disc and the one-hot target of the disc moved 3 pixels along the second axis,
    (items, 2, 18, 16)."""
    grid = torch.stack(torch.meshgrid(torch.arange(18.0), torch.arange(16.0), indexing="ij"))
    disc = ((grid[0] - 8.5) ** 2 + (grid[1] - 6.5) ** 2 <= 16).float()
    moved = torch.roll(disc, 3, 1)
    logits = torch.stack([4 * (1 - 2 * disc), 4 * (2 * disc - 1)])[None].repeat(items, 1, 1, 1)
    target = torch.stack([1 - moved, moved])[None].repeat(items, 1, 1, 1)
    return logits, target


ADAPTERS = {
    "SinkhornSegmentationLoss": lambda spacing: SinkhornSegmentationLoss(softmax=True, reduction="none",
                                                                         spacing=spacing),
    "DiceSinkhornLoss": lambda spacing: DiceSinkhornLoss(softmax=True, reduction="none", spacing=spacing),
    "BoundaryKernelLoss": lambda spacing: BoundaryKernelLoss(softmax=True, reduction="none", spacing=spacing),
    "SinkhornDistanceMetric": lambda spacing: _metric(spacing),
}


def _metric(spacing):
    """The metric on the binarised prediction, as a loss-like callable."""
    metric = SinkhornDistanceMetric(include_background=True)
    return lambda logits, target: metric((logits > 0).float(), target, spacing=spacing)  # a MetaTensor stays one


def _value(adapter: str, logits, target, spacing=None) -> torch.Tensor:
    return ADAPTERS[adapter](spacing)(logits, target).detach().reshape(logits.shape[0], -1).double()


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("kind", ["sagittal", "oblique"])
def test_two_dimensional_slices_of_three_dimensional_affines(adapter, kind):
    """A 2-D item carrying the 4 × 4 affine of a sagittal or oblique slice is measured with its true pixel sizes,
    as with the spacing given explicitly — for the losses and the metric alike (the 2 × 2 corner would give a zero
    or wrong spacing)."""
    logits, target = _disc_pair()
    expected = _value(adapter, logits, target, SPACING)
    affine = torch.as_tensor(_slice_affine(kind))
    torch.testing.assert_close(_value(adapter, logits, MetaTensor(target, affine=affine)), expected)
    torch.testing.assert_close(_value(adapter, MetaTensor(logits, affine=affine), target), expected)
    assert not torch.allclose(_value(adapter, logits, target), expected)  # 1 mm pixels differ: the test can fail


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_batched_affines_of_different_spacings(adapter):
    """A collated batch of affines (B, 4, 4) with different spacings: each item is measured with its own, as
    with an explicit per-item spacing, and the target's affine takes precedence over the prediction's."""
    logits, target = _disc_pair(items=2)
    spacings = [(0.7, 1.2), (1.5, 0.5)]
    affines = torch.stack([torch.as_tensor(_slice_affine("oblique", s)) for s in spacings])
    expected = torch.cat([_value(adapter, logits[k : k + 1], target[k : k + 1], s) for k, s in enumerate(spacings)])
    torch.testing.assert_close(_value(adapter, logits, MetaTensor(target, affine=affines)), expected)
    other = torch.stack([torch.as_tensor(_slice_affine("axial", (3.0, 3.0)))] * 2)
    torch.testing.assert_close(_value(adapter, MetaTensor(logits, affine=other), MetaTensor(target, affine=affines)),
                               expected)


def test_the_rule_and_its_errors():
    """Explicit spacing first (a number, per axis, per item), then the target, the prediction, 1 mm; malformed
    affines and spacings are refused naming the tensor."""
    logits, target = _disc_pair(items=2)
    sagittal = torch.as_tensor(_slice_affine("sagittal"))
    assert item_spacings(logits, target, None) == [(1.0, 1.0)] * 2
    assert item_spacings(logits, target, 0.5) == [(0.5, 0.5)] * 2
    assert item_spacings(logits, target, [[0.5, 0.6], [0.7, 0.8]]) == [(0.5, 0.6), (0.7, 0.8)]
    np.testing.assert_allclose(item_spacings(MetaTensor(logits, affine=sagittal), target, None), [SPACING] * 2)
    with pytest.raises(ValueError, match="target's MetaTensor holds 3 affines for a batch of 2"):
        item_spacings(logits, MetaTensor(target, affine=torch.stack([sagittal] * 3)), None)
    with pytest.raises(ValueError, match="span no plane"):
        item_spacings(logits, MetaTensor(target, affine=torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0]))), None)
    with pytest.raises(ValueError, match="positive numbers of mm"):
        item_spacings(logits, target, (0.5, -1.0))


def test_mask_to_measure_places_a_sagittal_slice_in_its_plane():
    """The transform follows the same rule: a sagittal 2-D mask's measure has the true pixel area as weights and
    the true in-plane distances between its points."""
    mask = torch.zeros(1, 6, 5)
    mask[0, 1, 1] = mask[0, 4, 3] = 1.0
    affine = _slice_affine("sagittal")
    measure = MaskToMeasure()(MetaTensor(mask, affine=torch.as_tensor(affine)))
    np.testing.assert_allclose(measure.weights.numpy(), [SPACING[0] * SPACING[1]] * 2)
    distance = float(torch.linalg.norm(measure.points[1] - measure.points[0]))
    assert distance == pytest.approx(math.hypot(3 * SPACING[0], 2 * SPACING[1]))


def test_mesh_metric_reads_batched_affines_of_different_spacings():
    """The 3-D mesh metric follows the same rule: a collated (B, 4, 4) affine of the target gives each item its
    own voxel size, as an explicit per-item spacing does (the prediction's conflicting affine is not read)."""
    from monai_losses.metrics import MeshSurfaceDistanceMetric

    grid = torch.stack(torch.meshgrid(*[torch.arange(14.0)] * 3, indexing="ij"))
    inner = ((grid - 6.5) ** 2).sum(0) <= 16
    outer = ((grid - 6.5) ** 2).sum(0) <= 25
    y_pred = torch.stack([torch.stack([~inner, inner])] * 2).float()
    y = torch.stack([torch.stack([~outer, outer])] * 2).float()
    spacings = [(1.0, 1.0, 1.0), (0.5, 0.8, 1.2)]
    affines = torch.stack([torch.diag(torch.tensor([*s, 1.0], dtype=torch.float64)) for s in spacings])
    metric = MeshSurfaceDistanceMetric()
    expected = metric(y_pred, y, spacing=[list(s) for s in spacings])
    wrong = torch.stack([torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))] * 2)
    torch.testing.assert_close(metric(MetaTensor(y_pred, affine=wrong), MetaTensor(y, affine=affines)), expected)
    assert float(expected[1, 0]) < float(expected[0, 0])  # the smaller voxels give the smaller distance
