"""What a Sinkhorn solve returns: the value, the potentials, diagnostics, and the plan as an operator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .softmin import Softmin


@dataclass(frozen=True)
class ScheduleStep:
    """One phase of the ε-schedule.

    ``phase`` is "initialisation", "eps-scaling", "scale-jump" (the step moved to a finer multiscale level) or
    "final-blur"; ``eps`` (mm^p); iterations run at it; wall time (s); ``scale``, the cell side (mm) of the
    multiscale level it ran on (0 for the input points); ``kept``, the fraction of the cross cost matrix evaluated;
    ``softmins``, the softmin reductions its Sinkhorn updates computed (4 per ε-step and per final iteration while
    the debiasing problems update, 2 once they have converged; the extrapolations and truncation tests of a
    multiscale or grid geometry are not counted); ``pattern_bytes``, the memory its truncation patterns held.
    """

    phase: str
    eps: float
    iterations: int
    seconds: float
    scale: float = 0.0
    kept: float = 1.0
    softmins: int = 0
    pattern_bytes: int = 0


@dataclass(frozen=True)
class _PlanItem:
    """One solved geometry in the solver's frame: (B, ·) tensors in the softmins' point order (``order_*`` maps
    from input order; None when it is the input order)."""

    softmin_xy: Softmin
    softmin_yx: Softmin
    x: torch.Tensor
    y: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    order_x: torch.Tensor | None
    order_y: torch.Tensor | None
    support_x: torch.Tensor | None = None
    support_y: torch.Tensor | None = None

    def apply(self, eps: float, values: torch.Tensor, transpose: bool) -> torch.Tensor:
        """π values (B, M, K) → (B, N, K) (or πᵀ), values and result in input order."""
        x, y, f, g, alpha, beta, softmin = self.x, self.y, self.f, self.g, self.alpha, self.beta, self.softmin_xy
        order_x, order_y, support_x, support_y = self.order_x, self.order_y, self.support_x, self.support_y
        if transpose:
            x, y, f, g, alpha, beta, softmin = y, x, g, f, self.beta, self.alpha, self.softmin_yx
            order_x, order_y, support_x, support_y = order_y, order_x, support_y, support_x
        if order_y is not None:
            values = torch.gather(values, 1, order_y.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
        if support_y is not None:
            values = values.new_zeros(values.shape[0], y.shape[1], values.shape[-1]).index_copy_(1, support_y, values)
        h = beta.log() + g / eps
        reduced = softmin(eps, x, y, h)
        result = torch.exp(alpha.log() + (f - reduced) / eps).unsqueeze(-1) * softmin.average(eps, x, y, h, reduced, values)
        return self._to_input(result, order_x, support_x)

    def barycentric_map(self, eps: float) -> torch.Tensor:
        """T(x_i) (B, N, D) in input order, in the solver's (centred) frame."""
        h = self.beta.log() + self.g / eps
        reduced = self.softmin_xy(eps, self.x, self.y, h)
        mapped = self.softmin_xy.average(eps, self.x, self.y, h, reduced, self.y)
        return self._to_input(mapped, self.order_x, self.support_x)

    @staticmethod
    def _to_input(values: torch.Tensor, order: torch.Tensor | None, support: torch.Tensor | None) -> torch.Tensor:
        """(B, n, K) in the solver's points → input order: un-permute (``order``), or pick the input points out of
        the voxel grid the solver worked on (``support``)."""
        if order is not None:
            values = torch.empty_like(values).scatter_(1, order.unsqueeze(-1).expand_as(values), values)
        if support is not None:
            values = values.index_select(1, support)
        return values


@dataclass(frozen=True)
class Solution:
    """The detached potentials that the Sinkhorn loop found, and how it went.

    Attributes
    ----------
    f, g : Tensor (B, N), (B, M)
        Potentials of the cross problem (cost units, mm^p), on the geometry's level-0 points in its order.
    f_aa, g_bb : Tensor (B, N), (B, M), or None
        Potentials of the symmetric problems; None when they were not solved.
    error : float or Tensor
        The last relative L1 marginal error; a 0-d tensor on the potentials' device when no decision needed it
        on the host (``max_iter=0`` without ``tol``): ``float()`` reads it.
    converged : bool
        Whether ``error`` reached ``tol``.
    schedule : list of ScheduleStep
    """

    f: torch.Tensor
    g: torch.Tensor
    f_aa: torch.Tensor | None
    g_bb: torch.Tensor | None
    error: float | torch.Tensor
    converged: bool
    schedule: list[ScheduleStep]

    @property
    def potentials(self) -> list[torch.Tensor | None]:
        """[f, g, f_aa, g_bb]."""
        return [self.f, self.g, self.f_aa, self.g_bb]


