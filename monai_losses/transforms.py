"""MONAI transforms that turn files, masks and meshes into geomed shapes, in world RAS millimetres.

A collection of array transforms and their dictionary-based wrappers (class names ending in ``d``, with ``keys``
and ``allow_missing_keys`` as in :py:class:`monai.transforms.MapTransform`):

- :class:`LoadMesh` / :class:`LoadMeshd`: a mesh file (.vtk .vtp .stl .ply .obj .gii) → :class:`geomed.Mesh`;
- :class:`MaskToMeasure` / :class:`MaskToMeasured`: a mask or label map → volume :class:`geomed.Measure` (mm³);
- :class:`MaskToMesh` / :class:`MaskToMeshd`: a mask or label map → closed surface :class:`geomed.Mesh`;
- :class:`MeshToMeasure` / :class:`MeshToMeasured`: a :class:`geomed.Mesh` → surface :class:`geomed.Measure` (mm²).

Images arrive as MONAI produces them: channel-first ``(1, H, W[, D])`` :class:`monai.data.MetaTensor` whose
``affine`` maps a voxel index to world millimetres. MONAI's readers (``LoadImage`` with the NiBabel or ITK reader)
give RAS affines, geomed's frame too; an affine recorded as LPS (``meta["space"] == "LPS"``, e.g. from
``ITKReader(affine_lps_to_ras=False)``) is converted to RAS.

A geomed ``Measure`` or ``Mesh`` cannot carry MONAI metadata, so the dictionary transforms keep it in the data
dictionary under ``meta_keys`` or ``f"{key}_{meta_key_postfix}"`` (default ``"image_meta_dict"`` for key
``"image"``), as ``LoadImaged(image_only=False)`` does: the source MetaTensor's metadata (``affine``,
``filename_or_obj``, ``spatial_shape``, ...) for the mask transforms, ``filename_or_obj`` and ``space`` for
:class:`LoadMeshd`. The transforms replace ``data[key]``; copy it first (``CopyItemsd``) to keep the source.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms.transform import MapTransform, Transform
from monai.utils import ImageMetaKey, TransformBackends, convert_to_numpy, ensure_tuple, ensure_tuple_rep
from monai.utils.enums import MetaKeys, PostFix, SpaceKeys

from geomed import Image, Measure, Mesh
from geomed.io import read_mesh
from geomed.surface import METHODS, mask_to_mesh

from .spacing import plane_affine

__all__ = [
    "LoadMesh", "LoadMeshd", "LoadMeshD", "LoadMeshDict",
    "MaskToMeasure", "MaskToMeasured", "MaskToMeasureD", "MaskToMeasureDict",
    "MaskToMesh", "MaskToMeshd", "MaskToMeshD", "MaskToMeshDict",
    "MeshToMeasure", "MeshToMeasured", "MeshToMeasureD", "MeshToMeasureDict",
]

DEFAULT_POST_FIX = PostFix.meta()
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SPACES = ("RAS", "LPS")


# ---------------------------------------------------------------------------------------------------- helpers
def _ras_affine(affine: NdarrayOrTensor, space: str | None) -> np.ndarray:
    """A MONAI affine as a float64 array in RAS: LPS affines (``space == "LPS"``) are flipped in x and y."""
    matrix = convert_to_numpy(affine, dtype=np.float64)
    if str(space) == SpaceKeys.LPS:
        if matrix.shape != (4, 4):
            raise ValueError(f"an LPS affine must have shape (4, 4), got {matrix.shape}")
        matrix = _LPS_TO_RAS @ matrix
    return matrix


def _channel_and_affine(img: Any, affine: NdarrayOrTensor | None) -> tuple[NdarrayOrTensor, np.ndarray]:
    """Split a channel-first one-channel mask into its spatial values and its voxel → RAS mm affine.

    Returns the values ``(H, W[, D])`` (a plain tensor for tensor input, keeping its autograd graph; an array
    otherwise) and the affine, ``(3, 3)`` for 2-D and ``(4, 4)`` for 3-D. The affine is ``affine`` if given (RAS),
    else the MetaTensor's (converted from LPS if recorded so), else the identity (1 mm voxels at the origin).
    """
    if isinstance(img, MetaTensor):
        values: NdarrayOrTensor = img.as_tensor()
        if affine is None:
            affine = _ras_affine(img.affine, img.meta.get(MetaKeys.SPACE))
    elif isinstance(img, (torch.Tensor, np.ndarray)):
        values = img
    else:
        raise TypeError(f"img must be a MetaTensor, tensor or numpy array, got {type(img).__name__}")
    if values.ndim not in (3, 4) or values.shape[0] != 1:
        raise ValueError(
            f"img must be channel-first with one channel, (1, H, W) or (1, H, W, D), got shape {tuple(values.shape)}; "
            "select one channel (or argmax a multi-channel prediction) first"
        )
    spatial_dims = values.ndim - 1
    if affine is None:
        return values[0], np.eye(spatial_dims + 1)
    matrix = convert_to_numpy(affine, dtype=np.float64)
    if spatial_dims == 2 and matrix.shape == (4, 4):
        matrix = plane_affine(matrix)  # the slice in its own plane (monai_losses.spacing: one rule for every class)
    if matrix.shape != (spatial_dims + 1,) * 2:
        raise ValueError(
            f"affine of a {spatial_dims}-D mask must have shape {(spatial_dims + 1,) * 2}, got {matrix.shape}"
        )
    return values[0], matrix


def _value_range(values: NdarrayOrTensor) -> tuple[float, float, bool]:
    """Minimum, maximum, and whether every value is an integer, of a non-empty finite array or tensor."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.is_floating_point():
            if not bool(torch.isfinite(values).all()):
                raise ValueError("img contains NaN/Inf values")
            integral = bool((values == values.round()).all())
        else:
            integral = True
        return float(values.min()), float(values.max()), integral
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise ValueError("img contains NaN/Inf values")
        integral = bool(np.all(values == np.round(values)))
    else:
        integral = True
    return float(values.min()), float(values.max()), integral


