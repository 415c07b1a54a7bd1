r"""Rigid, similarity and affine registration from optimal-transport correspondences.

At each blur of a coarse-to-fine schedule, the (unbalanced) entropic transport plan π between the moved shape and
the fixed one gives every moving point a target — its barycentric map :math:`T_i = \sum_j \pi_{ij} y_j / \sum_j
\pi_{ij}` — and a confidence, the mass it transports :math:`m_i = \sum_j \pi_{ij}` (with a ``reach``, points with no
counterpart within about the reach transport almost nothing: partial overlap). The transform is then refitted to
these weighted pairs, and the two steps alternate until the transform moves no point by more than a twentieth of
the blur (a hundredth at the last blur). With π fixed, the transport cost is :math:`\sum_i m_i |\varphi(x_i) -
T_i|^2` plus a constant, so only the cross problem is solved: the debiasing terms do not move the correspondences.
The targets are corrected for the entropic bias of the barycentric map (the fixed shape's own barycentric map
at the same blur, solved once per blur, pulls its points inward by about blur² × curvature / 2): otherwise a
scale or affine fit would shrink the moving shape by that much.

Two refits, as in ICP:

- at the coarsest blur, **point to point**: the closed-form weighted Procrustes (Kabsch; Umeyama's scale for
  ``similarity``) or least squares (``affine``) of :math:`\sum_i m_i |\varphi(x_i) - T_i|^2` — each refit lowers
  the transport cost. The blurred shapes are blobs; pulling every point onto its target finds the pose without
  sliding into a wrong one.
- at the finer blurs, **point to plane** (Chen & Medioni): one Gauss–Newton step of
  :math:`\sum_i m_i [(n_i \cdot (\psi(p_i) - T_i))^2 + \lambda |\psi(p_i) - T_i|^2]` over a small increment ψ of
  the model about the moved points' centroid, with :math:`n_i` the plan-averaged unit normal of the fixed surface
  at :math:`T_i` and λ = 0.01. Tangential residuals — the entropic and sampling noise of the correspondences, and
  the pull of a missing part on a cropped edge — barely count, so the shape slides along the surface to its place
  in a few steps where point to point crawls along it (on a femur 12° off: 0.03° in 13 correspondence steps,
  where point to point stopped at 0.13° after 30). The λ term keeps the step well-posed along flat or
  cylindrical parts. Without normals on the fixed shape (point clouds, mask voxels), every blur is point to point.

**Partial overlap.** Near the rim of a cropped surface the transport still pulls points toward the part the other
shape lacks (by up to about the reach). Correspondences within ``max(reach, blur)`` of an open mesh boundary, on
either side, are therefore left out of the fits; they stay in the transport, where they absorb that pull.

Large blurs see only the global shape (no local minima from the details); the last blur sets the accuracy. Both
shapes are pooled into cells of half the blur, or wider until at most 2000 remain: the fits average over thousands
of pairs, so the pooled positions cost little accuracy and every solve stays small. Once the shapes are aligned to
within the previous blur, the transport's ε-scaling starts from twice that blur rather than from the diameter.
"""

from __future__ import annotations

import torch

from .._spatial import cell_means, cell_sums, grid_cells
from ..measure import Measure
from ..ot import sinkhorn_divergence
from .transforms import AffineTransform

LINEAR_MODELS = ("rigid", "similarity", "affine")
_POINT_BUDGET = 2000
_POINT_TO_POINT = 0.01


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
        try:
            matrix = torch.linalg.solve(covariance, cross.T).T
        except torch.linalg.LinAlgError:
            rank = int(torch.linalg.matrix_rank(covariance))
            raise ValueError(f"the affine fit is degenerate: the matched points span only {rank} of {dim} "
                             "dimensions (use a rigid or similarity model)") from None
    else:
        cross = (cy * w[:, None]).T @ cx
        u, s, vt = torch.linalg.svd(cross)
        signs = torch.ones(dim, dtype=x.dtype, device=x.device)
        signs[-1] = torch.sign(torch.linalg.det(u @ vt))
        matrix = u @ torch.diag(signs) @ vt
        if model == "similarity":
            matrix = matrix * (s * signs).sum() / (w @ cx.square().sum(1))
    return AffineTransform(matrix, mean_y - matrix @ mean_x)


