"""The study on a real ``dask.distributed`` cluster: a ``dask scheduler`` and two ``dask worker`` processes, each a
process of its own as on other machines, bound to loopback; ``geomed study --scheduler`` run against them gives the
in-process numbers, and its subjects are measured in those worker processes (issue #21, item 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from distributed import Client, get_task_stream

from geomed.cli import main
from geomed.study import run_study
from geomed.synthetic_cohort import synthetic_cohort

pytestmark = pytest.mark.slow

_LOOPBACK = "127.0.0.1"
_STARTUP_SECONDS = 120  # a cold worker imports geomed, torch and VTK on a busy 2-core machine
_STOP_SECONDS = 30


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two subjects (one per group), one hippocampus interval each: tests/test_study.py's cohort, halved."""
    return synthetic_cohort(tmp_path_factory.mktemp("cohort"), subjects_per_group=1, structures=("hippocampus",),
                            years=(0.0, 1.0), rescan=False, seed=5)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """The study on the embedded (in-process) Dask cluster."""
    return run_study(cohort.table, tmp_path_factory.mktemp("reference"), workers=2, progress=False, report=False)


@dataclass
class _Cluster:
    """A running loopback cluster: its scheduler's address, a client watching it and the workers' processes."""

    address: str
    client: Client
    workers: list[subprocess.Popen]


def _start(log: Path, *arguments: str) -> subprocess.Popen:
    """Start ``dask ARGUMENTS`` (with this interpreter), its stdout and stderr going to ``log``."""
    with open(log, "wb") as stream:
        return subprocess.Popen([sys.executable, "-m", "dask", *arguments], stdout=stream,
                                stderr=subprocess.STDOUT, cwd=log.parent)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (a worker's nanny then closes its worker), SIGKILL if it is still running after a while."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _logs(folder: Path) -> str:
    """The end of every process's log, for a failure message."""
    return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}"
                     for log in sorted(folder.glob("*.log")))


def _fail_unless_running(processes: dict[str, subprocess.Popen], deadline: float, waiting_for: str,
                         logs: Path) -> None:
    """Fail the test, showing the processes' logs, if one of them exited or the deadline has passed."""
    exited = {name: process.returncode for name, process in processes.items() if process.poll() is not None}
    if exited or time.monotonic() > deadline:
        reason = f"exited ({exited})" if exited else f"not ready after {_STARTUP_SECONDS} s"
        pytest.fail(f"loopback Dask cluster {reason} while waiting for {waiting_for}\n{_logs(logs)}")


def _scheduler_address(scheduler_file: Path, processes: dict[str, subprocess.Popen], deadline: float,
                       logs: Path) -> str:
    """The address the scheduler wrote to its scheduler file once it listens."""
    while True:
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or half written
            _fail_unless_running(processes, deadline, "the scheduler", logs)
            time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path):
    """A ``dask scheduler`` and two ``dask worker`` processes (one thread each, under their nannies) on 127.0.0.1
    with free ports, their HTTP servers too; ready once both workers are connected. All are stopped at teardown,
    whatever happened."""
    logs = tmp_path / "logs"
    logs.mkdir()
    scheduler_file = tmp_path / "scheduler.json"
    processes: dict[str, subprocess.Popen] = {}
    client = None
    deadline = time.monotonic() + _STARTUP_SECONDS
    try:
        processes["scheduler"] = _start(logs / "scheduler.log", "scheduler", "--host", _LOOPBACK, "--port", "0",
                                        "--dashboard-address", f"{_LOOPBACK}:0", "--scheduler-file",
                                        str(scheduler_file))
        address = _scheduler_address(scheduler_file, processes, deadline, logs)
        assert address.startswith(f"tcp://{_LOOPBACK}:")
        for name in ("worker-1", "worker-2"):
            processes[name] = _start(logs / f"{name}.log", "worker", address, "--name", name, "--host", _LOOPBACK,
                                     "--nthreads", "1", "--dashboard-address", f"{_LOOPBACK}:0",
                                     "--local-directory", str(tmp_path / name), "--death-timeout", "60")
        client = Client(address, timeout=_STARTUP_SECONDS, set_as_default=False)
        while len(client.scheduler_info()["workers"]) < 2:
            _fail_unless_running(processes, deadline, "both workers to connect", logs)
            time.sleep(0.2)
        yield _Cluster(address, client, [processes["worker-1"], processes["worker-2"]])
    finally:
        if client is not None:
            client.close()
        for process in reversed(processes.values()):  # the workers first, then the scheduler
            _stop(process)


def _table(output: Path, name: str) -> pd.DataFrame:
    """One of the study's tables as written, without its timings."""
    return pd.read_parquet(output / f"{name}.parquet").drop(columns="seconds", errors="ignore")


def test_study_on_a_scheduler_and_two_worker_processes_gives_the_in_process_numbers(cohort, reference, cluster,
                                                                                    tmp_path):
    output = tmp_path / "study"
    with get_task_stream(cluster.client) as stream:
        assert main(["study", str(cohort.table), "-o", str(output), "--scheduler", cluster.address]) == 0
    for name in ("changes", "rates"):
        expected = getattr(reference, name).drop(columns="seconds", errors="ignore")
        pd.testing.assert_frame_equal(_table(output, name), expected, check_exact=False, rtol=1e-9, atol=1e-12)
    assert len(reference.changes) == 2 and pd.read_csv(output / "failures.csv").empty
    # Each subject ran as a task of the scheduler, one on each worker, and the workers are the processes started
    # above (children of their nannies), not this one: an in-process run leaves no task at this scheduler.
    ran = {entry["key"]: entry["worker"] for entry in stream.data if str(entry["key"]).startswith("geomed-subject-")}
    assert sorted(key.rsplit("-", 1)[0] for key in ran) == [f"geomed-subject-{subject}"
                                                           for subject in sorted(reference.changes["subject"])]
    parents = cluster.client.run(os.getppid)
    assert set(ran.values()) == set(parents), f"both workers should have measured a subject: {ran}"
    assert sorted(parents.values()) == sorted(worker.pid for worker in cluster.workers)
    assert os.getpid() not in cluster.client.run(os.getpid).values()
