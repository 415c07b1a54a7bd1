r"""Wasserstein barycenters of several measures with the debiased Sinkhorn divergence: population templates.

Conventions are those of :mod:`geomed.ot.sinkhorn`: cost :math:`C(x, y) = |x - y|^2/2` with coordinates in mm,
temperature :math:`\varepsilon = \mathrm{blur}^2` (mm²), balanced OT (each input normalised to unit mass).
Given measures :math:`\alpha_1, \dots, \alpha_K` and barycentric weights :math:`\lambda_k \ge 0`,
:math:`\sum_k \lambda_k = 1`, the barycenter is

.. math:: \beta^\star = \arg\min_\beta \sum_k \lambda_k\, S_\varepsilon(\beta, \alpha_k),
   \qquad S_\varepsilon(\beta, \alpha) = \mathrm{OT}_\varepsilon(\beta, \alpha)
   - \tfrac12 \mathrm{OT}_\varepsilon(\beta, \beta) - \tfrac12 \mathrm{OT}_\varepsilon(\alpha, \alpha).

As ε → 0 it tends to the Wasserstein-2 barycenter (Agueh & Carlier, 2011): for translates of one shape, the shape
translated by :math:`\sum_k \lambda_k t_k`; in 1-D, the measure whose quantile function is
:math:`\sum_k \lambda_k F_k^{-1}`. The raw :math:`\mathrm{OT}_\varepsilon` barycenter is blurred (its
entropic bias shrinks the transport maps towards local means); the debiasing term
:math:`-\frac12\mathrm{OT}_\varepsilon(\beta, \beta)` removes that blur (Janati, Cuturi & Gramfort, "Debiased
Sinkhorn barycenters", ICML 2020).

Free support (:func:`sinkhorn_barycenter`)
    β = Σ_j b_j δ(y_j) with fixed weights b (those of the initial support) and free points y_j (mm). By the envelope
    theorem (see :mod:`geomed.ot.divergence`), with :math:`T_{\beta\to\alpha}(y_j) = \sum_i \pi_{ji} x_i / b_j` the
    barycentric map of the optimal entropic plan,

    .. math:: \frac{1}{b_j}\,\nabla_{y_j}\mathrm{OT}_\varepsilon(\beta, \alpha) = y_j - T_{\beta\to\alpha}(y_j),
       \qquad \frac{1}{b_j}\,\nabla_{y_j}\tfrac12\mathrm{OT}_\varepsilon(\beta, \beta) = y_j - T_{\beta\to\beta}(y_j)

    (the second moves both arguments of the symmetric problem: twice one side's gradient, halved). The update

    .. math:: y_j \leftarrow y_j - \frac{1}{b_j} \nabla_{y_j} \sum_k \lambda_k S_\varepsilon(\beta, \alpha_k)
       = \sum_k \lambda_k T_{\beta\to\alpha_k}(y_j) + \big(y_j - T_{\beta\to\beta}(y_j)\big)

    is the fixed-point iteration of Cuturi & Doucet (2014) for the biased :math:`\mathrm{OT}_\varepsilon`
    (:math:`y_j \leftarrow \sum_k \lambda_k T_k(y_j)`, a Newton step for ε → 0, where the Hessian of
    :math:`\mathrm{OT}` w.r.t. :math:`y_j` is :math:`b_j I`) plus the debiasing correction
    :math:`y_j - T_{\beta\to\beta}(y_j)`, which undoes the shrinkage of the entropic maps. For translates of one
    shape, one step from any of them lands on the exact answer, since
    :math:`T_{\beta\to\beta+t}(y) = T_{\beta\to\beta}(y) + t`. The gradients come from autograd through
    :func:`geomed.sinkhorn_divergence` (one extra reduction per problem), so every backend works.

On a voxel grid (:func:`grid_sinkhorn_barycenter`)
    Densities :math:`a_k` on one grid with Gibbs kernel :math:`K_{ij} = e^{-|x_i - x_j|^2 / 2\varepsilon}`: the
    debiased iterative Bregman projections of Janati et al. (2020, Algorithm 1),

    .. math:: u_k = \frac{a_k}{K v_k}, \quad b = d \odot \prod_k (K u_k)^{\lambda_k}, \quad v_k = \frac{b}{K u_k},
       \quad d \leftarrow \sqrt{d \odot \frac{b}{K d}},

    where the debiasing vector d converges to the scaling of the symmetric problem :math:`\mathrm{OT}_\varepsilon(b,
    b)` (:math:`d \odot K d = b`); d ≡ 1 gives the biased barycenter of Benamou et al. (2015). Every product with
    K is a separable log-sum-exp (:class:`geomed.ot.grid.GridSoftmin`: exact in the log domain, anisotropic spacing
    honoured), so the loop runs on :math:`\log u, \log v, \log d, \log b` and small blurs do not underflow. The
    blur decreases from the grid's diagonal to ``blur`` by factors ``scaling`` (ε-scaling), carrying the dual
    potentials :math:`g_k = \varepsilon(\log v_k - \log b)` and :math:`p = \varepsilon(\log d - \log b)` from one ε
    to the next, then the projections continue until the relative L1 errors of the plans' second marginals,
    :math:`\sum_k \lambda_k |v_k \odot K u_k - b|_1 / |b|_1`, and of the debiasing equation,
    :math:`|d \odot K d - b|_1 / |b|_1`, are below ``tol``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..measure import Measure
from .grid import GridSoftmin
from .problem import check_arguments
from .schedule import EpsilonSchedule
from .sinkhorn import sinkhorn_divergence

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class BarycenterResult:
    """A free-support Sinkhorn barycenter and how its iteration went.

    Attributes
    ----------
    measure : Measure
        The barycenter: points (M, D) in mm (detached), weights (M,) scaled to the weighted mean mass
        Σ_k λ_k m(α_k) of the inputs.
    history : list of float
        The objective Σ_k λ_k S_ε(β, α_k) (mm²) at the initial support and after each step; the last entry is the
        value at ``measure``.
    converged : bool
        Whether the stopping test held before ``max_iter`` steps.
    """

    measure: Measure
    history: list[float]
    converged: bool

    @property
    def iterations(self) -> int:
        """Number of fixed-point steps taken."""
        return len(self.history) - 1


def _barycentric_weights(weights, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """λ (K,) on the simplex from user weights (default uniform)."""
    if weights is None:
        return torch.full((count,), 1.0 / count, dtype=dtype, device=device)
    try:
        values = torch.as_tensor(weights, dtype=torch.float64).detach().flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"weights must be a sequence of {count} non-negative numbers: {error}") from None
    if len(values) != count:
        raise ValueError(f"weights must hold one number per measure ({count}), got {len(values)}")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"weights must be finite and non-negative, got {values.tolist()}")
    total = float(values.sum())
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {values.tolist()}")
    return (values / total).to(dtype=dtype, device=device)


def _check_iteration(max_iter, tol) -> None:
    if not (isinstance(max_iter, int) and max_iter >= 0):
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")


def _check_measures(measures) -> list[Measure]:
    if isinstance(measures, Measure) or not isinstance(measures, Sequence):
        raise TypeError(f"measures must be a sequence of geomed.Measure, got {type(measures).__name__}")
    if not measures:
        raise ValueError("measures is empty: a barycenter needs at least one measure")
    for index, measure in enumerate(measures):
        if not isinstance(measure, Measure):
            raise TypeError(f"measures[{index}] must be a geomed.Measure, got {type(measure).__name__}")
        if measure.batch_shape:
            raise ValueError(f"measures[{index}] must be one measure (N, D), got batch shape "
                             f"{tuple(measure.batch_shape)}")
        if measure.dim != measures[0].dim:
            raise ValueError(f"measures must live in one dimension: measures[0] has D={measures[0].dim}, "
                             f"measures[{index}] has D={measure.dim}")
        if measure.device != measures[0].device:
            raise ValueError(f"measures must be on one device: measures[0] is on {measures[0].device}, "
                             f"measures[{index}] on {measure.device}")
    return list(measures)


def _initial_support(first: Measure, support: Measure | None, n_points: int | None, seed: int, dim: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (M, D) and unit-mass weights (M,) to start from: ``support``, or the first measure (subsampled)."""
    if support is not None:
        if n_points is not None:
            raise ValueError("give support or n_points, not both (n_points subsamples the first measure)")
        if not isinstance(support, Measure):
            raise TypeError(f"support must be a geomed.Measure, got {type(support).__name__}")
        if support.batch_shape or support.dim != dim or support.device != first.device:
            raise ValueError(f"support must be one measure (M, {dim}) on {first.device}, got points of shape "
                             f"{tuple(support.points.shape)} on {support.device}")
        if bool((support.weights.detach() <= 0).any()):
            raise ValueError("support must have positive weights: each point's step is divided by its weight")
        points, weights = support.points.detach(), support.weights.detach()
    else:
        kept = first.weights.detach() > 0
        points, weights = first.points.detach()[kept], first.weights.detach()[kept]
        if n_points is not None:
            if not (isinstance(n_points, int) and 0 < n_points <= len(points)):
                raise ValueError(f"n_points must be an integer in [1, {len(points)}] (the points of measures[0] "
                                 f"with positive weight), got {n_points!r}; give a support to use more points")
            generator = torch.Generator().manual_seed(seed)
            chosen = torch.multinomial(weights.double().cpu(), n_points, replacement=False, generator=generator)
            points, weights = points[chosen.to(points.device)], torch.ones(n_points, device=points.device)
    points, weights = points.to(dtype), weights.to(dtype)
    return points.clone(), weights / weights.sum()


