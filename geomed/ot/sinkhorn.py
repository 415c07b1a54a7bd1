r"""The debiased Sinkhorn divergence between measures: the front-ends on measures, with the maths they solve.

Conventions (GeomLoss's, in millimetres)
    Cost :math:`C(x, y) = |x - y|^p / p` — :math:`|x-y|^2/2` for ``p = 2`` — with coordinates in mm, so values are
    in mm² for ``p = 2``. Temperature :math:`\varepsilon = \mathrm{blur}^p`; the marginal penalty of unbalanced OT
    is :math:`\rho\,\mathrm{KL}` with :math:`\rho = \mathrm{reach}^p`.

The entropic problem, in its dual form, for measures :math:`\alpha = \sum_i \alpha_i \delta_{x_i}` and
:math:`\beta = \sum_j \beta_j \delta_{y_j}`:

.. math::
   \mathrm{OT}_\varepsilon(\alpha, \beta) = \max_{f, g}\; \langle \alpha, \varphi_a(f)\rangle + \langle \beta,
   \varphi_b(g)\rangle - \varepsilon \langle \alpha \otimes \beta, e^{(f \oplus g - C)/\varepsilon} - 1\rangle,

with :math:`\varphi(f) = f` on a balanced side and :math:`\varphi(f) = -\rho(e^{-f/\rho} - 1)` on an unbalanced one.
Its optimality conditions are the Sinkhorn equations :math:`f = \lambda\,\mathrm{softmin}_\varepsilon(x, y, \log\beta
+ g/\varepsilon)` (and symmetrically for g), with damping :math:`\lambda = 1/(1 + \varepsilon/\rho)` (1 when
balanced).

The layers below: :mod:`geomed.ot.problem` (argument checks, reach and damping), :mod:`geomed.ot.schedule` (the
ε-schedule), :mod:`geomed.ot.solver` (the ε-scaling, symmetric, log-domain loop that solves the Sinkhorn equations
for the cross problem and the symmetric ones), :mod:`geomed.ot.divergence` (the debiased value and its gradients by
the envelope theorem), the geometries (:mod:`geomed.ot.geometry`, :mod:`geomed.ot.multiscale`,
:mod:`geomed.ot.grid`) and their softmins (:mod:`geomed.ot.softmin`, :mod:`geomed.ot.triton_softmin`), tied
together by :mod:`geomed.ot.solve`. This module holds :func:`sinkhorn_divergence` and :class:`SinkhornLoss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..measure import Measure
from .problem import Reach, check_arguments
from .result import OTResult
from .solve import choose_grid, solve_tensors


def sinkhorn_divergence(
    a: Measure | Sequence[Measure],
    b: Measure | Sequence[Measure],
    *,
    blur: float,
    p: int = 2,
    reach: Reach = None,
    scaling: float = 0.7,
    debias: bool = True,
    backend: str = "auto",
    tol: float | None = 1e-2,
    max_iter: int = 500,
    diameter: float | None = None,
) -> OTResult | list[OTResult]:
    r"""Debiased Sinkhorn divergence between two measures (or batches, or lists of them), in mm^p.

    Parameters
    ----------
    a, b : Measure, or sequences of Measures of equal length
        Points (N, D) / (M, D) in mm, or equal-size batches (B, N, D) / (B, M, D); a list pairs ragged measures
        item by item. Normals are ignored (use the kernel losses for oriented shapes, or put them in the points).
    blur : float
        Entropic blur in mm: ε = blur^p. Details finer than ``blur`` are smoothed out.
    p : {1, 2}
        Exponent of the cost C(x, y) = |x − y|^p / p (``p = 2``: |x − y|²/2, the squared Wasserstein geometry).
    reach : float, or (float | None, float | None), optional
        None (default): balanced OT; each measure is normalised to unit mass inside (shapes are compared, not
        sizes). A number: unbalanced OT with the marginal penalty (reach^p)·KL on both sides, physical masses kept
        (mm², mm³), so that growth and atrophy are seen; points farther apart than ~reach are not matched. A pair:
        semi-unbalanced, one reach per side (None for a balanced side).
    scaling : float in (0, 1)
        Ratio between successive blurs of the ε-scaling (closer to 1: more steps, each better warm-started).
    debias : bool
        Return the Sinkhorn divergence S (default), or the raw entropic OT_ε (biased: OT_ε(α, α) > 0).
    backend : {"auto", "dense", "online", "keops", "triton", "multiscale", "grid"}
        Softmin implementation (see :mod:`geomed.ot.softmin`, :mod:`geomed.ot.triton_softmin`,
        :mod:`geomed.ot.multiscale` and :mod:`geomed.ot.grid`); "auto" takes "grid" for two masks on one voxel
        grid when its separable softmin is cheaper than the dense one, else "dense" up to 4·10⁶ cost entries, then
        "triton" on GPUs ("keops", then "online", without Triton) and "multiscale" on CPUs.
    tol : float or None
        Stop at the final blur once the relative L1 marginal error is below ``tol``; None runs ``max_iter``
        iterations. The value is a maximum over the potentials, so its error is second order in theirs: the
        default 1e-2 keeps it within 0.1% of the converged value (see ``tests/test_sinkhorn.py``).
    max_iter : int
        Cap on the iterations at the final blur (after the ε-scaling steps). With ``max_iter=0`` the solve stops at
        the end of the ε-scaling and the value is read off the potentials extrapolated to the input points
        (GeomLoss's "last extrapolation"): the fastest, least accurate setting, for losses in training loops.
    diameter : float, optional
        Largest distance between points (mm), the first blur of the schedule; default: the diagonal of the
        bounding box of both measures.

    Returns
    -------
    OTResult, or a list of them for sequences
        ``value`` of shape ``batch_shape``, potentials, marginal error, the schedule, and the plan as an operator.

    Notes
    -----
    Grad mode is restored on exit (also on errors); no global state changes. Under autocast, or for half inputs,
    the solver runs in float32. The ground cost is translation invariant, so both measures are centred on their
    common mean first: millimetre coordinates of a whole body lose no precision in float32.
    """
    check_arguments(blur, p, scaling, backend, tol, max_iter, diameter)
    if isinstance(a, Measure) and isinstance(b, Measure):
        return _solve(a, b, blur=blur, p=p, reach=reach, scaling=scaling, debias=debias, backend=backend, tol=tol,
                      max_iter=max_iter, diameter=diameter)
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, Measure):
        if len(a) != len(b) or not a:
            raise ValueError(f"a and b must be sequences of the same, non-zero length, got {len(a)} and {len(b)}")
        return [
            _solve(ai, bi, blur=blur, p=p, reach=reach, scaling=scaling, debias=debias, backend=backend, tol=tol,
                   max_iter=max_iter, diameter=diameter)
            for ai, bi in zip(a, b, strict=True)
        ]
    raise TypeError(f"a and b must both be Measures or both sequences of Measures, got {type(a).__name__} and "
                    f"{type(b).__name__}")


def _solve(a, b, *, blur, p, reach, scaling, debias, backend, tol, max_iter, diameter) -> OTResult:
    """One pair of measures (or of equal batches): checked, put on their common voxel grid or batched, solved."""
    for name, measure in (("a", a), ("b", b)):
        if not isinstance(measure, Measure):
            raise TypeError(f"{name} must be a geomed.Measure, got {type(measure).__name__}")
    if a.dim != b.dim:
        raise ValueError(f"a and b must live in the same dimension, got D={a.dim} and D={b.dim}")
    if a.batch_shape != b.batch_shape:
        raise ValueError(f"a and b must have the same batch shape, got {tuple(a.batch_shape)} and {tuple(b.batch_shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    if a.dim > 6 and backend == "multiscale":
        raise ValueError(f"backend='multiscale' supports dimensions D ≤ 6, got D={a.dim}")
    grid = choose_grid(a, b, backend, p)
    if grid is not None:
        x, alpha, y, beta = grid.embed(a, b)
    else:
        x, alpha = _batched(a, "a")
        y, beta = _batched(b, "b")
    return solve_tensors(x, alpha, y, beta, grid=grid, batch_shape=tuple(a.batch_shape), blur=blur, p=p,
                         reach=reach, scaling=scaling, debias=debias, backend=backend, tol=tol, max_iter=max_iter,
                         diameter=diameter)


def _batched(measure: Measure, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (B, N, D) and weights (B, N) of a measure or a batch of them; half precision goes to float32."""
    if len(measure.batch_shape) > 1:
        raise ValueError(f"{name} must be one measure (N, D) or a batch (B, N, D), got batch shape {measure.batch_shape}")
    points, weights = measure.points, measure.weights
    if not measure.batch_shape:
        points, weights = points.unsqueeze(0), weights.unsqueeze(0)
    if points.dtype in (torch.float16, torch.bfloat16):
        points, weights = points.float(), weights.float()
    return points, weights


class SinkhornLoss(nn.Module):
    """:func:`sinkhorn_divergence` as a loss module: ``SinkhornLoss(blur=2.0)(a, b)`` returns the value.

    Takes the same keyword parameters as :func:`sinkhorn_divergence`. For sequences of measures it returns the
    values stacked, shape (len(a),).
    """

    def __init__(self, *, blur: float, p: int = 2, reach: Reach = None, scaling: float = 0.7, debias: bool = True,
                 backend: str = "auto", tol: float | None = 1e-2, max_iter: int = 500,
                 diameter: float | None = None):
        super().__init__()
        check_arguments(blur, p, scaling, backend, tol, max_iter, diameter)
        self.options = dict(blur=blur, p=p, reach=reach, scaling=scaling, debias=debias, backend=backend, tol=tol,
                            max_iter=max_iter, diameter=diameter)

    def forward(self, a: Measure | Sequence[Measure], b: Measure | Sequence[Measure]) -> torch.Tensor:
        result = sinkhorn_divergence(a, b, **self.options)
        return torch.stack([r.value for r in result]) if isinstance(result, list) else result.value

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
