"""File helpers: format suffixes, names made safe as file names, input files that may be read, atomic writes
that honour the user's umask, and CSV cells a spreadsheet will not run."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HASHED = re.compile(r".*-[0-9a-f]{10}")
_STEM_LENGTH = 64
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# What atomic_path leaves behind when killed: .<stem>.<token>.partial[<suffix>] and .<name>.<pid>.previous
LEFTOVER = re.compile(r"\..+\.(partial(\.[A-Za-z0-9.]+)?|previous)")


def file_suffix(path: Path) -> str:
    """The lower-case format suffix of a path, treating ``.nii.gz`` as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def file_stem(name: str) -> str:
    """A name (a structure's, a node's) made safe as a file name or part of one: letters, digits, '.', '_', '-';
    runs of anything else become '_'."""
    return _UNSAFE.sub("_", name).strip("._") or "shape"


def distinct_file_stem(name: str) -> str:
    """A file-name-safe stem that differs for different names (``"a b"`` and ``"a_b"`` get different stems).

    A name that is already safe, at most 64 characters long and not of the form ``*-<10 hex digits>`` is its own
    stem; any other is cleaned (:func:`file_stem`), cut to 53 characters and given ``-<10 hex digits>`` of its
    SHA-256, so the two kinds never meet.
    """
    if file_stem(name) == name and len(name) <= _STEM_LENGTH and not _HASHED.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{file_stem(name)[: _STEM_LENGTH - 11]}-{digest}"


def readable_input(path: Path) -> list[Path]:
    """The files to read for an input path: the path itself if it is a regular file, or the regular files directly
    inside it if it is a folder (a DICOM series).

    Raises
    ------
    FileNotFoundError
        If nothing is there.
    ValueError
        If it is neither a regular file nor a folder (a device such as ``/dev/zero``, a FIFO, a socket): reading
        one could block forever or never end.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or folder") from None
    if stat.S_ISREG(mode):
        return [path]
    if stat.S_ISDIR(mode):
        return sorted(item for item in path.iterdir() if item.is_file())
    raise ValueError(f"{path}: not a regular file or a DICOM series folder (a device, FIFO or socket is not read)")


def open_regular(path: Path):
    """Open a regular file for binary reading, refusing anything else without blocking on it (a FIFO opened
    normally waits for a writer)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"{path}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def spreadsheet_safe(value: object) -> object:
    """A CSV cell that a spreadsheet will not read as a formula: text starting with ``= + - @``, a tab or a
    carriage return gets a leading apostrophe (OWASP's advice on CSV injection); anything else is unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete what a killed :func:`atomic_path` left in ``folder`` (hidden ``.partial`` / ``.previous`` files and
    folders); returns what was removed. Call it only while no other writer uses the folder."""
    removed = []
    if not folder.is_dir():
        return removed
    for leftover in folder.iterdir():
        if LEFTOVER.fullmatch(leftover.name):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_path(path: Path, is_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) and move it into place only if the block succeeds.

    A reader never sees a half-written file under ``path``: on error the temporary is removed and an existing
    ``path`` is left as it was. The temporary is created with the process's umask, like any new file (no mode is
    forced: results derived from patients' scans stay as private as the user asked).
    """
    if not path.parent.exists():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    suffix = "" if is_folder else file_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temporary = _new_sibling(path.parent, stem, suffix, is_folder)
    try:
        yield temporary
        if is_folder:
            replace_folder(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary) if temporary.is_dir() else temporary.unlink()


def replace_folder(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target``, replacing whatever is there: the old one is first renamed to a
    hidden ``.<name>.<pid>.previous`` sibling (what :func:`remove_leftovers` clears if this is killed), so that
    ``target`` is never missing for more than the instant between two renames."""
    if target.exists():
        previous = target.with_name(f".{target.name}.{os.getpid()}.previous")
        os.replace(target, previous)
        os.replace(source, target)
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
    else:
        os.replace(source, target)


def _new_sibling(folder: Path, stem: str, suffix: str, is_folder: bool) -> Path:
    """Create a new hidden ``.<stem>.<token>.partial<suffix>`` file or folder (mode 0666 / 0777 less the umask)."""
    for _ in range(100):
        candidate = folder / f".{stem}.{secrets.token_hex(4)}.partial{suffix}"
        try:
            if is_folder:
                os.mkdir(candidate, 0o777)
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: could not create a temporary file for {stem}{suffix}")
