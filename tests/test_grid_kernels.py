"""Boundary currents and varifolds of soft masks on grids, against geomed's point-cloud kernel losses."""

from __future__ import annotations

import math

import pytest
import torch

from geomed import Measure, varifold_distance
from geomed.grid_kernels import _boundary_features, grid_boundary_distance


def _centres(shape, spacing):
    axes = [torch.arange(n, dtype=torch.float64) * s for n, s in zip(shape, spacing)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def _soft_ball(centres, centre, radius):
    return torch.sigmoid(2.0 * (radius - (centres - centre).norm(dim=-1)))


def _boundary_measure(mask, spacing):
    """The measure the grid function compares: voxel centres, weights |g| (mm²), normals g/|g|."""
    vectors = _boundary_features(mask[None, None], spacing, "current")[0, 0].movedim(0, -1)
    vectors = vectors.reshape(-1, len(spacing))
    lengths = vectors.norm(dim=-1)
    keep = lengths > 0
    points = _centres(mask.shape, spacing).reshape(-1, len(spacing))
    if len(spacing) == 2:  # varifold_distance works on 3-D points: embed the plane
        points = torch.cat([points, torch.zeros(len(points), 1, dtype=points.dtype)], 1)
        vectors = torch.cat([vectors, torch.zeros(len(vectors), 1, dtype=vectors.dtype)], 1)
    return Measure(points[keep], lengths[keep], normals=vectors[keep] / lengths[keep, None])


@pytest.mark.parametrize("kind", ["current", "unoriented"])
@pytest.mark.parametrize("shape, spacing", [((14, 12, 10), (0.8, 1.0, 1.4)), ((30, 22), (0.6, 1.1))])
def test_grid_boundary_distance_equals_the_point_cloud_varifold(kind, shape, spacing):
    """Separable kernel products on the grid = geomed.varifold_distance on the same boundary measures, untruncated."""
    centres = _centres(shape, spacing)
    middle = centres.reshape(-1, len(shape)).mean(0)
    shift = torch.tensor([1.0, 0.5, 0.0][: len(shape)], dtype=torch.float64)
    a, b = _soft_ball(centres, middle, 3.5), _soft_ball(centres, middle + shift, 3.0)
    expected = varifold_distance(_boundary_measure(a, spacing), _boundary_measure(b, spacing), blur=2.0, kind=kind,
                                 truncate=None)
    computed = grid_boundary_distance(a[None, None], b[None, None], blur=2.0, spacing=spacing, kind=kind)
    torch.testing.assert_close(computed[0, 0], expected, rtol=1e-8, atol=0)


def test_normalized_distance_is_zero_for_equal_boundaries_and_one_for_far_apart_ones():
    spacing = (1.0, 1.0)
    centres = _centres((60, 30), spacing)
    near = _soft_ball(centres, torch.tensor([12.0, 15.0], dtype=torch.float64), 5.0)
    far = _soft_ball(centres, torch.tensor([47.0, 15.0], dtype=torch.float64), 5.0)
    masks = torch.stack([near, near])[None], torch.stack([near, far])[None]
    values = grid_boundary_distance(*masks, blur=2.0, spacing=spacing, normalized=True)
    assert float(values[0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert float(values[0, 1]) == pytest.approx(1.0, abs=1e-6)
    empty = torch.zeros_like(near)[None, None]
    assert float(grid_boundary_distance(empty, empty, blur=2.0, normalized=True)) == 0.0
    assert float(grid_boundary_distance(near[None, None], empty, blur=2.0, normalized=True)) == pytest.approx(1.0)


def test_small_shift_of_a_large_disk_costs_one_minus_the_kernel_overlap():
    """For a boundary much longer than the blur, shifted by t along x: 1 − ⟨μ, μ_t⟩/‖μ‖², about t²/2σ² for t ≪ σ
    (the part of the boundary facing the shift); spacing-aware: the same t in mm on two voxel sizes."""
    values = []
    for spacing in ((0.5, 0.5), (0.25, 1.0)):
        shape = (int(80 / spacing[0]), int(80 / spacing[1]))
        centres = _centres(shape, spacing)
        middle = torch.tensor([40.0, 40.0], dtype=torch.float64)
        a = _soft_ball(centres, middle, 25.0)
        b = _soft_ball(centres, middle + torch.tensor([1.0, 0.0], dtype=torch.float64), 25.0)
        values.append(float(grid_boundary_distance(a[None, None], b[None, None], blur=3.0, spacing=spacing,
                                                   normalized=True)))
    assert values[0] == pytest.approx(values[1], rel=0.05)
    assert 0.25 * 1 / (2 * 3.0**2) < values[0] < 1 / (2 * 3.0**2)


def test_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(1, 2, 6, 5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.rand(1, 2, 6, 5, 4, dtype=torch.float64, generator=generator)
    for kind in ("current", "unoriented"):
        assert torch.autograd.gradcheck(
            lambda x: grid_boundary_distance(x, b, blur=1.5, spacing=(0.7, 1.0, 1.3), kind=kind, normalized=True),
            (a,))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kind="oriented"), ValueError, "kind must be one of"),
    (dict(blur=0.0), ValueError, "blur must be a positive"),
    (dict(spacing=(1.0, 1.0)), ValueError, "spacing must be 3 positive"),
    (dict(truncate=2.0), ValueError, "truncate"),
])
def test_bad_options_are_refused(kwargs, error, match):
    mask = torch.rand(1, 1, 4, 4, 4)
    with pytest.raises(error, match=match):
        grid_boundary_distance(mask, mask, **{"blur": 1.0, **kwargs})


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same"):
        grid_boundary_distance(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 2, 4, 4, 4), blur=1.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        grid_boundary_distance(torch.rand(4, 4, 4), torch.rand(4, 4, 4), blur=1.0)
    with pytest.raises(TypeError, match="floating"):
        grid_boundary_distance(torch.ones(1, 1, 4, 4, dtype=torch.int64), torch.ones(1, 1, 4, 4), blur=1.0)
    assert math.isfinite(float(grid_boundary_distance(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), blur=1.0)))