def sinkhorn_barycenter(
    measures: Sequence[Measure],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    blur: float,
    support: Measure | None = None,
    n_points: int | None = None,
    debias: bool = True,
    max_iter: int = 50,
    tol: float = 1e-5,
    scaling: float = 0.7,
    backend: str = "auto",
    sinkhorn_tol: float = 1e-3,
    seed: int = 0,
) -> BarycenterResult:
    r"""Free-support barycenter of measures for the debiased Sinkhorn divergence (balanced, ``p = 2``).

    Minimises :math:`\sum_k \lambda_k S_\varepsilon(\beta, \alpha_k)` over the points of β by the preconditioned
    gradient step :math:`y_j \leftarrow \sum_k \lambda_k T_{\beta\to\alpha_k}(y_j) + y_j - T_{\beta\to\beta}(y_j)`
    (see the module docstring), the weights of β staying fixed.

    Parameters
    ----------
    measures : sequence of Measure
        K ≥ 1 measures, points (N_k, D) in mm (ragged sizes allowed), one dimension D, one device. Balanced: each is
        normalised to unit mass for the transport (shapes are averaged, not sizes).
    weights : sequence of K floats or Tensor (K,), optional
        Barycentric weights λ_k ≥ 0 (normalised to sum 1); default uniform. Measures with λ_k = 0 are not solved.
    blur : float
        Entropic blur in mm (ε = blur²): details finer than ``blur`` are not resolved.
    support : Measure, optional
        Initial support (M, D): its points start the iteration and its weights (positive; normalised) stay.
        Default: the points and weights of ``measures[0]`` (points of zero weight dropped).
    n_points : int, optional
        Without ``support``: start from ``n_points`` points of ``measures[0]`` drawn without replacement with
        probabilities ∝ their weights (generator seeded with ``seed``), with equal weights.
    max_iter : int
        Maximum number of fixed-point steps.
    tol : float
        Stop when the objective changes by less than ``tol`` relative to its previous value. The objective is
        quadratic near its minimum, so this is strict on the points: they then move by well under ``blur``/10.
    scaling, backend
        Passed to :func:`geomed.sinkhorn_divergence`.
    sinkhorn_tol : float
        Marginal tolerance of each Sinkhorn solve (the ``tol`` of :func:`geomed.sinkhorn_divergence`).
    seed : int
        Seed of the subsampling for ``n_points``.

    Returns
    -------
    BarycenterResult
        ``measure``: points (M, D) in mm, weights (M,) scaled to the weighted mean mass Σ_k λ_k m(α_k) (mm² for
        surfaces, mm³ for volumes), in the dtype shared by the inputs, on their device; ``history`` of objective
        values (mm²); ``converged``.
    """
    check_arguments(blur, 2, scaling, backend, sinkhorn_tol, 0, None)
    _check_iteration(max_iter, tol)
    measures = _check_measures(measures)
    dtype = measures[0].dtype
    for measure in measures[1:]:
        dtype = torch.promote_types(dtype, measure.dtype)
    device = measures[0].device
    lam = _barycentric_weights(weights, len(measures), dtype, device)
    points, b = _initial_support(measures[0], support, n_points, seed, measures[0].dim, dtype)
    active = [(float(lam[k]), measure.to(dtype=dtype)) for k, measure in enumerate(measures) if lam[k] > 0]
    options = {"blur": blur, "scaling": scaling, "backend": backend, "tol": sinkhorn_tol, "debias": debias}

    history: list[float] = []
    converged = False
    while True:
        moving = points.clone().requires_grad_()
        barycenter = Measure(moving, b)
        objective = sum(weight * sinkhorn_divergence(barycenter, measure, **options).value
                        for weight, measure in active)
        (gradient,) = torch.autograd.grad(objective, moving)
        history.append(float(objective.detach()))
        logger.debug("sinkhorn_barycenter step %d: objective %.6g mm²", len(history) - 1, history[-1])
        if len(history) > 1:
            change = abs(history[-2] - history[-1]) / max(abs(history[-2]), torch.finfo(dtype).tiny)
            converged = change < tol
        if converged or len(history) > max_iter:
            break
        points = points - gradient / b.unsqueeze(-1)
    mass = sum(float(lam[k]) * float(measure.total_mass.detach()) for k, measure in enumerate(measures))
    logger.info("sinkhorn_barycenter: %s after %d steps, objective %.6g mm²",
                "converged" if converged else "stopped at max_iter", len(history) - 1, history[-1])
    return BarycenterResult(Measure(points.detach(), b * mass), history, converged)


