"""Images on regular voxel grids, placed in world RAS millimetres by a 4×4 affine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from ._validation import frozen_array, require_finite


@dataclass(frozen=True, eq=False)
class Image:
    """A 3-D image (scalar or multi-component) with its voxel-to-world map.

    Parameters
    ----------
    array : array (I, J, K) or (I, J, K, C)
        Voxel values indexed ``[i, j, k]`` (the NIfTI / nibabel / MONAI order, not SimpleITK's ``[k, j, i]``).
    affine : array (4, 4)
        Maps a voxel index ``(i, j, k, 1)`` to world **RAS** millimetres. Its 3×3 block is
        ``direction @ diag(spacing)``; oblique directions and anisotropic spacing are honoured everywhere.
    label_names : mapping of int to str, optional
        Names of the labels of a label map (e.g. ``{40: "left_hippocampus"}``).

    Notes
    -----
    An ``Image`` is immutable-minded: its arrays are read-only copies and every operation returns a new image.
    """

    array: np.ndarray
    affine: np.ndarray
    label_names: Mapping[int, str] | None = None

    def __post_init__(self) -> None:
        array = frozen_array(self.array, "array")
        if array.ndim not in (3, 4):
            raise ValueError(f"array must have shape (I, J, K) or (I, J, K, C), got {tuple(array.shape)}")
        if array.dtype == object:
            raise TypeError("array must hold numbers, got dtype object")
        affine = frozen_array(self.affine, "affine", np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must have shape (4, 4), got {tuple(affine.shape)}")
        require_finite(affine, "affine")
        if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
            raise ValueError(f"affine must have last row [0, 0, 0, 1], got {affine[3].tolist()}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("affine must be invertible (a voxel with zero volume), got a singular 3×3 block")
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)
        if self.label_names is not None:
            names = {int(k): str(v) for k, v in self.label_names.items()}
            object.__setattr__(self, "label_names", MappingProxyType(names))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (I, J, K)."""
        return tuple(self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm, shape (3,)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines of the i, j, k axes in RAS (columns), shape (3, 3)."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """World RAS position of the centre of voxel (0, 0, 0), mm, shape (3,)."""
        return self.affine[:3, 3].copy()

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm³."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Map voxel indices (N, 3) (integer or continuous) to world RAS mm (N, 3)."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map world RAS mm (N, 3) to continuous voxel indices (N, 3)."""
        points = np.asarray(points, dtype=np.float64)
        return np.linalg.solve(self.affine[:3, :3], (points - self.affine[:3, 3]).T).T

    def label_id(self, label: int | str) -> int:
        """The integer id of a label given by id or by a name from :attr:`label_names`.

        Raises ``ValueError`` for an unknown name, listing the known ones, and ``TypeError`` for other types.
        """
        if isinstance(label, str):
            ids = [key for key, name in (self.label_names or {}).items() if name == label]
            if not ids:
                known = ", ".join(sorted(self.label_names.values())) if self.label_names else "none (no label_names)"
                raise ValueError(f"unknown label name {label!r}; known names: {known}")
            return ids[0]
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            return int(label)
        raise TypeError(f"a label must be an int id or a str name, got {label!r}")

    def with_array(self, array: np.ndarray) -> Image:
        """Same geometry and label names, new voxel values of the same spatial shape."""
        array = np.asarray(array)
        if array.shape[:3] != self.shape:
            raise ValueError(f"array must have spatial shape {self.shape}, got {tuple(array.shape)}")
        return Image(array, self.affine, self.label_names)

    def crop(self, lower: tuple[int, int, int], upper: tuple[int, int, int]) -> Image:
        """The sub-image ``array[lower[0]:upper[0], ...]`` with its affine moved so that world positions stay."""
        lower_index = np.asarray(lower, dtype=int)
        upper_index = np.asarray(upper, dtype=int)
        if lower_index.shape != (3,) or upper_index.shape != (3,):
            raise ValueError("lower and upper must each hold three voxel indices (i, j, k)")
        if np.any(lower_index < 0) or np.any(upper_index > self.shape) or np.any(upper_index <= lower_index):
            raise ValueError(f"crop box {lower}..{upper} must lie inside the image shape {self.shape} and be non-empty")
        slices = tuple(slice(lo, hi) for lo, hi in zip(lower_index, upper_index))
        affine = self.affine.copy()
        affine[:3, 3] = self.index_to_world(lower_index[None])[0]
        return Image(self.array[slices], affine, self.label_names)

    def __repr__(self) -> str:
        return (
            f"Image(shape={tuple(self.array.shape)}, dtype={self.array.dtype}, "
            f"spacing={np.round(self.spacing, 4).tolist()} mm, origin={np.round(self.origin, 2).tolist()} mm RAS)"
        )
