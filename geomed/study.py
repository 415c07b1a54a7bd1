r"""Longitudinal cohort studies: how fast each structure changes, and where, for every subject of a cohort, on Dask.

Input is a table (CSV or Parquet) with one row per scan:

=========== ==========================================================================================
subject     subject id (letters, digits, ``-``, ``_``, ``.``; it names the subject's output folder)
timepoint   years from any origin (numbers) or a date (ISO ``2021-03-15``; years from the subject's first)
path        a mesh (.vtp .vtk .stl .ply .obj .gii) or label map / mask (.nii.gz .nrrd .mha …); relative
            paths are relative to the table's folder
label       optional: the structure; for label maps, the label id or name to extract
group       optional: e.g. "control" / "patient" (group rates and their difference)
=========== ==========================================================================================

For each subject and structure the scans are sorted by time, and every consecutive pair is measured both ways:
a rigid Sinkhorn registration (:func:`geomed.register`) takes out the change of position, then the baseline
surface is carried along its normals onto the follow-up (:func:`geomed.morphometry.surface_change`). That gives
the **percent volume change** twice — *direct* (difference of enclosed volumes) and *registration-based*
(SIENA-like, the volume enclosed by the carried surface) — and a **change map** (normal displacement in mm, local
area change) on the baseline surface. The same is done backwards, follow-up onto baseline. A consistent method
has :math:`(1 + p_{AB}/100)(1 + p_{BA}/100) = 1`; the departure is reported as ``consistency_pp``
= :math:`p_{AB} + p_{BA} + p_{AB} p_{BA}/100` (the plain sum :math:`p_{AB} + p_{BA}` is not 0 even for exact
measurements: −3% then +3.09%). As SIENA measures in a halfway space, the reported ``registration_percent`` is
the symmetric estimate :math:`100(\sqrt{(1 + p_{AB}/100)/(1 + p_{BA}/100)} - 1)`, which is the same whichever
scan is called the baseline; ``forward_percent`` and ``backward_percent`` keep the two one-way estimates. Same-day
repeat scans (interval 0) give the rescan distribution.

Per subject and structure an **annualised rate** (% per year) is fitted to the log-volume trajectory, and per group
its mean with a 95% confidence interval; each group is compared with the reference group (Welch's t-test,
Cohen's d).

Subjects run as Dask tasks: in-process by default, or on an existing ``dask.distributed`` cluster
(``scheduler="tcp://host:8786"``; its workers must have geomed and see the input paths). A subject's results are
written as soon as it finishes, atomically, under ``output/subjects/<subject>``, keyed by the hash of its input
files, table rows and parameters: a re-run (after a crash, a kill or a new subject) skips finished subjects and
produces identical tables. A subject that fails (a corrupt file, an empty label) is recorded in ``failures.csv``
with its error and does not stop the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from ._files import atomic_path, file_stem, file_suffix
from .io import IMAGE_FORMATS, MESH_FORMATS, read_image, read_mesh, write_mesh
from .mesh import Mesh
from .morphometry import percent_volume_change, surface_area, surface_change, volume

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("subject", "timepoint", "path")
OPTIONAL_COLUMNS = ("label", "group")
_SUBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DAYS_PER_YEAR = 365.25


@dataclass(frozen=True)
class StudyParameters:
    """What a study measures with; part of every subject's cache key.

    Attributes
    ----------
    preset : {"brain", "knee", "heart"} or None
        Registration scales (:mod:`geomed.registration.presets`); None scales them to each shape's size.
    max_distance : float
        Largest normal displacement searched between consecutive scans, mm.
    method : {"surface_nets", "flying_edges"}
        Surface extraction from label maps and masks (:func:`geomed.mask_to_mesh`).
    """

    preset: str | None = None
    max_distance: float = 3.0
    method: str = "surface_nets"

    def __post_init__(self) -> None:
        from .registration import PRESETS
        from .surface import METHODS

        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}")
        if not (isinstance(self.max_distance, (int, float)) and math.isfinite(self.max_distance)
                and self.max_distance > 0):
            raise ValueError(f"max_distance must be a positive number of mm, got {self.max_distance!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


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


def read_study_table(path: str | Path):
    """Read and check a study table (CSV or Parquet) → pandas DataFrame with ``years`` and resolved ``file``.

    Raises
    ------
    ValueError
        Naming the table and what is wrong: missing columns, empty table, unusable timepoints or subject ids,
        a scan listed twice.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study table {path} does not exist")
    suffix = file_suffix(path)
    if suffix == ".parquet":
        table = pd.read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype={"subject": str, "label": str,
                                                                               "group": str, "path": str})
    else:
        raise ValueError(f"study table {path}: expected a .csv, .tsv or .parquet file")
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"study table {path} lacks column(s) {missing}; it has {list(table.columns)} "
                         f"(required: {list(REQUIRED_COLUMNS)}, optional: {list(OPTIONAL_COLUMNS)})")
    if table.empty:
        raise ValueError(f"study table {path} has no rows")
    table = table.copy()
    for column, default in (("label", ""), ("group", "")):
        table[column] = table[column].fillna(default).astype(str) if column in table.columns else default
    table["subject"] = table["subject"].astype(str)
    bad = sorted({name for name in table["subject"] if not _SUBJECT_NAME.match(name) or name in (".", "..")})
    if bad:
        raise ValueError(f"study table {path}: subject ids must be letters, digits, '-', '_' or '.', got {bad[:5]}")
    table["years"] = _years(table, path)
    table["file"] = [str(_resolved(entry, path.parent)) for entry in table["path"].astype(str)]
    duplicated = table.duplicated(["subject", "label", "file"])
    if duplicated.any():
        rows = table[duplicated][["subject", "label", "path"]].to_dict("records")
        raise ValueError(f"study table {path}: a scan is listed twice for the same subject and label: {rows[:3]}")
    return table


