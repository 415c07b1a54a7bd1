"""The study on a real ``dask.distributed`` cluster: a ``dask scheduler`` and two ``dask worker`` processes, each a
process of its own as on other machines, bound to loopback; ``geomed study --scheduler`` run against them gives the
in-process numbers, and its subjects are measured in those worker processes (issue #21, item 8)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from distributed import Client, get_task_stream

from geomed.cli import main
from geomed.study import run_study
from geomed.synthetic_cohort import synthetic_cohort

pytestmark = pytest.mark.slow

_LOOPBACK = "127.0.0.1"
_BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "study_throughput.py"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two subjects (one per group), one hippocampus interval each: tests/test_study.py's cohort, halved."""
    return synthetic_cohort(tmp_path_factory.mktemp("cohort"), subjects_per_group=1, structures=("hippocampus",),
                            years=(0.0, 1.0), rescan=False, seed=5)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """The study on the embedded (in-process) Dask cluster."""
    return run_study(cohort.table, tmp_path_factory.mktemp("reference"), workers=2, progress=False, report=False)


def _benchmark():
    """benchmarks/study_throughput.py, whose loopback cluster this test runs on (one way to start it)."""
    spec = importlib.util.spec_from_file_location("study_throughput", _BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cluster(tmp_path):
    """A ``dask scheduler`` and two ``dask worker`` processes (one thread each, under their nannies) on 127.0.0.1
    with free ports, their HTTP servers too, and a client watching it; all stopped at teardown, whatever
    happened."""
    with _benchmark().loopback_cluster(2, tmp_path / "cluster") as running:
        assert running.address.startswith(f"tcp://{_LOOPBACK}:")
        with Client(running.address, set_as_default=False) as client:
            yield running, client


def _table(output: Path, name: str) -> pd.DataFrame:
    """One of the study's tables as written, without its timings."""
    return pd.read_parquet(output / f"{name}.parquet").drop(columns="seconds", errors="ignore")


def test_study_on_a_scheduler_and_two_worker_processes_gives_the_in_process_numbers(cohort, reference, cluster,
                                                                                    tmp_path):
    output = tmp_path / "study"
    running, client = cluster
    with get_task_stream(client) as stream:
        assert main(["study", str(cohort.table), "-o", str(output), "--scheduler", running.address]) == 0
    for name in ("changes", "rates"):
        expected = getattr(reference, name).drop(columns="seconds", errors="ignore")
        pd.testing.assert_frame_equal(_table(output, name), expected, check_exact=False, rtol=1e-9, atol=1e-12)
    assert len(reference.changes) == 2 and pd.read_csv(output / "failures.csv").empty
    # Each subject ran as a task of the scheduler, one on each worker, and the workers are the processes started
    # above (children of their nannies), not this one: an in-process run leaves no task at this scheduler.
    ran = {entry["key"]: entry["worker"] for entry in stream.data if str(entry["key"]).startswith("geomed-subject-")}
    assert sorted(key.rsplit("-", 1)[0] for key in ran) == [f"geomed-subject-{subject}"
                                                           for subject in sorted(reference.changes["subject"])]
    parents = client.run(os.getppid)
    assert set(ran.values()) == set(parents), f"both workers should have measured a subject: {ran}"
    assert sorted(parents.values()) == sorted(worker.pid for worker in running.workers)
    assert os.getpid() not in client.run(os.getpid).values()
