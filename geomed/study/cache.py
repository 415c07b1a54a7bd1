"""Each subject's results on disk: the cache key of its inputs, reading and atomically writing its folder, and
clearing what an interrupted run left."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__
from .._files import atomic_path
from ..io import write_mesh
from .parameters import StudyParameters

logger = logging.getLogger(__name__)


def remove_interrupted_writes(folder: Path) -> None:
    """Delete what a killed run left half-written: the hidden ``.<subject>.*.partial`` / ``.previous`` folders of
    :func:`geomed._files.atomic_path` (finished subjects are never among them)."""
    import shutil

    for leftover in folder.glob(".*"):
        if leftover.is_dir() and leftover.name.endswith((".partial", ".previous")):
            logger.info("removing %s, left by an interrupted run", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def subject_key(records: list[dict], parameters: StudyParameters) -> str:
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


def cached_outcome(output: Path, subject: str, key: str) -> dict | None:
    """The finished results of a subject measured before with the same key, else None."""
    path = output / "subjects" / subject / "result.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("key") == key else None


def save_subject(output: Path, subject: str, key: str, outcome: dict) -> None:
    """Write a finished subject (maps and result.json) into its folder in one atomic step."""
    folder = output / "subjects" / subject
    with atomic_path(folder, is_folder=True) as partial:
        (partial / "maps").mkdir()
        for name, mesh in outcome["maps"].items():
            write_mesh(mesh, partial / "maps" / f"{name}.vtp")
        saved = {"key": key, "subject": subject, "scans": outcome["scans"], "changes": outcome["changes"],
                 "maps": sorted(f"maps/{name}.vtp" for name in outcome["maps"])}
        (partial / "result.json").write_text(json.dumps(saved, indent=1, default=json_value))


def json_value(value):
    """Plain Python numbers for JSON (numpy scalars as their value)."""
    return value.item() if isinstance(value, (np.floating, np.integer, np.bool_)) else value