def _years(table, path: Path):
    """Timepoints as years: numbers as given, dates as years since each subject's first scan."""
    import pandas as pd

    values = pd.to_numeric(table["timepoint"], errors="coerce")
    if values.notna().all():
        return values.astype(float)
    dates = pd.to_datetime(table["timepoint"], errors="coerce")
    if dates.isna().any():
        bad = table["timepoint"][dates.isna() & values.isna()].tolist()
        raise ValueError(f"study table {path}: timepoint must be years (a number) or a date, got {bad[:5]}")
    first = dates.groupby(table["subject"]).transform("min")
    return (dates - first).dt.total_seconds() / (86400.0 * _DAYS_PER_YEAR)


def _resolved(entry: str, folder: Path) -> Path:
    candidate = Path(entry).expanduser()
    return candidate if candidate.is_absolute() else folder / candidate


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
    _remove_interrupted_writes(output / "subjects")
    jobs = {}
    for subject, scans in rows.groupby("subject", sort=True):
        records = [{key: _json_value(value) for key, value in record.items()} for record in scans.to_dict("records")]
        jobs[subject] = (records, _subject_key(records, parameters))
    outcomes: dict[str, dict] = {}
    pending = {}
    for subject, (records, key) in jobs.items():
        cached = _cached(output, subject, key)
        if cached is not None:
            outcomes[subject] = cached
            if on_subject:
                on_subject(subject, "cached")
        else:
            pending[subject] = (records, key)
    logger.info("study: %d subjects, %d finished before, %d to measure", len(jobs), len(outcomes), len(pending))
    failures = []
    if pending:
        failures = _measure(pending, output, parameters, scheduler, workers, progress, outcomes, on_subject)
    result = _assemble(output, jobs, outcomes, failures)
    result.timings["measure"] = time.perf_counter() - start
    if report:
        from .study_report import write_report

        result.report = write_report(result, parameters, table=Path(table))
    result.timings["total"] = time.perf_counter() - start
    return result


