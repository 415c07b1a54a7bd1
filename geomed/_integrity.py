"""Completeness checks for files whose readers accept a truncated file silently (or crash on one).

SimpleITK reads a truncated NIfTI without complaint and fills the missing voxels with zeros; vtkPLYReader
crashes the process on a truncated binary PLY and returns part of a truncated ASCII one. These checks compare
what the header announces with what the file holds, before the reader sees the file.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from ._vtk import VTKError


def check_nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI file: SimpleITK reads one without complaint and fills the missing voxels with 0."""
    with open(path, "rb") as stream:
        compressed = stream.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if compressed else open)(path, "rb") as stream:
            header = stream.read(540)
            length = len(header)
            while chunk := stream.read(1 << 20):
                length += len(chunk)
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: could not read the image (broken or truncated gzip stream): {error}") from None
    for order in "<>":
        if len(header) >= 348 and struct.unpack_from(f"{order}i", header)[0] == 348:  # NIfTI-1
            bitpix, dims = struct.unpack_from(f"{order}h", header, 72)[0], struct.unpack_from(f"{order}8h", header, 40)
            offset = struct.unpack_from(f"{order}f", header, 108)[0]
            break
        if len(header) >= 540 and struct.unpack_from(f"{order}i", header)[0] == 540:  # NIfTI-2
            bitpix, dims = struct.unpack_from(f"{order}h", header, 14)[0], struct.unpack_from(f"{order}8q", header, 16)
            offset = struct.unpack_from(f"{order}q", header, 168)[0]
            break
    else:
        return  # not a NIfTI header: SimpleITK reports it
    if not 1 <= dims[0] <= 7:
        return
    expected = int(offset) + int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bitpix // 8
    if length < expected:
        raise ValueError(
            f"{path}: could not read the image (truncated file?): the header announces {expected} bytes, "
            f"the file holds {length}"
        )


_PLY_TYPES = {
    name: np.dtype(code)
    for names, code in (
        (("char", "int8"), "i1"), (("uchar", "uint8"), "u1"), (("short", "int16"), "i2"),
        (("ushort", "uint16"), "u2"), (("int", "int32"), "i4"), (("uint", "uint32"), "u4"),
        (("float", "float32"), "f4"), (("double", "float64"), "f8"),
    )
    for name in names
}


def check_ply_complete(path: Path) -> None:
    """Refuse a truncated PLY file: vtkPLYReader crashes the process on a binary one and silently returns part of
    an ASCII one. Walks the elements the header declares and checks that the file holds them all."""
    data = path.read_bytes()
    end = data.find(b"end_header")
    body = data.find(b"\n", end) + 1 if end >= 0 else 0
    if not data.startswith(b"ply") or body == 0:
        raise VTKError("not a PLY file, or its header is cut short (no 'end_header' line)")
    file_format, elements = None, []  # elements: [(count, [(list count dtype or None, value dtype)])]
    for words in (line.split() for line in data[:end].decode("latin-1").splitlines()):
        if words[:1] == ["format"] and len(words) > 1:
            file_format = words[1]
        elif words[:1] == ["element"] and len(words) > 2:
            elements.append((int(words[2]), []))
        elif words[:1] == ["property"] and elements:
            types = words[2:4] if words[1:2] == ["list"] else [None, words[1]]
            if any(t is not None and t not in _PLY_TYPES for t in types):
                return  # a type this check does not know: leave the file to vtk
            elements[-1][1].append(tuple(_PLY_TYPES.get(t) for t in types))
    if file_format == "ascii":
        tokens, position = data[body:].split(), 0
        for count, properties in elements:
            if all(count_type is None for count_type, _ in properties):
                position += count * len(properties)
                continue
            for _ in range(count):
                for count_type, _ in properties:
                    if count_type is not None and position < len(tokens):
                        position += max(int(float(tokens[position])), 0)
                    position += 1
        needed, held, unit = position, len(tokens), "values"
    elif file_format in ("binary_little_endian", "binary_big_endian"):
        order = "<" if file_format == "binary_little_endian" else ">"
        position = body
        for count, properties in elements:
            position = _ply_binary_rows_end(data, position, count, properties, order)
        needed, held, unit = position, len(data), "bytes"
    else:
        return
    if needed > held:
        raise VTKError(f"the file is truncated: its header announces {needed} {unit}, the file holds {held}")


def _ply_binary_rows_end(data: bytes, position: int, count: int, properties: list, order: str) -> int:
    """Where ``count`` binary rows starting at ``position`` end (past the end of ``data`` if it is truncated)."""
    if position > len(data):  # already past the end: truncated
        return position
    if all(count_type is None for count_type, _ in properties):
        return position + count * sum(value_type.itemsize for _, value_type in properties)
    list_counts = []  # (offset in the row, dtype) of each list's length, assuming rows alike

    def row_end(at: int) -> int:
        start = at
        for count_type, value_type in properties:
            if count_type is None:
                at += value_type.itemsize
                continue
            if at + count_type.itemsize > len(data):
                return len(data) + 1
            if len(list_counts) < sum(ct is not None for ct, _ in properties):
                list_counts.append((at - start, count_type))
            length = int(np.frombuffer(data, count_type.newbyteorder(order), 1, at)[0])
            at += count_type.itemsize + length * value_type.itemsize
        return at

    size = row_end(position) - position if count else 0
    if position + count * size <= len(data):  # fast path: every row like the first (e.g. all triangles)
        rows = np.frombuffer(data, np.uint8, count * size, position).reshape(count, size)
        if all(np.all(rows[:, o : o + t.itemsize] == rows[0, o : o + t.itemsize]) for o, t in list_counts):
            return position + count * size
    for _ in range(count):
        position = row_end(position)
        if position > len(data):
            break
    return position
