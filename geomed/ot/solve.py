"""One solve on batched tensors, for every front-end: backend choice, geometry, the loop, the value, the result.

:func:`solve_tensors` takes points and weights, centres them (the ground cost is translation invariant), picks the
backend (:func:`choose_backend`), builds the :class:`~geomed.ot.geometry.Geometry` — the single-scale one for
``dense``, ``online``, ``keops`` and ``triton``, one :class:`~geomed.ot.multiscale.Multiscale` per batch item, or a
:class:`~geomed.ot.grid.GridPyramid` on a voxel grid — runs :func:`geomed.ot.solver.sinkhorn_loop` on it, reads the
value and its gradients off the potentials (:func:`geomed.ot.divergence.divergence`) and returns them as an
:class:`~geomed.ot.result.OTResult`.
"""

from __future__ import annotations

import math
import warnings

import torch

from .._spatial import keops_available, morton_order, triton_unusable
from ..measure import Measure
from .divergence import divergence
from .geometry import Geometry, SingleScale, gather, scatter
from .grid import DenseGrid, GridPyramid, SharedGrid, grid_pays_off, shared_grid
from .grid_graphs import graph_applies, solve_as_graph
from .multiscale import Multiscale
from .problem import Problem, Reach, reaches
from .result import OTResult, Solution, SolvedItem, _PlanItem, _Problem
from .schedule import EpsilonSchedule
from .softmin import DenseSoftmin, KeOpsSoftmin, OnlineSoftmin, Softmin
from .solver import sinkhorn_loop


_MAX_EXTENT_PER_BLUR = 1e9  # ε-scaling from the diameter to the blur; beyond this the coordinates are not mm


def choose_backend(backend: str, n: int, m: int, dim: int, device: torch.device) -> str:
    """The softmin backend for n × m points in dimension ``dim`` on ``device``; raises a ValueError when an explicit
    ``keops`` or ``triton`` cannot run here.

    ``auto``: dense up to 4·10⁶ cost entries per item; beyond, the fused ``triton`` kernels on GPUs (KeOps where
    Triton is missing, then ``online``), multiscale on CPUs (online for D > 6, where the grid clusters stop).
    """
    if backend == "keops" and not keops_available():
        raise ValueError("backend='keops' was asked for, but KeOps is unavailable here (see the logged warning)")
    if backend == "triton" and (reason := triton_unusable(device)):
        raise ValueError(f"backend='triton' was asked for, but {reason}")
    if backend != "auto":
        return backend
    if n * m <= 4_000_000:
        return "dense"
    if device.type == "cuda":
        if not triton_unusable(device):
            return "triton"
        return "keops" if keops_available() else "online"
    return "multiscale" if dim <= 6 else "online"


def choose_grid(a: Measure, b: Measure, backend: str, p: int) -> SharedGrid | None:
    """The common voxel grid of two mask measures, when the grid path applies (``auto``) or is asked for."""
    if backend not in ("auto", "grid"):
        return None
    grid, reason = shared_grid(a, b, p)
    if backend == "grid" and grid is None:
        raise ValueError(f"backend='grid' was asked for, but {reason}")
    if backend == "auto" and grid is not None and not grid_pays_off(grid, a.n_points, b.n_points):
        return None
    return grid


