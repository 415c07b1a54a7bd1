"""Segmentations as users have them: exact partial volumes on oblique anisotropic grids, surfaces of probability
maps, the synthetic cohort's image scans, and the study measuring probability and label maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from vtkmodules.vtkFiltersSources import vtkSphereSource

from geomed import Image, Mesh, probability_to_mesh
from geomed.io import polydata_to_mesh
from geomed.io import read_image
from geomed.morphometry import volume
from geomed.study import run_study
from geomed.synthetic_cohort import LABEL_IDS, calibrated_probability, synthetic_cohort
from geomed.voxelize import mesh_to_partial_volume

SPACING = np.array([0.365, 0.365, 0.7])


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotations about x, then y, then z (radians)."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))


def _oblique_affine(spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.radians([17.0, -11.0, 23.0])) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _sphere(radius: float, centre=(0.0, 0.0, 0.0), resolution: int = 160) -> Mesh:
    source = vtkSphereSource()
    source.SetRadius(radius)
    source.SetCenter(*centre)
    source.SetThetaResolution(resolution)
    source.SetPhiResolution(resolution)
    source.Update()
    mesh = polydata_to_mesh(source.GetOutput(), "sphere")
    return mesh if volume(mesh) > 0 else Mesh(mesh.vertices, mesh.triangles[:, ::-1])


def _grid_around(radius: float, spacing: np.ndarray, shift: float = 0.37,
                 mirrored: bool = False) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An oblique grid whose centre lies near the origin (off the voxel centres by ``shift`` voxels); ``mirrored``:
    its first axis reversed (a left-handed affine)."""
    shape = tuple(int(n) for n in np.ceil(2 * radius / spacing) + 6)
    affine = _oblique_affine(spacing, np.zeros(3))
    if mirrored:
        affine[:3, 0] *= -1
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2 - shift)
    return affine, shape


def test_partial_volumes_of_a_box_are_exact_on_an_oblique_anisotropic_grid():
    """A box with faces along the grid's axes: each voxel's fraction is the product of its overlaps along i, j, k
    (faces on multiples of 1/8 voxel across the lines, anywhere along them)."""
    affine = _oblique_affine(SPACING, np.array([3.0, -2.0, 1.0]))
    low, high = np.array([1.25, 2.625, 1.3]), np.array([6.375, 5.5, 7.81])
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    faces = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1), (2, 3, 7), (2, 7, 6), (0, 2, 6),
             (0, 6, 4), (1, 5, 7), (1, 7, 3)]
    box = Mesh(corners @ affine[:3, :3].T + affine[:3, 3], np.array(faces))
    box = box if volume(box) > 0 else Mesh(box.vertices, box.triangles[:, ::-1])
    fractions = mesh_to_partial_volume(box, affine, (9, 8, 10)).array
    overlap = [np.clip(np.minimum(np.arange(n) + 0.5, high[a]) - np.maximum(np.arange(n) - 0.5, low[a]), 0, 1)
               for a, n in enumerate((9, 8, 10))]
    expected = overlap[0][:, None, None] * overlap[1][None, :, None] * overlap[2][None, None, :]
    np.testing.assert_allclose(fractions, expected, atol=1e-12)


@pytest.mark.parametrize("flip", [False, True])
def test_partial_volumes_of_a_sphere_sum_to_its_volume(flip):
    """On an oblique 0.365 × 0.365 × 0.7 mm grid (and its mirror image, a left-handed affine): Σ fractions × voxel
    volume = the enclosed volume to 10⁻⁴; voxels farther than a voxel diagonal from the surface are exactly 0 or 1."""
    sphere = _sphere(6.0, centre=(0.21, -0.13, 0.05))
    affine, shape = _grid_around(6.0, SPACING, mirrored=flip)
    fractions = mesh_to_partial_volume(sphere, affine, shape).array
    grid = Image(fractions, affine)
    assert fractions.sum() * grid.voxel_volume == pytest.approx(volume(sphere), rel=1e-4)
    index = np.indices(shape).reshape(3, -1).T
    radius = np.linalg.norm(grid.index_to_world(index) - [0.21, -0.13, 0.05], axis=1).reshape(shape)
    diagonal = np.linalg.norm(SPACING) / 2
    assert np.all(fractions[radius < 6.0 - diagonal - 0.01] == 1.0)
    assert np.all(fractions[radius > 6.0 + diagonal] == 0.0)
    assert 0.0 <= fractions.min() and fractions.max() <= 1.0


