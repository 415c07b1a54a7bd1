"""Volumes and areas against closed forms and the real demo anatomy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from vtkmodules.vtkFiltersSources import vtkSphereSource

from geomed import Image, Mesh, datasets, mask_to_mesh, register
from geomed.io import polydata_to_mesh
from geomed.morphometry import (
    flux_volume_change,
    local_area_change,
    percent_volume_change,
    regional_summary,
    structure_measurements,
    surface_area,
    surface_change,
    volume,
)
from geomed.surface import NORMAL_SMOOTHING, distance_along_normals

_CUBE_VERTICES = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=float)
_CUBE_TRIANGLES = np.array(
    [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
     [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
)


def _cube(side: float) -> Mesh:
    return Mesh(_CUBE_VERTICES * side, _CUBE_TRIANGLES)


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rx @ rz @ ry


@pytest.mark.parametrize("side", [0.5, 1.0, 37.0])
def test_cube_volume_and_area_closed_form(side):
    cube = _cube(side)
    assert cube.is_closed
    assert volume(cube) == pytest.approx(side**3, rel=1e-12)
    assert surface_area(cube) == pytest.approx(6 * side**2, rel=1e-12)


@pytest.mark.parametrize("mirror", [1.0, -1.0])
def test_volume_invariant_under_rigid_maps_and_mirrors(mirror):
    affine = np.eye(4)
    affine[:3, :3] = _rotation((0.3, -1.1, 2.0)) @ np.diag([mirror, 1.0, 1.0])
    affine[:3, 3] = [10.0, -40.0, 7.5]
    cube = _cube(3.0).transformed(affine)
    assert volume(cube) == pytest.approx(27.0, rel=1e-12)


def test_scaled_mesh_volume_scales_by_determinant():
    heart = datasets.heart_myocardium("septum")
    scaled = heart.transformed(np.diag([1.1, 0.9, 1.2, 1.0]))
    assert volume(scaled) == pytest.approx(volume(heart) * 1.1 * 0.9 * 1.2, rel=1e-10)


def test_mask_volumes_binary_soft_and_label():
    array = np.zeros((4, 4, 4))
    array[1:3, 1:3, 1:3] = 1.0
    array[0, 0, 0] = 0.25
    image = Image(array, np.diag([0.5, 2.0, 3.0, 1.0]))
    assert volume(image) == pytest.approx((8 + 0.25) * 3.0)
    brain = datasets.brain_labels("9861")
    count = np.count_nonzero(brain.array == 40)
    assert volume(brain, "left_hippocampus") == volume(brain, 40) == pytest.approx(count * 1.0)


def test_structure_measurements_rows():
    brain = datasets.brain_labels("9861")
    rows = structure_measurements(brain, ["left_hippocampus", 81])
    assert [row["structure"] for row in rows] == ["left_hippocampus", "right_hippocampus"]
    for row in rows:
        assert row["closed"]
        assert row["voxel_volume_ml"] == pytest.approx(row["voxels"] / 1000)
        assert row["surface_volume_ml"] == pytest.approx(row["voxel_volume_ml"], rel=0.03)
    [row] = structure_measurements(datasets.heart_myocardium("lv"))
    assert row["label"] is None and row["voxels"] is None
    assert row["surface_volume_ml"] == pytest.approx(125.8, abs=0.05)


def test_open_mesh_warns(caplog):
    open_box = Mesh(_CUBE_VERTICES, _CUBE_TRIANGLES[:-2])
    with caplog.at_level(logging.WARNING, logger="geomed.morphometry"):
        volume(open_box)
    assert "boundary edges" in caplog.text


def test_bad_input():
    brain = datasets.brain_labels("9861")
    with pytest.raises(TypeError, match="label applies to label maps only"):
        volume(_cube(1.0), label=3)
    with pytest.raises(ValueError, match=r"occupancies in \[0, 1\].*pass label="):
        volume(brain)
    with pytest.raises(TypeError, match="geomed.Mesh or geomed.Image"):
        volume(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="label 3 is absent"):
        structure_measurements(brain, [3])
    with pytest.raises(ValueError, match="no triangles"):
        volume(Mesh(np.eye(3), np.zeros((0, 3), dtype=int)))


# ------------------------------------------------------------------ change between timepoints


def _hippocampus() -> Mesh:
    return mask_to_mesh(datasets.brain_labels("9861"), "left_hippocampus")


def _scaled(mesh: Mesh, factor: float) -> Mesh:
    centre = mesh.vertices.mean(0)
    return Mesh(centre + factor * (mesh.vertices - centre), mesh.triangles, dict(mesh.point_data))


def test_vertex_areas_sum_to_the_area_and_scale_by_the_square():
    mesh = _hippocampus()
    assert mesh.vertex_areas().sum() == pytest.approx(surface_area(mesh), rel=1e-12)
    np.testing.assert_allclose(local_area_change(mesh, _scaled(mesh, 0.9)), 0.81, rtol=1e-9)


def test_flux_of_a_small_normal_offset_is_the_volume_it_sweeps():
    """Moving every vertex 0.05 mm along its (smoothed) normal sweeps ≈ area × 0.05 mm³; the first-order flux
    matches the change of the enclosed volume of the offset surface."""
    mesh = _hippocampus()
    offset = Mesh(mesh.vertices + 0.05 * mesh.vertex_normals(NORMAL_SMOOTHING), mesh.triangles)
    flux = flux_volume_change(mesh, np.full(mesh.n_vertices, 0.05))
    assert 0.9 * 0.05 * surface_area(mesh) < flux <= 0.05 * surface_area(mesh)
    assert volume(offset) - volume(mesh) == pytest.approx(flux, rel=0.02)


def _sphere(radius: float, resolution: int) -> Mesh:
    """A UV sphere: vertices exactly on the sphere, triangles cutting its corners."""
    source = vtkSphereSource()
    source.SetRadius(radius)
    source.SetThetaResolution(resolution)
    source.SetPhiResolution(resolution)
    source.Update()
    return polydata_to_mesh(source.GetOutput(), "sphere")


@pytest.mark.parametrize(("radius", "resolution"), [(10.2, 40), (9.5, 20), (10.0, 17)])
def test_distance_along_normals_between_differently_meshed_spheres(radius, resolution):
    """Concentric spheres meshed independently: the distance is r − 10 mm at every vertex. The triangles of the
    target cut its corners by up to h²/8r ≈ 0.1 mm; the Phong midpoint leaves < 0.01 mm."""
    distance = distance_along_normals(_sphere(10.0, 30), _sphere(radius, resolution))
    assert not np.isnan(distance).any()
    assert np.mean(distance) == pytest.approx(radius - 10.0, abs=0.005)
    assert np.abs(distance - (radius - 10.0)).max() < 0.03


def test_distance_along_normals_never_takes_the_far_side_of_a_thin_sheet():
    """A 1.5 mm thick shell (two concentric spheres as one mesh, the inner one facing inwards): each side finds its
    own moved copy, 0.1 mm out, not the other wall 1.5 mm away."""
    def shell(offset: float) -> Mesh:
        outer, inner = _sphere(10.0 + offset, 30), _sphere(8.5 + offset, 30)
        return Mesh(np.vstack([outer.vertices, inner.vertices]),
                    np.vstack([outer.triangles, inner.triangles[:, ::-1] + outer.n_vertices]))

    distance = distance_along_normals(shell(0.0), shell(0.1))
    half = _sphere(10.0, 30).n_vertices
    np.testing.assert_allclose(distance[:half], 0.1, atol=0.01)
    np.testing.assert_allclose(distance[half:], -0.1, atol=0.01)


def test_surface_change_after_a_rigid_registration_recovers_the_volume_change():
    """A hippocampus shrunk by 1% in every direction, turned by 10° and moved 3 mm, loses 100·(1 − 0.99³) = 2.97%:
    exactly so directly; the rigid registration and the normal motion of the carried surface find it within
    0.05 percentage points, and the map shows inward motion nearly everywhere."""
    baseline = _hippocampus()
    affine = np.eye(4)
    affine[:3, :3] = _rotation((np.radians(10), 0.0, 0.0))
    affine[:3, 3] = [3.0, 0.0, -1.0]
    follow_up = _scaled(baseline, 0.99).transformed(affine)
    result = register(baseline, follow_up, model="rigid", preset="brain")
    carried = surface_change(baseline, follow_up, result.transform)
    change = percent_volume_change(baseline, follow_up, carried)
    assert change["direct_percent"] == pytest.approx(100 * (0.99**3 - 1), abs=1e-9)
    assert change["registration_percent"] == pytest.approx(change["direct_percent"], abs=0.05)
    assert change["flux_percent"] == pytest.approx(change["direct_percent"], abs=0.1)
    assert change["disagreement_pp"] == pytest.approx(change["direct_percent"] - change["registration_percent"])
    moved = carried.point_data["normal displacement"]
    assert np.median(moved) < 0 and np.mean(moved < 0) > 0.75  # (x − c)·n < 0 where the shape is concave
    np.testing.assert_allclose(np.median(carried.point_data["area change"]), 0.99**2, atol=0.01)
    assert "registration_percent" not in percent_volume_change(baseline, follow_up)
    with pytest.raises(ValueError, match="carried must be surface_change"):
        percent_volume_change(baseline, follow_up, datasets.heart_myocardium("septum"))


def test_regional_summary_by_a_mesh_region_array():
    femur = datasets.femur(1)
    rows = regional_summary(femur, np.full(femur.n_vertices, 2.5), "Cartilage Region")
    assert [row["id"] for row in rows] == [0, 6, 11, 12, 13, 14, 15]
    assert sum(row["area_mm2"] for row in rows) == pytest.approx(surface_area(femur))
    assert all(row["mean"] == pytest.approx(2.5) and row["p05"] == pytest.approx(2.5) for row in rows)
    with pytest.raises(ValueError, match="no point array 'region'"):
        regional_summary(femur, np.zeros(femur.n_vertices), "region")
    with pytest.raises(ValueError, match="one value per vertex"):
        regional_summary(femur, np.zeros(3), "Cartilage Region")
    with pytest.raises(ValueError, match="same vertices and triangles"):
        local_area_change(femur, datasets.femur(2))
