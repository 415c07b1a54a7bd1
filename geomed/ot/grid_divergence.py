"""The MONAI-shaped front-end of the grid solver: Sinkhorn divergences between dense weights on one voxel grid.

Soft segmentations ``(B, C, *spatial)`` are compared channel by channel with the separable grid softmin and the
grid pyramid of :mod:`geomed.ot.grid` (exact gradients w.r.t. every voxel's weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._validation import dense_grid_pair
from .grid import DenseGrid
from .problem import Reach, check_arguments
from .result import OTResult
from .solve import solve_tensors


def grid_sinkhorn_divergence(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    blur: float,
    spacing: Sequence[float] | None = None,
    p: int = 2,
    reach: Reach = None,
    scaling: float = 0.7,
    debias: bool = True,
    tol: float | None = 1e-2,
    max_iter: int = 500,
    diameter: float | None = None,
) -> OTResult:
    """Sinkhorn divergence between weights on one voxel grid, channel by channel: the MONAI-shaped entry point.

    Parameters
    ----------
    a, b : Tensor (B, C, *spatial)
        Non-negative weights on a 2-D or 3-D grid (e.g. softmax probabilities and one-hot labels), each
        (item, channel) with positive mass; ``a`` may require grad (exact gradients w.r.t. every voxel's weight).
    blur : float
        Entropic blur in mm (ε = blur²).
    spacing : sequence of float, optional
        Voxel size along each spatial axis in mm (default 1). The direction of the image does not matter.
    p, reach, scaling, debias, tol, max_iter, diameter
        As in :func:`geomed.sinkhorn_divergence` (``p = 2`` only: the kernel must factorise over the axes).
        Balanced (``reach=None``) compares shapes (each channel normalised); with a ``reach`` the masses count.

    Returns
    -------
    OTResult
        ``value`` (B, C); potentials (B, C, N) over the N voxels in C order (``.view(B, C, *spatial)``); the plan
        operators take values (B, C, N[, K]).
    """
    check_arguments(blur, p, scaling, "grid", tol, max_iter, diameter)
    if p != 2:
        raise ValueError(f"p must be 2 on a grid (|x−y|^p does not factorise over the axes for p={p})")
    spacing = dense_grid_pair(a, b, spacing)
    shape = tuple(a.shape[2:])
    batch_shape = tuple(a.shape[:2])
    flat = [weights.reshape(-1, math.prod(shape)) for weights in (a, b)]
    _check_weights(flat, batch_shape[1])
    dtype = torch.promote_types(a.dtype, b.dtype)
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    axes = [(torch.arange(n, dtype=torch.float64, device=a.device) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, len(shape)).to(dtype)
    if diameter is None:
        diameter = max(math.hypot(*[(n - 1) * s for n, s in zip(shape, spacing)]), blur)
    points = centres.expand(len(flat[0]), -1, -1)
    return solve_tensors(points, flat[0], points, flat[1], grid=DenseGrid(shape, spacing), batch_shape=batch_shape,
                         blur=blur, p=p, reach=reach, scaling=scaling, debias=debias, backend="grid", tol=tol,
                         max_iter=max_iter, diameter=diameter)


def _check_weights(flat: list[torch.Tensor], channels: int) -> None:
    """Raise a ValueError if ``a`` or ``b`` (flattened to (B·C, N)) holds a non-finite or negative weight, or a
    channel without mass; one read on the host for both."""
    flags = torch.stack([torch.stack([~torch.isfinite(w).all() | (w < 0).any(), (w.sum(-1) <= 0).any()])
                         for w in (t.detach() for t in flat)]).tolist()
    for name, weights, (invalid, empty) in zip("ab", flat, flags):
        if invalid:
            raise ValueError(f"{name} must hold finite, non-negative weights")
        if empty:
            item, channel = divmod(int(torch.nonzero(weights.detach().sum(-1) <= 0)[0]), channels)
            raise ValueError(f"{name} has no mass in item {item}, channel {channel}: an empty mask has no shape to "
                             "compare (leave such channels out, or use a reach and a small positive floor)")
