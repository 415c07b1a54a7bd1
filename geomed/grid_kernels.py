r"""Currents and varifolds of the boundaries of soft masks on voxel grids: kernel losses without extracting meshes.

The boundary of a region :math:`\Omega` with outward normal :math:`n` is, as a current, the distributional
gradient :math:`-\nabla 1_\Omega = n\,dA`. A soft mask :math:`u` (probabilities on a grid of spacing
:math:`s` mm, voxel volume :math:`V`) therefore defines a boundary measure with one vector per voxel,

.. math:: g_i = -V\,(\nabla u)_i \quad(\text{mm}^2), \qquad
          \text{area } |g_i|, \quad \text{normal } g_i / |g_i|,

the gradient taken by central differences in mm (zero outside the grid). The measures compared are those of
:func:`geomed.varifold_distance` — Diracs at the voxel centres with weights :math:`|g_i|` and normals
:math:`g_i/|g_i|` — and the loss is the same ½‖μ_a − μ_b‖² (mm⁴) with a Gaussian kernel of width σ = ``blur``:

``current``     :math:`\tfrac12\sum_{ij} k_{ij}\,\langle d_i, d_j\rangle`, :math:`d = g_a - g_b`;
``unoriented``  :math:`\tfrac12\sum_{ij} k_{ij}\,\langle D_i, D_j\rangle_F`, :math:`D = T_a - T_b`,
                :math:`T_i = g_i g_i^\top / |g_i|` (so :math:`\langle T_i, T_j\rangle_F = |g_i||g_j|\langle n_i, n_j\rangle^2`).

On a grid the Gaussian kernel factorises over the axes, so :math:`\sum_j k_{ij} d_j` is three 1-D convolutions,
each a product with the (n, n) matrix :math:`e^{-s_k^2 (i - j)^2/2\sigma^2}` (entries below ``truncate`` dropped) —
linear in the soft mask, differentiated by autograd, spacing-aware through the finite differences and the
kernel. A few matrix products per structure: this is the cheap, smooth boundary term of :mod:`monai_losses` (the oriented
varifold's exponential kernel on normals does not factorise and is left to the point-cloud path).

``normalized=True`` returns :math:`\|\mu_a - \mu_b\|^2 / (\|\mu_a\|^2 + \|\mu_b\|^2) \in [0, 1]` for non-negative
kernels: 0 for equal boundaries, 1 for boundaries farther apart than the blur — a dimensionless "kernel Dice" of
the boundaries that can be added to a Dice loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._validation import dense_grid_pair

BOUNDARY_KINDS = ("current", "unoriented")


def grid_boundary_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    blur: float,
    spacing: Sequence[float] | None = None,
    kind: str = "current",
    normalized: bool = False,
    truncate: float = 1e-9,
) -> torch.Tensor:
    """Current or unoriented varifold loss between the boundaries of soft masks on one grid, channel by channel.

    Parameters
    ----------
    a, b : Tensor (B, C, *spatial)
        Soft masks (probabilities, one-hot labels) on a 2-D or 3-D grid; differentiable.
    blur : float
        Width σ (mm) of the Gaussian kernel on positions: boundary displacements well below σ cost about their
        square, those beyond σ saturate.
    spacing : sequence of float, optional
        Voxel size along each spatial axis in mm (default 1).
    kind : {"current", "unoriented"}
        Orientation kernel, as in :func:`geomed.varifold_distance`.
    normalized : bool
        Divide by ‖μ_a‖² + ‖μ_b‖² (a value in [0, 1]; 0 where both boundaries are empty) instead of the raw
        ½‖μ_a − μ_b‖² in mm⁴ (mm² in 2-D, where boundary "areas" are lengths).
    truncate : float
        Kernel values below this are dropped (the value changes by at most
        ½ truncate (Σ|g_a| + Σ|g_b|)², as in :func:`geomed.mmd`).

    Returns
    -------
    Tensor (B, C)
    """
    if kind not in BOUNDARY_KINDS:
        raise ValueError(f"kind must be one of {BOUNDARY_KINDS}, got {kind!r}")
    if not (isinstance(blur, (int, float)) and math.isfinite(blur) and blur > 0):
        raise ValueError(f"blur must be a positive number of mm, got {blur!r}")
    if not 0 < truncate < 1:
        raise ValueError(f"truncate must be in (0, 1), got {truncate!r}")
    spacing = dense_grid_pair(a, b, spacing)
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a, b.to(a.dtype)
        features_a = _boundary_features(a, spacing, kind)
        features_b = _boundary_features(b, spacing, kind)
        kernels = _kernel_matrices(a.shape[2:], spacing, blur, truncate, a.dtype, a.device)
        if not normalized:
            difference = features_a - features_b
            return 0.5 * _kernel_inner(difference, _smooth(difference, kernels))
        smooth_a, smooth_b = _smooth(features_a, kernels), _smooth(features_b, kernels)
        norm_a, norm_b = _kernel_inner(features_a, smooth_a), _kernel_inner(features_b, smooth_b)
        cross = _kernel_inner(features_a, smooth_b)
        total = norm_a + norm_b
        return torch.where(total > 0, (total - 2 * cross) / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def _boundary_features(mask: torch.Tensor, spacing: tuple[float, ...], kind: str) -> torch.Tensor:
    """(B, C, K, *spatial): the boundary vectors g (K = D) for currents, or the upper triangle of g gᵀ/|g| with
    off-diagonal entries × √2 (K = D(D+1)/2, so that the Euclidean product is the Frobenius one) for varifolds."""
    volume = math.prod(spacing)
    components = []
    for axis, step in enumerate(spacing):
        padded = F.pad(mask, _pad_one(mask.dim() - 2, axis))
        dim = axis + 2
        forward = padded.narrow(dim, 2, mask.shape[dim])
        backward = padded.narrow(dim, 0, mask.shape[dim])
        components.append((backward - forward) * (volume / (2 * step)))
    vectors = torch.stack(components, 2)
    if kind == "current":
        return vectors
    length = vectors.square().sum(2, keepdim=True).sqrt()
    unit_scaled = vectors / length.clamp_min(torch.finfo(vectors.dtype).tiny).sqrt()
    entries = []
    for row in range(len(spacing)):
        for col in range(row, len(spacing)):
            factor = 1.0 if row == col else math.sqrt(2.0)
            entries.append(factor * unit_scaled[:, :, row] * unit_scaled[:, :, col])
    return torch.stack(entries, 2)


def _pad_one(dims: int, axis: int) -> tuple[int, ...]:
    """F.pad widths: one voxel of zeros on both sides of ``axis`` among ``dims`` spatial axes."""
    widths = [0] * (2 * dims)
    position = 2 * (dims - 1 - axis)
    widths[position] = widths[position + 1] = 1
    return tuple(widths)


def _kernel_matrices(shape, spacing, blur, truncate, dtype, device) -> list[torch.Tensor]:
    """Per axis, the (n, n) matrix of exp(−s²(i − j)²/2σ²), entries below ``truncate`` set to zero."""
    matrices = []
    for length, step in zip(shape, spacing):
        offsets = torch.arange(length, dtype=torch.float64) * step
        kernel = torch.exp(-(offsets[:, None] - offsets).square() / (2 * blur**2))
        matrices.append(kernel.masked_fill_(kernel < truncate, 0.0).to(dtype=dtype, device=device))
    return matrices


def _smooth(features: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
    """Σ_j k(x_i, x_j) f_j for every channel of ``features`` (B, C, K, *spatial): one product with a symmetric
    (n, n) kernel matrix per axis (a convolution with zeros beyond the grid; BLAS-shaped, unlike a 1-D conv)."""
    field = features
    for axis, kernel in enumerate(kernels, start=3):
        field = (field.transpose(axis, -1) @ kernel).transpose(axis, -1)
    return field


def _kernel_inner(features: torch.Tensor, smoothed: torch.Tensor) -> torch.Tensor:
    """Σ_i ⟨f_i, (K f')_i⟩ per (item, channel): (B, C)."""
    return (features * smoothed).flatten(2).sum(-1)
