"""mask_to_mesh on real label maps: enclosed volume, placement in world mm, orientation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomed import Image, Measure, Mesh, datasets, mask_to_mesh
from geomed.morphometry import volume
from geomed.surface import smooth_mesh


def _volume_centroid(mesh) -> np.ndarray:
    a, b, c = (mesh.vertices[mesh.triangles[:, k]] for k in range(3))
    signed = np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0
    return (signed[:, None] * (a + b + c) / 4.0).sum(0) / signed.sum()


def _mask_centroid(image: Image, label: int) -> np.ndarray:
    measure = Measure.from_mask(image.with_array(image.array == label), dtype=torch.float64)
    return (measure.weights[:, None] * measure.points).sum(0).numpy() / float(measure.total_mass)


@pytest.fixture(scope="module")
def knees() -> dict[str, Image]:
    return {name: datasets.knee_labels(name) for name in datasets.KNEES}


@pytest.mark.parametrize("donor", datasets.BRAIN_DONORS)
@pytest.mark.parametrize("label", ["left_hippocampus", "right_hippocampus"])
def test_hippocampus_surface_volume_within_3_percent(donor, label):
    brain = datasets.brain_labels(donor)
    mesh = mask_to_mesh(brain, label)
    voxel_volume = volume(brain, label)
    assert mesh.is_closed
    assert volume(mesh) == pytest.approx(voxel_volume, rel=0.03)


@pytest.mark.parametrize("knee", datasets.KNEES)
@pytest.mark.parametrize("label", ["femur", "tibia"])
def test_bone_surface_volume_within_3_percent_and_in_place(knees, knee, label):
    image = knees[knee]
    mesh = mask_to_mesh(image, label)
    assert mesh.is_closed
    assert volume(mesh) == pytest.approx(volume(image, label), rel=0.03)
    label_id = image.label_id(label)
    # the surface sits where the voxels are, through the oblique direction matrix: centroids agree closely
    np.testing.assert_allclose(_volume_centroid(mesh), _mask_centroid(image, label_id), atol=0.1)


@pytest.mark.parametrize("method", ["surface_nets", "flying_edges"])
def test_methods_agree_on_cartilage(knees, method):
    image = knees["B"]
    mesh = mask_to_mesh(image, "femoral_cartilage", method=method)
    assert volume(mesh) == pytest.approx(volume(image, "femoral_cartilage"), rel=0.03)
    np.testing.assert_allclose(_volume_centroid(mesh), _mask_centroid(image, 1), atol=0.2)


def test_unsmoothed_surface_nets_enclose_exactly_the_voxels():
    brain = datasets.brain_labels("10021")
    mesh = mask_to_mesh(brain, 40, smoothing_iterations=0)
    assert volume(mesh) == pytest.approx(volume(brain, 40), rel=1e-6)  # vtk stores float32 vertices


def test_mirrored_affine_keeps_normals_outward():
    brain = datasets.brain_labels("9861")
    mirrored = Image(brain.array, np.diag([-1.0, 1.0, 1.0, 1.0]) @ brain.affine, brain.label_names)
    assert np.linalg.det(mirrored.affine) * np.linalg.det(brain.affine) < 0
    mesh = mask_to_mesh(mirrored, 40)
    assert volume(mesh) == pytest.approx(volume(mask_to_mesh(brain, 40)), rel=1e-6)  # vtk stores float32 vertices
    np.testing.assert_allclose(_volume_centroid(mesh), _mask_centroid(mirrored, 40), atol=0.1)


def test_binary_mask_touching_the_border_is_closed():
    array = np.zeros((6, 7, 8), dtype=np.uint8)
    array[:3, 2:5, 3:8] = 1
    image = Image(array, np.diag([0.5, 0.7, 1.2, 1.0]))
    mesh = mask_to_mesh(image, smoothing_iterations=0)
    assert mesh.is_closed
    assert volume(mesh) == pytest.approx(3 * 3 * 5 * 0.5 * 0.7 * 1.2, rel=1e-6)  # vtk stores float32 vertices


def test_bad_input():
    brain = datasets.brain_labels("9861")
    with pytest.raises(ValueError, match="label 'left_hippocampus' is absent"):
        mask_to_mesh(brain.with_array(np.where(brain.array == 40, 0, brain.array)), "left_hippocampus")
    with pytest.raises(ValueError, match="mask is empty"):
        mask_to_mesh(brain.with_array(np.zeros(brain.shape)))
    with pytest.raises(ValueError, match="unknown label name 'hippo'"):
        mask_to_mesh(brain, "hippo")
    with pytest.raises(ValueError, match="method must be one of"):
        mask_to_mesh(brain, 40, method="marching_cubes")
    with pytest.raises(ValueError, match="smoothing_iterations must be a non-negative integer"):
        mask_to_mesh(brain, 40, smoothing_iterations=-1)
    with pytest.raises(TypeError, match="geomed.Image"):
        mask_to_mesh(brain.array, 40)
    with pytest.raises(ValueError, match="scalar image"):
        mask_to_mesh(Image(np.zeros((2, 2, 2, 3)), np.eye(4)))


def test_distance_to_surface_measures_to_triangles_not_vertices():
    """A unit square of two triangles: above its middle the distance is the height (the nearest vertex is farther),
    beside it the distance to the edge."""
    from geomed.surface import distance_to_surface

    square = Mesh(np.array([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]), np.array([[0, 1, 2], [0, 2, 3]]))
    points = np.array([[0.5, 0.5, 2.0], [2.0, 0.5, 0.0], [0.25, 0.5, -0.5]])
    np.testing.assert_allclose(distance_to_surface(points, square), [2.0, 1.0, 0.5], atol=1e-12)


def test_smooth_mesh_unfolds_a_crumpled_surface_and_keeps_its_volume():
    """The raw LV mesh folds at the scale of its edges (|area vector| / vertex area ≈ 0.88); smoothing unfolds it
    (> 0.98) and changes the enclosed volume by < 1%."""
    raw = datasets.heart_myocardium("lv")
    smooth = smooth_mesh(raw, 60)

    def unfolded(mesh):
        return float(np.mean(np.linalg.norm(mesh.vertex_area_vectors(), axis=1) / mesh.vertex_areas()))

    assert unfolded(raw) < 0.9 < 0.98 < unfolded(smooth)
    assert smooth.n_vertices == raw.n_vertices and smooth.is_closed
    assert volume(smooth) == pytest.approx(volume(raw), rel=0.01)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        smooth_mesh(raw, 0)