def _region(values: NdarrayOrTensor, label: int | None) -> NdarrayOrTensor:
    """The occupancy to measure or mesh: ``values`` itself for a binary or soft mask (in [0, 1]), the non-zero
    voxels of a label map when ``label`` is None, or the voxels equal to ``label``."""
    if (values.numel() if isinstance(values, torch.Tensor) else values.size) == 0:
        raise ValueError("img has no voxels")
    low, high, integral = _value_range(values)
    label_map = integral and low >= 0
    if label is None:
        if low >= 0 and high <= 1:
            return values
        if label_map:
            return values != 0
        raise ValueError(
            f"img must be a mask (values in [0, 1]) or a label map (non-negative integers), got values in "
            f"[{low:g}, {high:g}]"
        )
    if not label_map:
        raise ValueError(
            f"label={label} needs a label map (non-negative integers), got values in [{low:g}, {high:g}]"
            + ("" if integral else " that are not all integers")
        )
    selected = values == label
    if not bool(selected.any()):
        nonzero = values[values != 0]
        present = torch.unique(nonzero) if isinstance(nonzero, torch.Tensor) else np.unique(nonzero)
        raise ValueError(f"label {label} is absent from img; present labels: {[int(v) for v in present.tolist()]}")
    return selected


def _check_label(label: int | None) -> int | None:
    if label is None:
        return None
    if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
        raise TypeError(f"label must be an integer label id or None, got {label!r}")
    if label <= 0:
        raise ValueError(f"label must be a positive integer id (0 is the background) or None, got {label}")
    return int(label)


