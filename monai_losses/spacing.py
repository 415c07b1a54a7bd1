r"""One rule for the voxel geometry of a batch item, shared by every class of :mod:`monai_losses` (losses, metrics,
transforms).

The voxel index → world mm map of item b is, in this order:

1. the explicit ``spacing`` (a loss's constructor argument, a metric's call argument), with MONAI's semantics
   (``monai.metrics.utils.prepare_spacing``): a number (isotropic), one number per spatial axis, or one such entry
   per batch item — a diagonal map;
2. the ``affine`` of the **target** when it is a MONAI ``MetaTensor`` — (D + 1, D + 1), or (B, D + 1, D + 1) for a
   batch collated by ``monai.data.list_data_collate``;
3. the affine of the **prediction** (a network's output often carries its input's metadata, which after
   resampling or cropping may no longer describe the label grid: the target is the reference);
4. unit voxels (1 mm).

A 2-D item carrying the 4 × 4 affine of its slice in 3-D (a sagittal, coronal or oblique plane) is mapped through
:func:`plane_affine`: its voxel sizes are the full norms of the first two columns, and its positions are taken in
the slice's own plane — MONAI's ``to_affine_nd``/``affine_to_spacing`` read the 2 × 2 corner instead, which is only
right for axial slices (a sagittal slice's first column has no x or y part at all: spacing 0).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.metrics.utils import prepare_spacing

__all__ = ["item_affines", "item_spacings", "plane_affine"]


def plane_affine(affine: np.ndarray) -> np.ndarray:
    """The (3, 3) map of a 2-D slice's voxel index to mm in its own plane, from the slice's (4, 4) map into 3-D.

    The columns c₀, c₁ of the slice's voxel axes span its plane; with an orthonormal basis Q of that plane, the
    in-plane map is Qᵀ[c₀ c₁] and the origin Qᵀt, so every distance and angle within the slice is kept. Each basis
    vector points along the positive world axis it is closest to: for an axis-aligned slice the coordinates are the
    world coordinates along the two axes it spans (an axial slice gets exactly the corner ``to_affine_nd`` takes).

    Raises
    ------
    ValueError
        If the two columns are parallel or zero (no plane).
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"the affine of a slice in 3-D must have shape (4, 4), got {matrix.shape}")
    columns, origin = matrix[:3, :2], matrix[:3, 3]
    basis, _ = np.linalg.qr(columns)
    signs = np.sign(basis[np.abs(basis).argmax(0), [0, 1]])
    basis = basis * np.where(signs == 0, 1.0, signs)
    in_plane = basis.T @ columns
    if abs(np.linalg.det(in_plane)) <= 1e-12 * max(float(np.abs(columns).max()), 1e-300) ** 2:
        raise ValueError(f"the affine's first two columns {columns.T.tolist()} span no plane (a voxel of zero size)")
    result = np.eye(3)
    result[:2, :2], result[:2, 2] = in_plane, basis.T @ origin
    return result


def item_affines(prediction: torch.Tensor, target: torch.Tensor | None, spacing: Any,
                 spatial_dims: int | None = None) -> list[np.ndarray]:
    """The voxel index → mm map, (D + 1, D + 1), of each item of a batch (B, C, *spatial), by the module's rule.

    Parameters
    ----------
    prediction, target : Tensor (B, C, *spatial)
        Plain tensors or MONAI MetaTensors; ``target`` may be None.
    spacing : None, number, sequence, or one per item
        The explicit voxel size (mm), with MONAI's semantics; None to read the affines.
    spatial_dims : int, optional
        Default: ``prediction.dim() - 2``.

    Raises
    ------
    ValueError
        A spacing that is not positive, a number of affines that is not the batch size, or an affine that maps a
        voxel axis to zero length; the message names the tensor.
    """
    dims = prediction.dim() - 2 if spatial_dims is None else spatial_dims
    items = prediction.shape[0]
    if spacing is None:
        for name, tensor in (("target", target), ("prediction", prediction)):
            affines = _metatensor_affines(tensor, name, dims, items)
            if affines is not None:
                return affines
        return [np.eye(dims + 1) for _ in range(items)]
    affines = []
    for value in prepare_spacing(spacing=spacing, batch_size=items, img_dim=dims):
        sizes = (1.0,) * dims if value is None else (value,) * dims if np.isscalar(value) else tuple(value)
        try:
            sizes = tuple(float(s) for s in sizes)
        except (TypeError, ValueError):
            raise ValueError(f"spacing must hold numbers of mm, got {spacing!r}") from None
        if len(sizes) != dims or not all(math.isfinite(s) and s > 0 for s in sizes):
            raise ValueError(f"spacing must be {dims} positive numbers of mm per item, got {spacing!r}")
        affines.append(np.diag([*sizes, 1.0]))
    return affines


def item_spacings(prediction: torch.Tensor, target: torch.Tensor | None, spacing: Any,
                  spatial_dims: int | None = None) -> list[tuple[float, ...]]:
    """The voxel size (mm per axis) of each item: the column norms of :func:`item_affines`."""
    return [tuple(float(s) for s in np.linalg.norm(affine[:-1, :-1], axis=0))
            for affine in item_affines(prediction, target, spacing, spatial_dims)]


def _metatensor_affines(tensor: Any, name: str, dims: int, items: int) -> list[np.ndarray] | None:
    """The per-item affines of a MetaTensor (None for a plain tensor), 2-D slices of 3-D affines in their plane."""
    affine = getattr(tensor, "affine", None)
    if affine is None:
        return None
    matrix = torch.as_tensor(affine, dtype=torch.float64).cpu().numpy()
    matrix = np.broadcast_to(matrix, (items, *matrix.shape[-2:])) if matrix.ndim == 2 else matrix
    if matrix.ndim != 3:
        raise ValueError(f"the {name}'s MetaTensor holds an affine of shape {matrix.shape}, not (D + 1, D + 1) or "
                         "(B, D + 1, D + 1)")
    if matrix.shape[0] != items:
        raise ValueError(f"the {name}'s MetaTensor holds {matrix.shape[0]} affines for a batch of {items} items")
    if matrix.shape[-2:] == (dims + 1, dims + 1):
        affines = [np.array(m) for m in matrix]
    elif dims == 2 and matrix.shape[-2:] == (4, 4):
        affines = [plane_affine(m) for m in matrix]
    else:
        raise ValueError(f"the {name}'s affine has shape {matrix.shape[-2:]}, not that of a {dims}-D image "
                         f"{(dims + 1,) * 2}")
    for affine in affines:
        if not (np.linalg.norm(affine[:-1, :-1], axis=0) > 0).all():
            raise ValueError(f"the {name}'s affine maps a voxel axis to zero length (a voxel of zero size)")
    return affines
