"""The synthetic longitudinal cohort: real anatomy, exactly known volume change, realistic rescan noise."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest

from geomed import Mesh, datasets, mask_to_mesh
from geomed.synthetic_cohort import _contraction, _focus, _rescanned, synthetic_cohort
from geomed.io import read_mesh
from geomed.morphometry import volume


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return synthetic_cohort(tmp_path_factory.mktemp("cohort"), subjects_per_group=1,
                            structures=("hippocampus", "lv_myocardium"), years=(0.0, 1.0, 2.5), seed=3)


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_table_lists_every_scan_with_its_group(cohort):
    rows = _rows(cohort.table)
    assert list(rows[0]) == ["subject", "timepoint", "path", "label", "group"]
    assert {row["subject"] for row in rows} == {"brain-control-01", "brain-patient-01", "heart-control-01",
                                                "heart-patient-01"}
    assert len(rows) == 4 * 4  # 3 years + a baseline rescan, one structure per subject
    for row in rows:
        assert (cohort.folder / row["path"]).is_file()
        assert row["group"] in ("control", "patient") and row["group"] in row["subject"]


def test_truth_is_the_enclosed_volume_and_compounds_the_annual_rate(cohort):
    """V_t = V_0 (1 + r/100)^t to 1e-9, and the truth file holds the written meshes' own volumes."""
    rows = _rows(cohort.truth)
    for subject in {row["subject"] for row in rows}:
        scans = [row for row in rows if row["subject"] == subject]
        baseline = next(float(row["volume_mm3"]) for row in scans if row["timepoint"] == "0.0")
        for row in scans:
            expected = baseline * (1 + float(row["annual_rate_percent"]) / 100) ** float(row["timepoint"])
            assert float(row["volume_mm3"]) == pytest.approx(expected, rel=1e-9)
            assert volume(read_mesh(cohort.folder / row["path"])) == pytest.approx(float(row["volume_mm3"]),
                                                                                   rel=1e-12)
    patient = [float(row["annual_rate_percent"]) for row in rows if row["subject"] == "brain-patient-01"]
    assert patient[0] < -2.0  # Alzheimer's-like hippocampal atrophy


def test_rescan_moves_and_jitters_the_shape_but_not_its_volume(cohort):
    rows = [row for row in _rows(cohort.truth) if row["subject"] == "brain-control-01"]
    first, repeat = (read_mesh(cohort.folder / row["path"]) for row in rows[:2])
    assert rows[1]["rescan"] == "1" and rows[1]["timepoint"] == "0.0"
    assert volume(repeat) == pytest.approx(volume(first), rel=1e-10)
    assert np.abs(repeat.vertices - first.vertices).max() > 0.5  # repositioned
    centred = [mesh.vertices - mesh.vertices.mean(0) for mesh in (first, repeat)]
    assert not np.allclose(np.linalg.svd(centred[0], compute_uv=False), np.linalg.svd(centred[1], compute_uv=False),
                           atol=1e-3)  # not only a rigid motion: jittered


def test_same_seed_writes_the_same_cohort(tmp_path):
    def digest(folder):
        made = synthetic_cohort(folder, subjects_per_group=1, structures=("hippocampus",), years=(0, 1),
                                rescan=False, seed=11)
        return {row["path"]: hashlib.sha256((made.folder / row["path"]).read_bytes()).hexdigest()
                for row in _rows(made.table)}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_warped_mesh_volume_is_the_continuous_warp_volume():
    """The truth moves the mesh's vertices only; the continuous map bends its flat triangles. Applying the same map
    to the baseline subdivided 4× and 16× (flat, same surface) changes the volume change by < 1e-3 pp."""
    rng = np.random.default_rng(0)
    mesh = mask_to_mesh(datasets.brain_labels("9861"), "left_hippocampus")
    focus, width = _focus(mesh, rng), float(np.ptp(mesh.vertices, axis=0).max()) / 3

    def change(surface: Mesh) -> float:
        return 100 * (volume(Mesh(_contraction(surface.vertices, focus, width, 0.05), surface.triangles))
                      / volume(surface) - 1)

    coarse = change(mesh)
    finer = [change(_subdivided(mesh, times)) for times in (1, 2)]
    assert coarse < -1.5
    assert abs(finer[0] - coarse) < 1e-3 and abs(finer[1] - finer[0]) < 1e-3


def _subdivided(mesh: Mesh, times: int) -> Mesh:
    """Split every triangle into four at its edge midpoints (the surface is unchanged)."""
    for _ in range(times):
        count = mesh.n_vertices
        edges = np.sort(mesh.triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        keys, index = np.unique(edges[:, 0] * count + edges[:, 1], return_inverse=True)
        middles = (mesh.vertices[keys // count] + mesh.vertices[keys % count]) / 2
        a, b, c = mesh.triangles.T
        ab, bc, ca = (index.reshape(-1, 3) + count).T
        triangles = np.concatenate([np.stack(corners, 1) for corners in
                                    ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
        mesh = Mesh(np.vstack([mesh.vertices, middles]), triangles)
    return mesh


def test_rescanned_noise_is_volume_neutral_and_of_the_asked_size():
    rng = np.random.default_rng(1)
    mesh = datasets.heart_myocardium("lv")
    jittered = _rescanned(mesh, 0.2, rng)
    assert volume(jittered) == pytest.approx(volume(mesh), rel=1e-10)
    assert _rescanned(mesh, 0.0, rng).n_vertices == mesh.n_vertices


@pytest.mark.parametrize(("arguments", "message"), [
    ({"structures": ("amygdala",)}, "structures must be"),
    ({"subjects_per_group": 0}, "subjects_per_group"),
    ({"years": (1.0, 2.0)}, "years must increase from 0"),
    ({"years": (0.0,)}, "years must increase from 0"),
    ({"noise": -0.1}, "noise must be"),
])
def test_bad_arguments_are_named(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        synthetic_cohort(tmp_path, **arguments)
