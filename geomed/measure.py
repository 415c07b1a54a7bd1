"""Shapes as measures: weighted points in world millimetres, optionally with unit normals and labels.

Every loss, registration and measurement in geomed takes a :class:`Measure`. Meshes, masks and label maps
are only *sources* of measures, converted here once, in world RAS millimetres:

- a surface mesh becomes the sum of its triangles, ``Σ_f area_f δ(centroid_f)``, with unit normals (mm²);
- a mask becomes the sum of its voxels, ``Σ_v occupancy_v · |voxel| δ(centre_v)``, centres mapped through the
  full affine (origin, spacing and direction) (mm³).
"""

from __future__ import annotations

import warnings

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ._validation import require_finite
from .image import Image
from .mesh import Mesh

_Array = np.ndarray | torch.Tensor
_FLOAT32_EXACT_MM = 8192.0  # float32 steps are at most 2⁻¹⁰ mm ≈ 1 µm up to here


def _as_float_tensor(value: _Array, name: str, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be a tensor or array of numbers: {error}") from None
    if not (tensor.is_floating_point() or tensor.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16,
                                                             torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    if dtype is None:
        keep = isinstance(value, torch.Tensor) and tensor.is_floating_point()
        dtype = tensor.dtype if keep else torch.get_default_dtype()
    return tensor.to(device=device, dtype=dtype)


def _coordinate_dtype(magnitude: float, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype for coordinates reaching ``magnitude`` mm from the origin: ``dtype`` when given; else torch's
    default, unless that is float32 and float32 cannot resolve 1 µm there (beyond 8192 mm): then float64, with a
    warning that names the magnitude."""
    if dtype is not None:
        return dtype
    default = torch.get_default_dtype()
    if default == torch.float32 and magnitude > _FLOAT32_EXACT_MM:
        warnings.warn(f"points reach {magnitude:.3g} mm from the origin, where float32 resolves only "
                      f"{magnitude * 2.0**-23:.2g} mm: the measure is kept in float64 (pass dtype= to choose)",
                      RuntimeWarning, stacklevel=3)
        return torch.float64
    return default


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(tensor.detach())
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/Inf value(s), the first at index {first}")


@dataclass(frozen=True, eq=False)
class VoxelGrid:
    """The regular voxel grid a mask measure lives on, and the voxel of each of its points.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the grid, (I, J, K), or (I, J) for a 2-D slice.
    affine : array (D + 1, D + 1)
        Voxel index → world mm (origin, direction and spacing), as in :class:`~geomed.Image`.
    index : Tensor (N,) of int64
        Flat (C-order) voxel index of every point.
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    index: torch.Tensor

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each axis (mm)."""
        return np.linalg.norm(self.affine[:-1, :-1], axis=0)

    def same_geometry(self, other: VoxelGrid) -> bool:
        """Whether both grids are the same voxels in world space (shape, and affine to 1e-6 mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, rtol=0, atol=1e-6))

    def is_orthogonal(self) -> bool:
        """Whether the voxel axes are orthogonal (direction a rotation, as in every ITK image), which lets the
        Gaussian kernel factorise over them; a sheared NIfTI affine does not."""
        block = self.affine[:-1, :-1]
        gram = block.T @ block
        return bool(np.allclose(gram, np.diag(np.diag(gram)), rtol=0, atol=1e-6 * float(gram.diagonal().max())))

    def to(self, device: torch.device | str | None) -> VoxelGrid:
        return VoxelGrid(self.shape, self.affine, self.index.to(device=device))


@dataclass(frozen=True, eq=False)
class Measure:
    """A discrete measure ``Σ_i w_i δ(x_i)`` in world RAS millimetres.

    Parameters
    ----------
    points : Tensor (..., N, D)
        Positions in mm. Leading dimensions, if any, are a batch of equal-size measures.
    weights : Tensor (..., N)
        Non-negative masses (mm² for surfaces, mm³ for volumes, or unitless), not all zero in any batch item.
    normals : Tensor (..., N, D), optional
        Unit normals (outward for closed surfaces).
    labels : Tensor (..., N) of int64, optional
        Integer label of each point (e.g. the structure it belongs to).
    grid : VoxelGrid, optional
        For a measure built from a mask (one, unbatched): the voxel grid its points sit on and each point's voxel.
        Two measures on one grid are solved by the separable grid Sinkhorn (:mod:`geomed.ot.grid`).

    Notes
    -----
    Build measures with the constructors :meth:`from_points`, :meth:`from_mesh`, :meth:`from_mask` and
    :meth:`from_labels`; they validate their input. A ``Measure`` is immutable-minded: its methods return new
    measures and never modify tensors in place, so gradients flow through ``points`` and ``weights``.
    """

    points: torch.Tensor
    weights: torch.Tensor
    normals: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    grid: VoxelGrid | None = None

    def __post_init__(self) -> None:
        points, weights, normals, labels = self.points, self.weights, self.normals, self.labels
        if not isinstance(points, torch.Tensor) or not isinstance(weights, torch.Tensor):
            raise TypeError("points and weights must be torch tensors; use Measure.from_points for arrays")
        if points.ndim < 2 or points.shape[-1] < 1:
            raise ValueError(f"points must have shape (..., N, D), got {tuple(points.shape)}")
        if not points.is_floating_point():
            raise TypeError(f"points must be a floating tensor, got dtype {points.dtype}")
        if weights.shape != points.shape[:-1]:
            raise ValueError(
                f"weights must have shape {tuple(points.shape[:-1])} (one per point), got {tuple(weights.shape)}"
            )
        if weights.dtype != points.dtype or weights.device != points.device:
            raise TypeError(
                f"weights ({weights.dtype}, {weights.device}) must match points ({points.dtype}, {points.device})"
            )
        if points.shape[-2] == 0:
            raise ValueError("points is empty: a measure needs at least one point")
        _check_finite(points, "points")
        _check_finite(weights, "weights")
        if bool((weights.detach() < 0).any()):
            raise ValueError(f"weights must be non-negative, found minimum {float(weights.detach().min())}")
        totals = weights.detach().sum(-1)
        if not bool(torch.isfinite(totals).all()):
            exact = float(weights.detach().double().sum(-1).max())
            raise ValueError(f"weights sum to {exact:.3g}, beyond the range of {weights.dtype}: rescale them (e.g. "
                             "normalise to total 1) or use float64")
        if bool((totals <= 0).any()):
            raise ValueError("weights sum to zero: a measure needs a positive total mass")
        if normals is not None:
            if not isinstance(normals, torch.Tensor) or normals.shape != points.shape:
                shape = tuple(normals.shape) if isinstance(normals, torch.Tensor) else type(normals).__name__
                raise ValueError(f"normals must have the shape of points {tuple(points.shape)}, got {shape}")
            if normals.dtype != points.dtype or normals.device != points.device:
                raise TypeError("normals must have the dtype and device of points")
            _check_finite(normals, "normals")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != weights.shape:
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels must have the shape of weights {tuple(weights.shape)}, got {shape}")
            if labels.dtype != torch.int64 or labels.device != points.device:
                raise TypeError("labels must be an int64 tensor on the device of points")
        if self.grid is not None:
            if not isinstance(self.grid, VoxelGrid):
                raise TypeError(f"grid must be a geomed.VoxelGrid, got {type(self.grid).__name__}")
            if points.ndim != 2 or self.grid.index.shape != (points.shape[0],) or len(self.grid.shape) != points.shape[1]:
                raise ValueError(f"grid must index every point of one measure (N={points.shape[-2]}) on a "
                                 f"{points.shape[-1]}-D grid, got {len(self.grid.index)} indices on a "
                                 f"{len(self.grid.shape)}-D grid")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_points(
        cls,
        points: _Array,
        weights: _Array | None = None,
        normals: _Array | None = None,
        labels: _Array | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Measure:
        """A measure from point coordinates in mm.

        Parameters
        ----------
        points : array or Tensor (..., N, D)
            Coordinates in mm. Tensors keep their autograd graph.
        weights : array or Tensor (..., N), optional
            Masses; default 1 per point.
        normals : array or Tensor (..., N, D), optional
            Normal directions; normalised to unit length here (a zero normal is an error).
        labels : array or Tensor (..., N) of int, optional
        dtype, device
            Default: the dtype and device of a floating ``points`` tensor; torch's default dtype (float32 unless
            changed) for arrays.
        """
        if dtype is None and not (isinstance(points, torch.Tensor) and points.is_floating_point()):
            exact = _as_float_tensor(points, "points", torch.float64, device)  # arrays: converted once, in float64
            finite = exact[torch.isfinite(exact)].abs()
            points_t = exact.to(_coordinate_dtype(float(finite.max()) if finite.numel() else 0.0, None))
        else:
            points_t = _as_float_tensor(points, "points", dtype, device)
        dtype, device = points_t.dtype, points_t.device
        if points_t.ndim < 2:
            raise ValueError(f"points must have shape (..., N, D), got {tuple(points_t.shape)}")
        weights_t = (
            torch.ones(points_t.shape[:-1], dtype=dtype, device=device)
            if weights is None
            else _as_float_tensor(weights, "weights", dtype, device)
        )
        normals_t = None
        if normals is not None:
            normals_t = _as_float_tensor(normals, "normals", dtype, device)
            if normals_t.shape != points_t.shape:
                raise ValueError(
                    f"normals must have the shape of points {tuple(points_t.shape)}, got {tuple(normals_t.shape)}"
                )
            _check_finite(normals_t, "normals")
            length = normals_t.norm(dim=-1, keepdim=True)
            if bool((length.detach() == 0).any()):
                raise ValueError("normals contains zero vectors, which have no direction")
            normals_t = normals_t / length
        labels_t = None
        if labels is not None:
            labels_t = torch.as_tensor(labels, device=device)
            if labels_t.is_floating_point() or labels_t.is_complex():
                raise TypeError(f"labels must be integers, got dtype {labels_t.dtype}")
            labels_t = labels_t.to(torch.int64)
        return cls(points_t, weights_t, normals_t, labels_t)

    @classmethod
    def from_mesh(
        cls,
        mesh: Mesh,
        *,
        lumped: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Measure:
        """The surface measure of a triangle mesh, in mm².

        Parameters
        ----------
        mesh : Mesh
        lumped : bool
            ``False`` (default): one Dirac per triangle at its centroid, weight = its area, normal = its unit
            normal. ``True``: one Dirac per vertex, weight = a third of the area of the triangles around it,
            normal = the area-weighted mean of their normals (unit). Both have total mass = mesh area.
            Zero-area triangles (and, when lumped, vertices used by none) carry no mass and are left out.
        """
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a geomed.Mesh, got {type(mesh).__name__}")
        if mesh.n_triangles == 0:
            raise ValueError("mesh has no triangles: its surface measure is empty")
        areas = mesh.triangle_areas()
        normals = mesh.triangle_normals()
        if lumped:
            vertex_weights, vertex_normals = mesh.vertex_areas(), mesh.vertex_normals()
            keep = (vertex_weights > 0) & (np.linalg.norm(vertex_normals, axis=1) > 0)
            points, weights, unit = mesh.vertices[keep], vertex_weights[keep], vertex_normals[keep]
        else:
            keep = areas > 0
            points, weights, unit = mesh.triangle_centroids()[keep], areas[keep], normals[keep]
        if not keep.any():
            raise ValueError("mesh has zero area (all triangles are degenerate)")
        dtype = _coordinate_dtype(float(np.abs(mesh.vertices).max()), dtype)
        return cls(
            torch.as_tensor(points, dtype=dtype, device=device),
            torch.as_tensor(weights, dtype=dtype, device=device),
            torch.as_tensor(unit, dtype=dtype, device=device),
        )

    @classmethod
    def from_triangles(cls, vertices: torch.Tensor, triangles: _Array) -> Measure:
        """The surface measure of moving vertices, differentiable w.r.t. them (for registration and flows).

        One Dirac per triangle at its centroid, weight = its area (mm²), normal = its unit normal — the same
        measure as :meth:`from_mesh`, but computed in torch so that gradients reach ``vertices``.

        Parameters
        ----------
        vertices : Tensor (V, D), D = 3
            Vertex positions in mm, e.g. ``torch.tensor(mesh.vertices, requires_grad=True)``.
        triangles : array or Tensor (F, 3) of int
            Vertex indices per triangle (``mesh.triangles``).

        Raises
        ------
        ValueError
            For a triangle of zero area (its normal is undefined and its gradient infinite): the message gives how
            many and the first ones. Clean the mesh first, or keep the flow from collapsing triangles.
        """
        if not isinstance(vertices, torch.Tensor) or not vertices.is_floating_point():
            raise TypeError("vertices must be a floating torch tensor (V, 3); use Measure.from_mesh for a Mesh")
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise ValueError(f"vertices must have shape (V, 3), got {tuple(vertices.shape)}")
        faces = triangles if isinstance(triangles, torch.Tensor) else torch.tensor(np.array(triangles))
        faces = faces.to(vertices.device)
        if faces.is_floating_point() or faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
            raise ValueError(f"triangles must be integer indices of shape (F, 3), F > 0, got {tuple(faces.shape)} "
                             f"of {faces.dtype}")
        faces = faces.long()
        if int(faces.min()) < 0 or int(faces.max()) >= len(vertices):
            raise ValueError(f"triangles index vertices out of range [0, {len(vertices)}): found "
                             f"{int(faces.min())}..{int(faces.max())}")
        corners = vertices[faces]
        cross = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        doubled = cross.norm(dim=1)
        degenerate = torch.nonzero(doubled.detach() == 0).squeeze(1)
        if len(degenerate):
            raise ValueError(f"{len(degenerate)} triangle(s) have zero area, e.g. triangles "
                             f"{degenerate[:5].tolist()}: their normals are undefined")
        return cls(corners.mean(1), doubled / 2, cross / doubled.unsqueeze(1))

    @classmethod
    def from_mask(
        cls,
        mask: Image | _Array,
        affine: np.ndarray | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Measure:
        """The volume measure of a binary or soft mask, in mm³.

        One Dirac per voxel with positive occupancy, at the voxel centre mapped through the full affine
        (origin, spacing *and* direction), with weight ``occupancy × voxel volume``.

        Parameters
        ----------
        mask : Image, or array / Tensor (I, J, K) or (I, J)
            Occupancy in [0, 1]: booleans, 0/1 integers, or probabilities (a soft segmentation). A tensor
            keeps its autograd graph: the weights are differentiable w.r.t. the occupancies. A 2-D slice gives a
            2-D measure (points (N, 2) in mm, weights in mm²).
        affine : array (4, 4), or (3, 3) for a 2-D mask, optional
            Voxel index → world RAS mm. Required for a bare array; must be omitted for an ``Image``.
        dtype, device
            Default: torch's default dtype; the device of a tensor mask, else CPU.
        """
        values, matrix = _mask_and_affine(mask, affine)
        if isinstance(values, torch.Tensor):
            detached = values.detach()
            if detached.is_floating_point():
                _check_finite(detached, "mask")
            _check_occupancy(float(detached.min()), float(detached.max()), detached.is_floating_point())
            index = torch.nonzero(detached > 0).cpu().numpy()
            occupancy = values[tuple(torch.as_tensor(index.T, device=values.device))]
            device = device if device is not None else values.device
            floating = values.is_floating_point()
        else:
            floating = np.issubdtype(values.dtype, np.floating)
            require_finite(values, "mask")
            _check_occupancy(float(values.min()), float(values.max()), floating)
            index = np.argwhere(values > 0)
            occupancy = torch.as_tensor(values[tuple(index.T)].astype(np.float64))
        if len(index) == 0:
            raise ValueError("mask is empty: no voxel has positive occupancy")
        dim = values.ndim
        if dtype is None and floating and isinstance(values, torch.Tensor):
            dtype = values.dtype
        dtype = _coordinate_dtype(_grid_magnitude(values.shape, matrix), dtype)
        weights = occupancy.to(dtype=dtype, device=device) * float(abs(np.linalg.det(matrix[:dim, :dim])))
        grid = _voxel_grid(tuple(values.shape), matrix, index, weights.device)
        return cls(_index_to_world(index, matrix, dtype, weights.device), weights, grid=grid)

    @classmethod
    def from_labels(
        cls,
        image: Image,
        labels: Iterable[int | str] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> dict[Hashable, Measure]:
        """One volume measure (mm³) per label of a label map.

        Parameters
        ----------
        image : Image
            Integer label map (0 = background).
        labels : iterable of int or str, optional
            Label ids, or names from ``image.label_names``. Default: every non-zero label present.
        dtype, device
            As in :meth:`from_mask`.

        Returns
        -------
        dict
            Keyed by the requested ids or names, in the requested order; each measure carries its label id in
            ``labels``.
        """
        if not isinstance(image, Image):
            raise TypeError(f"image must be a geomed.Image, got {type(image).__name__}")
        if image.array.ndim != 3:
            raise ValueError(f"image must be a scalar label map (I, J, K), got shape {tuple(image.array.shape)}")
        array = image.array
        if not np.issubdtype(array.dtype, np.integer):
            if array.dtype == bool or not np.all(np.equal(np.mod(array, 1), 0)):
                raise ValueError(f"image must be an integer label map, got dtype {array.dtype} with non-integer values")
        flat_index = np.flatnonzero(array)
        values = array.reshape(-1)[flat_index].astype(np.int64)
        order = np.argsort(values, kind="stable")
        present, starts = np.unique(values[order], return_index=True)
        requested = list(present) if labels is None else list(labels)
        if labels is not None and not requested:
            raise ValueError("labels is empty: ask for at least one label id or name")
        ids = [_resolve_label(image, label, present) for label in requested]
        bounds = dict(zip(present.tolist(), zip(starts.tolist(), [*starts[1:].tolist(), len(values)])))
        dtype = _coordinate_dtype(_grid_magnitude(array.shape, image.affine), dtype)
        voxel_volume = image.voxel_volume
        measures: dict[Hashable, Measure] = {}
        for key, label in zip(requested, ids):
            start, stop = bounds[label]
            index = np.stack(np.unravel_index(flat_index[order[start:stop]], array.shape), axis=1)
            points = _index_to_world(index, image.affine, dtype, device)
            weights = torch.full((len(index),), voxel_volume, dtype=dtype, device=points.device)
            label_ids = torch.full((len(index),), label, dtype=torch.int64, device=points.device)
            grid = _voxel_grid(image.shape, image.affine, index, points.device)
            measures[int(key) if isinstance(key, (int, np.integer)) else key] = cls(points, weights, None, label_ids,
                                                                                    grid)
        return measures

    # ------------------------------------------------------------------ properties and moves
    @property
    def n_points(self) -> int:
        """Number of points N per measure."""
        return self.points.shape[-2]

    @property
    def dim(self) -> int:
        """Ambient dimension D."""
        return self.points.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        """Leading batch dimensions (empty for a single measure)."""
        return self.points.shape[:-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.points.dtype

    @property
    def device(self) -> torch.device:
        return self.points.device

    @property
    def total_mass(self) -> torch.Tensor:
        """Sum of the weights, shape ``batch_shape`` (a 0-d tensor for a single measure)."""
        return self.weights.sum(-1)

    def normalized(self) -> Measure:
        """The same points with weights divided by the total mass (a probability measure)."""
        return Measure(self.points, self.weights / self.total_mass.unsqueeze(-1), self.normals, self.labels, self.grid)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Measure:
        """Move to a device and/or floating dtype; labels stay int64."""
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        labels = None if self.labels is None else self.labels.to(device=device)
        grid = None if self.grid is None else self.grid.to(device)
        return Measure(move(self.points), move(self.weights), move(self.normals), labels, grid)

    def __repr__(self) -> str:
        extras = "".join(
            f", {name}=True" for name in ("normals", "labels") if getattr(self, name) is not None
        )
        batch = f"batch_shape={tuple(self.batch_shape)}, " if self.batch_shape else ""
        return (
            f"Measure({batch}n_points={self.n_points}, dim={self.dim}, dtype={self.dtype}, "
            f"device={self.device}{extras})"
        )


def _mask_and_affine(mask: Image | _Array, affine: np.ndarray | None) -> tuple[_Array, np.ndarray]:
    if isinstance(mask, Image):
        if affine is not None:
            raise TypeError("affine must be omitted when mask is an Image (the image carries its own affine)")
        if mask.array.ndim != 3:
            raise ValueError(f"mask must be a scalar image (I, J, K), got shape {tuple(mask.array.shape)}")
        return mask.array, mask.affine
    if affine is None:
        raise TypeError("affine is required when mask is a bare array or tensor (voxel index → world RAS mm)")
    values = mask if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if values.ndim == 3:
        return values, Image(np.zeros((1, 1, 1), dtype=np.uint8), affine).affine
    if values.ndim != 2:
        raise ValueError(f"mask must have shape (I, J, K), or (I, J) for a 2-D slice, got {tuple(values.shape)}")
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"affine of a 2-D mask (I, J) must have shape (3, 3) (pixel index → mm), got {matrix.shape}")
    require_finite(matrix, "affine")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0]) or abs(np.linalg.det(matrix[:2, :2])) == 0:
        raise ValueError("affine of a 2-D mask must be invertible with last row [0, 0, 1]")
    return values, matrix


def _check_occupancy(low: float, high: float, floating: bool) -> None:
    if low < 0 or high > 1:
        expected = "occupancies in [0, 1]" if floating else "binary (0/1) values"
        raise ValueError(
            f"mask must hold {expected}, got values in [{low:g}, {high:g}]; for a label map use Measure.from_labels"
        )


def _voxel_grid(shape: tuple[int, ...], affine: np.ndarray, index: np.ndarray, device) -> VoxelGrid:
    flat = np.ravel_multi_index(tuple(np.asarray(index).T), shape) if len(index) else np.zeros(0, dtype=np.int64)
    return VoxelGrid(shape, affine, torch.as_tensor(flat, dtype=torch.int64, device=device))


def _grid_magnitude(shape: tuple[int, ...], affine: np.ndarray) -> float:
    """Largest |world coordinate| of a grid's corner voxels (mm)."""
    dim = len(shape)
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in shape], indexing="ij")).reshape(dim, -1).T
    return float(np.abs(corners @ affine[:dim, :dim].T + affine[:dim, dim]).max())


def _index_to_world(index: np.ndarray, affine: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    dim = index.shape[1]
    world = index.astype(np.float64) @ affine[:dim, :dim].T + affine[:dim, dim]
    return torch.as_tensor(world, dtype=dtype, device=device)


def _resolve_label(image: Image, label: int | str, present: np.ndarray) -> int:
    label_id = image.label_id(label)
    if label_id == 0:
        raise ValueError("label 0 is the background and has no measure")
    if label_id not in present:
        raise ValueError(f"label {label!r} (id {label_id}) is absent from the image; present labels: {present.tolist()}")
    return label_id
