"""The geomed command: help, the measure table on bundled and user files, outputs and errors."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geomed import datasets, write_image, write_mesh
from geomed.cli import main


def test_console_script_help_reads_well():
    beside = Path(sys.executable).with_name("geomed")  # the environment's scripts folder, on PATH or not
    executable = str(beside) if beside.exists() else shutil.which("geomed")
    if executable is None:
        pytest.skip("the geomed console script is not installed beside this Python nor on PATH")
    top = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True).stdout
    assert "measure" in top and "RAS" in top
    measure = subprocess.run([executable, "measure", "--help"], capture_output=True, text=True, check=True).stdout
    for needle in ("examples:", "--labels", "--space", "--output", "units: volumes in mL"):
        assert needle in measure


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "geomed.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("geomed ")


def test_measure_bundled_heart_to_csv(tmp_path, capsys):
    output = tmp_path / "heart.csv"
    assert main(["measure", "--demo", "heart", "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "heart/lv_myocardium" in printed and "125.782" in printed
    with open(output, newline="") as stream:
        rows = list(csv.DictReader(stream))
    volumes = {row["source"]: float(row["surface_volume_ml"]) for row in rows}
    assert volumes == pytest.approx(
        {"heart/lv_myocardium": 125.78, "heart/rv_myocardium": 62.06, "heart/septum_myocardium": 38.28}, abs=0.01
    )


def test_measure_user_label_map_and_mesh_to_json(tmp_path, capsys):
    brain = datasets.brain_labels("9861")
    write_image(brain, tmp_path / "brain.nii.gz")
    write_mesh(datasets.heart_myocardium("septum"), tmp_path / "septum.stl", space="LPS")
    output = tmp_path / "table.json"
    status = main(["measure", str(tmp_path / "brain.nii.gz"), str(tmp_path / "septum.stl"),
                   "--labels", "40", "81", "-o", str(output)])
    assert status == 0
    rows = json.loads(output.read_text())
    assert [row["label"] for row in rows] == [40, 81, None]
    assert rows[0]["voxels"] == int(np.count_nonzero(brain.array == 40))
    assert rows[2]["surface_volume_ml"] == pytest.approx(38.28, abs=0.01)
    assert "label_40" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["measure", "{tmp}/missing.nii.gz"], "no such file"),
        (["measure", "{tmp}/table.xlsx"], "unknown format '.xlsx'"),
        (["measure", "--demo", "heart", "-o", "{tmp}/out.txt"], "--output must end in .csv or .json"),
        (["measure", "--demo", "heart", "-o", "{tmp}/nowhere/out.csv"], "does not exist"),
        (["measure", "{tmp}/x.vtk", "--demo", "brain"], "not both"),
        (["measure", "--demo", "brain", "--labels", "left_hipocampus"], "unknown label name 'left_hipocampus'"),
        (["register", "{tmp}/table.xlsx", "{tmp}/table.xlsx", "-o", "{tmp}/table.xlsx"],
         "--output {tmp}/table.xlsx is a file"),
        (["study", "{tmp}/missing.csv", "-o", "{tmp}/out"], "study table {tmp}/missing.csv does not exist"),
        (["study", "{tmp}/table.xlsx", "-o", "{tmp}/out"], "expected a .csv, .tsv or .parquet"),
        (["measure", "{tmp}/pipe.vtp"], "pipe.vtp: not a regular file or a DICOM series folder"),
    ],
)
def test_errors_exit_2_with_one_clear_line(tmp_path, capsys, arguments, message):
    (tmp_path / "table.xlsx").write_text("not a shape")
    os.mkfifo(tmp_path / "pipe.vtp")  # reading it would wait forever for a writer
    with pytest.raises(SystemExit) as stop:
        main([a.format(tmp=tmp_path) for a in arguments])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("geomed: error:") and message.format(tmp=tmp_path) in error
    assert "Traceback" not in error and error.count("\n") == 1


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["frobnicate"])
    assert stop.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_measure_all_bundled_anatomy(tmp_path, capsys):
    output = tmp_path / "measurements.csv"
    assert main(["measure", "-o", str(output)]) == 0
    with open(output, newline="") as stream:
        rows = list(csv.DictReader(stream))
    groups = [row["source"].split("/")[0] for row in rows]
    assert groups.count("brain") == 6 * 14 and groups.count("femur") == 5 and groups.count("heart") == 3
    assert groups.count("knee") == 7 + 10 + 7
    for row in rows:
        if row["voxels"]:
            assert row["closed"] == "True"
            assert float(row["surface_volume_ml"]) == pytest.approx(float(row["voxel_volume_ml"]), rel=0.03)


def test_register_writes_the_warped_mesh_transform_and_report(tmp_path, capsys):
    """`geomed register`: a ball mask onto the mesh of a ball 3 mm away (the mask becomes its surface); the warped
    mesh carries its displacement arrays, SimpleITK reads the transform, and the report shows the distance drop."""
    import SimpleITK as sitk

    from geomed import Image, mask_to_mesh, read_mesh

    axis = np.arange(32)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)

    def ball(centre):
        return Image((np.linalg.norm(grid - np.asarray(centre), axis=-1) <= 8.0).astype(np.uint8), np.eye(4))

    write_mesh(mask_to_mesh(ball((17.0, 15.0, 16.0))), tmp_path / "fixed.vtp")
    write_image(ball((15.0, 16.0, 15.0)), tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    assert main(["register", str(tmp_path / "fixed.vtp"), str(tmp_path / "moving.nii.gz"), "-o", str(out),
                 "--model", "rigid", "--preset", "brain"]) == 0
    report = json.loads((out / "registration.json").read_text())
    assert report["mean_surface_distance_mm"]["after"] < 0.1 < 1.0 < report["mean_surface_distance_mm"]["before"]
    assert report["model"] == "rigid" and report["min_jacobian"] == pytest.approx(1.0)
    warped = read_mesh(out / "warped.vtp")
    assert {"displacement", "normal displacement", "jacobian"} <= set(warped.point_data)
    transform = sitk.ReadTransform(str(out / "transform.h5"))  # fixed → moving in LPS: −t = (−2, 1, −1) RAS
    np.testing.assert_allclose(transform.TransformPoint((0.0, 0.0, 0.0)), [2.0, -1.0, -1.0], atol=0.3)
    assert "wrote warped.vtp" in capsys.readouterr().err


@pytest.mark.slow
def test_main_job_demo_on_a_reduced_cohort(tmp_path, capsys):
    """`geomed demo` end to end (one subject per group, hippocampus and ventricles): the report, its figures, the
    tables and the validation against the exact truth."""
    output = tmp_path / "demo"
    assert main(["demo", "-o", str(output), "--subjects", "1", "--structures", "hippocampus",
                 "lateral_ventricles"]) == 0
    printed = capsys.readouterr()
    assert "hippocampus" in printed.out and "patient" in printed.out
    assert "index.html" in printed.err and "error vs truth: median" in printed.err
    page = (output / "index.html").read_text()
    for image in re.findall(r'<img src="([^"]+)"', page):
        assert (output / image).is_file()
    validation = pd.read_csv(output / "validation.csv")
    assert len(validation) == 2 * 2 * 3  # subjects x structures x (rescan + 2 intervals)
    assert validation["error_pp"].abs().max() < 0.1
    assert (output / "cohort" / "cohort.csv").is_file() and (output / "changes.parquet").is_file()


def test_study_and_demo_help_read_well():
    for command, needles in (("study", ("TABLE", "--scheduler", "tcp://", "examples:", "re-run skips")),
                             ("demo", ("--subjects", "index.html", "examples:")),
                             ("distance", ("--blur", "Hausdorff", "examples:"))):
        result = subprocess.run([sys.executable, "-m", "geomed.cli", command, "--help"], capture_output=True,
                                text=True, check=True)
        for needle in needles:
            assert needle in result.stdout, (command, needle)


def test_distance_between_two_hippocampi(tmp_path, capsys):
    """Surface distances against an independent computation (VTK's point-to-surface distance both ways), and the
    Sinkhorn divergence is 0 for a shape and itself."""
    from geomed import mask_to_mesh
    from geomed.surface import distance_to_surface

    first, second = (mask_to_mesh(datasets.brain_labels(donor), "left_hippocampus") for donor in ("9861", "10021"))
    write_mesh(first, tmp_path / "a.vtp")
    write_mesh(second, tmp_path / "b.vtp")
    assert main(["distance", str(tmp_path / "a.vtp"), str(tmp_path / "b.vtp"), "--json", "--blur", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    both = np.concatenate([distance_to_surface(first.vertices, second), distance_to_surface(second.vertices, first)])
    assert report["mean_surface_distance_mm"] == pytest.approx(both.mean(), rel=1e-9)
    assert report["hausdorff_mm"] == pytest.approx(both.max(), rel=1e-9)
    assert report["sinkhorn_divergence_mm2"] > 1.0 and report["blur_mm"] == 2.0
    assert report["volume_a_ml"] == pytest.approx(4.907, abs=0.01)
    assert main(["distance", str(tmp_path / "a.vtp"), str(tmp_path / "a.vtp"), "--blur", "2"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"mean_surface_distance_mm\s+0\.0000", table)
    assert float(re.search(r"sinkhorn_divergence_mm2\s+(\S+)", table).group(1)) == pytest.approx(0.0, abs=1e-3)
