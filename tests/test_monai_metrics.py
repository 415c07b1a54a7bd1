"""MONAI metrics: SinkhornDistanceMetric and MeshSurfaceDistanceMetric against closed forms, exact transport (POT)
and MONAI's own SurfaceDistanceMetric / HausdorffDistanceMetric, with MONAI's conventions (spacing, MetaTensors,
empty masks, buffer and reductions)."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

from monai_losses.metrics import MeshSurfaceDistanceMetric, SinkhornDistanceMetric

ANISOTROPIC = (0.8, 1.0, 1.5)


def _ball(shape: tuple[int, ...], spacing: tuple[float, ...], centre: tuple[float, ...], radius: float,
          semi_axes: tuple[float, ...] | None = None) -> np.ndarray:
    """Boolean mask of the voxels whose centre (mm, voxel 0 at the origin) lies in a ball (or an ellipsoid with
    ``semi_axes`` scaling ``radius`` per axis)."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1) - np.asarray(centre)
    return np.linalg.norm(grid / np.asarray(semi_axes or 1.0), axis=-1) <= radius


def _one_hot(*foregrounds: np.ndarray) -> torch.Tensor:
    """(B, 2, *spatial) float one-hot masks (background, foreground), one item per foreground mask."""
    foreground = torch.as_tensor(np.stack(foregrounds), dtype=torch.float32).unsqueeze(1)
    return torch.cat([1 - foreground, foreground], 1)


def _shifted_ball_pair(shift: int, axis: int = 2, items: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A ball of radius 3 voxels on a 12 × 12 × 16 grid and the same ball moved ``shift`` voxels along ``axis``."""
    ball = _ball((12, 12, 16), (1.0, 1.0, 1.0), (5.5, 5.5, 5.5), 3.0)
    return _one_hot(*[ball] * items), _one_hot(*[np.roll(ball, shift, axis)] * items)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")  # inside MONAI's own metrics
@pytest.mark.parametrize("radii", [(6.0, 10.0), (9.0, 7.0)])
@pytest.mark.parametrize("distance_metric, percentile, voxels", [("mean", None, 0.25), ("hausdorff", 95, 0.5)])
def test_mesh_distance_of_concentric_balls_on_an_anisotropic_grid(radii, distance_metric, percentile, voxels):
    """Two concentric balls are |r1 − r2| apart everywhere: on a 0.8 × 1.0 × 1.5 mm grid the mesh distance finds
    it within a quarter of the smallest voxel (average), half of it (HD95: the tails hold the staircase of the
    1.5 mm axis at the poles); MONAI's edge-voxel metrics within half of the largest voxel."""
    shape, centre = (36, 32, 24), (14.0, 15.5, 17.25)
    y_pred = _one_hot(_ball(shape, ANISOTROPIC, centre, radii[0]))
    y = _one_hot(_ball(shape, ANISOTROPIC, centre, radii[1]))
    truth = abs(radii[0] - radii[1])
    ours = MeshSurfaceDistanceMetric(distance_metric=distance_metric, percentile=percentile)
    monai = (SurfaceDistanceMetric(symmetric=True) if distance_metric == "mean"
             else HausdorffDistanceMetric(percentile=percentile))
    value = ours(y_pred, y, spacing=ANISOTROPIC)
    assert value.shape == (1, 1)
    assert float(value) == pytest.approx(truth, abs=voxels * min(ANISOTROPIC))
    assert float(monai(y_pred, y, spacing=ANISOTROPIC)) == pytest.approx(truth, abs=0.5 * max(ANISOTROPIC))


@pytest.mark.parametrize("axis, voxels", [(0, 5), (1, 4), (2, 3)])
def test_sinkhorn_distance_of_a_shifted_ball_is_the_shift(axis, voxels):
    """A mask moved by t mm is W2 = |t| away, and the debiased divergence of a translation is exactly |t|²/2 at
    any blur: the metric returns |t| along each axis of an anisotropic grid."""
    ball = _ball((20, 18, 14), ANISOTROPIC, (7.6, 8.5, 9.75), 4.0)
    shift = voxels * ANISOTROPIC[axis]
    value = SinkhornDistanceMetric(blur=1.0)(_one_hot(ball), _one_hot(np.roll(ball, voxels, axis)),
                                             spacing=ANISOTROPIC)
    assert float(value) == pytest.approx(shift, rel=0.02)


@pytest.fixture(scope="module")
def blob_pair() -> tuple[np.ndarray, np.ndarray, tuple[float, ...], float]:
    """A ball and a displaced ellipsoid on a 12³ anisotropic grid, and their exact W2 (mm) from POT's network
    simplex on the voxel centres with the squared Euclidean cost."""
    shape, spacing = (12, 12, 12), (1.0, 0.8, 1.2)
    centre = np.array([4.5, 4.4, 5.4])
    ball = _ball(shape, spacing, tuple(centre), 3.2)
    ellipsoid = _ball(shape, spacing, tuple(centre + [2.3, 1.1, 1.9]), 3.0, semi_axes=(1.4, 0.9, 1.0))
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    x, y = centres[ball], centres[ellipsoid]
    cost = ot.dist(x, y, metric="sqeuclidean")
    w2 = math.sqrt(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), cost))
    return ball, ellipsoid, spacing, w2