def _check_densities(densities) -> torch.Tensor:
    if isinstance(densities, Sequence) and not isinstance(densities, torch.Tensor):
        if not densities:
            raise ValueError("densities is empty: a barycenter needs at least one density")
        for index, density in enumerate(densities):
            if not isinstance(density, torch.Tensor):
                raise TypeError(f"densities[{index}] must be a tensor, got {type(density).__name__}")
            if density.shape != densities[0].shape:
                raise ValueError(f"densities must lie on one grid: densities[0] has shape {tuple(densities[0].shape)}, "
                                 f"densities[{index}] has shape {tuple(density.shape)}")
        densities = torch.stack(list(densities))
    if not isinstance(densities, torch.Tensor) or not densities.is_floating_point():
        raise TypeError("densities must be a floating tensor (K, *spatial) or a sequence of K tensors (*spatial)")
    if not 2 <= densities.dim() <= 4:
        raise ValueError(f"densities must have shape (K, *spatial) with 1 to 3 spatial axes, got "
                         f"{tuple(densities.shape)}")
    if densities.shape[0] == 0:
        raise ValueError("densities is empty: a barycenter needs at least one density")
    detached = densities.detach()
    if not bool(torch.isfinite(detached).all()) or bool((detached < 0).any()):
        raise ValueError("densities must hold finite, non-negative values")
    empty = torch.nonzero(detached.flatten(1).sum(-1) <= 0)
    if len(empty):
        raise ValueError(f"densities[{int(empty[0])}] has no mass: an empty mask has no shape to average")
    return densities


