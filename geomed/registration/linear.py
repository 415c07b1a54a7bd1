r"""Rigid, similarity and affine registration from optimal-transport correspondences.

At each blur of a coarse-to-fine schedule, the (unbalanced) Sinkhorn plan between the moved shape and the fixed
one gives every moving point x_i a target — its barycentric map :math:`T(x_i) = \sum_j \pi_{ij} y_j / \sum_j
\pi_{ij}` — and a confidence, the mass it transports :math:`m_i = \sum_j \pi_{ij}` (with a reach, points with no
counterpart transport almost nothing: partial overlap). The transform is then refitted to these weighted pairs in
closed form — weighted Procrustes (Kabsch; with Umeyama's scale for ``similarity``) or weighted least squares
(``affine``) — and the two steps alternate until the transform moves no point by more than a twentieth of the
blur (a hundredth at the last blur). Large blurs see only the global shape (no local minima from the details);
the last blur sets the accuracy. Both shapes are pooled into cells of half the blur, or wider until at most 2000
remain: the closed-form fits average over thousands of pairs, so the pooled positions cost little accuracy and
every solve stays small.
"""

from __future__ import annotations

import torch

from ..measure import Measure
from ..ot import sinkhorn_divergence
from .transforms import AffineTransform

LINEAR_MODELS = ("rigid", "similarity", "affine")
_POINT_BUDGET = 2000


def fit_pairs(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, model: str) -> AffineTransform:
    """The transform of ``model`` minimising Σ_i w_i |φ(x_i) − y_i|², in closed form (float64).

    Parameters
    ----------
    source, target : Tensor (N, D)
        Paired points x_i, y_i (mm).
    weights : Tensor (N,)
        Non-negative weights w_i, not all zero.
    model : {"rigid", "similarity", "affine"}
    """
    x, y, w = source.double(), target.double(), weights.double().clamp_min(0)
    w = w / w.sum()
    mean_x, mean_y = w @ x, w @ y
    cx, cy = x - mean_x, y - mean_y
    dim = x.shape[1]
    if model == "affine":
        covariance = (cx * w[:, None]).T @ cx
        cross = (cy * w[:, None]).T @ cx
        matrix = torch.linalg.solve(covariance, cross.T).T
    else:
        cross = (cy * w[:, None]).T @ cx
        u, s, vt = torch.linalg.svd(cross)
        signs = torch.ones(dim, dtype=x.dtype, device=x.device)
        signs[-1] = torch.sign(torch.linalg.det(u @ vt))
        matrix = u @ torch.diag(signs) @ vt
        if model == "similarity":
            matrix = matrix * (s * signs).sum() / (w @ cx.square().sum(1))
    return AffineTransform(matrix, mean_y - matrix @ mean_x)


def fit_linear(moving: Measure, fixed: Measure, model: str, *, blurs, reach, initial: AffineTransform,
               iterations: int, report) -> AffineTransform:
    """Alternate Sinkhorn correspondences and closed-form fits over ``blurs`` (mm, coarse to fine).

    ``report(stage, iteration, value)`` is called after each correspondence step (progress and cancel).
    """
    transform = initial
    source = moving.points.detach().double()
    for blur in blurs:
        coarse_fixed = _pooled(fixed, blur / 2)
        coarse_moving, members = _pooled_with_members(moving, blur / 2)
        coarse_source = _pool_points(source, moving.weights.double(), members, len(coarse_moving.weights))
        for iteration in range(iterations):
            moved = transform(coarse_source)
            moved_measure = Measure.from_points(moved.to(fixed.dtype), coarse_moving.weights.to(fixed.dtype))
            result = sinkhorn_divergence(moved_measure, coarse_fixed, blur=blur, reach=reach)
            targets = result.barycentric_map().double()
            confidence = result.plan_times(torch.ones_like(coarse_fixed.weights)).double()
            updated = fit_pairs(coarse_source, targets, confidence, model)
            shift = float((updated(coarse_source) - moved).norm(dim=1).max())
            transform = updated
            report(f"{model} (blur {blur:g} mm)", iteration, float(result.value))
            if shift < (0.01 if blur == blurs[-1] else 0.05) * blur:
                break
    return transform


def _pooled_with_members(measure: Measure, cell: float) -> tuple[Measure, torch.Tensor]:
    """The measure with its points merged per cubic cell of side ``cell`` (mm), widened until at most
    ``_POINT_BUDGET`` cells remain: weighted mean positions, summed weights; and each point's cell index."""
    points = measure.points.detach().double()
    members, count, _ = budgeted_cells(points, cell)
    weights = measure.weights.detach().double()
    pooled_weights = torch.zeros(count, dtype=weights.dtype).index_add_(0, members, weights)
    pooled = Measure.from_points(_pool_points(points, weights, members, count).to(measure.dtype),
                                 pooled_weights.to(measure.dtype))
    return pooled, members


def budgeted_cells(points: torch.Tensor, cell: float) -> tuple[torch.Tensor, int, float]:
    """Cells of side ``cell`` (mm), widened by 1.5× until at most ``_POINT_BUDGET`` remain: each point's cell, the
    number of cells and the side used."""
    members, count = _cells(points, cell)
    while count > _POINT_BUDGET:
        cell *= 1.5
        members, count = _cells(points, cell)
    return members, count, cell


def _cells(points: torch.Tensor, cell: float) -> tuple[torch.Tensor, int]:
    """Each point's cubic cell of side ``cell`` (mm), numbered from 0, and the number of cells."""
    keys = torch.floor((points - points.amin(0)) / cell).long()
    _, members = torch.unique(keys, dim=0, return_inverse=True)
    return members, int(members.max()) + 1


def _pooled(measure: Measure, cell: float) -> Measure:
    return _pooled_with_members(measure, cell)[0]


def _pool_points(points: torch.Tensor, weights: torch.Tensor, members: torch.Tensor, count: int) -> torch.Tensor:
    """Weighted mean of the points of each cell (differentiable w.r.t. the points)."""
    sums = torch.zeros(count, points.shape[1], dtype=points.dtype, device=points.device)
    sums = sums.index_add(0, members, points * weights[:, None])
    mass = torch.zeros(count, dtype=points.dtype, device=points.device).index_add_(0, members, weights)
    return sums / mass.clamp_min(torch.finfo(points.dtype).tiny)[:, None]