def point_to_plane_step(points: torch.Tensor, targets: torch.Tensor, normals: torch.Tensor, weights: torch.Tensor,
                        model: str) -> AffineTransform:
    """One Gauss–Newton step ψ of ``model`` for Σ_i w_i [(n_i·(ψ(p_i) − T_i))² + λ|ψ(p_i) − T_i|²], λ = 0.01.

    ψ(p) = c + M (p − c) + τ about the weighted centroid c; the increment is linearised — rigid: M = exp([ω]×)
    (a rotation), similarity: (1 + s)·exp([ω]×), affine: I + B — so that the normal equations are 6, 7 or 12
    unknowns (float64).

    Parameters
    ----------
    points, targets : Tensor (N, 3)
        Current positions p_i and their targets T_i (mm).
    normals : Tensor (N, 3)
        Unit normals n_i of the target surface at T_i.
    weights : Tensor (N,)
        Non-negative confidences w_i, not all zero.
    model : {"rigid", "similarity", "affine"}
    """
    p, w = points.double(), weights.double().clamp_min(0)
    w = w / w.sum()
    centre = w @ p
    offsets = p - centre
    eye = torch.eye(3, dtype=p.dtype, device=p.device)
    if model == "affine":
        jacobian = torch.cat([torch.kron(eye, offsets[:, None, :]).reshape(len(p), 3, 9),
                              eye.expand(len(p), 3, 3)], 2)
    else:
        jacobian = torch.cat([-_cross_matrices(offsets), eye.expand(len(p), 3, 3)], 2)
        if model == "similarity":
            jacobian = torch.cat([jacobian, offsets[:, :, None]], 2)
    residuals = p - targets.double()
    along_normal = torch.einsum("nk,nkj->nj", normals.double(), jacobian)
    normal_residuals = (normals.double() * residuals).sum(1)
    hessian = along_normal.T @ (along_normal * w[:, None]) + _POINT_TO_POINT * torch.einsum(
        "nkj,nkl,n->jl", jacobian, jacobian, w)
    gradient = along_normal.T @ (normal_residuals * w) + _POINT_TO_POINT * torch.einsum(
        "nkj,nk,n->j", jacobian, residuals, w)
    step = -torch.linalg.solve(hessian, gradient)
    if model == "affine":
        matrix, shift = eye + step[:9].reshape(3, 3), step[9:]
    else:
        matrix, shift = torch.linalg.matrix_exp(_cross_matrices(step[None, :3])[0]), step[3:6]
        if model == "similarity":
            matrix = matrix * (1 + step[6])
    return AffineTransform(matrix, centre + shift - matrix @ centre)


def fit_linear(moving: Measure, fixed: Measure, model: str, *, blurs, reach, initial: AffineTransform,
               aligned: bool = False, iterations: int, report, moving_rim: torch.Tensor | None = None,
               fixed_rim: torch.Tensor | None = None) -> AffineTransform:
    """Alternate Sinkhorn correspondences and fits over ``blurs`` (mm, coarse to fine); see the module docstring.

    Parameters
    ----------
    moving, fixed : Measure
    model : {"rigid", "similarity", "affine"}
    blurs : sequence of float
        Blurs (mm), coarse to fine.
    reach : float or None
        Unbalanced transport reach (mm).
    initial : AffineTransform
    aligned : bool
        Whether ``initial`` already aligns the shapes to within the first blur (a previous stage's result): then
        every blur is fitted point to plane, and the transport's ε-scaling starts at twice the blur instead of the
        shapes' diameter.
    iterations : int
        Most correspondence steps per blur.
    report : callable(stage, iteration, value)
        Called after each correspondence step (progress and cancel), with the entropic transport cost (mm²) of
        the pooled shapes.
    moving_rim, fixed_rim : Tensor (N,), (M,), optional
        Each point's distance (mm) to an open boundary of its surface (a crop or a hole; inf on closed
        surfaces). Correspondences within ``max(reach, blur)`` of a rim on either side are left out of the fits:
        there the transport pulls points toward the part the other shape lacks (they still take part in the
        transport, and absorb that pull).
    """
    transform, dim = initial, moving.dim
    for level, blur in enumerate(blurs):
        margin = max(reach or 0.0, blur)
        source, source_trust = _pooled(moving, blur / 2, _trusted(moving_rim, margin, moving))
        target, target_trust = _pooled(fixed, blur / 2, _trusted(fixed_rim, margin, fixed))
        target, target_trust = target.to(fixed.device, fixed.dtype), target_trust.to(fixed.device, fixed.dtype)
        to_plane = (aligned or level > 0) and target.normals is not None and dim == 3
        weights = source.weights.to(fixed.dtype)
        start = 2 * blurs[level - 1] if level > 0 else 2 * blur if aligned else None  # ε-scaling's first blur
        unbiased = target.points - _entropic_bias(target, blur, reach, start)
        for iteration in range(iterations):
            moved = transform(source.points)
            result = sinkhorn_divergence(Measure.from_points(moved.to(fixed.dtype), weights), target, blur=blur,
                                         reach=reach, debias=False, diameter=start)
            columns = [unbiased, target_trust[:, None], torch.ones_like(target_trust)[:, None]]
            sums = result.plan_times(torch.cat(columns + ([target.normals] if to_plane else []), 1)).double()
            targets = sums[:, :dim] / sums[:, dim + 1:dim + 2].clamp_min(torch.finfo(sums.dtype).tiny)
            confidence = source_trust * sums[:, dim]
            if not bool((confidence > 0).any()):
                confidence = sums[:, dim + 1]
            if to_plane:
                normals = _unit(sums[:, dim + 2:])
                updated = transform.then(point_to_plane_step(moved, targets, normals, confidence, model))
            else:
                updated = fit_pairs(source.points, targets, confidence, model)
            shift = float((updated(source.points) - moved).norm(dim=1).max())
            transform = updated
            report(f"{model} (blur {blur:g} mm)", iteration, float(result.value))
            if shift < (0.01 if blur == blurs[-1] else 0.05) * blur:
                break
    return transform


