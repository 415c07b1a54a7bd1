r"""The velocity field of a kernel deformation at many points, in O(N) memory: KeOps or row tiles in torch.

A deformation's velocity at points :math:`x_i` is :math:`v(x_i) = \sum_k K(x_i, q_k)\, p_k` with the Gaussian
kernel :math:`K(x, q) = e^{-|x - q|^2 / 2\sigma^2}` over K control points :math:`q_k` carrying momenta
:math:`p_k`. While the momenta are fitted, the points are the pooled shape (≤ 2000) and the dense N × K kernel
with autograd is cheapest. Applying the fitted map to a whole mesh, and its Jacobian (one backward pass per
dimension through every time step), are another matter: autograd would keep an N × K kernel per step — 13 GB for
320k vertices, 500 control points and 10 steps. Here the velocity is an autograd function that keeps only its
inputs and recomputes the kernel in its backward pass:

.. math:: \frac{\partial}{\partial x_i} \big(g_i \cdot v(x_i)\big)
          = \sum_k K(x_i, q_k)\, (g_i \cdot p_k)\, \frac{q_k - x_i}{\sigma^2},

both reductions being one KeOps ``Genred`` on scaled coordinates ``x/σ`` (on GPUs: fused, nothing stored), or
torch tiles of at most 2²² kernel entries (on CPUs).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._spatial import keops_available

BACKENDS = ("auto", "dense", "tiles", "keops")
_TILE_ENTRIES = 2**22
_FORMULAS = {"velocity": "Exp(-SqDist(X,Q)*IntInv(2))*P", "pull": "Exp(-SqDist(X,Q)*IntInv(2))*(G|P)*(Q-X)"}
_GENREDS: dict[tuple, object] = {}


def velocity(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """v(x_i) = Σ_k exp(−|x_i − q_k|²/2σ²) p_k.

    Parameters
    ----------
    x : Tensor (N, D)
        Points (mm).
    q, p : Tensor (K, D)
        Control points (mm) and momenta (mm per unit time).
    scale : float
        Kernel width σ (mm).
    backend : {"auto", "dense", "tiles", "keops"}
        "dense": the N × K kernel with autograd (differentiable in everything). "tiles" / "keops": O(N + K)
        memory, differentiable in ``x`` only. "auto": dense while the control points or momenta need gradients
        or N·K ≤ 2²², else KeOps on GPUs and tiles on CPUs.

    Returns
    -------
    Tensor (N, D)
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if q.requires_grad or p.requires_grad or len(x) * len(q) <= _TILE_ENTRIES:
            backend = "dense"
        else:
            backend = "keops" if x.is_cuda and keops_available() else "tiles"
    if backend == "dense":
        return _kernel(x, q, scale) @ p
    if q.requires_grad or p.requires_grad:
        raise ValueError(f"backend={backend!r} differentiates in the points only; control points and momenta that "
                         "need gradients take backend='dense'")
    return _Velocity.apply(x, q, p, scale, backend)


def _kernel(x: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(x, q).square() / (2 * scale**2))


class _Velocity(torch.autograd.Function):
    """The velocity, keeping only (x, q, p) for its backward pass (which recomputes the kernel)."""

    @staticmethod
    def forward(ctx, x, q, p, scale: float, backend: str):
        ctx.save_for_backward(x, q, p)
        ctx.scale, ctx.backend = scale, backend
        return _reduce("velocity", x, q, p, None, scale, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, q, p = ctx.saved_tensors
        pull = _reduce("pull", x, q, p, grad.contiguous(), ctx.scale, ctx.backend) / ctx.scale**2
        return pull, None, None, None, None


def _reduce(kind: str, x, q, p, g, scale: float, backend: str) -> torch.Tensor:
    """Σ_k K_ik p_k ("velocity") or Σ_k K_ik (g_i·p_k)(q_k − x_i) ("pull"), (N, D)."""
    if backend == "keops":
        return _reduce_keops(kind, x, q, p, g, scale)
    rows = max(1, _TILE_ENTRIES // max(len(q), 1))
    out = torch.empty_like(x)
    for start in range(0, len(x), rows):
        block = slice(start, start + rows)
        kernel = _kernel(x[block], q, scale)
        if kind == "velocity":
            out[block] = kernel @ p
        else:
            weights = kernel * (g[block] @ p.T)
            out[block] = weights @ q - weights.sum(1, keepdim=True) * x[block]
    return out


def _reduce_keops(kind: str, x, q, p, g, scale: float) -> torch.Tensor:
    from pykeops.torch import Genred

    dim = x.shape[1]
    dtype = "float64" if x.dtype == torch.float64 else "float32"
    key = (kind, dim, dtype)
    if key not in _GENREDS:
        aliases = [f"X = Vi({dim})", f"Q = Vj({dim})", f"P = Vj({dim})"]
        if kind == "pull":
            aliases.append(f"G = Vi({dim})")
        _GENREDS[key] = Genred(_FORMULAS[kind], aliases, reduction_op="Sum", axis=1)
    arguments = [(x / scale).contiguous(), (q / scale).contiguous(), p.contiguous()]
    if kind == "pull":
        arguments.append(g)
    out = _GENREDS[key](*arguments, backend="auto")
    return out * scale if kind == "pull" else out
