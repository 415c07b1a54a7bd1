"""Measure: constructors from real masks, label maps and meshes, invariants, and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import geomed
from geomed import Image, Measure, Mesh, datasets, sinkhorn_divergence
from geomed.morphometry import surface_area, volume


@pytest.fixture(scope="module")
def knee_a() -> Image:
    return datasets.knee_labels("A")


@pytest.fixture(scope="module")
def brain() -> Image:
    return datasets.brain_labels("9861")


@pytest.fixture(scope="module")
def septum() -> Mesh:
    return datasets.heart_myocardium("septum")


# ---------------------------------------------------------------------------------------------- from_mask
def test_from_mask_mass_is_voxel_count_times_voxel_volume(knee_a):
    mask = knee_a.with_array(knee_a.array == 2)
    measure = Measure.from_mask(mask, dtype=torch.float64)
    count = int(np.count_nonzero(knee_a.array == 2))
    assert measure.n_points == count
    assert float(measure.total_mass) == pytest.approx(count * 0.3645833432674408**2 * 0.6999998688697815, rel=1e-6)
    assert float(measure.total_mass) == pytest.approx(count * knee_a.voxel_volume, rel=1e-12)


def test_from_mask_points_are_voxel_centres_in_world(knee_a):
    mask = knee_a.with_array(knee_a.array == 3)
    measure = Measure.from_mask(mask, dtype=torch.float64)
    index = np.argwhere(knee_a.array == 3)
    expected = index @ knee_a.affine[:3, :3].T + knee_a.affine[:3, 3]
    np.testing.assert_allclose(measure.points.numpy(), expected, atol=1e-9)
    assert measure.normals is None and measure.labels is None


def test_from_mask_array_with_affine_equals_image(brain):
    mask = (brain.array == 40).astype(np.uint8)
    from_image = Measure.from_mask(brain.with_array(mask))
    from_array = Measure.from_mask(mask, brain.affine)
    from_tensor = Measure.from_mask(torch.from_numpy(mask), brain.affine)
    for other in (from_array, from_tensor):
        torch.testing.assert_close(other.points, from_image.points)
        torch.testing.assert_close(other.weights, from_image.weights)


def test_soft_mask_weights_are_differentiable(brain):
    probabilities = torch.rand(brain.shape, dtype=torch.float64) * torch.from_numpy(brain.array == 81)
    probabilities.requires_grad_(True)
    measure = Measure.from_mask(probabilities, brain.affine)
    assert measure.dtype == torch.float64
    measure.total_mass.backward()
    expected = torch.from_numpy((brain.array == 81) * brain.voxel_volume)
    positive = probabilities.detach() > 0
    torch.testing.assert_close(probabilities.grad[positive], expected[positive])
    assert float(measure.total_mass.detach()) == pytest.approx(float(probabilities.detach().sum()) * brain.voxel_volume)


# ---------------------------------------------------------------------------------------------- from_labels
def test_from_labels_by_id_and_name(brain):
    measures = Measure.from_labels(brain, [40, "right_hippocampus"], dtype=torch.float64)
    assert list(measures) == [40, "right_hippocampus"]
    for key, label in ((40, 40), ("right_hippocampus", 81)):
        measure = measures[key]
        count = int(np.count_nonzero(brain.array == label))
        assert measure.n_points == count
        assert float(measure.total_mass) == pytest.approx(count * brain.voxel_volume)
        assert torch.all(measure.labels == label)


def test_from_labels_default_is_every_present_label(knee_a):
    measures = Measure.from_labels(knee_a)
    present = sorted(int(v) for v in np.unique(knee_a.array) if v)
    assert list(measures) == present
    total = sum(m.n_points for m in measures.values())
    assert total == int(np.count_nonzero(knee_a.array))


def test_from_labels_agrees_with_from_mask(knee_a):
    by_label = Measure.from_labels(knee_a, [4])[4]
    by_mask = Measure.from_mask(knee_a.with_array(knee_a.array == 4))
    torch.testing.assert_close(by_label.points, by_mask.points)
    torch.testing.assert_close(by_label.weights, by_mask.weights)


def test_mask_measures_remember_their_voxel_grid(knee_a):
    """``grid.index`` is each point's voxel: the image's own index → world map gives the points back; the grid
    survives ``normalized`` and ``to``, and a grid that does not index every point is refused."""
    by_label = Measure.from_labels(knee_a, [4], dtype=torch.float64)[4]
    by_mask = Measure.from_mask(knee_a.with_array(knee_a.array == 4), dtype=torch.float64)
    for measure in (by_label, by_mask, by_mask.normalized(), by_mask.to(dtype=torch.float32)):
        grid = measure.grid
        assert grid.shape == knee_a.shape and grid.same_geometry(by_label.grid) and grid.is_orthogonal()
        index = np.stack(np.unravel_index(grid.index.numpy(), grid.shape), -1)
        np.testing.assert_allclose(knee_a.index_to_world(index), measure.points.double().numpy(), atol=1e-4)
    np.testing.assert_allclose(by_mask.grid.spacing, knee_a.spacing)
    with pytest.raises(ValueError, match="grid must index every point"):
        Measure(by_mask.points[:-1], by_mask.weights[:-1], grid=by_mask.grid)


# ---------------------------------------------------------------------------------------------- from_mesh
@pytest.mark.parametrize("lumped", [False, True])
def test_from_mesh_mass_is_area_and_normals_are_unit(septum, lumped):
    measure = Measure.from_mesh(septum, lumped=lumped, dtype=torch.float64)
    assert float(measure.total_mass) == pytest.approx(surface_area(septum), rel=1e-12)
    torch.testing.assert_close(measure.normals.norm(dim=-1), torch.ones(measure.n_points, dtype=torch.float64))
    assert measure.n_points == (septum.n_vertices if lumped else septum.n_triangles)


def test_from_mesh_normals_point_outwards_divergence_theorem(septum):
    # For a closed surface, ∮ n dA = 0 and ∮ (x·n)/3 dA = enclosed volume; x·n is linear on a flat triangle,
    # so the centroid rule is exact and the flux equals the divergence-theorem volume to rounding.
    measure = Measure.from_mesh(septum, dtype=torch.float64)
    flux = (measure.weights * (measure.points * measure.normals).sum(-1)).sum() / 3.0
    assert float(flux) == pytest.approx(volume(septum), rel=1e-10)
    assert float(flux) > 0
    net_normal = (measure.weights[:, None] * measure.normals).sum(0).norm()
    assert float(net_normal) < 1e-8 * float(measure.total_mass)


def test_from_mesh_skips_degenerate_triangles():
    mesh = Mesh([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]], [[0, 1, 2], [0, 1, 3]])
    measure = Measure.from_mesh(mesh)
    assert measure.n_points == 1
    assert float(measure.total_mass) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- from_points, moves
def test_from_points_defaults_and_normalised_normals():
    measure = Measure.from_points(np.zeros((3, 3)) + [[0, 0, 0], [1, 0, 0], [0, 2, 0]], normals=[[0, 0, 2]] * 3,
                                  labels=[1, 1, 2])
    assert measure.dtype == torch.get_default_dtype()
    torch.testing.assert_close(measure.weights, torch.ones(3))
    torch.testing.assert_close(measure.normals, torch.tensor([[0.0, 0.0, 1.0]] * 3))
    assert measure.labels.dtype == torch.int64


def test_from_points_keeps_autograd_graph():
    points = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    measure = Measure.from_points(points)
    (measure.points**2).sum().backward()
    torch.testing.assert_close(points.grad, 2 * points.detach())


def test_batched_measure_total_mass_per_item():
    measure = Measure.from_points(torch.randn(4, 10, 6), torch.rand(4, 10) + 0.1)
    assert measure.batch_shape == (4,) and measure.dim == 6
    assert measure.total_mass.shape == (4,)
    torch.testing.assert_close(measure.normalized().total_mass, torch.ones(4))


def test_to_moves_everything_but_labels_dtype(septum):
    measure = Measure.from_points(torch.randn(6, 3), torch.rand(6) + 0.1, torch.randn(6, 3), torch.arange(6))
    moved = measure.to("cpu", torch.float64)
    assert moved.points.dtype == moved.weights.dtype == moved.normals.dtype == torch.float64
    assert moved.labels.dtype == torch.int64
    assert measure.points.dtype == torch.float32
    with pytest.raises(TypeError, match="floating dtype"):
        measure.to(dtype=torch.int32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_and_back():
    measure = Measure.from_points(torch.randn(6, 3), labels=torch.arange(6))
    moved = measure.to("cuda")
    assert moved.device.type == "cuda" and moved.labels.device.type == "cuda"
    torch.testing.assert_close(moved.to("cpu").points, measure.points)


# ---------------------------------------------------------------------------------------------- properties
_coordinates = st.floats(-500, 500, allow_nan=False, width=64)
_masses = st.floats(1e-3, 1e3, allow_nan=False, width=64)


@st.composite
def _clouds(draw):
    n = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 6))
    points = draw(arrays(np.float64, (n, dim), elements=_coordinates))
    weights = draw(arrays(np.float64, (n,), elements=_masses))
    return points, weights


@settings(max_examples=60, deadline=None)
@given(_clouds(), st.floats(1e-3, 1e3))
def test_measure_invariants(cloud, scale):
    points, weights = cloud
    measure = Measure.from_points(points, weights, dtype=torch.float64)
    assert float(measure.total_mass) == pytest.approx(weights.sum(), rel=1e-12)
    normalized = measure.normalized()
    assert float(normalized.total_mass) == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(normalized.normalized().weights, normalized.weights)
    scaled = Measure.from_points(points, weights * scale, dtype=torch.float64).normalized()
    torch.testing.assert_close(scaled.weights, normalized.weights)
    torch.testing.assert_close(normalized.points, measure.points)
    assert np.all(measure.weights.numpy() == weights)


@settings(max_examples=40, deadline=None)
@given(_clouds())
def test_dtype_round_trip(cloud):
    points, weights = cloud
    measure = Measure.from_points(points, weights, dtype=torch.float64)
    single = measure.to(dtype=torch.float32)
    assert single.dtype == torch.float32 and single.weights.dtype == torch.float32
    np.testing.assert_allclose(single.to(dtype=torch.float64).points.numpy(), points, rtol=1e-6, atol=1e-4)
    assert float(single.total_mass) == pytest.approx(weights.sum(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "points, weights, match",
    [
        ([[0.0, np.nan, 0.0]], None, "points contains 1 NaN/Inf"),
        ([[0.0, 0.0, 0.0]], [np.inf], "weights contains 1 NaN/Inf"),
        ([[0.0, 0.0, 0.0], [1, 1, 1]], [1.0, -1.0], "non-negative"),
        ([[0.0, 0.0, 0.0], [1, 1, 1]], [0.0, 0.0], "sum to zero"),
        ([[0.0, 0.0, 0.0], [1, 1, 1]], [1.0], r"weights must have shape \(2,\)"),
        (np.zeros((0, 3)), None, "points is empty"),
        ([0.0, 1.0, 2.0], None, r"points must have shape \(..., N, D\)"),
    ],
)
def test_from_points_rejects(points, weights, match):
    with pytest.raises(ValueError, match=match):
        Measure.from_points(points, weights)


def test_from_points_rejects_bad_normals_and_labels():
    with pytest.raises(ValueError, match="normals must have the shape of points"):
        Measure.from_points(np.zeros((2, 3)), normals=np.ones((2, 2)))
    with pytest.raises(ValueError, match="zero vectors"):
        Measure.from_points(np.zeros((2, 3)), normals=[[0, 0, 1], [0, 0, 0]])
    with pytest.raises(TypeError, match="labels must be integers"):
        Measure.from_points(np.zeros((2, 3)), labels=[0.5, 1.0])
    with pytest.raises(TypeError, match="points must be a tensor or array of numbers"):
        Measure.from_points([["a", "b"]])


def test_direct_construction_checks_types():
    with pytest.raises(TypeError, match="torch tensors"):
        Measure(np.zeros((2, 3)), np.ones(2))
    with pytest.raises(TypeError, match="must match points"):
        Measure(torch.zeros(2, 3), torch.ones(2, dtype=torch.float64))


def test_from_mask_rejects(brain):
    empty = brain.with_array(np.zeros(brain.shape, dtype=np.uint8))
    with pytest.raises(ValueError, match="mask is empty"):
        Measure.from_mask(empty)
    with pytest.raises(ValueError, match="use Measure.from_labels"):
        Measure.from_mask(brain)
    with pytest.raises(ValueError, match=r"occupancies in \[0, 1\]"):
        Measure.from_mask(brain.with_array(np.full(brain.shape, 1.5)))
    with pytest.raises(ValueError, match="mask contains 1 NaN"):
        Measure.from_mask(np.where(np.arange(8).reshape(2, 2, 2) == 3, np.nan, 0.5), np.eye(4))
    with pytest.raises(TypeError, match="affine is required"):
        Measure.from_mask(np.ones((2, 2, 2)))
    with pytest.raises(TypeError, match="affine must be omitted"):
        Measure.from_mask(brain.with_array(brain.array == 40), np.eye(4))
    with pytest.raises(ValueError, match=r"mask must have shape \(I, J, K\), or \(I, J\) for a 2-D slice"):
        Measure.from_mask(np.ones((2, 2, 2, 2)), np.eye(4))
    with pytest.raises(ValueError, match="affine must be invertible"):
        Measure.from_mask(np.ones((2, 2, 2)), np.diag([1.0, 1.0, 0.0, 1.0]))


def test_from_labels_rejects(brain):
    with pytest.raises(ValueError, match="unknown label name 'left_hipocampus'; known names: .*left_hippocampus"):
        Measure.from_labels(brain, ["left_hipocampus"])
    with pytest.raises(ValueError, match=r"label 3 \(id 3\) is absent from the image; present labels: \[35,"):
        Measure.from_labels(brain, [3])
    with pytest.raises(ValueError, match="background"):
        Measure.from_labels(brain, [0])
    with pytest.raises(ValueError, match="labels is empty"):
        Measure.from_labels(brain, [])
    with pytest.raises(TypeError, match="int id or a str name"):
        Measure.from_labels(brain, [4.5])
    with pytest.raises(ValueError, match="integer label map"):
        Measure.from_labels(brain.with_array(brain.array + 0.5))
    unnamed = Image(brain.array, brain.affine)
    with pytest.raises(ValueError, match="no label_names"):
        Measure.from_labels(unnamed, ["left_hippocampus"])


def test_from_mesh_rejects():
    with pytest.raises(TypeError, match="geomed.Mesh"):
        Measure.from_mesh(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no triangles"):
        Measure.from_mesh(Mesh(np.zeros((3, 3)), np.zeros((0, 3), dtype=int)))
    with pytest.raises(ValueError, match="zero area"):
        Measure.from_mesh(Mesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]]))


@pytest.mark.parametrize(
    "vertices, triangles, kwargs, error, match",
    [
        (np.zeros((3, 2)), [[0, 1, 2]], {}, ValueError, r"vertices must have shape \(V, 3\)"),
        ([[0, 0, np.nan], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], {}, ValueError, "vertices contains 1 NaN"),
        (np.eye(3), [[0, 1, 3]], {}, ValueError, "out of range"),
        (np.eye(4)[:, :3], [[0, 1, 2, 3]], {}, ValueError, "only triangle cells; triangulate"),
        (np.eye(3), [[0.5, 1, 2]], {}, TypeError, "integer vertex indices"),
        (np.eye(3), [[0, 1, 2]], {"point_data": {"t": [1.0, 2.0]}}, ValueError, r"point_data\['t'\] must have one row per vertex \(3\)"),
        (np.eye(3), [[0, 1, 2]], {"cell_data": {"r": [1, 2]}}, ValueError, r"cell_data\['r'\] must have one row per triangle \(1\)"),
    ],
)
def test_mesh_rejects(vertices, triangles, kwargs, error, match):
    with pytest.raises(error, match=match):
        Mesh(vertices, triangles, **kwargs)


@pytest.mark.parametrize(
    "array, affine, match",
    [
        (np.zeros((2, 2)), np.eye(4), r"array must have shape \(I, J, K\)"),
        (np.zeros((2, 2, 2)), np.eye(3), r"affine must have shape \(4, 4\)"),
        (np.zeros((2, 2, 2)), np.diag([1.0, np.nan, 1.0, 1.0]), "affine contains 1 NaN"),
        (np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]), "invertible"),
        (np.zeros((2, 2, 2)), np.ones((4, 4)), "last row"),
    ],
)
def test_image_rejects(array, affine, match):
    with pytest.raises(ValueError, match=match):
        Image(array, affine)


def test_data_types_do_not_alias_user_arrays():
    vertices = np.eye(3)
    mesh = Mesh(vertices, [[0, 1, 2]])
    vertices[0, 0] = 99.0
    assert mesh.vertices[0, 0] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        mesh.vertices[0, 0] = 5.0
    array = np.zeros((2, 2, 2))
    image = Image(array, np.eye(4))
    array[0, 0, 0] = 1.0
    assert image.array[0, 0, 0] == 0.0


def test_import_geomed_loads_the_file_readers_on_first_use():
    """A training script importing geomed for its losses pulls in torch, not VTK or SimpleITK."""
    probe = ("import sys, geomed; before = {m for m in ('vtkmodules', 'SimpleITK') if m in sys.modules}; "
             "geomed.read_mesh; after = {m for m in ('vtkmodules', 'SimpleITK') if m in sys.modules}; "
             "print(sorted(before), sorted(after))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[] ['SimpleITK', 'vtkmodules']"
    assert geomed.datasets.knee_labels is datasets.knee_labels and geomed.morphometry.volume is volume
    with pytest.raises(AttributeError, match="has no attribute 'read_volume'"):
        geomed.read_volume  # noqa: B018


def test_two_dimensional_masks_are_measures_on_a_grid():
    """A 2-D slice with a (3, 3) affine: points in mm, weights in mm², and two slices of one geometry are solved on
    their grid with the value of the point-cloud solver on the same pixels."""
    affine = np.array([[0.0, -0.7, 30.0], [1.2, 0.0, -5.0], [0.0, 0.0, 1.0]])
    first, second = np.zeros((20, 24)), np.zeros((20, 24))
    first[3:9, 4:15] = 1.0
    second[8:16, 9:20] = 0.5
    a, b = (Measure.from_mask(mask, affine, dtype=torch.float64) for mask in (first, second))
    assert a.points.shape == (66, 2)
    torch.testing.assert_close(a.points[0], torch.tensor([30.0 - 0.7 * 4, -5.0 + 1.2 * 3], dtype=torch.float64))
    assert float(a.total_mass) == pytest.approx(66 * 0.84)
    grid = sinkhorn_divergence(a, b, blur=1.0, backend="grid", tol=1e-6)
    cloud = sinkhorn_divergence(Measure(a.points, a.weights), Measure(b.points, b.weights), blur=1.0,
                                backend="dense", tol=1e-6)
    assert grid.backend == "grid"
    assert float(grid.value) == pytest.approx(float(cloud.value), rel=1e-6)
    with pytest.raises(ValueError, match=r"2-D mask \(I, J\) must have shape \(3, 3\)"):
        Measure.from_mask(first, np.eye(4))
