"""File helpers: format suffixes and atomic writes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def file_suffix(path: Path) -> str:
    """The lower-case format suffix of a path, treating ``.nii.gz`` as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def file_stem(name: str) -> str:
    """A name (a structure's, a node's) made safe as a file name or part of one: letters, digits, '.', '_', '-';
    runs of anything else become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "shape"


@contextlib.contextmanager
def atomic_path(path: Path, is_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) and move it into place only if the block succeeds.

    A reader never sees a half-written file under ``path``: on error the temporary is removed and an existing
    ``path`` is left as it was.
    """
    if not path.parent.exists():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    suffix = "" if is_folder else file_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    if is_folder:
        temporary = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".partial", dir=path.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{suffix}", dir=path.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o755 if is_folder else 0o644)
        if is_folder and path.exists():
            previous = path.with_name(f".{path.name}.{os.getpid()}.previous")
            os.replace(path, previous)
            os.replace(temporary, path)
            shutil.rmtree(previous)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary) if temporary.is_dir() else temporary.unlink()
