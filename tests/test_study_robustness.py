"""A study survives the inputs real users bring: hostile rows fail only their subject (named in failures.csv),
small holes are closed with a warning, outputs stay private under the umask and safe to open in a spreadsheet, one
run at a time per folder, and a report is never left describing other tables."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from geomed import read_mesh, write_mesh
from geomed.cli import main
from geomed.mesh import Mesh
from geomed.study import OutputInUseError, StudyParameters, run_study
from geomed.study.lock import LOCK_NAME, output_lock
from geomed.study.runner import measure_on_dask
from geomed.synthetic_cohort import synthetic_cohort

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """Two subjects' hippocampus scans (baseline and year 1), and the second subject's year-1 scan with a hole of
    ~1 mm radius (a dozen missing triangles)."""
    cohort = synthetic_cohort(tmp_path_factory.mktemp("cohort"), subjects_per_group=1, structures=("hippocampus",),
                              years=(0.0, 1.0), rescan=False, seed=3)
    table = pd.read_csv(cohort.table)
    files = {f"{row.subject}-{row.timepoint:g}": cohort.folder / row.path for row in table.itertuples()}
    mesh = read_mesh(files["brain-patient-01-1"])
    centres = mesh.triangle_centroids()
    keep = np.linalg.norm(centres - mesh.vertices[100], axis=1) > 1.0
    holed = cohort.folder / "holed.vtp"
    write_mesh(Mesh(mesh.vertices, mesh.triangles[keep]), holed)
    return {**files, "holed": holed}


@pytest.fixture(scope="module")
def hostile(scans, tmp_path_factory):
    """A table where every kind of bad row sits beside good subjects, run once through the CLI under umask 077
    while the listening sockets of the in-process Dask cluster are recorded."""
    folder = tmp_path_factory.mktemp("hostile")
    fifo = folder / "scan.fifo"
    os.mkfifo(fifo)
    a0, a1 = str(scans["brain-control-01-0"]), str(scans["brain-control-01-1"])
    b0, holed = str(scans["brain-patient-01-0"]), str(scans["holed"])
    rows = [
        ("good", 0, a0, "hippocampus", "=HYPERLINK(\"http://x\")"),
        ("good", 1, a1, "hippocampus", "=HYPERLINK(\"http://x\")"),
        ("alike", 0, b0, "a b", "patient"), ("alike", 1, holed, "a b", "patient"),
        ("alike", 0, a0, "a_b", "patient"), ("alike", 1, a1, "a_b", "patient"),
        ("infinite", 0, a0, "", ""), ("infinite", "inf", a1, "", ""),
        ("huge", 0, a0, "", ""), ("huge", 1e308, a1, "", ""),
        ("negative", "-inf", a0, "", ""), ("negative", 0, a1, "", ""),
        ("x" * 250, 0, a0, "", ""), ("x" * 250, 1, a1, "", ""),
        ("newline\n", 0, a0, "", ""), ("newline\n", 1, a1, "", ""),
        ("twice", 0, a0, "", ""), ("twice", 1, a0, "", ""),
        ("device", 0, a0, "", ""), ("device", 1, "/dev/zero", "", ""),
        ("pipe", 0, a0, "", ""), ("pipe", 1, str(fifo), "", ""),
    ]
    table = folder / "cohort.csv"
    pd.DataFrame(rows, columns=["subject", "timepoint", "path", "label", "group"]).to_csv(table, index=False)
    output = folder / "study"
    previous = os.umask(0o077)
    try:
        status = main(["study", str(table), "-o", str(output), "--preset", "brain"])
    finally:
        os.umask(previous)
    return status, output


def test_bad_rows_fail_only_their_subject(hostile):
    status, output = hostile
    assert status == 1
    failures = pd.read_csv(output / "failures.csv", keep_default_na=False).set_index("subject")
    reasons = failures["error"].to_dict()
    assert set(reasons) == {"infinite", "huge", "negative", "x" * 250, "newline\n", "twice", "device", "pipe"}
    assert "row 8: timepoint 'inf' is not a finite number" in reasons["infinite"]
    assert "row 10: timepoint '1e+308'" in reasons["huge"] or "row 10: timepoint '1e308'" in reasons["huge"]
    assert "row 11" in reasons["negative"]
    assert "is not 1 to 64 letters" in reasons["x" * 250] and "is not 1 to 64" in reasons["newline\n"]
    assert "listed again" in reasons["twice"] and "first in row 17" in reasons["twice"]
    assert "/dev/zero: not a regular file" in reasons["device"] and failures.loc["device", "file"] == "/dev/zero"
    assert "scan.fifo: not a regular file" in reasons["pipe"]
    changes = pd.read_parquet(output / "changes.parquet")
    assert sorted(zip(changes["subject"], changes["structure"])) == [("alike", "a b"), ("alike", "a_b"),
                                                                     ("good", "hippocampus")]
    assert not any((output / "subjects" / name).exists() for name in reasons)  # failures are never cached
    assert (output / "index.html").is_file()


def test_small_holes_are_closed_with_a_warning(hostile):
    _, output = hostile
    warnings = pd.read_csv(output / "warnings.csv")
    assert warnings[["subject", "structure"]].values.tolist() == [["alike", "a b"]]
    assert "closed a hole of radius" in warnings["warning"].iloc[0]
    assert "closed a hole of radius" in (output / "index.html").read_text()


def test_names_that_clean_up_alike_get_distinct_files(hostile):
    _, output = hostile
    maps = sorted(path.name for path in (output / "subjects" / "alike" / "maps").iterdir())
    assert len(maps) == 2 and maps[0] != maps[1]
    changes = pd.read_parquet(output / "changes.parquet").set_index("structure")
    assert changes.loc["a b", "map"] != changes.loc["a_b", "map"]


def test_outputs_follow_the_umask(hostile):
    _, output = hostile
    for path in [output, *output.rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others: {oct(path.stat().st_mode)}"


def test_csv_cells_are_not_formulas_but_parquet_keeps_the_value(hostile):
    _, output = hostile
    csv = pd.read_csv(output / "changes.csv").set_index("subject")
    parquet = pd.read_parquet(output / "changes.parquet").set_index("subject")
    assert csv.loc["good", "group"] == "'=HYPERLINK(\"http://x\")"
    assert parquet.loc["good", "group"] == "=HYPERLINK(\"http://x\")"


def test_the_in_process_cluster_listens_on_loopback_only(scans, tmp_path):
    table = tmp_path / "t.csv"
    pd.DataFrame({"subject": ["s", "s"], "timepoint": [0, 1], "path": [scans["brain-control-01-0"],
                                                                      scans["brain-control-01-1"]]}).to_csv(table)
    listening = set()

    def record(subject, status):
        listening.update(c.laddr.ip for c in psutil.Process().net_connections("inet")
                         if c.status == psutil.CONN_LISTEN)

    result = run_study(table, tmp_path / "out", parameters=StudyParameters(preset="brain"), progress=False,
                       report=False, on_subject=record)
    assert result.failures.empty and listening and listening <= {"127.0.0.1", "::1"}


def test_an_error_while_saving_fails_that_subject(scans, tmp_path):
    """``subjects`` is a file here, so nothing can be saved under it: the error is the subject's failure."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "subjects").write_text("in the way")
    records = [{"row": i + 1, "subject": "s", "timepoint": float(i), "years": float(i), "path": str(path),
                "file": str(path), "label": "", "group": "", "problem": ""}
               for i, path in enumerate((scans["brain-control-01-0"], scans["brain-control-01-1"]))]
    outcomes = {}
    failures = measure_on_dask({"s": (records, "key")}, output, StudyParameters(preset="brain"), None, 1, False,
                               outcomes, None)
    assert outcomes == {} and [f["subject"] for f in failures] == ["s"]
    assert failures[0]["error"].startswith(f"saving to {output / 'subjects' / 's'}")


