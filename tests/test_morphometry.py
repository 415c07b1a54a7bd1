"""Volumes and areas against closed forms and the real demo anatomy."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from geomed import Image, Mesh, datasets
from geomed.morphometry import structure_measurements, surface_area, volume

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
