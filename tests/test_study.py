"""The longitudinal study pipeline: accuracy against the synthetic truth on the embedded Dask cluster, resuming
after a kill, a corrupt subject, label-map inputs with dates, the report and bad tables (a scheduler and worker
processes: tests/test_study_distributed.py)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from geomed import datasets
from geomed.study import StudyParameters, read_study_table, run_study
from geomed.study.table import subject_problems
from geomed.synthetic_cohort import synthetic_cohort

_COMPARED = ["subject", "structure", "from_timepoint", "to_timepoint", "direct_percent", "registration_percent",
             "forward_percent", "backward_percent", "consistency_pp"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four subjects (two per group), one hippocampus interval each: small enough to run several times."""
    return synthetic_cohort(tmp_path_factory.mktemp("cohort"), subjects_per_group=2,
                            structures=("hippocampus",), years=(0.0, 1.0), rescan=False, seed=5)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """The study run once on the embedded (in-process) Dask cluster."""
    return run_study(cohort.table, tmp_path_factory.mktemp("reference"), workers=2, progress=False)


def _changes(result) -> pd.DataFrame:
    return result.changes[_COMPARED].sort_values(["subject", "structure"]).reset_index(drop=True)


def test_study_recovers_the_true_volume_change(cohort, reference):
    validation = cohort.validate(reference.changes)
    assert len(validation) == 4 and reference.failures.empty
    assert validation["error_pp"].abs().max() < 0.1
    assert validation["direct_error_pp"].abs().max() < 1e-9  # meshes: the enclosed volumes are exact
    assert validation["consistency_pp"].abs().max() < 0.1
    truth = pd.read_csv(cohort.truth).groupby("subject")["annual_rate_percent"].first()
    rates = reference.rates.set_index("subject")["registration_rate"]
    assert (rates - truth[rates.index]).abs().max() < 0.1
    groups = reference.groups.set_index("group")
    assert groups.loc["patient", "difference"] < -1.0  # Alzheimer's-like hippocampi shrink faster


def test_outputs_parquet_csv_and_change_maps(reference):
    output = reference.output
    for name in ("scans", "changes", "rates", "groups"):
        pd.testing.assert_frame_equal(pd.read_parquet(output / f"{name}.parquet"), getattr(reference, name))
        assert len(pd.read_csv(output / f"{name}.csv")) == len(getattr(reference, name))
    for subject in reference.scans["subject"].unique():
        maps = sorted((output / "subjects" / subject / "maps").glob("*.vtp"))
        assert [path.name for path in maps] == ["hippocampus_00_0y_to_1y.vtp"]
        from geomed.io import read_mesh

        carried = read_mesh(maps[0])
        assert {"normal displacement", "area change"} <= set(carried.point_data)