@dataclass(frozen=True)
class SolvedItem(Solution):
    """One solved geometry (a whole batch, or one multiscale item): its solution with the potentials in input order
    (B, ·), the value and the plan.

    Attributes
    ----------
    value : Tensor (B,)
        The divergence, differentiable w.r.t. the inputs.
    plan : _PlanItem
        The plan operator of the item, in the solver's frame.
    """

    value: torch.Tensor
    plan: _PlanItem


@dataclass(frozen=True)
class _Problem:
    """The solved problem: one plan item for a whole batch, or one per item (multiscale); centred on ``center``."""

    items: list[_PlanItem]
    center: torch.Tensor
    batch_shape: tuple[int, ...]

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        return [values] if len(self.items) == 1 else list(values.split(1))


@dataclass(frozen=True, eq=False)
class OTResult:
    r"""The (debiased) Sinkhorn divergence between two measures, with what the solve found.

    Attributes
    ----------
    value : Tensor, shape ``batch_shape`` (0-d for one pair)
        The divergence in cost units (mm² for ``p = 2``), differentiable w.r.t. the points and weights of both
        measures (exact gradients by the envelope theorem).
    f, g : Tensor (..., N), (..., M)
        Dual potentials of the cross problem on ``a``'s and ``b``'s points, in input order (detached), cost units.
    f_aa, g_bb : Tensor or None
        Potentials of the symmetric (debiasing) problems; None when ``debias=False``.
    eps : float
        The final temperature ``blur**p``.
    marginal_error : float
        Final relative L1 marginal error of the plan, ``Σ_i |π𝟙 − α|_i / m(α)``, worst over both sides and the
        debiasing problems (for unbalanced OT: the same residual of the fixed-point equation); read from the
        device when asked for.
    converged : bool
        Whether ``marginal_error`` reached ``tol`` within ``max_iter`` iterations.
    schedule : list of ScheduleStep
        ε per step of the ε-scaling, iterations and seconds per phase.
    backend : str
        The softmin implementation that ran.
    """

    value: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    f_aa: torch.Tensor | None
    g_bb: torch.Tensor | None
    eps: float
    _marginal_error: float | torch.Tensor = field(repr=False)
    converged: bool
    schedule: list[ScheduleStep]
    backend: str
    _problem: _Problem = field(repr=False)

    @property
    def marginal_error(self) -> float:
        return float(self._marginal_error)

    @property
    def iterations(self) -> int:
        """Total Sinkhorn iterations over the whole schedule."""
        return sum(step.iterations for step in self.schedule)

    @property
    def softmins(self) -> int:
        """Softmin reductions of the Sinkhorn updates over the whole schedule (see :class:`ScheduleStep`)."""
        return sum(step.softmins for step in self.schedule)

    def _apply(self, values: torch.Tensor, transpose: bool) -> torch.Tensor:
        problem = self._problem
        source = self.f if transpose else self.g
        leading = len(problem.batch_shape)
        vector = values.dim() == leading + 1
        if tuple(values.shape[: leading + 1]) != tuple(source.shape):
            raise ValueError(
                f"values must hold one row per point of the measure it lives on ({source.shape[-1]}), "
                f"got shape {tuple(values.shape)}"
            )
        batch = values.reshape(-1, *values.shape[leading:])
        batch = batch.unsqueeze(-1) if vector else batch
        with torch.no_grad():
            result = torch.cat([item.apply(self.eps, part.to(source), transpose)
                                for item, part in zip(problem.items, problem.split(batch), strict=True)])
        result = result.squeeze(-1) if vector else result
        return result.reshape((*problem.batch_shape, *result.shape[1:]))

    def plan_times(self, values: torch.Tensor) -> torch.Tensor:
        """``(π v)_i = Σ_j π_ij v_j`` for values (..., M[, K]) on ``b``'s points → (..., N[, K]).

        The plan ``π_ij = α_i β_j exp((f_i + g_j − C_ij)/ε)`` is never formed: one reduction, O(N + M) memory.
        ``plan_times(ones)`` is the first marginal of the plan.
        """
        return self._apply(values, transpose=False)

    def plan_transpose_times(self, values: torch.Tensor) -> torch.Tensor:
        """``(πᵀ u)_j = Σ_i π_ij u_i`` for values (..., N[, K]) on ``a``'s points → (..., M[, K])."""
        return self._apply(values, transpose=True)

    def barycentric_map(self) -> torch.Tensor:
        """Correspondences ``T(x_i) = Σ_j π_ij y_j / Σ_j π_ij`` in world mm, shape (..., N, D), in ``a``'s order."""
        problem = self._problem
        with torch.no_grad():
            mapped = torch.cat([item.barycentric_map(self.eps) for item in problem.items]) + problem.center
        return mapped.reshape((*problem.batch_shape, *mapped.shape[1:]))