def solve_tensors(x: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, *,
                  grid: SharedGrid | DenseGrid | None, batch_shape: tuple[int, ...], blur: float, p: int,
                  reach: Reach, scaling: float, debias: bool, backend: str, tol: float | None, max_iter: int,
                  diameter: float | None) -> OTResult:
    """The solve on batched tensors x (B, N, D), α (B, N), y (B, M, D), β (B, M); ``grid``: the shared voxel grid
    of two masks, or the grid of dense weights (then x = y are its voxel centres).

    The options are those of :func:`geomed.sinkhorn_divergence` (checked by the caller); ``batch_shape`` is the
    shape of the result's value (B items).
    """
    rho_a, rho_b = reaches(reach, p)
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, alpha, y, beta = x.to(dtype), alpha.to(dtype), y.to(dtype), beta.to(dtype)
    if rho_a is None and rho_b is None:
        alpha = alpha / alpha.sum(-1, keepdim=True)
        beta = beta / beta.sum(-1, keepdim=True)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if isinstance(grid, DenseGrid):  # voxel centres built about the grid's middle (grid_sinkhorn_divergence)
            center, offset = x.new_zeros(x.shape[0], 1, x.shape[-1]), 0.0
        else:
            center = (x.detach().sum(1, keepdim=True) + y.detach().sum(1, keepdim=True)) / (x.shape[1] + y.shape[1])
            x, y = x - center, y - center
            offset = center.detach().abs().max().double()
        if diameter is None:
            upper = torch.maximum(x.detach().amax(1), y.detach().amax(1)).double()
            lower = torch.minimum(x.detach().amin(1), y.detach().amin(1)).double()
            extent, offset = torch.stack([(upper - lower).norm(dim=-1).max(), offset]).tolist()  # one read
            diameter = max(extent, blur)
        _check_scale(diameter, blur, p, dtype, float(offset))
        name = "grid" if grid is not None else choose_backend(backend, x.shape[1], y.shape[1], x.shape[-1], x.device)
        identical = (x.shape == y.shape and rho_a == rho_b and (x is y or torch.equal(x, y))
                     and torch.equal(alpha, beta))
        problem = Problem(p=p, blur=blur, rho_a=rho_a, rho_b=rho_b, debias=debias, identical=identical, tol=tol,
                          max_iter=max_iter, schedule=EpsilonSchedule(diameter, blur, p, scaling))
        if grid is not None and graph_applies(grid, problem, x.device):
            solution, softmins = solve_as_graph(x, y, alpha.detach(), beta.detach(), grid, problem)
            items = [_solved_item(solution, softmins, None, x, y, alpha, beta, problem)]
        elif grid is not None:
            pyramid = GridPyramid(x, y, alpha.detach(), beta.detach(), grid.shape, grid.spacing, problem.damping,
                                  problem=problem, on_support=isinstance(grid, SharedGrid))
            item = _solve_item(pyramid, x, y, alpha, beta, problem)
            items = [grid.restrict(item) if isinstance(grid, SharedGrid) else item]
        elif name == "multiscale":
            # identical measures solve the cross problem only (S(α, α) = 0), so no symmetric levels are built
            items = [_solve_item(_multiscale(x[i], y[i], alpha[i], beta[i], problem),
                                 x[i : i + 1], y[i : i + 1], alpha[i : i + 1], beta[i : i + 1], problem)
                     for i in range(len(x))]
        else:
            softmin = _single_scale_softmin(name, p, x.device)
            order = None
            if name in ("dense", "online"):
                order = (torch.stack([morton_order(item, diameter / 1000) for item in x]),
                         torch.stack([morton_order(item, diameter / 1000) for item in y]))
            geometry = SingleScale(x, y, alpha.log(), beta.log(), softmin, order)
            items = [_solve_item(geometry, x, y, alpha, beta, problem)]
    return _result(items, center, batch_shape, problem.schedule.final, name)


def _check_scale(diameter: float, blur: float, p: int, dtype: torch.dtype, offset: float) -> None:
    """Refuse extents whose costs overflow the dtype or dwarf the blur beyond any ε-scaling; warn when the points
    sit so far from the origin that their own rounding exceeds a tenth of the blur (values then err by ~0.1% and
    more: 1.5% for 10 mm clouds 10⁷ mm out in float32 at a 0.5 mm blur)."""
    limit = torch.finfo(dtype).max
    if not math.isfinite(diameter) or diameter ** p > limit / 1e4:
        raise ValueError(f"the points span {diameter:.3g} mm: costs |x − y|^{p} overflow {dtype} (are the "
                         "coordinates in mm?)")
    if diameter / blur > _MAX_EXTENT_PER_BLUR:
        raise ValueError(f"the points span {diameter:.3g} mm, {diameter / blur:.2g} times the blur {blur:g} mm (at "
                         f"most {_MAX_EXTENT_PER_BLUR:.0e}): are the coordinates in mm?")
    resolution = offset * torch.finfo(dtype).eps
    if resolution > blur / 10:
        warnings.warn(f"the points lie about {offset:.3g} mm from the origin, where {dtype} resolves only "
                      f"{resolution:.2g} mm, more than a tenth of the blur {blur:g} mm: the value may be off; build the "
                      "measures in float64 (or centre the coordinates)", RuntimeWarning, stacklevel=4)