class _MaskMapTransform(MapTransform):
    """Dictionary wrapper of a mask transform, keeping the source's metadata as ``LoadImaged(image_only=False)``.

    A MetaTensor's metadata is stored under the meta key (replacing any stale copy there). A plain tensor or array
    takes its affine from ``data[meta_key]["affine"]`` when that exists (MONAI's meta-dict convention, e.g. under
    ``set_track_meta(False)``), else the identity; its meta dict is left as it is.
    """

    def __init__(
        self,
        converter: MaskToMeasure | MaskToMesh,
        keys: KeysCollection,
        meta_keys: KeysCollection | None,
        meta_key_postfix: str,
        allow_missing_keys: bool,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = converter
        self.meta_keys, self.meta_key_postfix = _meta_keys(self.keys, meta_keys, meta_key_postfix)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            meta_key = meta_key or f"{key}_{meta_key_postfix}"
            img = d[key]
            if isinstance(img, MetaTensor):
                d[key] = self.converter(img)
                d[meta_key] = dict(img.meta)
                continue
            meta = d.get(meta_key)
            has_affine = isinstance(meta, Mapping) and MetaKeys.AFFINE in meta
            affine = _ras_affine(meta[MetaKeys.AFFINE], meta.get(MetaKeys.SPACE)) if has_affine else None
            d[key] = self.converter(img, affine)
        return d


def _meta_keys(
    keys: tuple[Hashable, ...], meta_keys: KeysCollection | None, meta_key_postfix: str
) -> tuple[tuple, tuple[str, ...]]:
    """``meta_keys`` and ``meta_key_postfix`` per key, checked as :py:class:`monai.transforms.LoadImaged` does."""
    if not isinstance(meta_key_postfix, str):
        raise TypeError(f"meta_key_postfix must be a str but is {type(meta_key_postfix).__name__}.")
    per_key = ensure_tuple_rep(None, len(keys)) if meta_keys is None else ensure_tuple(meta_keys)
    if len(keys) != len(per_key):
        raise ValueError(f"meta_keys should have the same length as keys, got {len(keys)} and {len(per_key)}.")
    return per_key, ensure_tuple_rep(meta_key_postfix, len(keys))


# ---------------------------------------------------------------------------------------------------- meshes
class LoadMesh(Transform):
    """Load a triangle surface mesh file into a :class:`geomed.Mesh` in world RAS millimetres.

    Supports what :func:`geomed.read_mesh` reads: .vtk, .vtp, .stl, .ply, .obj, and .gii (with nibabel).
    Polygons are triangulated; point and cell arrays are kept (.vtk, .vtp, .gii).

    Parameters
    ----------
    space : {"RAS", "LPS"}, optional
        Frame of the file's coordinates. Default: the ``SPACE=`` record that 3D Slicer (and geomed) write, else
        RAS. LPS coordinates are converted to RAS.
    expanduser : bool
        Expand a leading ``~`` in the file name, as :py:class:`monai.transforms.LoadImage` does.

    Raises
    ------
    FileNotFoundError
        If the file does not exist (the message names it).
    ValueError
        If the format is unknown or the file is broken, truncated or holds no surface (the message names it).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, space: str | None = None, expanduser: bool = True) -> None:
        if space is not None and space not in _SPACES:
            raise ValueError(f"space must be 'RAS', 'LPS' or None, got {space!r}")
        self.space = space
        self.expanduser = expanduser

    def path(self, filename: str | os.PathLike) -> Path:
        """The path that :meth:`__call__` reads for ``filename``."""
        if not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"filename must be a path to a mesh file, got {type(filename).__name__}")
        return Path(filename).expanduser() if self.expanduser else Path(filename)

    def __call__(self, filename: str | os.PathLike) -> Mesh:
        """Read ``filename``; returns a Mesh with vertices (V, 3) in RAS mm and triangles (F, 3)."""
        return read_mesh(self.path(filename), space=self.space)


class LoadMeshd(MapTransform):
    """Dictionary-based wrapper of :class:`LoadMesh`: ``data[key]`` is a file name, replaced by its Mesh.

    The metadata ``{"filename_or_obj": str(path), "space": "RAS"}`` is stored under ``meta_keys`` or
    ``f"{key}_{meta_key_postfix}"`` (e.g. ``"surface_meta_dict"``), as :py:class:`monai.transforms.LoadImaged`
    does with ``image_only=False``; ``space`` is the frame of the loaded vertices, always RAS.

    Parameters
    ----------
    keys : KeysCollection
        Keys of the items to load. See also :py:class:`monai.transforms.MapTransform`.
    space : {"RAS", "LPS"}, optional
        Frame of the files' coordinates, as in :class:`LoadMesh`.
    meta_keys : KeysCollection, optional
        Keys under which to store the metadata, one per key; default ``f"{key}_{meta_key_postfix}"``.
    meta_key_postfix : str
        Postfix of the default meta keys, ``"meta_dict"``.
    overwriting : bool
        Whether an existing meta key may be overwritten; ``False`` raises ``KeyError``, as in ``LoadImaged``.
    expanduser : bool
        Expand a leading ``~`` in file names.
    allow_missing_keys : bool
        Skip keys missing from the data instead of raising ``KeyError``.
    """

    backend = LoadMesh.backend

    def __init__(
        self,
        keys: KeysCollection,
        space: str | None = None,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = DEFAULT_POST_FIX,
        overwriting: bool = False,
        expanduser: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self._loader = LoadMesh(space, expanduser)
        self.meta_keys, self.meta_key_postfix = _meta_keys(self.keys, meta_keys, meta_key_postfix)
        self.overwriting = overwriting

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """
        Raises
        ------
        KeyError
            When a key is missing (unless ``allow_missing_keys``), or when a meta key already exists and
            ``overwriting`` is False.
        """
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            meta_key = meta_key or f"{key}_{meta_key_postfix}"
            if meta_key in d and not self.overwriting:
                raise KeyError(f"Metadata with key {meta_key} already exists and overwriting=False.")
            path = self._loader.path(d[key])
            d[key] = self._loader(path)
            d[meta_key] = {ImageMetaKey.FILENAME_OR_OBJ: str(path), MetaKeys.SPACE: SpaceKeys.RAS.value}
        return d


class MeshToMeasure(Transform):
    """The surface measure of a :class:`geomed.Mesh`, via :meth:`geomed.Measure.from_mesh` (mm²).

    Parameters
    ----------
    lumped : bool
        ``False`` (default): one Dirac per triangle at its centroid, weight = its area (mm²), normal = its unit
        normal. ``True``: one Dirac per vertex carrying a third of the area of its triangles, with the area-weighted
        unit normal. Either way the total mass is the mesh area; zero-area triangles are left out.
    dtype : torch.dtype, optional
        Floating dtype of the measure; default torch's default dtype (float32).
    device : torch.device or str, optional
        Device of the measure; default CPU.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self, lumped: bool = False, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        self.lumped = lumped
        self.dtype = dtype
        self.device = device

    def __call__(self, mesh: Mesh) -> Measure:
        """Convert ``mesh``; returns a Measure with points (N, 3) in mm, weights (N,) in mm², unit normals (N, 3)."""
        return Measure.from_mesh(mesh, lumped=self.lumped, dtype=self.dtype, device=self.device)


class MeshToMeasured(MapTransform):
    """Dictionary-based wrapper of :class:`MeshToMeasure`: the Mesh at each key is replaced by its Measure.

    Metadata already in the dictionary (e.g. ``f"{key}_meta_dict"`` from :class:`LoadMeshd`) is left as it is.

    Parameters
    ----------
    keys : KeysCollection
        Keys of the meshes to convert. See also :py:class:`monai.transforms.MapTransform`.
    lumped, dtype, device
        As in :class:`MeshToMeasure`.
    allow_missing_keys : bool
        Skip keys missing from the data instead of raising ``KeyError``.
    """

    backend = MeshToMeasure.backend

    def __init__(
        self,
        keys: KeysCollection,
        lumped: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = MeshToMeasure(lumped, dtype, device)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


# ---------------------------------------------------------------------------------------------------- masks
class MaskToMeasure(Transform):
    """The volume measure of a mask or of one label of a label map, via :meth:`geomed.Measure.from_mask`.

    One Dirac per voxel with positive occupancy, at the voxel centre mapped through the full affine (origin,
    spacing *and* direction) into world RAS mm, with weight ``occupancy × voxel volume`` (mm³; mm² for a 2-D
    slice, whose measure is 2-D). The measure keeps its voxel grid, so two masks of one image are compared by
    geomed's grid Sinkhorn.

    Parameters
    ----------
    label : int, optional
        The label id to measure. ``None`` (default): a binary or soft mask (values in [0, 1], used as occupancy),
        or, for a label map (non-negative integers, e.g. the float32 labels ``LoadImage`` returns), all its
        non-zero voxels.
    dtype : torch.dtype, optional
        Floating dtype of the measure; default that of a soft (floating) tensor mask used as occupancy, else
        torch's default (float32).
    device : torch.device or str, optional
        Device of the measure; default that of a tensor mask, else CPU.

    Raises
    ------
    ValueError
        For an empty mask, a label absent from the image (the message lists the present ones), values that are
        neither occupancies nor labels, or an input that is not channel-first with one channel.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self, label: int | None = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        self.label = _check_label(label)
        self.dtype = dtype
        self.device = device

    def __call__(self, img: NdarrayOrTensor, affine: NdarrayOrTensor | None = None) -> Measure:
        """Convert a mask.

        Parameters
        ----------
        img : MetaTensor, Tensor or array (1, H, W, D) or (1, H, W)
            Channel-first mask or label map. A soft mask given as a tensor keeps its autograd graph: the weights
            are differentiable w.r.t. it.
        affine : array or Tensor (4, 4), or (3, 3) for a 2-D mask, optional
            Voxel index → world RAS mm. Default: ``img.affine`` for a MetaTensor (RAS, or converted from LPS);
            else the identity. A (4, 4) affine of a 2-D mask places it in its own plane
            (:func:`monai_losses.spacing.plane_affine`).

        Returns
        -------
        Measure
            Points (N, 3) (or (N, 2)) in mm, weights (N,) in mm³ (or mm²).
        """
        values, matrix = _channel_and_affine(img, affine)
        return Measure.from_mask(_region(values, self.label), matrix, dtype=self.dtype, device=self.device)


class MaskToMeasured(_MaskMapTransform):
    """Dictionary-based wrapper of :class:`MaskToMeasure`: the mask at each key is replaced by its Measure.

    The source's metadata is kept under ``meta_keys`` or ``f"{key}_{meta_key_postfix}"`` (e.g.
    ``"label_meta_dict"``): a MetaTensor's ``meta`` (``affine``, ``filename_or_obj``, ...) is stored there,
    replacing any older copy. A plain tensor or array takes its affine from ``data[meta_key]["affine"]`` when that
    exists (MONAI's meta-dict convention, e.g. under ``set_track_meta(False)``), else the identity.

    Parameters
    ----------
    keys : KeysCollection
        Keys of the masks to convert. See also :py:class:`monai.transforms.MapTransform`.
    label, dtype, device
        As in :class:`MaskToMeasure`.
    meta_keys : KeysCollection, optional
        Keys of the metadata, one per key; default ``f"{key}_{meta_key_postfix}"``.
    meta_key_postfix : str
        Postfix of the default meta keys, ``"meta_dict"``.
    allow_missing_keys : bool
        Skip keys missing from the data instead of raising ``KeyError``.
    """

    backend = MaskToMeasure.backend

    def __init__(
        self,
        keys: KeysCollection,
        label: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = DEFAULT_POST_FIX,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(MaskToMeasure(label, dtype, device), keys, meta_keys, meta_key_postfix, allow_missing_keys)


class MaskToMesh(Transform):
    """The closed boundary surface of a 3-D mask or of one label of a label map, via :func:`geomed.mask_to_mesh`.

    Parameters
    ----------
    label : int, optional
        The label id whose surface to extract. ``None`` (default): the voxels above 0.5 of a mask (values in
        [0, 1]), or all non-zero voxels of a label map (non-negative integers).
    method : {"surface_nets", "flying_edges"}
        ``"surface_nets"`` (vtkSurfaceNets3D, default) or ``"flying_edges"`` (vtkDiscreteFlyingEdges3D).
    smoothing_iterations : int
        Iterations of windowed-sinc smoothing, which keeps the enclosed volume (0: the voxel staircase).

    Raises
    ------
    ValueError
        For an empty mask, a label absent from the image, values that are neither occupancies nor labels, or an
        input that is not channel-first 3-D with one channel.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, label: int | None = None, method: str = "surface_nets", smoothing_iterations: int = 20) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.label = _check_label(label)
        self.method = method
        self.smoothing_iterations = smoothing_iterations

    def __call__(self, img: NdarrayOrTensor, affine: NdarrayOrTensor | None = None) -> Mesh:
        """Extract the surface.

        Parameters
        ----------
        img : MetaTensor, Tensor or array (1, H, W, D)
            Channel-first mask or label map.
        affine : array or Tensor (4, 4), optional
            Voxel index → world RAS mm. Default: ``img.affine`` for a MetaTensor (RAS, or converted from LPS);
            else the identity.

        Returns
        -------
        Mesh
            Vertices (V, 3) in RAS mm, triangles (F, 3) wound so that normals point outwards.
        """
        values, matrix = _channel_and_affine(img, affine)
        if values.ndim != 3:
            raise ValueError(f"MaskToMesh needs a 3-D mask (1, H, W, D), got shape {tuple(img.shape)}")
        region = convert_to_numpy(_region(values, self.label))
        return mask_to_mesh(Image(region, matrix), method=self.method, smoothing_iterations=self.smoothing_iterations)


class MaskToMeshd(_MaskMapTransform):
    """Dictionary-based wrapper of :class:`MaskToMesh`: the mask at each key is replaced by its surface Mesh.

    Metadata is kept as in :class:`MaskToMeasured`: a MetaTensor's ``meta`` goes under ``meta_keys`` or
    ``f"{key}_{meta_key_postfix}"``; a plain tensor or array takes its affine from ``data[meta_key]["affine"]``
    when that exists, else the identity.

    Parameters
    ----------
    keys : KeysCollection
        Keys of the masks to convert. See also :py:class:`monai.transforms.MapTransform`.
    label, method, smoothing_iterations
        As in :class:`MaskToMesh`.
    meta_keys : KeysCollection, optional
        Keys of the metadata, one per key; default ``f"{key}_{meta_key_postfix}"``.
    meta_key_postfix : str
        Postfix of the default meta keys, ``"meta_dict"``.
    allow_missing_keys : bool
        Skip keys missing from the data instead of raising ``KeyError``.
    """

    backend = MaskToMesh.backend

    def __init__(
        self,
        keys: KeysCollection,
        label: int | None = None,
        method: str = "surface_nets",
        smoothing_iterations: int = 20,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = DEFAULT_POST_FIX,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            MaskToMesh(label, method, smoothing_iterations), keys, meta_keys, meta_key_postfix, allow_missing_keys
        )


LoadMeshD = LoadMeshDict = LoadMeshd
MaskToMeasureD = MaskToMeasureDict = MaskToMeasured
MaskToMeshD = MaskToMeshDict = MaskToMeshd
MeshToMeasureD = MeshToMeasureDict = MeshToMeasured