def _remove_interrupted_writes(folder: Path) -> None:
    """Delete what a killed run left half-written: the hidden ``.<subject>.*.partial`` / ``.previous`` folders of
    :func:`geomed._files.atomic_path` (finished subjects are never among them)."""
    import shutil

    for leftover in folder.glob(".*"):
        if leftover.is_dir() and leftover.name.endswith((".partial", ".previous")):
            logger.info("removing %s, left by an interrupted run", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _subject_key(records: list[dict], parameters: StudyParameters) -> str:
    """Hash of everything a subject's results depend on: its rows, its files' bytes, the parameters, geomed."""
    digest = hashlib.sha256()
    description = [{key: record[key] for key in ("timepoint", "path", "label", "group", "years")}
                   for record in records]
    digest.update(json.dumps([description, asdict(parameters), __version__], sort_keys=True, default=str).encode())
    for record in records:
        digest.update(_file_digest(Path(record["file"])).encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes (of every file of a folder, e.g. a DICOM series); "missing" if unreadable, so that
    the subject is measured, and fails there with the reason."""
    digest = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for item in files:
            with open(item, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()


def _cached(output: Path, subject: str, key: str) -> dict | None:
    """The finished results of a subject measured before with the same key, else None."""
    path = output / "subjects" / subject / "result.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("key") == key else None


def _measure(pending: dict, output: Path, parameters: StudyParameters, scheduler: str | None, workers: int | None,
             progress: bool, outcomes: dict, on_subject) -> list[dict]:
    """Run the pending subjects on Dask; save each as it finishes. Returns the failures."""
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    failures = []
    cluster = None
    dask_logger = logging.getLogger("distributed")
    dask_level = dask_logger.level
    if not logger.isEnabledFor(logging.DEBUG):  # Dask's INFO chatter (cluster start and stop) only when debugging
        dask_logger.setLevel(logging.WARNING)
    if scheduler is None:
        threads = workers or max(1, min(2, os.cpu_count() or 1))
        # Dask's scheduler always serves HTTP (health, dashboard): on a free loopback port, not the shared :8787.
        cluster = LocalCluster(processes=False, n_workers=1, threads_per_worker=threads,
                               dashboard_address="127.0.0.1:0")
        client = Client(cluster, set_as_default=False)
    else:
        client = Client(scheduler, set_as_default=False)
    try:
        futures = {client.submit(measure_subject, subject, records, parameters, pure=False,
                                 key=f"geomed-subject-{subject}-{key[:16]}"): (subject, key)
                   for subject, (records, key) in pending.items()}
        with tqdm(total=len(futures), desc="subjects", unit="subject", disable=not progress) as bar:
            for future in as_completed(futures, loop=client.loop):
                subject, key = futures[future]
                try:
                    outcome = future.result()
                except Exception as error:  # the task itself was lost (a worker died, a cluster went away)
                    outcome = {"error": f"{type(error).__name__}: {error}"}
                future.release()
                if "error" in outcome:
                    failures.append({"subject": subject, "error": outcome["error"]})
                    logger.error("subject %s failed: %s", subject, outcome["error"])
                    status = "failed"
                else:
                    _save_subject(output, subject, key, outcome)
                    outcomes[subject] = _cached(output, subject, key)
                    status = "done"
                bar.update()
                if on_subject:
                    on_subject(subject, status)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        dask_logger.setLevel(dask_level)
    return failures


def measure_subject(subject: str, records: list[dict], parameters: StudyParameters) -> dict:
    """Measure one subject (a Dask task): per structure, its scans and every consecutive interval both ways.

    Returns ``{"scans": [...], "changes": [...], "maps": {name: Mesh}}``, or ``{"error": "..."}`` naming the file
    and the reason if anything failed.
    """
    try:
        scans, changes, maps = [], [], {}
        for structure, entries in _by_structure(records).items():
            shapes = [_surface(entry, parameters) for entry in entries]
            for entry, shape in zip(entries, shapes):
                scans.append({"subject": subject, "structure": structure, "group": entry["group"],
                              "timepoint": entry["years"], "path": entry["path"], "volume_mm3": volume(shape),
                              "area_mm2": surface_area(shape), "vertices": shape.n_vertices})
            for index in range(len(entries) - 1):
                row, carried = _interval(entries[index], entries[index + 1], shapes[index], shapes[index + 1],
                                         parameters)
                changes.append({"subject": subject, "structure": structure, **row})
                maps[_map_name(structure, index, entries)] = carried
        return {"scans": scans, "changes": changes, "maps": maps}
    except Exception as error:  # one subject's failure is recorded, the cohort goes on
        logger.debug("subject %s failed", subject, exc_info=True)
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=4)}


def _by_structure(records: list[dict]) -> dict[str, list[dict]]:
    structures: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: (str(r["label"]), float(r["years"]), str(r["path"]))):
        structures.setdefault(str(record["label"]) or "shape", []).append(record)
    return structures


def _surface(entry: dict, parameters: StudyParameters) -> Mesh:
    """The closed surface of one scan: a mesh file, or the boundary of a mask / one label of a label map."""
    path = Path(entry["file"])
    suffix = file_suffix(path)
    if suffix in MESH_FORMATS:
        mesh = read_mesh(path)
    elif suffix in IMAGE_FORMATS or path.is_dir():
        from .surface import mask_to_mesh

        image = read_image(path)
        label = entry["label"] or None
        if label is not None and label.isdigit():
            label = int(label)
        try:
            mesh = mask_to_mesh(image, label, method=parameters.method)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path}: {error}") from None
    else:
        raise ValueError(f"{path}: not a mesh ({', '.join(MESH_FORMATS)}) or image ({', '.join(IMAGE_FORMATS)})")
    if not mesh.is_closed:
        raise ValueError(f"{path}: the surface is not closed ({mesh.boundary_edge_count()} boundary edges), so it "
                         "encloses no definite volume")
    if volume(mesh) <= 0:
        raise ValueError(f"{path}: the surface encloses a non-positive volume (inward-wound?)")
    return mesh


def _interval(first: dict, second: dict, before: Mesh, after: Mesh, parameters: StudyParameters):
    """One interval measured forwards and backwards: its table row and the forward change map."""
    from .registration import register

    started = time.perf_counter()
    forward = register(before, after, model="rigid", preset=parameters.preset)
    backward = register(after, before, model="rigid", preset=parameters.preset)
    carried = surface_change(before, after, forward.transform, max_distance=parameters.max_distance)
    returned = surface_change(after, before, backward.transform, max_distance=parameters.max_distance)
    ahead = percent_volume_change(before, after, carried)
    back = percent_volume_change(after, before, returned)
    displacement = carried.point_data["normal displacement"]
    interval = float(second["years"]) - float(first["years"])
    p, q = ahead["registration_percent"], back["registration_percent"]
    symmetric = 100.0 * (math.sqrt((1.0 + p / 100.0) / (1.0 + q / 100.0)) - 1.0)
    row = {
        "group": first["group"], "from_timepoint": float(first["years"]), "to_timepoint": float(second["years"]),
        "interval_years": interval, "rescan": bool(interval == 0.0), "from_path": first["path"],
        "to_path": second["path"], "direct_percent": ahead["direct_percent"], "registration_percent": symmetric,
        "forward_percent": p, "backward_percent": q, "consistency_pp": p + q + p * q / 100.0,
        "flux_percent": ahead["flux_percent"], "disagreement_pp": ahead["direct_percent"] - symmetric,
        "mean_abs_normal_displacement_mm": float(np.nanmean(np.abs(displacement))),
        "unmatched_vertices": int(np.isnan(displacement).sum()),
        "seconds": time.perf_counter() - started,
    }
    return row, carried


def _map_name(structure: str, index: int, entries: list[dict]) -> str:
    first, second = entries[index], entries[index + 1]
    return f"{file_stem(structure)}_{index:02d}_{float(first['years']):g}y_to_{float(second['years']):g}y"


def _save_subject(output: Path, subject: str, key: str, outcome: dict) -> None:
    """Write a finished subject (maps and result.json) into its folder in one atomic step."""
    folder = output / "subjects" / subject
    with atomic_path(folder, is_folder=True) as partial:
        (partial / "maps").mkdir()
        for name, mesh in outcome["maps"].items():
            write_mesh(mesh, partial / "maps" / f"{name}.vtp")
        saved = {"key": key, "subject": subject, "scans": outcome["scans"], "changes": outcome["changes"],
                 "maps": sorted(f"maps/{name}.vtp" for name in outcome["maps"])}
        (partial / "result.json").write_text(json.dumps(saved, indent=1, default=_json_value))


def _json_value(value):
    """Plain Python numbers for JSON (numpy scalars as their value)."""
    return value.item() if isinstance(value, (np.floating, np.integer, np.bool_)) else value


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


def annualised_rates(scans, changes):
    """Per subject and structure, the annual percent volume change, registration-based and direct.

    The registration-based trajectory chains the intervals' changes, v_k = Π (1 + p_i/100), and the direct one
    uses the volumes; each rate is 100·(exp(b) − 1) for the least-squares slope b of ln v against years, which is
    exact for a constant annual rate (V_t = V_0 (1 + r/100)^t).
    """
    import pandas as pd

    rows = []
    if changes.empty:
        return pd.DataFrame(columns=["subject", "structure", "group", "scans", "years", "registration_rate",
                                     "direct_rate", "consistency_pp"])
    for (subject, structure), chain in changes.groupby(["subject", "structure"], sort=True):
        chain = chain.sort_values(["from_timepoint", "to_timepoint"])
        times = np.concatenate([[chain["from_timepoint"].iloc[0]], chain["to_timepoint"].to_numpy()])
        registration = np.concatenate([[0.0], np.cumsum(np.log1p(chain["registration_percent"].to_numpy() / 100))])
        direct = np.concatenate([[0.0], np.cumsum(np.log1p(chain["direct_percent"].to_numpy() / 100))])
        rows.append({"subject": subject, "structure": structure, "group": chain["group"].iloc[0],
                     "scans": len(times), "years": float(times.max() - times.min()),
                     "registration_rate": _rate(times, registration), "direct_rate": _rate(times, direct),
                     "consistency_pp": float(chain["consistency_pp"].abs().max())})
    return pd.DataFrame(rows)


def _rate(times: np.ndarray, log_volume: np.ndarray) -> float:
    if np.ptp(times) == 0:
        return float("nan")
    slope = np.polyfit(times, log_volume, 1)[0]
    return float(100.0 * np.expm1(slope))


def group_rates(rates, reference: str | None = None):
    """Per structure and group: mean annual rate with its 95% confidence interval; each group against the
    reference group ("control" if present, else the first): difference, Welch's t-test p-value, Cohen's d."""
    import pandas as pd
    from scipy import stats

    rows = []
    if rates.empty:
        return pd.DataFrame(columns=["structure", "group", "n", "mean_rate", "ci_low", "ci_high", "sd"])
    for structure, per_structure in rates.groupby("structure", sort=True):
        names = sorted(per_structure["group"].unique())
        base = reference if reference in names else ("control" if "control" in names else names[0])
        values = {name: per_structure.loc[per_structure["group"] == name, "registration_rate"].dropna().to_numpy()
                  for name in names}
        for name in names:
            sample = values[name]
            n, mean = len(sample), float(np.mean(sample)) if len(sample) else float("nan")
            sd = float(np.std(sample, ddof=1)) if n > 1 else float("nan")
            half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
            row = {"structure": structure, "group": name, "n": n, "mean_rate": mean, "ci_low": mean - half,
                   "ci_high": mean + half, "sd": sd, "reference": base}
            if name != base and n > 1 and len(values[base]) > 1:
                other = values[base]
                pooled = math.sqrt(((n - 1) * sd**2 + (len(other) - 1) * np.var(other, ddof=1))
                                   / (n + len(other) - 2))
                row.update(difference=mean - float(np.mean(other)),
                           p_value=float(stats.ttest_ind(sample, other, equal_var=False).pvalue),
                           cohens_d=(mean - float(np.mean(other))) / pooled if pooled > 0 else float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)