def _single_scale_softmin(name: str, p: int, device: torch.device) -> Softmin:
    if name == "online":
        return OnlineSoftmin.for_device(p, device)
    if name == "triton":
        from .triton_softmin import TritonSoftmin

        return TritonSoftmin(p)
    return {"dense": DenseSoftmin, "keops": KeOpsSoftmin}[name](p)


def _multiscale(x, y, alpha, beta, problem: Problem) -> Multiscale:
    return Multiscale(x.detach(), y.detach(), alpha.detach().log(), beta.detach().log(), p=problem.p,
                      blur=problem.blur, damping=problem.damping, debias=problem.symmetric)


def _solve_item(geometry: Geometry, x, y, alpha, beta, problem: Problem) -> SolvedItem:
    """Solve on one geometry (all items of a batch, or one multiscale item); values and potentials in input order."""
    with torch.no_grad():
        solution = sinkhorn_loop(geometry, problem)
    return _solved_item(solution, geometry.softmins, geometry.order, x, y, alpha, beta, problem)


def _solved_item(solution: Solution, softmins: dict[str, Softmin], order: tuple[torch.Tensor, torch.Tensor] | None,
                 x, y, alpha, beta, problem: Problem) -> SolvedItem:
    """The value, potentials and plan of a solution, from the level-0 ``softmins`` and point ``order`` of its
    geometry."""
    potentials = solution.potentials
    if problem.debias and problem.identical:  # S(α, α) = 0 exactly: the symmetric problems are the cross problem
        potentials[2], potentials[3] = potentials[1], potentials[0]
        softmins.setdefault("xx", softmins["xy"])
        softmins.setdefault("yy", softmins["yx"])
    order_x, order_y = order or (None, None)
    xs, ys = (x, y) if order_x is None else (gather(x, order_x), gather(y, order_y))
    alphas, betas = (alpha, beta) if order_x is None else (torch.gather(alpha, 1, order_x), torch.gather(beta, 1, order_y))
    with torch.enable_grad():
        value = divergence(softmins, xs, ys, alphas, betas, potentials, problem)
    f, g, f_aa, g_bb = (scatter(t, o) for t, o in zip(potentials, (order_x, order_y, order_x, order_y)))
    plan = _PlanItem(softmins["xy"], softmins["yx"], xs.detach(), ys.detach(),
                     alphas.detach(), betas.detach(), potentials[0], potentials[1], order_x, order_y)
    return SolvedItem(f=f, g=g, f_aa=f_aa, g_bb=g_bb, error=solution.error, converged=solution.converged,
                      schedule=solution.schedule, value=value, plan=plan)


def _result(items: list[SolvedItem], center, batch_shape: tuple[int, ...], eps: float, backend: str) -> OTResult:
    def stack(name):
        parts = [getattr(item, name) for item in items]
        return None if parts[0] is None else torch.cat(parts)

    value, f, g, f_aa, g_bb = (stack(name) for name in ("value", "f", "g", "f_aa", "g_bb"))

    def unbatch(tensor):
        return None if tensor is None else tensor.reshape((*batch_shape, *tensor.shape[1:]))

    schedule = items[0].schedule if len(items) == 1 else [step for item in items for step in item.schedule]
    return OTResult(
        value=unbatch(value), f=unbatch(f), g=unbatch(g), f_aa=unbatch(f_aa), g_bb=unbatch(g_bb), eps=eps,
        _marginal_error=items[0].error if len(items) == 1 else max(float(item.error) for item in items),
        converged=all(item.converged for item in items),
        schedule=schedule, backend=backend, _problem=_Problem([item.plan for item in items], center, batch_shape),
    )
