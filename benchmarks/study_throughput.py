"""Throughput of ``geomed.study`` on a ``dask.distributed`` cluster of 1, 2, … worker processes, against the default
in-process cluster.

A synthetic cohort (``geomed.synthetic_cohort.synthetic_cohort``: real anatomy with a known change, one interval
per subject and structure) is measured by ``run_study`` (no report) several times, each into a fresh output folder
so that nothing is cached, after an untimed in-process run of its first subject (this process's imports and
first calls):

- ``in-process``: the default (no ``--scheduler``), an in-process cluster measuring 2 subjects at a time (1 on a
  single core);
- ``N workers``: ``run_study(..., scheduler=ADDRESS)`` against a ``dask scheduler`` and N ``dask worker``
  processes started for the run on 127.0.0.1, each worker with one thread (under its nanny, which limits
  OpenMP/MKL/OpenBLAS to one thread) and ``--preload geomed.study`` so that importing geomed is not timed — the
  way a cluster of N single-core machines runs it, here sharing one machine's cores.

For each: the study's wall time (``StudyResult.timings["measure"]``: table, subjects, tables written), seconds per
subject, subjects per minute, the speed-up over one worker (the in-process run's too), the mean over subjects of
their intervals' registration and measuring time inside the workers (it grows when workers share cores) and the
largest difference of any change (pp) from the in-process run (0: the same numbers). Prints the table and writes
``study_throughput.md`` and ``study_throughput.csv`` under ``--out``; run it on an idle machine (the 1-minute load
average at the start is recorded).

    python benchmarks/study_throughput.py [--workers 1 2] [--subjects 4] [--structures hippocampus] [--seed 0]
                                          [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from geomed import __version__
from geomed.study import run_study
from geomed.synthetic_cohort import STRUCTURES, synthetic_cohort

_LOOPBACK = "127.0.0.1"
_STARTUP_SECONDS = 120  # a cold worker imports geomed, torch and VTK on a busy 2-core machine
_STOP_SECONDS = 30
_COMPARED = ["direct_percent", "registration_percent", "forward_percent", "backward_percent"]
_HEADER = ("cluster", "subjects (intervals)", "wall s", "s / subject", "subjects / min", "speed-up vs 1 worker",
           "interval s / subject", "max \\|Δ\\| vs in-process (pp)")


def _start(log: Path, *arguments: str) -> subprocess.Popen:
    """Start ``dask ARGUMENTS`` with this interpreter, its stdout and stderr going to ``log``."""
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


def _check_running(processes: list[subprocess.Popen], deadline: float, waiting_for: str, folder: Path) -> None:
    """Raise, with the processes' logs, if one of them exited or the deadline has passed."""
    exited = [process.returncode for process in processes if process.poll() is not None]
    if exited or time.monotonic() > deadline:
        logs = "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}"
                         for log in sorted(folder.glob("*.log")))
        reason = f"a process exited (status {exited})" if exited else f"not ready after {_STARTUP_SECONDS} s"
        raise RuntimeError(f"loopback Dask cluster: {reason} while waiting for {waiting_for}\n{logs}")


@dataclass
class LoopbackCluster:
    """A running loopback cluster: its scheduler's address and its workers' processes."""

    address: str
    workers: list[subprocess.Popen]


@contextmanager
def loopback_cluster(workers: int, folder: Path) -> Iterator[LoopbackCluster]:
    """A ``dask scheduler`` and ``workers`` single-threaded ``dask worker`` processes on 127.0.0.1 (free ports, their
    HTTP servers too), yielded once every worker is connected; all stopped on exit, whatever happened (the workers
    first). ``tests/test_study_distributed.py`` runs the study on it too."""
    from distributed import Client

    folder.mkdir(parents=True)
    scheduler_file = folder / "scheduler.json"
    processes: list[subprocess.Popen] = []
    deadline = time.monotonic() + _STARTUP_SECONDS
    try:
        processes.append(_start(folder / "scheduler.log", "scheduler", "--host", _LOOPBACK, "--port", "0",
                                "--dashboard-address", f"{_LOOPBACK}:0", "--scheduler-file", str(scheduler_file)))
        while True:
            try:
                address = json.loads(scheduler_file.read_text())["address"]
                break
            except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or half written
                _check_running(processes, deadline, "the scheduler", folder)
                time.sleep(0.1)
        for index in range(workers):
            name = f"worker-{index + 1}"
            processes.append(_start(folder / f"{name}.log", "worker", address, "--name", name, "--host", _LOOPBACK,
                                    "--nthreads", "1", "--dashboard-address", f"{_LOOPBACK}:0", "--local-directory",
                                    str(folder / name), "--death-timeout", "60", "--preload", "geomed.study"))
        with Client(address, timeout=_STARTUP_SECONDS, set_as_default=False) as client:
            while len(client.scheduler_info()["workers"]) < workers:
                _check_running(processes, deadline, f"{workers} workers to connect", folder)
                time.sleep(0.2)
        yield LoopbackCluster(address, processes[1:])
    finally:
        for process in reversed(processes):  # the workers first, then the scheduler
            _stop(process)