def _entropic_bias(target: Measure, blur: float, reach, start) -> torch.Tensor:
    """How far the barycentric map at this blur pulls the fixed shape's own points, B(y_j) − y_j (M, D): inward,
    by about blur² × curvature / 2. Correspondences subtract it (plan-averaged), so that a closed surface is not
    fitted as a smaller one (without it, a similarity fit of a hippocampus shrunk by 1% found 2.6%)."""
    result = sinkhorn_divergence(target, target, blur=blur, reach=reach, debias=False, diameter=start)
    return result.barycentric_map() - target.points


def _trusted(rim: torch.Tensor | None, margin: float, measure: Measure) -> torch.Tensor:
    """1 for points farther than ``margin`` (mm) from a rim, 0 for the others (float64)."""
    if rim is None:
        return torch.ones_like(measure.weights, dtype=torch.float64)
    return (rim > margin).to(torch.float64)


def _cross_matrices(vectors: torch.Tensor) -> torch.Tensor:
    """[v]× for each row v (N, 3) → (N, 3, 3), so that [v]× u = v × u."""
    x, y, z = vectors.unbind(1)
    zero = torch.zeros_like(x)
    return torch.stack([torch.stack([zero, -z, y], 1), torch.stack([z, zero, -x], 1),
                        torch.stack([-y, x, zero], 1)], 1)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _pooled(measure: Measure, cell: float, values: torch.Tensor | None = None) -> tuple[Measure, torch.Tensor]:
    """The measure with its points merged per cubic cell of side ``cell`` (mm), widened until at most
    ``_POINT_BUDGET`` cells remain (float64): weighted mean positions, summed weights, and the unit weighted mean
    normals if it has normals; and the weighted mean per cell of ``values`` (N,) (default: ones)."""
    points, weights = measure.points.detach().double(), measure.weights.detach().double()
    members, count, _ = budgeted_cells(points, cell)
    pooled_weights = cell_sums(weights, members, count)
    normals = None if measure.normals is None else _unit(
        cell_means(measure.normals.detach().double(), weights, members, count))
    values = torch.ones_like(weights) if values is None else values.double()
    return (Measure(cell_means(points, weights, members, count), pooled_weights, normals),
            cell_means(values[:, None], weights, members, count)[:, 0])


def budgeted_cells(points: torch.Tensor, cell: float) -> tuple[torch.Tensor, int, float]:
    """Cells of side ``cell`` (mm), widened by 1.5× until at most ``_POINT_BUDGET`` remain: each point's cell, the
    number of cells and the side used."""
    members, count = grid_cells(points, cell)
    while count > _POINT_BUDGET:
        cell *= 1.5
        members, count = grid_cells(points, cell)
    return members, count, cell