def test_open_meshes_and_bad_grids_are_refused():
    sphere = _sphere(3.0, resolution=16)
    open_mesh = Mesh(sphere.vertices, sphere.triangles[1:])
    with pytest.raises(ValueError, match="closed"):
        mesh_to_partial_volume(open_mesh, np.eye(4), (4, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        mesh_to_partial_volume(sphere, np.eye(4), (4, 4))
    with pytest.raises(ValueError, match="supersampling"):
        mesh_to_partial_volume(sphere, np.eye(4), (4, 4, 4), supersampling=0)


def _sphere_map(radius: float, spacing: np.ndarray, shift: float) -> tuple[Image, float]:
    sphere = _sphere(radius)
    affine, shape = _grid_around(radius, spacing, shift)
    fractions = mesh_to_partial_volume(sphere, affine, shape).array
    return Image(calibrated_probability(fractions).astype(np.float32), affine), volume(sphere)


@pytest.mark.parametrize(("spacing", "shift"), [(np.ones(3), 0.37), (np.ones(3), 0.0), (SPACING, 0.21)])
def test_probability_map_surface_of_a_sphere(spacing, shift):
    """A 6 mm sphere's calibrated probability map (not its partial volume): the surface encloses the sphere's
    volume to 0.3% and lies within 0.05 mm of the sphere on average (0.25 mm everywhere: the 0.5 level's
    interpolation error, a tenth to a fifth of a voxel, which the volume fit spreads evenly)."""
    image, exact = _sphere_map(6.0, spacing, shift)
    mesh = probability_to_mesh(image)
    assert mesh.is_closed
    assert volume(mesh) == pytest.approx(exact, rel=3e-3)
    distance = np.linalg.norm(mesh.vertices, axis=1) - 6.0
    assert abs(distance.mean()) < 0.05 and np.abs(distance).max() < 0.25


def test_known_calibration_gives_the_exact_volume():
    """p = f²/(f² + (1 − f)²) and calibration=2: the probabilities invert to the exact partial volumes."""
    sphere = _sphere(5.0)
    affine, shape = _grid_around(5.0, np.ones(3))
    fractions = mesh_to_partial_volume(sphere, affine, shape).array
    probability = fractions**2 / (fractions**2 + (1 - fractions) ** 2)
    mesh = probability_to_mesh(Image(probability, affine), calibration=2.0)
    assert volume(mesh) == pytest.approx(fractions.sum(), rel=1e-6)


def test_one_channel_of_a_multi_component_map():
    image, _ = _sphere_map(4.0, np.ones(3), 0.3)
    stacked = Image(np.stack([1.0 - image.array, image.array], axis=-1), image.affine)
    np.testing.assert_allclose(probability_to_mesh(stacked, 1).vertices, probability_to_mesh(image).vertices)


@pytest.mark.parametrize(("change", "channel", "error", "message"), [
    (lambda a: np.where(a > 0.9, np.nan, a), None, ValueError, "NaN"),
    (lambda a: a * 1.5, None, ValueError, r"must lie in \[0, 1\]"),
    (lambda a: a - 0.1, None, ValueError, r"must lie in \[0, 1\]"),
    (lambda a: a * 0.4, None, ValueError, "no voxel has a probability above 0.5"),
    (lambda a: a, 0, ValueError, "channel applies to multi-component maps only"),
    (lambda a: np.stack([a, 1 - a], -1), None, ValueError, "give the channel"),
    (lambda a: np.stack([a, 1 - a], -1), 2, ValueError, "channel must be an integer in 0..1"),
])
def test_bad_probability_maps_are_refused_with_the_reason(change, channel, error, message):
    image, _ = _sphere_map(3.0, np.ones(3), 0.2)
    with pytest.raises(error, match=message):
        probability_to_mesh(Image(change(image.array.astype(np.float64)), image.affine), channel)


def test_bad_arguments_of_probability_to_mesh():
    image, _ = _sphere_map(3.0, np.ones(3), 0.2)
    with pytest.raises(TypeError, match="geomed.Image"):
        probability_to_mesh(image.array)
    with pytest.raises(ValueError, match="calibration must be a positive number"):
        probability_to_mesh(image, calibration=0.0)


def test_image_scans_are_two_views_of_the_same_sampled_shapes(tmp_path):
    """The same seed: the label map is where the probability map is ≥ 0.5; the truth is the continuous shape's
    volume, which the exact partial volumes (no segmentation noise) reproduce."""
    arguments = {"subjects_per_group": 1, "structures": ("hippocampus",), "years": (0.0, 1.0), "rescan": False,
                 "seed": 2}
    labels = synthetic_cohort(tmp_path / "labels", scans="label_map", **arguments)
    maps = synthetic_cohort(tmp_path / "maps", scans="probability", **arguments)
    truth = pd.read_csv(maps.truth)
    assert truth.equals(pd.read_csv(labels.truth))
    assert (truth["segmented_volume_mm3"] == truth["volume_mm3"]).all()
    rows = pd.read_csv(labels.table)
    assert (rows["label"] == LABEL_IDS["hippocampus"]).all()
    for path in truth["path"]:
        label_map, probability = read_image(labels.folder / path), read_image(maps.folder / path)
        assert label_map.array.dtype == np.uint8 and probability.array.dtype == np.float32
        np.testing.assert_allclose(label_map.affine, probability.affine)
        np.testing.assert_array_equal(label_map.array == LABEL_IDS["hippocampus"], probability.array >= 0.5)
        assert 0.0 <= probability.array.min() and probability.array.max() <= 1.0
        assert not np.isin(probability.array, [0.0, 1.0]).all()
    spacing = {tuple(np.round(read_image(maps.folder / path).spacing, 3)) for path in truth["path"]}
    assert spacing == {(1.0, 1.0, 1.0)}


def test_segmentation_noise_moves_the_volume_and_is_reported(tmp_path):
    cohort = synthetic_cohort(tmp_path, subjects_per_group=1, structures=("hippocampus",), years=(0.0, 1.0),
                              rescan=False, scans="probability", segmentation_noise=0.2, seed=2)
    truth = pd.read_csv(cohort.truth)
    relative = (truth["segmented_volume_mm3"] / truth["volume_mm3"] - 1).abs()
    assert (relative > 1e-4).all() and (relative < 0.05).all()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"scans": "voxels"}, "scans must be one of"),
    ({"segmentation_noise": 0.1}, "segmentation_noise applies to image scans"),
    ({"scans": "probability", "segmentation_noise": -1.0}, "segmentation_noise must be"),
])
def test_bad_image_scan_arguments(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        synthetic_cohort(tmp_path, **arguments)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One brain subject, one interval, hippocampus only, written as probability maps and as label maps (the same
    scans), each measured by the study."""
    results = {}
    for scans in ("probability", "label_map"):
        folder = tmp_path_factory.mktemp(scans)
        cohort = synthetic_cohort(folder / "cohort", subjects_per_group=1, structures=("hippocampus",),
                                  years=(0.0, 2.0), rescan=False, scans=scans, seed=4)
        table = pd.read_csv(cohort.table)
        table[table["subject"] == "brain-patient-01"].to_csv(folder / "one.csv", index=False)
        (folder / "cohort" / "one.csv").write_bytes((folder / "one.csv").read_bytes())
        result = run_study(folder / "cohort" / "one.csv", folder / "study", workers=1, progress=False, report=False)
        assert result.failures.empty
        results[scans] = cohort.validate(result.changes)
    return results


@pytest.mark.slow
def test_study_measures_probability_maps_within_a_tenth_of_a_point(measured):
    row = measured["probability"].iloc[0]
    assert row["true_percent"] < -4.0  # a patient's two years
    assert abs(row["error_pp"]) < 0.1
    assert abs(row["error_pp"]) < abs(row["voxel_count_error_pp"])


@pytest.mark.slow
def test_study_on_label_maps_is_not_worse_than_voxel_counting(measured):
    row = measured["label_map"].iloc[0]
    assert abs(row["error_pp"]) <= abs(row["voxel_count_error_pp"]) + 0.02
