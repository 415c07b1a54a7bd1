"""The study as a whole: read the table, skip the finished subjects, measure the others, assemble and write the
cohort's tables, then the report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._files import atomic_path
from .cache import cached_outcome, json_value, remove_interrupted_writes, subject_key
from .parameters import StudyParameters
from .runner import measure_on_dask
from .statistics import annualised_rates, group_rates
from .table import read_study_table

logger = logging.getLogger(__name__)


@dataclass
class StudyResult:
    """What :func:`run_study` produced (pandas DataFrames, also written under ``output``)."""

    output: Path
    scans: object
    changes: object
    rates: object
    groups: object
    failures: object
    report: Path | None = None
    timings: dict = field(default_factory=dict)


def run_study(
    table: str | Path,
    output: str | Path,
    *,
    parameters: StudyParameters = StudyParameters(),
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    report: bool = True,
    on_subject: Callable[[str, str], None] | None = None,
) -> StudyResult:
    """Measure every subject of a study table on Dask; write tables, change maps, figures and a report.

    Parameters
    ----------
    table : str or Path
        The study table (see the module docstring).
    output : str or Path
        Output folder (created). It receives ``scans``, ``changes``, ``rates`` and ``groups`` as ``.parquet`` and
        ``.csv``, ``failures.csv``, ``subjects/<subject>/`` (``result.json`` and ``maps/*.vtp``), ``figures/`` and
        ``index.html``. Nothing is written outside it.
    parameters : StudyParameters
    scheduler : str, optional
        Address of a running ``dask.distributed`` scheduler (``tcp://host:port``); default: an in-process cluster
        on this machine.
    workers : int, optional
        Subjects measured at once by the in-process cluster (default: 2, or 1 on a single core).
    progress : bool
        Show a progress bar (tqdm) over subjects.
    report : bool
        Draw the figures and write ``index.html``.
    on_subject : callable(subject, status), optional
        Called on this machine as each subject is done: status "cached", "done" or "failed".

    Returns
    -------
    StudyResult
    """
    start = time.perf_counter()
    rows = read_study_table(table)
    output = Path(output)
    (output / "subjects").mkdir(parents=True, exist_ok=True)
    remove_interrupted_writes(output / "subjects")
    jobs = {}
    for subject, scans in rows.groupby("subject", sort=True):
        records = [{key: json_value(value) for key, value in record.items()} for record in scans.to_dict("records")]
        jobs[subject] = (records, subject_key(records, parameters))
    outcomes: dict[str, dict] = {}
    pending = {}
    for subject, (records, key) in jobs.items():
        cached = cached_outcome(output, subject, key)
        if cached is not None:
            outcomes[subject] = cached
            if on_subject:
                on_subject(subject, "cached")
        else:
            pending[subject] = (records, key)
    logger.info("study: %d subjects, %d finished before, %d to measure", len(jobs), len(outcomes), len(pending))
    failures = []
    if pending:
        failures = measure_on_dask(pending, output, parameters, scheduler, workers, progress, outcomes, on_subject)
    result = _assemble(output, jobs, outcomes, failures)
    result.timings["measure"] = time.perf_counter() - start
    if report:
        from .report import write_report

        result.report = write_report(result, parameters, table=Path(table))
    result.timings["total"] = time.perf_counter() - start
    return result


def _assemble(output: Path, jobs: dict, outcomes: dict, failures: list[dict]) -> StudyResult:
    """The cohort's tables from the subjects' results, written as Parquet and CSV (atomically)."""
    import pandas as pd

    scans = pd.DataFrame([row for subject in sorted(outcomes) for row in outcomes[subject]["scans"]])
    changes = pd.DataFrame([row for subject in sorted(outcomes) for row in outcomes[subject]["changes"]])
    rates = annualised_rates(scans, changes)
    groups = group_rates(rates)
    failed = pd.DataFrame(failures, columns=["subject", "error"]).sort_values("subject", ignore_index=True)
    for name, frame in (("scans", scans), ("changes", changes), ("rates", rates), ("groups", groups)):
        _write_table(frame, output / name)
    with atomic_path(output / "failures.csv") as partial:
        failed.to_csv(partial, index=False)
    stale = sorted({p.name for p in (output / "subjects").iterdir() if p.is_dir() and not p.name.startswith(".")}
                   - set(jobs))
    if stale:
        logger.info("output holds %d subjects no longer in the table (left untouched): %s", len(stale), stale[:5])
    return StudyResult(output, scans, changes, rates, groups, failed)


def _write_table(frame, stem: Path) -> None:
    with atomic_path(stem.with_suffix(".parquet")) as partial:
        frame.to_parquet(partial, index=False)
    with atomic_path(stem.with_suffix(".csv")) as partial:
        frame.to_csv(partial, index=False)
