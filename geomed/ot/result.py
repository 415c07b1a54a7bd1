"""What a Sinkhorn solve returns: the value, the potentials, diagnostics, and the plan as an operator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .softmin import Softmin


@dataclass(frozen=True)
class ScheduleStep:
    """One phase of the ε-schedule: ``eps`` (mm^p), iterations run at it, and wall time (s)."""

    phase: str
    eps: float
    iterations: int
    seconds: float


@dataclass(frozen=True)
class _Problem:
    """The solved problem in the solver's frame: batched (B, ·) tensors, points centred on ``center``."""

    softmin: Softmin
    x: torch.Tensor
    y: torch.Tensor
    log_a: torch.Tensor
    log_b: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    center: torch.Tensor
    batched: bool


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
        debiasing problems (for unbalanced OT: the same residual of the fixed-point equation).
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
    marginal_error: float
    converged: bool
    schedule: list[ScheduleStep]
    backend: str
    _problem: _Problem = field(repr=False)

    @property
    def iterations(self) -> int:
        """Total Sinkhorn iterations over the whole schedule."""
        return sum(step.iterations for step in self.schedule)

    def _apply(self, values: torch.Tensor, transpose: bool) -> torch.Tensor:
        problem = self._problem
        x, y, f, g, log_a, log_b = problem.x, problem.y, problem.f, problem.g, problem.log_a, problem.log_b
        if transpose:
            x, y, f, g, log_a, log_b = y, x, g, f, log_b, log_a
        vector = values.dim() == (2 if problem.batched else 1)
        batch = values if problem.batched else values.unsqueeze(0)
        batch = batch.unsqueeze(-1) if vector else batch
        if batch.shape[:2] != y.shape[:2]:
            raise ValueError(
                f"values must hold one row per point of the measure it lives on ({y.shape[1]}), "
                f"got shape {tuple(values.shape)}"
            )
        with torch.no_grad():
            h = log_b + g / self.eps
            softmin = problem.softmin(self.eps, x, y, h)
            average = problem.softmin.average(self.eps, x, y, h, softmin, batch.to(x))
            result = torch.exp(log_a + (f - softmin) / self.eps).unsqueeze(-1) * average
        result = result.squeeze(-1) if vector else result
        return result if problem.batched else result.squeeze(0)

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
            h = problem.log_b + problem.g / self.eps
            softmin = problem.softmin(self.eps, problem.x, problem.y, h)
            mapped = problem.softmin.average(self.eps, problem.x, problem.y, h, softmin, problem.y) + problem.center
        return mapped if problem.batched else mapped.squeeze(0)