@pytest.mark.parametrize("blur, tolerance", [(1.0, 0.05), (0.5, 0.03), (0.25, 0.015)])
def test_sinkhorn_distance_matches_exact_transport(blob_pair, blur, tolerance):
    """Between two different shapes the estimate approaches POT's exact W2 as the blur decreases: within 5% at the
    default 1 mm blur (displacement ≈ 3 mm), 1.5% at 0.25 mm."""
    ball, ellipsoid, spacing, w2 = blob_pair
    value = SinkhornDistanceMetric(blur=blur)(_one_hot(ball), _one_hot(ellipsoid), spacing=spacing)
    assert float(value) == pytest.approx(w2, rel=tolerance)


def _meta(tensor: torch.Tensor, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64))


def _rotated_affine(spacing: tuple[float, ...]) -> np.ndarray:
    """An oblique voxel → world map: a rotation about an oblique axis, the given spacing, an origin."""
    angle, axis = 0.6, np.array([1.0, 2.0, 2.0]) / 3.0
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


@pytest.mark.parametrize("source", ["unit", "float", "per_axis", "per_item", "metatensor", "collated", "list"])
def test_sinkhorn_spacing_from_each_source(source):
    """A ball moved 3 voxels along the third axis is 3 × s₃ mm away, with s₃ from the call's spacing (a number, one
    per axis, one per item), from a MetaTensor's (oblique) affine, from a collated batch's per-item affines, or
    unit voxels; items of different spacings in one batch are solved apart."""
    metric = SinkhornDistanceMetric(blur=0.5)
    y_pred, y = _shifted_ball_pair(3, items=2)
    if source == "unit":
        value, expected = metric(y_pred, y), [3.0, 3.0]
    elif source == "float":
        value, expected = metric(y_pred, y, spacing=2.0), [6.0, 6.0]
    elif source == "per_axis":
        value, expected = metric(y_pred, y, spacing=(1.0, 0.7, 2.5)), [7.5, 7.5]
    elif source == "per_item":
        value, expected = metric(y_pred, y, spacing=[(1.0, 1.0, 1.0), (0.5, 0.5, 2.5)]), [3.0, 7.5]
    elif source == "metatensor":
        value, expected = metric(_meta(y_pred, _rotated_affine((0.9, 1.1, 2.5))), y), [7.5, 7.5]
    elif source == "collated":
        batch = list_data_collate([_meta(y_pred[0], np.diag([1.0, 1.0, 1.0, 1.0])),
                                   _meta(y_pred[1], _rotated_affine((0.9, 1.1, 2.5)))])
        assert batch.affine.shape == (2, 4, 4)
        value, expected = metric(batch, y), [3.0, 7.5]
    else:
        value, expected = metric([_meta(p, np.diag([1.0, 1.0, 2.5, 1.0])) for p in y_pred], list(y)), [7.5, 7.5]
    assert value.shape == (2, 1)
    torch.testing.assert_close(value[:, 0], torch.tensor(expected), rtol=0.02, atol=0)