def test_report_html_shows_figures_that_exist(reference):
    page = (reference.output / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert "figures/trajectories.png" in images and "figures/rates.png" in images
    assert "figures/change_map_hippocampus.png" in images
    links = re.findall(r'href="([^"]+)"', page)
    for target in images + links:
        assert (reference.output / target).is_file(), target
    assert "patient" in page and "95% CI" in page


# A finished subject's folder; not the hidden ``.<subject>.*.partial`` one it is written in (pathlib's ``*`` matches
# hidden names too, and the kill may land between writing result.json there and renaming the folder).
_FINISHED = "[!.]*/result.json"


def test_killed_study_resumes_with_identical_results(cohort, reference, tmp_path):
    """Kill the command with SIGKILL once a subject is written; the re-run measures only the others, and the
    tables equal an uninterrupted run's, without lost or duplicated rows."""
    output = tmp_path / "study"
    command = [sys.executable, "-m", "geomed.cli", "study", str(cohort.table), "-o", str(output), "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not list((output / "subjects").glob(_FINISHED)):
            assert process.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "no subject finished within 5 minutes"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = {path.parent.name for path in (output / "subjects").glob(_FINISHED)}
    assert 1 <= len(finished) < 4
    assert not (output / "changes.parquet").exists()
    statuses = {}
    result = run_study(cohort.table, output, progress=False, report=False,
                       on_subject=lambda subject, status: statuses.__setitem__(subject, status))
    assert {subject for subject, status in statuses.items() if status == "cached"} == finished
    assert set(statuses.values()) <= {"cached", "done"} and len(statuses) == 4
    pd.testing.assert_frame_equal(_changes(result), _changes(reference))
    assert not [path for path in (output / "subjects").iterdir() if path.name.startswith(".")]
    again = run_study(cohort.table, output, progress=False, report=False,
                      on_subject=lambda subject, status: statuses.__setitem__(subject, status))
    assert set(statuses.values()) == {"cached"}
    pd.testing.assert_frame_equal(_changes(again), _changes(reference))


def test_a_corrupt_file_is_recorded_and_the_others_are_measured(cohort, tmp_path):
    table = pd.read_csv(cohort.table)
    broken = tmp_path / "broken.vtp"
    victim = table.index[(table["subject"] == "brain-patient-02") & (table["timepoint"] == 1.0)][0]
    data = (cohort.folder / table.loc[victim, "path"]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    table["path"] = [str(cohort.folder / path) for path in table["path"]]
    table.loc[victim, "path"] = str(broken)
    table.to_csv(tmp_path / "cohort.csv", index=False)
    result = run_study(tmp_path / "cohort.csv", tmp_path / "study", progress=False, report=False)
    assert result.failures["subject"].tolist() == ["brain-patient-02"]
    assert result.failures["file"].iloc[0] == str(broken) and "broken.vtp" in result.failures["error"].iloc[0]
    assert sorted(result.changes["subject"]) == ["brain-control-01", "brain-control-02", "brain-patient-01"]
    failures = pd.read_csv(tmp_path / "study" / "failures.csv")
    assert failures["subject"].tolist() == ["brain-patient-02"]


def test_label_map_inputs_with_dates(tmp_path):
    """Label maps picked by label id (40: left hippocampus), timepoints as dates (years from each subject's first
    scan); the same anatomy twice has no change."""
    source = Path(datasets.__file__).parent / "data" / "brain" / "9861.nii.gz"
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(source, tmp_path / name)
    pd.DataFrame({"subject": ["s1", "s1"], "timepoint": ["2020-01-01", "2021-07-02"],
                  "path": ["a.nii.gz", "b.nii.gz"], "label": ["40"] * 2}).to_csv(tmp_path / "t.csv",
                                                                                               index=False)
    result = run_study(tmp_path / "t.csv", tmp_path / "study", parameters=StudyParameters(preset="brain"),
                       progress=False, report=False)
    change = result.changes.iloc[0]
    assert change["interval_years"] == pytest.approx(548 / 365.25)
    assert abs(change["registration_percent"]) < 0.01 and change["direct_percent"] == 0.0
    assert result.scans["volume_mm3"].iloc[0] == pytest.approx(4907, rel=0.01)


@pytest.mark.parametrize(("content", "message"), [
    ("subject,path\ns1,a.vtp\n", r"lacks column\(s\) \['timepoint'\]"),
    ("subject,timepoint,path\n", "has no rows"),
    ("subject,timepoint,path\n\"s1,0\n", "cannot be read"),
])
def test_tables_no_subject_can_be_measured_from_are_refused(tmp_path, content, message):
    path = tmp_path / "cohort.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_study_table(path)


@pytest.mark.parametrize(("content", "problem"), [
    ("subject,timepoint,path\n../up,0,a.vtp\n", "subject id '../up' is not 1 to 64"),
    ("subject,timepoint,path\ns1,soon,a.vtp\n", "timepoint 'soon' is not a finite number of years"),
    ("subject,timepoint,path\ns1,0,a.vtp\ns1,1,a.vtp\n", "a.vtp is listed again for this subject and label (first "
                                                        "in row 1)"),
    ("subject,timepoint,path\ns1,2020-01-01,a.vtp\ns1,1,b.vtp\n", "the subject's timepoints mix numbers and dates"),
    ("subject,timepoint,path,label\ns1,0,a.vtp,left\x07\n", "label 'left\\x07' is not at most 64 printable"),
])
def test_problems_of_one_subjects_rows_are_named_per_row(tmp_path, content, problem):
    path = tmp_path / "cohort.csv"
    path.write_text(content)
    table = read_study_table(path)
    assert problem in table["problem"].iloc[-1]
    assert subject_problems(table).startswith(f"row {table['row'].iloc[-1] if 'again' in problem else 1}: ")


@pytest.mark.parametrize(("arguments", "message"), [
    ({"preset": "liver"}, "preset must be one of"),
    ({"max_distance": 0.0}, "max_distance must be a positive"),
    ({"method": "marching"}, "method must be one of"),
    ({"max_hole_radius": -1.0}, "max_hole_radius must be a non-negative"),
])
def test_bad_parameters_are_refused_before_any_work(arguments, message):
    with pytest.raises(ValueError, match=message):
        StudyParameters(**arguments)


def test_missing_table_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_study_table(tmp_path / "none.csv")
    (tmp_path / "cohort.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"expected a \.csv, \.tsv or \.parquet"):
        read_study_table(tmp_path / "cohort.xlsx")