def test_a_second_run_on_the_same_folder_is_refused_and_leaves_its_files_alone(scans, tmp_path, capsys):
    table = tmp_path / "t.csv"
    pd.DataFrame({"subject": ["s"], "timepoint": [0], "path": [scans["brain-control-01-0"]]}).to_csv(table)
    output = tmp_path / "out"
    (output / "subjects").mkdir(parents=True)
    partial = output / "subjects" / ".s.1a2b3c4d.partial"
    partial.mkdir()
    with output_lock(output):
        with pytest.raises(OutputInUseError, match=f"pid {os.getpid()}"):
            run_study(table, output, progress=False)
        with pytest.raises(SystemExit) as stop:
            main(["study", str(table), "-o", str(output)])
        assert stop.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("geomed: error: output folder") and error.count("\n") == 1
        assert partial.exists()  # the running study's write in progress is untouched
    leftovers = [output / ".scans.1a2b3c4d.partial.csv", output / "figures" / ".rates.0f0f0f0f.partial.png"]
    leftovers[1].parent.mkdir()
    for path in leftovers:
        path.write_text("half")
    run_study(table, output, progress=False, report=False)
    assert not partial.exists() and not any(path.exists() for path in leftovers)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_full_disk_while_reporting_keeps_the_previous_report_and_tables(hostile, tmp_path):
    """Files may not grow beyond 20 kB (as on a full disk): the figures cannot be written, so the run stops with
    one line and the previous run's tables, figures and report stay together, untouched."""
    _, original = hostile
    output = tmp_path / "study"
    shutil.copytree(original, output)
    table = original.parent / "cohort.csv"
    def outputs() -> dict[Path, bytes]:
        return {path: path.read_bytes() for path in output.iterdir() if path.is_file() and path.name != LOCK_NAME}

    before = outputs()
    figures = sorted(path.name for path in (output / "figures").iterdir())
    done = subprocess.run([sys.executable, "-m", "geomed.cli", "study", str(table), "-o", str(output),
                           "--preset", "brain"], capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("geomed: error:") and "Traceback" not in done.stderr
    assert "File too large" in last and str(output) in last, last
    assert outputs() == before
    assert sorted(path.name for path in (output / "figures").iterdir()) == figures
    assert not [path for path in output.iterdir() if path.name.startswith(".publish")]
