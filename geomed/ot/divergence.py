r"""The value of a solved problem and its exact gradients, from the potentials (envelope theorem).

The divergence :math:`S = \mathrm{OT}(\alpha,\beta) - \tfrac12\mathrm{OT}(\alpha,\alpha) - \tfrac12\mathrm{OT}(\beta,
\beta) + \tfrac\varepsilon2 (m(\alpha) - m(\beta))^2` reduces, at optimality, to sums over the potentials only:

.. math::
   S = \langle \alpha, \psi_a(f) - \psi_a(p)\rangle + \langle \beta, \psi_b(g) - \psi_b(q)\rangle,
   \qquad \psi(f) = f \ \text{(balanced)}, \quad \psi(f) = -(\rho + \varepsilon/2)\, e^{-f/\rho} \ \text{(KL)},

with p, q the symmetric potentials; it is ≥ 0, zero iff α = β, and positive definite.

Gradients (envelope theorem)
    The dual objective is stationary in the potentials, so the gradient of S w.r.t. points and weights is that of the
    objective at *fixed* optimal potentials. One last, differentiable softmin per problem — with the other measure
    and the potentials detached — provides it: w.r.t. a point, :math:`\sum_j \pi_{ij}\nabla_x C(x_i, y_j)` minus its
    symmetric counterpart; w.r.t. a weight, :math:`f_i - p_i` (balanced) or :math:`(\rho+\varepsilon)(e^{-p_i/\rho} -
    e^{-f_i/\rho})` (KL; note :math:`\rho + \varepsilon`, not the :math:`\rho + \varepsilon/2` of the value). For
    ``p = 2`` the backward pass is one soft average :math:`x_i - \sum_j w_{ij} y_j` (a custom autograd function), so
    no backend keeps an (N, M) graph.
"""

from __future__ import annotations

import torch

from .geometry import Potentials
from .problem import Problem, damping
from .softmin import KeOpsSoftmin, Softmin


class _EnvelopeSoftmin(torch.autograd.Function):
    """softmin(x; y, h) differentiable w.r.t. x only: ∂s_i/∂x_i = Σ_j w_ij ∇_x C(x_i, y_j) (x_i − A_i(y) for p = 2)."""

    @staticmethod
    def forward(ctx, x, y, h, eps, softmin):
        value = softmin(eps, x, y, h)
        ctx.save_for_backward(x, y, h, value)
        ctx.eps, ctx.softmin = eps, softmin
        return value

    @staticmethod
    def backward(ctx, grad_value):
        x, y, h, value = ctx.saved_tensors
        gradient = None
        if ctx.needs_input_grad[0]:
            if ctx.softmin.p == 2:
                gradient = x - ctx.softmin.average(ctx.eps, x, y, h, value, y)
            else:
                gradient = ctx.softmin.cost_gradient(ctx.eps, x, y, h, value)
            gradient = grad_value.unsqueeze(-1) * gradient
        return gradient, None, None, None, None


def _differentiable_softmin(softmin: Softmin, eps: float, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor):
    if softmin.p == 2 or not isinstance(softmin, KeOpsSoftmin):
        return _EnvelopeSoftmin.apply(x, y, h, eps, softmin)
    return softmin(eps, x, y, h)


def divergence(softmins: dict[str, Softmin], x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor,
               beta: torch.Tensor, potentials: Potentials, problem: Problem) -> torch.Tensor:
    """The value (B,), with exact gradients: one differentiable softmin per problem at fixed optimal potentials.

    Parameters
    ----------
    softmins : dict
        The level-0 softmins of the geometry ("xy", "yx", and "xx", "yy" when debiased).
    x, y : Tensor (B, N, D), (B, M, D)
        Points (mm) in the softmins' order, possibly requiring grad.
    alpha, beta : Tensor (B, N), (B, M)
        Weights, possibly requiring grad.
    potentials : [f, g, f_aa, g_bb]
        The detached optimal potentials, in the same order.
    problem : Problem

    If the solve stopped at the last extrapolation (``max_iter=0``), the value and its gradient w.r.t. the weights
    are read off those potentials (GeomLoss's last extrapolation: no full-resolution softmin), and the softmins run
    only when the points need gradients.
    """
    eps, rho_a, rho_b, debias = problem.schedule.final, problem.rho_a, problem.rho_b, problem.debias
    extrapolated = problem.max_iter == 0
    value, surrogate = _terms(alpha, beta, potentials, eps, rho_a, rho_b, debias) if extrapolated else (None, None)
    if not extrapolated or x.requires_grad or y.requires_grad:
        f, g, f_aa, g_bb = potentials
        log_a, log_b = alpha.detach().log(), beta.detach().log()
        damp_a, damp_b = damping(eps, rho_a), damping(eps, rho_b)
        updated = [damp_a * _differentiable_softmin(softmins["xy"], eps, x, y.detach(), log_b + g / eps),
                   damp_b * _differentiable_softmin(softmins["yx"], eps, y, x.detach(), log_a + f / eps), None, None]
        if debias:
            updated[2] = damp_a * _differentiable_softmin(softmins["xx"], eps, x, x.detach(), log_a + f_aa / eps)
            updated[3] = damp_b * _differentiable_softmin(softmins["yy"], eps, y, y.detach(), log_b + g_bb / eps)
        updated_value, surrogate = _terms(alpha, beta, updated, eps, rho_a, rho_b, debias)
        value = updated_value if value is None else value
    return value.detach() + (surrogate - surrogate.detach())


def _side(weights, new, symmetric, rho, eps, debias):
    """(value, gradient surrogate) of one side's term ⟨w, ψ(new) − ψ(symmetric)⟩ (or of OT_ε without debias)."""
    if rho is None:
        if debias:
            term = (weights * (new - symmetric)).sum(-1)
            return term, term
        return (weights * (new - eps / 2)).sum(-1), (weights * (new - eps)).sum(-1)
    if debias:
        difference = (weights * (torch.exp(-symmetric / rho) - torch.exp(-new / rho))).sum(-1)
        return (rho + eps / 2) * difference, (rho + eps) * difference
    return ((weights * (rho - (rho + eps / 2) * torch.exp(-new / rho))).sum(-1),
            (weights * (rho - (rho + eps) * torch.exp(-new / rho))).sum(-1))


def _terms(alpha, beta, potentials, eps, rho_a, rho_b, debias):
    """(value, gradient surrogate) of the divergence at the given potentials (f, g, f_aa, g_bb)."""
    f, g, f_aa, g_bb = potentials
    value_a, grad_a = _side(alpha, f, f_aa, rho_a, eps, debias)
    value_b, grad_b = _side(beta, g, g_bb, rho_b, eps, debias)
    value, surrogate = value_a + value_b, grad_a + grad_b
    if not debias:
        mass = eps * alpha.sum(-1) * beta.sum(-1)
        value, surrogate = value + mass, surrogate + mass
    return value, surrogate
