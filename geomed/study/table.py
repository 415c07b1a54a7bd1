"""The study table: reading it and checking what a whole table must satisfy (columns, ids, timepoints)."""

from __future__ import annotations

import re
from pathlib import Path

from .._files import file_suffix

REQUIRED_COLUMNS = ("subject", "timepoint", "path")
OPTIONAL_COLUMNS = ("label", "group")
_SUBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DAYS_PER_YEAR = 365.25


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
