"""The study as a whole: under the output folder's lock, read the table, fail the subjects whose rows cannot be
measured, skip the finished ones, measure the others, then write the cohort's tables and the report together."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._files import readable_input, remove_leftovers, replace_folder, spreadsheet_safe
from .cache import cached_outcome, json_value, subject_key
from .lock import output_lock
from .parameters import StudyParameters
from .runner import measure_on_dask
from .statistics import group_rates
from .table import read_study_table, subject_problems

logger = logging.getLogger(__name__)

TABLES = ("scans", "changes", "rates", "groups")
FAILURE_COLUMNS = ("subject", "file", "error")
WARNING_COLUMNS = ("subject", "structure", "path", "warning")


@dataclass
class StudyResult:
    """What :func:`run_study` produced (pandas DataFrames, also written under ``output``)."""

    output: Path
    scans: object
    changes: object
    rates: object
    groups: object
    failures: object
    warnings: object
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
        ``.csv``, ``failures.csv``, ``warnings.csv``, ``subjects/<subject>/`` (``result.json`` and
        ``maps/*.vtp``), ``figures/`` and ``index.html``. Nothing is written outside it; files and folders get the
        process's umask. One study at a time may use it.
    parameters : StudyParameters
    scheduler : str, optional
        Address of a running ``dask.distributed`` scheduler (``tcp://host:port``, or ``tls://`` with Dask's TLS
        configuration); default: an in-process cluster on this machine, every listener on loopback.
    workers : int, optional
        Subjects measured at once by the in-process cluster (default: 2, or 1 on a single core).
    progress : bool
        Show a progress bar (tqdm) over subjects.
    report : bool
        Draw the figures and write ``index.html`` (when False, an earlier run's report is removed: a report never
        describes other tables).
    on_subject : callable(subject, status), optional
        Called on this machine as each subject is done: status "cached", "done" or "failed".

    Returns
    -------
    StudyResult

    Raises
    ------
    geomed.study.OutputInUseError
        If another study is using ``output``.
    FileNotFoundError, ValueError
        If the table cannot be used at all (see :func:`read_study_table`); a problem of one subject's rows fails
        that subject only.
    """
    start = time.perf_counter()
    rows = read_study_table(table)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file, not a folder")
    output.mkdir(parents=True, exist_ok=True)
    with output_lock(output):
        (output / "subjects").mkdir(exist_ok=True)
        for folder in (output, output / "subjects", output / "figures"):
            for leftover in remove_leftovers(folder):
                logger.info("removed %s, left by an interrupted run", leftover)
        jobs, failures = _jobs(rows, parameters, on_subject)
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
        logger.info("study: %d subjects, %d finished before, %d to measure, %d refused", len(jobs) + len(failures),
                    len(outcomes), len(pending), len(failures))
        if pending:
            failures += measure_on_dask(pending, output, parameters, scheduler, workers, progress, outcomes,
                                        on_subject)
        result = _assemble(output, outcomes, failures)
        result.timings["measure"] = time.perf_counter() - start
        _publish(result, parameters, Path(table), report)
        stale = sorted({p.name for p in (output / "subjects").iterdir() if p.is_dir() and not p.name.startswith(".")}
                       - set(rows["subject"]))
        if stale:
            logger.info("output holds %d subjects no longer in the table (left untouched): %s", len(stale), stale[:5])
    result.timings["total"] = time.perf_counter() - start
    return result


def _jobs(rows, parameters: StudyParameters, on_subject) -> tuple[dict, list[dict]]:
    """Each measurable subject's records and cache key; a failure for each subject whose rows cannot be used."""
    jobs, failures = {}, []
    for subject, scans in rows.groupby("subject", sort=True):
        records = [{key: json_value(value) for key, value in record.items()} for record in scans.to_dict("records")]
        problem = subject_problems(scans)
        file = ", ".join(scans.loc[scans["problem"] != "", "path"])
        if not problem:
            for record in records:
                try:
                    readable_input(Path(record["file"]))
                except (OSError, ValueError) as error:
                    problem, file = f"row {record['row']}: {error}", record["path"]
                    break
        if not problem:
            try:
                jobs[subject] = (records, subject_key(records, parameters))
                continue
            except (OSError, ValueError) as error:
                problem = str(error)
        failures.append({"subject": subject, "file": file, "error": problem})
        logger.error("subject %s refused: %s", subject, problem)
        if on_subject:
            on_subject(subject, "failed")
    return jobs, failures


def _assemble(output: Path, outcomes: dict, failures: list[dict]) -> StudyResult:
    """The cohort's tables from the subjects' results."""
    import pandas as pd

    def rows(part: str) -> list[dict]:
        return [row for subject in sorted(outcomes) for row in outcomes[subject][part]]

    rates = pd.DataFrame(rows("rates"))
    if rates.empty:
        rates = pd.DataFrame(columns=["subject", "structure", "group", "scans", "years", "registration_rate",
                                      "direct_rate", "consistency_pp"])
    failed = pd.DataFrame(failures, columns=list(FAILURE_COLUMNS)).sort_values("subject", ignore_index=True)
    warnings = pd.DataFrame(rows("warnings"), columns=list(WARNING_COLUMNS))
    return StudyResult(output, pd.DataFrame(rows("scans")), pd.DataFrame(rows("changes")), rates,
                       group_rates(rates), failed, warnings)


def _publish(result: StudyResult, parameters: StudyParameters, table: Path, report: bool) -> None:
    """Write the tables (and the report) into a hidden staging folder, then move them all into place: a failure
    (a full disk) leaves the previous run's outputs as they were, and the report never describes other tables."""
    import tempfile

    output = result.output
    staging = Path(tempfile.mkdtemp(prefix=".publish.", suffix=".partial", dir=output))
    try:
        for name in TABLES:
            frame = getattr(result, name)
            frame.to_parquet(staging / f"{name}.parquet", index=False)
            _csv_safe(frame).to_csv(staging / f"{name}.csv", index=False)
        _csv_safe(result.failures).to_csv(staging / "failures.csv", index=False)
        _csv_safe(result.warnings).to_csv(staging / "warnings.csv", index=False)
        if report:
            from .report import write_report

            write_report(result, parameters, table=table, folder=staging)
        (output / "index.html").unlink(missing_ok=True)
        for item in sorted(staging.iterdir(), key=lambda path: path.name == "index.html"):
            target = output / item.name
            if item.is_dir():
                replace_folder(item, target)
            else:
                os.replace(item, target)
        if not report:
            shutil.rmtree(output / "figures", ignore_errors=True)
        result.report = output / "index.html" if report else None
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(f"writing the tables and report into {output}: {reason}; the subjects' results are saved and "
                      "the previous tables and report are left as they were") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _csv_safe(frame):
    """The frame with text cells a spreadsheet would run as formulas neutralised (Parquet keeps the raw values)."""
    import pandas as pd

    text = [column for column in frame.columns if not pd.api.types.is_numeric_dtype(frame[column])]
    if not text:
        return frame
    safe = frame.copy()
    for column in text:
        safe[column] = safe[column].map(spreadsheet_safe)
    return safe