def test_mesh_distance_follows_the_spacing_and_the_affine():
    """The mesh metric works in world mm: an isotropic spacing of 2 doubles it; stretching one axis by 2 lengthens
    it, by less than 2×; an oblique MetaTensor affine (rotation, spacing, origin) gives the value of its bare
    spacing (distances do not see rotations or origins), and a collated batch's per-item affines apply per item."""
    shape = (18, 18, 14)
    y_pred = _one_hot(*[_ball(shape, (1.0,) * 3, (8.5, 8.5, 6.5), 4.0)] * 2)
    y = _one_hot(*[_ball(shape, (1.0,) * 3, (10.5, 8.5, 6.5), 5.0)] * 2)
    metric = MeshSurfaceDistanceMetric()
    unit = float(metric(y_pred, y)[0, 0])
    assert float(metric(y_pred, y, spacing=2.0)[0, 0]) == pytest.approx(2 * unit, rel=1e-4)
    stretched = float(metric(y_pred, y, spacing=(1.0, 1.0, 2.0))[0, 0])
    assert 1.1 * unit < stretched < 2 * unit
    oblique = metric(_meta(y_pred, _rotated_affine(ANISOTROPIC)), y)
    torch.testing.assert_close(oblique, metric(y_pred, y, spacing=ANISOTROPIC), rtol=1e-4, atol=0)
    batch = list_data_collate([_meta(y_pred[0], np.eye(4)), _meta(y_pred[1], _rotated_affine((1.0, 1.0, 2.0)))])
    torch.testing.assert_close(metric(batch, y)[:, 0], torch.tensor([unit, stretched]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("metric_class", [SinkhornDistanceMetric, MeshSurfaceDistanceMetric])
@pytest.mark.parametrize("empty", ["prediction", "ground truth"])
def test_empty_masks_give_nan_with_a_warning_and_aggregate_skips_them(metric_class, empty):
    """An empty prediction or label has no shape to compare: NaN and MONAI's warning naming the class; aggregate()
    averages the other values, get_not_nans counts them, reset() empties the buffer."""
    metric = metric_class(get_not_nans=True)
    y_pred, y = _shifted_ball_pair(2, items=2)
    (y_pred if empty == "prediction" else y)[1, 1] = 0
    with pytest.warns(UserWarning, match=f"the {empty} of class 1 is all 0"):
        value = metric(y_pred, y)
    assert math.isfinite(float(value[0, 0])) and math.isnan(float(value[1, 0]))
    metric(y_pred[:1], y[:1])
    mean, not_nans = metric.aggregate()
    assert float(mean) == pytest.approx(float(value[0, 0])) and float(not_nans) == 2
    per_item, counts = metric.aggregate(reduction="none")
    assert per_item.shape == counts.shape == (3, 1) and math.isnan(float(per_item[1, 0]))
    metric.reset()
    with pytest.raises(ValueError, match="must be PyTorch Tensor"):
        metric.aggregate()
    metric(y_pred[:1], y[:1])
    assert float(metric.aggregate()[0]) == pytest.approx(float(value[0, 0]))


def test_two_dimensional_inputs():
    """2-D masks (B, C, H, W): the Sinkhorn distance of a disc moved 4 pixels along an axis of 1.2 mm is 4.8 mm,
    with the spacing given, or read from the 4 × 4 affine of a sagittal slice (pixel axes along y and z, so the
    spacing is not in the 2 × 2 corner); the mesh metric needs volumes and says so."""
    disc = _ball((16, 14), (1.0, 1.0), (6.5, 5.5), 3.5)
    y_pred, y = _one_hot(disc), _one_hot(np.roll(disc, 4, 1))
    metric = SinkhornDistanceMetric()
    assert float(metric(y_pred, y, spacing=(0.7, 1.2))) == pytest.approx(4.8, rel=0.02)
    sagittal = np.array([[0.0, 0.0, 5.0, 3.0], [0.7, 0.0, 0.0, -2.0], [0.0, 1.2, 0.0, 9.0], [0.0, 0.0, 0.0, 1.0]])
    assert float(metric(_meta(y_pred, sagittal), y)) == pytest.approx(4.8, rel=0.02)
    with pytest.raises(ValueError, match=r"MeshSurfaceDistanceMetric: y_pred should have shape \(B, C, H, W, D\)"):
        MeshSurfaceDistanceMetric()(y_pred, y)


@pytest.mark.parametrize("metric_class", [SinkhornDistanceMetric, MeshSurfaceDistanceMetric])
@pytest.mark.parametrize("include_background, columns", [(False, 2), (True, 3)])
def test_include_background_sets_the_columns(metric_class, include_background, columns):
    """Three channels give two columns without the background, three with it (all finite: both masks filled)."""
    first = _ball((12, 12, 12), (1.0,) * 3, (4.0, 5.5, 5.5), 2.5)
    second = _ball((12, 12, 12), (1.0,) * 3, (8.0, 5.5, 5.5), 2.5)
    y_pred = torch.as_tensor(np.stack([~(first | second), first, second])[None], dtype=torch.float32)
    moved = np.roll(first, 1, 1)
    y = torch.as_tensor(np.stack([~(moved | second), moved, second])[None], dtype=torch.float32)
    value = metric_class(include_background=include_background)(y_pred, y)
    assert value.shape == (1, columns) and bool(torch.isfinite(value).all())
    assert float(value[0, -1]) == pytest.approx(0.0, abs=0.01) and float(value[0, -2]) > 0.3


@pytest.mark.parametrize("call, message", [
    (lambda m, p, y: m(p, y[:, :1]), "should have same shapes"),
    (lambda m, p, y: m(p[..., 0, 0], y[..., 0, 0]), r"should have shape \(B, C, H, W\) or \(B, C, H, W, D\)"),
    (lambda m, p, y: m(p), "needs the ground truth y"),
    (lambda m, p, y: m(p, y, spacing=(1.0, 2.0)), "same length as image dim"),
    (lambda m, p, y: m(p, y, spacing=[(1.0, 1.0, 1.0)] * 3), "same length as batch size"),
    (lambda m, p, y: m(p, y, spacing=(1.0, -1.0, 1.0)), "positive numbers of mm"),
    (lambda m, p, y: m(MetaTensor(p, affine=torch.eye(4).expand(3, 4, 4)), y), "3 affines for a batch of 2"),
    (lambda m, p, y: m(MetaTensor(p, affine=torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0]))), y), "zero size"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    """Malformed inputs raise ValueError with MONAI's wording where MONAI has one."""
    y_pred, y = _shifted_ball_pair(1, items=2)
    with pytest.raises(ValueError, match=message):
        call(SinkhornDistanceMetric(), y_pred, y)


@pytest.mark.parametrize("factory, message", [
    (lambda: SinkhornDistanceMetric(blur=0.0), "blur must be a positive number of mm"),
    (lambda: SinkhornDistanceMetric(tol=None), "tol must be a positive number"),
    (lambda: MeshSurfaceDistanceMetric(distance_metric="euclidean"), "distance_metric must be one of"),
    (lambda: MeshSurfaceDistanceMetric(distance_metric="hausdorff", percentile=150), "between 0 and 100"),
    (lambda: MeshSurfaceDistanceMetric(percentile=95), "applies to distance_metric='hausdorff'"),
    (lambda: MeshSurfaceDistanceMetric(smoothing_iterations=-1), "non-negative integer"),
])
def test_bad_options_raise_at_construction(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()