def _warm_up(table: Path, work: Path) -> None:
    """Measure the cohort's first subject in-process, untimed: the imports and first calls that this process makes
    once are then not charged to the first configuration measured."""
    rows = pd.read_csv(table)
    first = table.with_name("warm-up.csv")
    rows[rows["subject"] == rows["subject"].iloc[0]].to_csv(first, index=False)
    run_study(first, work / "warm-up", progress=False, report=False)


def _measure(name: str, table: Path, output: Path, scheduler: str | None) -> tuple[dict, pd.DataFrame]:
    """One study run into a fresh folder: its line of the results (without the comparisons) and its changes."""
    result = run_study(table, output, scheduler=scheduler, progress=False, report=False)
    if len(result.failures):
        raise RuntimeError(f"{name}: {len(result.failures)} subject(s) failed:\n{result.failures.to_string()}")
    subjects = result.changes["subject"].nunique()
    seconds = result.timings["measure"]
    print(f"{name}: {subjects} subjects in {seconds:.1f} s", file=sys.stderr)
    row = {"cluster": name, "subjects": subjects, "intervals": len(result.changes), "seconds": seconds,
           "seconds_per_subject": seconds / subjects, "subjects_per_minute": 60 * subjects / seconds,
           "interval_seconds_per_subject": result.changes.groupby("subject")["seconds"].sum().mean()}
    return row, result.changes.sort_values(["subject", "structure", "from_timepoint"], ignore_index=True)


def _markdown(table: pd.DataFrame, command: str, machine: str, cohort: str) -> str:
    """The results as markdown: the command, the machine, the cohort and the table."""
    lines = [f"Command: `{command}` ({machine}; {cohort}).", "",
             "| " + " | ".join(_HEADER) + " |", "|---|" + "--:|" * (len(_HEADER) - 1)]
    for row in table.itertuples():
        speedup = "—" if pd.isna(row.speedup) else f"{row.speedup:.2f}×"
        lines.append(f"| {row.cluster} | {row.subjects} ({row.intervals}) | {row.seconds:.1f} | "
                     f"{row.seconds_per_subject:.2f} | {row.subjects_per_minute:.1f} | {speedup} | "
                     f"{row.interval_seconds_per_subject:.2f} | {row.max_difference_pp:.1e} |")
    lines += ["", "Wall s: `run_study`'s time (table, subjects, tables written; no report). Interval s / subject: "
              "the mean over subjects of their intervals' registration and measuring time inside their worker (it "
              "grows when workers share cores). "
              "Workers: `dask worker --nthreads 1` processes on this machine, each under its nanny (one "
              "OpenMP/MKL thread) with geomed preloaded; in-process: `run_study`'s default cluster."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="N",
                        help="numbers of worker processes to measure (default: %(default)s)")
    parser.add_argument("--subjects", type=int, default=4, metavar="N",
                        help="subjects per group and anatomy of the cohort (default: %(default)s)")
    parser.add_argument("--structures", nargs="+", choices=STRUCTURES, default=["hippocampus"], metavar="NAME",
                        help=f"structures of the cohort, of {', '.join(STRUCTURES)} (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder for study_throughput.md and .csv (default: %(default)s)")
    args = parser.parse_args()
    if args.subjects < 1 or min(args.workers) < 1:
        parser.error("--subjects and --workers must be at least 1")
    command = " ".join(["python", "benchmarks/study_throughput.py", *sys.argv[1:]])
    machine = (f"{os.cpu_count()} CPUs, {platform.platform()}, geomed {__version__}, 1-minute load average "
               f"{os.getloadavg()[0]:.2f} at the start")
    with tempfile.TemporaryDirectory(prefix="study-throughput-") as temporary:
        work = Path(temporary)
        cohort = synthetic_cohort(work / "cohort", subjects_per_group=args.subjects,
                                  structures=tuple(args.structures), years=(0.0, 1.0), rescan=False, seed=args.seed)
        described = f"cohort: {', '.join(args.structures)}, {args.subjects} per group and anatomy, one interval each"
        _warm_up(cohort.table, work)
        rows, changes = [], []
        row, reference = _measure("in-process", cohort.table, work / "in-process", None)
        rows.append(row)
        changes.append(reference)
        for workers in args.workers:
            name = f"{workers} worker{'s' if workers > 1 else ''}"
            with loopback_cluster(workers, work / f"cluster-{workers}") as cluster:
                row, measured = _measure(name, cohort.table, work / f"study-{workers}", cluster.address)
            rows.append(row)
            changes.append(measured)
    table = pd.DataFrame(rows)
    single = table.loc[table["cluster"] == "1 worker", "seconds"]
    table["speedup"] = single.iloc[0] / table["seconds"] if len(single) else float("nan")
    table["max_difference_pp"] = [float((frame[_COMPARED] - reference[_COMPARED]).abs().max().max())
                                  for frame in changes]
    table = table.assign(cpus=os.cpu_count(), platform=platform.platform(), geomed=__version__)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.drop(columns=["cpus", "platform", "geomed"]).to_string(index=False,
                                                                           float_format=lambda v: f"{v:.3g}"))
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "study_throughput.csv", index=False)
    (args.out / "study_throughput.md").write_text(_markdown(table, command, machine, described), encoding="utf-8")


if __name__ == "__main__":
    main()