def grid_sinkhorn_barycenter(
    densities: torch.Tensor | Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    blur: float,
    spacing: Sequence[float] | None = None,
    debias: bool = True,
    scaling: float = 0.7,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> torch.Tensor:
    r"""Debiased Sinkhorn barycenter of densities (masks, soft segmentations) on one voxel grid.

    Iterative Bregman projections in the log domain with the debiasing vector of Janati, Cuturi & Gramfort (2020),
    each kernel product a separable log-sum-exp over the grid (see the module docstring).

    Parameters
    ----------
    densities : Tensor (K, *spatial), or a sequence of K tensors (*spatial)
        Non-negative values on one grid with 1 to 3 spatial axes (e.g. K subjects' masks resampled to a common
        space), each with positive mass. Each is normalised to unit mass for the transport.
    weights : sequence of K floats or Tensor (K,), optional
        Barycentric weights λ_k ≥ 0 (normalised to sum 1); default uniform.
    blur : float
        Entropic blur in mm (ε = blur², cost |x − y|²/2).
    spacing : sequence of float, optional
        Voxel size along each spatial axis in mm (default 1); the direction of the image does not matter.
    debias : bool
        Debiased barycenter (default); False gives the classical entropic barycenter, blurred by about ``blur``.
    scaling : float in (0, 1)
        Ratio between successive blurs of the ε-scaling.
    max_iter : int
        Cap on the projections at the final blur.
    tol : float
        Stop once the relative L1 error of the plans' marginals on the barycenter side is below ``tol``.

    Returns
    -------
    Tensor (*spatial)
        The barycenter density, scaled to the weighted mean mass Σ_k λ_k m(a_k) of the inputs (so masks of
        voxel occupancies give a template of the mean volume, in voxels), in the input dtype (float32 for half
        inputs, in which the loop also runs), on the input device. Not differentiable.
    """
    check_arguments(blur, 2, scaling, "grid", tol, 0, None)
    _check_iteration(max_iter, tol)
    densities = _check_densities(densities)
    shape = tuple(densities.shape[1:])
    spacing = (1.0,) * len(shape) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != len(shape) or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {len(shape)} positive numbers of mm, got {spacing!r}")
    dtype = torch.float32 if densities.dtype in (torch.float16, torch.bfloat16) else densities.dtype
    flat = densities.detach().to(dtype).reshape(len(densities), -1)
    lam = _barycentric_weights(weights, len(densities), dtype, flat.device)
    masses = flat.sum(-1)
    log_a = (flat / masses.unsqueeze(-1)).log()
    softmin = GridSoftmin(shape, spacing)
    diameter = math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing)))
    epsilons = EpsilonSchedule(max(diameter, blur), blur, 2, scaling).epsilons
    with torch.no_grad():
        log_b = _bregman_barycenter(softmin, log_a, lam, epsilons, debias, max_iter, tol)
    barycenter = torch.softmax(log_b, -1) * (lam * masses).sum()
    return barycenter.reshape(shape)


