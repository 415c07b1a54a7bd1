"""The registration tutorials (tutorials/{knee,brain,heart}_registration.py) run end to end on the shipped data,
write what their docstrings promise, and reach the quality they report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from geomed import datasets
from geomed.io import read_mesh

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def _tutorial(name: str):
    spec = importlib.util.spec_from_file_location(name, TUTORIALS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_figure(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


@pytest.mark.slow
def test_knee_tutorial_explains_two_femurs_model_by_model(tmp_path):
    rows = _tutorial("knee_registration").main(["--out", str(tmp_path)])
    distances = {row["model"]: row["distance_after_mm"] for row in rows}
    assert rows[0]["distance_before_mm"] > 10
    assert distances["rigid"] > distances["affine"] > distances["diffeomorphic"]
    assert distances["affine"] < 1.5 and distances["diffeomorphic"] < 0.8
    assert rows[-1]["min_jacobian"] > 0
    warped = read_mesh(tmp_path / "knee_warped.vtp")
    assert {"displacement", "normal displacement", "jacobian"} <= set(warped.point_data)
    assert warped.n_vertices == datasets.femur(2).n_vertices
    assert isinstance(sitk.ReadTransform(str(tmp_path / "knee_transform.h5")), sitk.Transform)
    assert _is_figure(tmp_path / "knee_registration.png")


@pytest.mark.slow
def test_brain_tutorial_maps_a_hippocampus_mask_onto_another_donors_surface(tmp_path):
    rows = _tutorial("brain_registration").main(["--out", str(tmp_path), "--targets", "10021"])
    (row,) = rows
    assert row["fixed"] == "10021" and row["affine_distance_mm"] < 1.5
    assert row["diffeomorphic_distance_mm"] < 0.8 * row["affine_distance_mm"]
    assert row["min_jacobian"] > 0
    assert _is_figure(tmp_path / "brain_registration.png")
    assert (tmp_path / "brain_registration.csv").read_text().startswith("moving,fixed,")


@pytest.mark.slow
def test_heart_tutorial_recovers_a_known_smooth_deformation(tmp_path):
    row = _tutorial("heart_registration").main(["--out", str(tmp_path)])
    assert row["truth_max_mm"] > 4
    assert row["mean_vertex_error_mm"] < 0.3 * row["truth_mean_mm"]
    assert row["mean_surface_distance_mm"] < 0.3
    assert row["min_jacobian"] > 0 and row["inverse_consistency_mm"] < 1e-6
    assert _is_figure(tmp_path / "heart_registration.png")


def test_known_heart_deformation_is_a_smooth_diffeomorphism_of_the_intended_size():
    tutorial = _tutorial("heart_registration")
    template = datasets.heart_myocardium("lv")
    truth = tutorial.known_deformation(template)
    motion = np.linalg.norm(truth(template).vertices - template.vertices, axis=1)
    assert truth.is_invertible
    assert 1.5 < motion.mean() < 4 and motion.max() < 8
