"""Each subject's results on disk: the cache key of its inputs, and reading and atomically writing its folder."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__
from .._files import atomic_path, open_regular, readable_input
from ..io import write_mesh
from .parameters import StudyParameters

logger = logging.getLogger(__name__)

SAVED_PARTS = ("scans", "changes", "rates", "warnings")  # a subject's rows of the study's tables
_RESULT_FORMAT = 2  # result.json's layout: a subject saved in another layout is measured again


def subject_key(records: list[dict], parameters: StudyParameters) -> str:
    """Hash of everything a subject's results depend on: its rows, its files' bytes, the parameters, geomed.

    Raises
    ------
    ValueError
        If an input path is neither a regular file nor a folder (a device or a FIFO is never read).
    """
    digest = hashlib.sha256()
    description = [{key: record[key] for key in ("timepoint", "path", "label", "group", "years")}
                   for record in records]
    digest.update(json.dumps([description, asdict(parameters), __version__, _RESULT_FORMAT], sort_keys=True,
                             default=str).encode())
    for record in records:
        digest.update(_file_digest(Path(record["file"])).encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    """sha256 of a regular file's bytes, or of the regular files directly inside a folder (a DICOM series);
    "missing" if there is nothing to read, so that the subject is measured and fails there with the reason."""
    digest = hashlib.sha256()
    try:
        for item in readable_input(path):
            with open_regular(item) as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()


def cached_outcome(output: Path, subject: str, key: str) -> dict | None:
    """The finished results of a subject measured before with the same key, else None."""
    path = output / "subjects" / subject / "result.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or any(part not in saved for part in SAVED_PARTS):
        return None
    return saved


def save_subject(output: Path, subject: str, key: str, outcome: dict) -> None:
    """Write a finished subject (maps and result.json) into its folder in one atomic step."""
    folder = output / "subjects" / subject
    with atomic_path(folder, is_folder=True) as partial:
        (partial / "maps").mkdir()
        for name, mesh in outcome["maps"].items():
            write_mesh(mesh, partial / "maps" / f"{name}.vtp")
        saved = {"key": key, "subject": subject, **{part: outcome[part] for part in SAVED_PARTS},
                 "maps": sorted(f"maps/{name}.vtp" for name in outcome["maps"])}
        (partial / "result.json").write_text(json.dumps(saved, indent=1, default=json_value))


def json_value(value):
    """Plain Python numbers for JSON (numpy scalars as their value)."""
    return value.item() if isinstance(value, (np.floating, np.integer, np.bool_)) else value