def _bregman_barycenter(softmin: GridSoftmin, log_a: torch.Tensor, lam: torch.Tensor, epsilons: list[float],
                        debias: bool, max_iter: int, tol: float) -> torch.Tensor:
    """log b (N,) of the (debiased) barycenter of the unit-mass densities exp(log_a) (K, N); one projection per ε
    of the schedule, then up to ``max_iter`` at the last ε until the marginal error is below ``tol``."""
    count, size = log_a.shape
    log_b = log_a.new_full((1, size), -math.log(size))
    log_v = log_b.expand(count, -1).clone()
    log_d = log_b.clone() if debias else torch.zeros_like(log_b)
    weights = lam.unsqueeze(-1)
    previous = epsilons[0]
    error, iterations = math.inf, 0
    for index, eps in enumerate(epsilons):
        log_v = log_b + (log_v - log_b) * (previous / eps)
        if debias:
            log_d = log_b + (log_d - log_b) * (previous / eps)
        previous = eps
        final = index == len(epsilons) - 1
        for _ in range(max(1, max_iter) if final else 1):
            log_b, log_v, log_d, error = _projection(softmin, eps, log_a, weights, log_v, log_d, debias)
            iterations += 1
            if final and error < tol:
                break
    if error < tol:
        logger.info("grid_sinkhorn_barycenter: converged after %d projections (error %.2g)",
                    iterations, error)
    else:
        logger.warning("grid_sinkhorn_barycenter: marginal error %.2g ≥ tol=%g after %d projections "
                       "(raise max_iter or blur)", error, tol, iterations)
    return log_b[0]


def _projection(softmin: GridSoftmin, eps: float, log_a: torch.Tensor, weights: torch.Tensor, log_v: torch.Tensor,
                log_d: torch.Tensor, debias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One round of Bregman projections: log b (1, N), the new log v (K, N) and log d (1, N), and the relative L1
    error of the previous v and d: the larger of Σ_k λ_k |v_k ⊙ K u_k − b|_1 and |d ⊙ K d − b|_1, over |b|_1."""

    def log_kernel(h):
        return softmin(eps, None, None, h).div_(-eps)

    log_u = log_a - log_kernel(log_v)
    log_ku = log_kernel(log_u)
    log_b = (weights * log_ku).sum(0, keepdim=True) + log_d
    total = log_b.logsumexp(-1, keepdim=True)
    error = float((weights * (torch.exp(log_v + log_ku - total) - torch.exp(log_b - total)).abs()).sum())
    if debias:
        log_kd = log_kernel(log_d)
        error = max(error, float((torch.exp(log_d + log_kd - total) - torch.exp(log_b - total)).abs().sum()))
        log_d = 0.5 * (log_d + log_b - log_kd)
    return log_b, log_b - log_ku, log_d, error
