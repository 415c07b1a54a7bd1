"""Argument checks shared by the data types: every message names the argument and what was expected."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import torch


def frozen_array(value: object, name: str, dtype: np.dtype | type | None = None) -> np.ndarray:
    """Return a read-only copy of ``value`` as a numpy array, so that a data type never aliases user memory."""
    try:
        array = np.array(value, dtype=dtype, copy=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be array-like{f' of {np.dtype(dtype).name}' if dtype else ''}: {error}") from None
    array.setflags(write=False)
    return array


def require_finite(array: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` if a floating array holds NaN or Inf, saying how many and where the first one is."""
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} contains {int(bad.sum())} NaN/Inf value(s), the first at index {first}")


def frozen_arrays(arrays: Mapping[str, object] | None, name: str, length: int, what: str) -> Mapping[str, np.ndarray]:
    """Freeze a mapping of per-element arrays, checking that each has ``length`` rows (one per vertex or cell)."""
    frozen: dict[str, np.ndarray] = {}
    for key, value in (arrays or {}).items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} keys must be non-empty strings, got {key!r}")
        array = frozen_array(value, f"{name}[{key!r}]")
        if array.ndim == 0 or array.shape[0] != length:
            raise ValueError(
                f"{name}[{key!r}] must have one row per {what} ({length}), got shape {tuple(array.shape)}"
            )
        frozen[key] = array
    return MappingProxyType(frozen)


def dense_grid_pair(a: object, b: object, spacing: object) -> tuple[float, ...]:
    """Check two dense weight tensors (B, C, *spatial) on one 2-D or 3-D grid; return the spacing (mm per axis,
    default 1)."""
    for name, weights in (("a", a), ("b", b)):
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (B, C, *spatial), got {type(weights).__name__}")
        if weights.dim() not in (4, 5):
            raise ValueError(f"{name} must have shape (B, C, H, W) or (B, C, H, W, D), got {tuple(weights.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must lie on one grid with the same (B, C), got {tuple(a.shape)} and {tuple(b.shape)}")
    dim = a.dim() - 2
    spacing = (1.0,) * dim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != dim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {dim} positive numbers of mm, got {spacing!r}")
    return spacing
