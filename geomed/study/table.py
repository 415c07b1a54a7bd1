"""The study table: reading it, refusing what sinks a whole table (no rows, missing columns, an unreadable file),
and naming the problems confined to one subject's rows, which fail that subject alone."""

from __future__ import annotations

import math
import re
from pathlib import Path

from .._files import file_suffix

REQUIRED_COLUMNS = ("subject", "timepoint", "path")
OPTIONAL_COLUMNS = ("label", "group")
MAX_NAME_LENGTH = 64
_SUBJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_STRUCTURE_NAME = re.compile(r"[^\x00-\x1f\x7f]*")
_DAYS_PER_YEAR = 365.25
_MAX_YEARS = 1e4  # numeric timepoints are years from any origin (calendar years included), not beyond


def read_study_table(path: str | Path):
    """Read and check a study table (CSV, TSV or Parquet).

    Returns
    -------
    pandas.DataFrame
        The table's rows with ``label`` and ``group`` filled (empty text where absent), ``row`` (the row's number,
        1 for the first row below the header), ``years`` (float; NaN where unusable), ``file`` (the path resolved
        against the table's folder) and ``problem``: empty, or why this row cannot be measured (a subject id that
        cannot name a folder, a timepoint that is not a finite number of years or a date, a file listed twice for
        the same subject and structure). A subject with any such row fails alone; the others are measured.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the table, for what no subject can be measured without: a missing or unreadable table, a missing
        required column, no rows.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study table {path} does not exist (or is not a regular file)")
    suffix = file_suffix(path)
    if suffix not in (".parquet", ".csv", ".tsv"):
        raise ValueError(f"study table {path}: expected a .csv, .tsv or .parquet file")
    try:
        if suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False,
                                dtype={"subject": str, "label": str, "group": str, "path": str, "timepoint": str})
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"study table {path} cannot be read: {reason}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"study table {path} lacks column(s) {missing}; it has {list(table.columns)} "
                         f"(required: {list(REQUIRED_COLUMNS)}, optional: {list(OPTIONAL_COLUMNS)})")
    if table.empty:
        raise ValueError(f"study table {path} has no rows")
    table = table.reset_index(drop=True).copy()
    for column in ("label", "group"):
        table[column] = table[column].map(_text) if column in table.columns else ""
    table["subject"] = table["subject"].map(_text)
    table["path"] = table["path"].map(_text)
    table.insert(0, "row", range(1, len(table) + 1))
    problems = [[] for _ in range(len(table))]
    for index, subject in enumerate(table["subject"]):
        if not _SUBJECT_NAME.fullmatch(subject) or len(subject) > MAX_NAME_LENGTH or subject in (".", ".."):
            problems[index].append(f"subject id {subject[:80]!r} is not 1 to {MAX_NAME_LENGTH} letters, digits, "
                                   "'-', '_' or '.' starting with a letter or digit")
    for index, label in enumerate(table["label"]):
        if not _STRUCTURE_NAME.fullmatch(label) or len(label) > MAX_NAME_LENGTH:
            problems[index].append(f"label {label[:80]!r} is not at most {MAX_NAME_LENGTH} printable characters")
    for index, entry in enumerate(table["path"]):
        if not entry.strip():
            problems[index].append("path is empty")
    table["years"] = _years(table, problems)
    table["file"] = [str(_resolved(entry, path.parent)) for entry in table["path"]]
    first_listing = table.groupby(["subject", "label", "file"])["row"].transform("min")
    for index in table.index[table["row"] != first_listing]:
        problems[index].append(f"{table.at[index, 'path']} is listed again for this subject and label (first in "
                               f"row {first_listing.iat[index]})")
    table["problem"] = ["; ".join(reasons) for reasons in problems]
    return table


def subject_problems(rows) -> str:
    """Why a subject's rows (of :func:`read_study_table`) cannot be measured, naming the rows; empty if they can."""
    bad = rows[rows["problem"] != ""]
    return "; ".join(f"row {row}: {problem}" for row, problem in zip(bad["row"], bad["problem"]))


def _text(value) -> str:
    """A cell as text: missing values (None, NaN) are empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _years(table, problems: list[list[str]]):
    """Timepoints as years: numbers as given, dates as years since the subject's first scan; NaN (and a problem)
    for anything else, a non-finite number or one beyond ±10⁴ years."""
    import pandas as pd

    text = table["timepoint"].map(_text)
    numbers = pd.to_numeric(text.where(text.str.strip() != ""), errors="coerce")
    is_date = numbers.isna() & (text.str.strip() != "")
    dates = pd.to_datetime(text.where(is_date), errors="coerce", format="mixed")
    years = numbers.astype(float).copy()
    firsts = dates.groupby(table["subject"]).transform("min")
    years[is_date] = ((dates - firsts).dt.total_seconds() / (86400.0 * _DAYS_PER_YEAR))[is_date]
    for index, value in enumerate(years):
        if not math.isfinite(value) or abs(value) > _MAX_YEARS:
            problems[index].append(f"timepoint {text.iat[index][:40]!r} is not a finite number of years "
                                   f"(|t| ≤ {_MAX_YEARS:g}) or a date")
            years.iat[index] = float("nan")
    kinds = pd.DataFrame({"subject": table["subject"], "date": is_date & dates.notna(), "number": numbers.notna()})
    mixed = kinds.groupby("subject")[["date", "number"]].transform("any").all(axis=1)
    for index in kinds.index[mixed]:
        problems[index].append("the subject's timepoints mix numbers and dates")
    return years


def _resolved(entry: str, folder: Path) -> Path:
    candidate = Path(entry).expanduser()
    return candidate if candidate.is_absolute() else folder / candidate
