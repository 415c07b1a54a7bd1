r"""Kernel losses between shapes: MMD for measures, varifolds and currents for surfaces.

A positive kernel :math:`k` turns measures into vectors of a Hilbert space, and the squared distance between two
of them is a loss with closed form — no iterations, no entropic blur, smooth gradients:

.. math:: L(\alpha, \beta) = \tfrac12\,\|\alpha - \beta\|_k^2
          = \tfrac12 \sum_{ij} a_i a_{i'} k_{ii'} - \sum_{ij} a_i b_j k_{ij} + \tfrac12 \sum_{jj'} b_j b_{j'} k_{jj'}

(GeomLoss's convention, so values compare one to one). **MMD** (:func:`mmd`) uses a kernel on positions
:math:`x` (mm) with a width σ = ``blur`` (mm):

=============  ===========================================  ============================================
``gaussian``   :math:`\exp(-|x-y|^2 / 2\sigma^2)`            smooth, local: sees details of size ≈ blur
``laplacian``  :math:`\exp(-|x-y| / \sigma)`                 heavier tails, sharper gradients
``energy``     :math:`-|x-y|`                                scale-free, global (no blur): the energy distance
=============  ===========================================  ============================================

**Varifolds and currents** (:func:`varifold_distance`) compare surfaces as measures of *oriented area elements*:
a triangle mesh becomes Diracs at the triangle centroids :math:`x_i` with weights the areas :math:`a_i` (mm²) and
unit normals :math:`u_i` (:meth:`geomed.Measure.from_mesh`, or :meth:`geomed.Measure.from_triangles` to
differentiate through the vertices), and the kernel is a product
:math:`k\big((x, u), (y, v)\big) = \exp(-|x-y|^2/2\sigma^2)\;k_o(u, v)` with

=============  ==============================================  ===========================================
``current``    :math:`\langle u, v\rangle`                      oriented, linear: opposite normals cancel
                                                                (thin folds vanish — a known blind spot)
``oriented``   :math:`\exp\big((\langle u,v\rangle - 1)/\tau^2\big)`  oriented varifold (Kaltenmark et al. 2017):
                                                                tells an inside-out patch from a flipped one
``unoriented`` :math:`\langle u, v\rangle^2`                    unoriented varifold (Charon & Trouvé 2013):
                                                                blind to the sign of normals
=============  ==============================================  ===========================================

with τ = ``orientation_width`` (radians, roughly). A varifold distance is small for two meshings of one surface,
whatever their triangles: it depends on the surface, not on its parametrisation.

How it is computed
------------------
Both measures are concatenated into one signed measure :math:`\sum_p w_p\,\delta_{z_p}`, ``w = (a, −b)``, so that
:math:`L = \tfrac12 \sum_p w_p (K w)_p`. Because the kernel is symmetric, one pass over the pairs gives the value
*and* every gradient: :math:`\partial L/\partial w_p = (Kw)_p`, :math:`\partial L/\partial z_p = w_p \sum_q w_q
\nabla_1 k(z_p, z_q)`, and likewise for normals. The pass is tiled: rows in blocks of consecutive points
(sorted along a Z curve, so that a block is a small box), columns in chunks; each tile is a few BLAS products
and one exponential pass, never an autograd graph — memory of one tile whatever the size.

Truncation (``truncate``, default 1e-9): the Gaussian and Laplacian kernels fall below ``truncate`` beyond
:math:`\sigma\sqrt{2\ln(1/\text{truncate})}` and :math:`\sigma\ln(1/\text{truncate})`; block pairs whose boxes are
farther apart are skipped. Each skipped kernel value is below ``truncate`` (orientation kernels are at most 1), so
the value changes by at most :math:`\tfrac12\,\text{truncate}\,(\sum|a| + \sum|b|)^2`. On a femur of 100 mm with
a 2 mm blur this skips almost all pairs. The energy kernel is global and never truncated.

Backends: ``"torch"`` (the tiles above, CPU or GPU) and ``"keops"`` (the same fused formula as one KeOps
reduction, every pair, O(N + M) memory). ``"auto"`` takes torch: measured in ``benchmarks/kernels.py``, its BLAS
tiles beat KeOps' generated loops on CPUs, and truncation makes it the faster one on GPUs for local kernels too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._spatial import LOGIT_FLOOR, expand_ranges, keops_available, morton_order
from .measure import Measure

KERNELS = ("gaussian", "laplacian", "energy")
ORIENTATIONS = ("current", "oriented", "unoriented")
BACKENDS = ("auto", "torch", "keops")

_ROWS = {"cpu": 256, "cuda": 4096}
_COLUMNS = {"cpu": 8192, "cuda": 65536}
_CELL = 32


@dataclass(frozen=True)
class _Kernel:
    """A position kernel (``name``, width ``blur`` in mm), times an orientation kernel when ``orientation`` is set."""

    name: str
    blur: float | None
    orientation: str | None = None
    orientation_width: float = 0.5

    def radius(self, truncate: float | None) -> float:
        """Distance (mm) beyond which the position kernel is below ``truncate`` (∞ when it never is)."""
        if truncate is None or self.name == "energy":
            return math.inf
        if self.name == "gaussian":
            return self.blur * math.sqrt(2 * math.log(1 / truncate))
        return self.blur * math.log(1 / truncate)

    def tile(self, xr, ur, yc, vc, wc, gradients: bool) -> torch.Tensor:
        """Σ_j w_j k(r, j) and, with ``gradients``, Σ_j w_j ∇_x k and Σ_j w_j ∇_u k, for rows xr (R, D) against
        columns yc (C, D) with weights wc (C,) → (R, 1) or (R, 1 + D [+ D])."""
        centre = xr.mean(0, keepdim=True)
        xr, yc = xr - centre, yc - centre
        if self.name == "gaussian":
            squared = torch.addmm((yc * yc).sum(1).unsqueeze(0), xr, yc.T, alpha=-2)
            squared.add_((xr * xr).sum(1, keepdim=True)).clamp_min_(0)
            position = squared.mul_(-0.5 / self.blur**2).clamp_min_(LOGIT_FLOOR).exp_()
            slope = None
        else:
            distance = torch.cdist(xr, yc, compute_mode="donot_use_mm_for_euclid_dist")
            if self.name == "laplacian":
                position = torch.div(distance, -self.blur).clamp_min_(LOGIT_FLOOR).exp_()
            else:
                position = -distance
            if gradients:
                slope = distance.reciprocal()
                if self.name == "laplacian":
                    slope.mul_(position).div_(self.blur)
                slope.nan_to_num_(0.0, 0.0, 0.0)
        orientation = derivative = None
        if self.orientation is not None:
            cosine = ur @ vc.T
            if self.orientation == "current":
                orientation, derivative = cosine, position
            elif self.orientation == "unoriented":
                orientation, derivative = cosine * cosine, position * cosine * 2
            else:
                orientation = cosine.sub_(1).div_(self.orientation_width**2).clamp_min_(LOGIT_FLOOR).exp_()
                derivative = position * orientation / self.orientation_width**2
        full = position if orientation is None else position * orientation
        if not gradients:
            return (full @ wc).unsqueeze(1)
        moments = torch.cat([wc.unsqueeze(0), wc * yc.T], 0)
        if slope is None:
            sums = _skinny_product(full, moments)
            value = sums[:, :1]
            pull = (sums[:, 1:] - value * xr) / self.blur**2
        else:
            value = (full @ wc).unsqueeze(1)
            sums = _skinny_product(slope if orientation is None else slope * orientation, moments)
            pull = sums[:, 1:] - sums[:, :1] * xr
        parts = [value, pull]
        if derivative is not None:
            parts.append(_skinny_product(derivative, wc * vc.T))
        return torch.cat(parts, 1)

    def keops_formula(self, gradients: bool) -> tuple[str, bool]:
        """The same reduction as :meth:`tile` as a KeOps formula over scaled coordinates X = x/σ (x for energy)."""
        if self.name == "gaussian":
            position, pull = "Exp(-SqDist(X,Y)*IntInv(2))", "Exp(-SqDist(X,Y)*IntInv(2))*(Y-X)"
        elif self.name == "laplacian":
            position, pull = "Exp(-Norm2(X-Y))", "Exp(-Norm2(X-Y))*Rsqrt(SqDist(X,Y))*(Y-X)"
        else:
            position, pull = "(-Norm2(X-Y))", "Rsqrt(SqDist(X,Y))*(Y-X)"
        orientation = derivative = None
        if self.orientation == "current":
            orientation, derivative = "(U|V)", "V"
        elif self.orientation == "unoriented":
            orientation, derivative = "Square((U|V))", "IntCst(2)*(U|V)*V"
        elif self.orientation == "oriented":
            orientation = "Exp(((U|V)-IntCst(1))*T)"
            derivative = f"{orientation}*T*V"
        value = position if orientation is None else f"{position}*{orientation}"
        formula = f"{value}*W"
        if gradients:
            pulled = pull if orientation is None else f"{pull}*{orientation}"
            formula = f"Concat({formula},{pulled}*W)"
            if derivative is not None:
                formula = f"Concat({formula},{position}*{derivative}*W)"
        return formula, orientation is not None


def _skinny_product(matrix: torch.Tensor, columns_t: torch.Tensor) -> torch.Tensor:
    """``matrix (R, C) @ columns_t.T`` for a few columns (k, C) → (R, k), as ``columns_t @ matrix.T``: BLAS runs a
    (k, C) × (C, R) product over the tile's memory about twice as fast as the skinny (R, C) × (C, k) one."""
    return (columns_t @ matrix.T).T


def _check_kernel(kernel: str, blur: float | None) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "energy":
        if blur is not None:
            raise ValueError("the energy kernel -|x - y| has no width: leave blur=None")
    elif blur is None or not math.isfinite(blur) or blur <= 0:
        raise ValueError(f"blur must be a positive width in mm for the {kernel} kernel, got {blur!r}")


def _check_options(truncate: float | None, backend: str) -> None:
    if truncate is not None and not 0 < truncate < 1:
        raise ValueError(f"truncate must be in (0, 1) (a kernel value) or None (every pair), got {truncate!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "keops" and not keops_available():
        raise ValueError("backend='keops' was asked for, but KeOps is unavailable here (see the logged warning)")


class _Tiles:
    """Row blocks of the Z-sorted points and, for each, the small column cells within the kernel's cutoff radius.

    Rows go in blocks of ``_ROWS`` consecutive points (enough work per tile), columns in cells of ``_CELL`` points
    (tight boxes, so that little beyond the radius is computed); both are bounding boxes of Z-curve runs.
    """

    def __init__(self, points: torch.Tensor, radius: float):
        device = points.device
        self.n = len(points)
        self.rows = _ROWS.get(device.type, _ROWS["cuda"])
        self.columns = _COLUMNS.get(device.type, _COLUMNS["cuda"])
        self.radius = radius
        detached = points.detach()
        extent = float((detached.amax(0) - detached.amin(0)).max())
        self.order = morton_order(detached, radius / 4 if math.isfinite(radius) else extent + 1.0)
        sorted_points = detached[self.order]
        self.starts = list(range(0, self.n, self.rows))
        self.row_low, self.row_high = _boxes(sorted_points, self.rows)
        self.cell_low, self.cell_high = _boxes(sorted_points, _CELL)
        self.cell_starts = torch.arange(0, self.n, _CELL, device=device)
        self.cell_counts = (self.n - self.cell_starts).clamp_max(_CELL)
        self.computed = 0

    def columns_of(self, block: int) -> torch.Tensor | slice:
        """Column indices (sorted order) that row block ``block`` meets: every cell whose box lies within the
        radius of the block's box."""
        if not math.isfinite(self.radius):
            self.computed += (min(self.starts[block] + self.rows, self.n) - self.starts[block]) * self.n
            return slice(0, self.n)
        gap = (self.cell_low - self.row_high[block]).clamp_min(0) + (self.row_low[block] - self.cell_high).clamp_min(0)
        near = (gap * gap).sum(1) <= self.radius**2
        columns = expand_ranges(self.cell_starts[near], self.cell_counts[near])
        self.computed += (min(self.starts[block] + self.rows, self.n) - self.starts[block]) * len(columns)
        return columns


def _boxes(points: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper corners (⌈n/size⌉, D) of consecutive runs of ``size`` points."""
    n, dim = points.shape
    padded = torch.cat([points, points[-1:].expand((-n) % size, dim)])
    runs = padded.reshape(-1, size, dim)
    return runs.amin(1), runs.amax(1)


def _reduce_torch(kernel: _Kernel, z, w, u, truncate: float | None, gradients: bool) -> torch.Tensor:
    """Per point p: [Σ_q w_q k(p, q), Σ_q w_q ∇_z k, Σ_q w_q ∇_u k] (P, 1 [+ D [+ D]]) in the input order."""
    tiles = _Tiles(z, kernel.radius(truncate))
    order = tiles.order
    z, w = z[order], w[order]
    u = u[order] if u is not None else None
    n = len(z)
    width = 1 + (z.shape[1] * (2 if u is not None else 1) if gradients else 0)
    out = torch.empty(n, width, dtype=z.dtype, device=z.device)
    for block, start in enumerate(tiles.starts):
        rows = slice(start, min(start + tiles.rows, n))
        columns = tiles.columns_of(block)
        total = torch.zeros(rows.stop - rows.start, width, dtype=z.dtype, device=z.device)
        count = n if isinstance(columns, slice) else len(columns)
        for first in range(0, count, tiles.columns):
            chunk = slice(first, min(first + tiles.columns, count))
            picked = columns[chunk] if isinstance(columns, torch.Tensor) else chunk
            total += kernel.tile(z[rows], None if u is None else u[rows], z[picked], None if u is None else u[picked],
                                 w[picked], gradients)
        out[rows] = total
    result = torch.empty_like(out)
    result[order] = out
    return result


_GENREDS: dict[tuple, object] = {}


def _reduce_keops(kernel: _Kernel, z, w, u, gradients: bool) -> torch.Tensor:
    """:func:`_reduce_torch` as one KeOps reduction over every pair."""
    from pykeops.torch import Genred

    dim = z.shape[1]
    formula, oriented = kernel.keops_formula(gradients)
    dtype = "float64" if z.dtype == torch.float64 else "float32"
    key = (formula, dim, dtype)
    if key not in _GENREDS:
        aliases = [f"X = Vi({dim})", f"Y = Vj({dim})", "W = Vj(1)"]
        if oriented:
            aliases += [f"U = Vi({dim})", f"V = Vj({dim})", "T = Pm(1)"]
        _GENREDS[key] = Genred(formula, aliases, reduction_op="Sum", axis=1)
    scale = 1.0 if kernel.name == "energy" else kernel.blur
    scaled = (z / scale).contiguous()
    arguments = [scaled, scaled, w.unsqueeze(1).contiguous()]
    if oriented:
        width = torch.tensor([1 / kernel.orientation_width**2], dtype=z.dtype, device=z.device)
        arguments += [u.contiguous(), u.contiguous(), width]
    out = _GENREDS[key](*arguments, backend="auto")
    if gradients:
        out[:, 1:1 + dim] /= scale
    return out


class _KernelNorm(torch.autograd.Function):
    """½ Σ_pq w_p w_q k(p, q) with its gradients from the same pass (no autograd graph over the pairs)."""

    @staticmethod
    def forward(ctx, z, w, u, kernel: _Kernel, truncate, backend):
        gradients = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        with torch.no_grad():
            if backend == "keops":
                out = _reduce_keops(kernel, z, w, u, gradients)
            else:
                out = _reduce_torch(kernel, z, w, u, truncate, gradients)
        ctx.save_for_backward(w, out)
        ctx.dim = z.shape[1]
        return (w.double() * out[:, 0].double()).sum().mul(0.5).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        w, out = ctx.saved_tensors
        dim = ctx.dim
        grad_z = grad_u = None
        grad_w = grad * out[:, 0] if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[0]:
            grad_z = grad * w.unsqueeze(1) * out[:, 1:1 + dim]
        if ctx.needs_input_grad[2]:
            grad_u = grad * w.unsqueeze(1) * out[:, 1 + dim:]
        return grad_z, grad_w, grad_u, None, None, None


def _flat(a: Measure, b: Measure, oriented: bool) -> tuple[tuple[int, ...], list[tuple]]:
    """Check a pair of measures and split it into per-item (z, w, u) signed concatenations."""
    for name, measure in (("a", a), ("b", b)):
        if not isinstance(measure, Measure):
            raise TypeError(f"{name} must be a geomed.Measure, got {type(measure).__name__}")
        if oriented and measure.normals is None:
            raise ValueError(f"{name} has no normals: varifolds and currents need a surface measure "
                             "(Measure.from_mesh or Measure.from_triangles)")
    if a.dim != b.dim:
        raise ValueError(f"a and b must have the same dimension, got {a.dim}-D and {b.dim}-D points")
    if a.batch_shape != b.batch_shape:
        raise ValueError(f"a and b must have the same batch shape, got {tuple(a.batch_shape)} and {tuple(b.batch_shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise TypeError(f"a ({a.dtype}, {a.device}) and b ({b.dtype}, {b.device}) must share dtype and device")
    batch_shape = tuple(a.batch_shape)
    dim = a.dim
    x, y = a.points.reshape(-1, a.n_points, dim), b.points.reshape(-1, b.n_points, dim)
    wa, wb = a.weights.reshape(-1, a.n_points), b.weights.reshape(-1, b.n_points)
    items = []
    for i in range(len(x)):
        u = None
        if oriented:
            u = torch.cat([a.normals.reshape(-1, a.n_points, dim)[i], b.normals.reshape(-1, b.n_points, dim)[i]])
        items.append((torch.cat([x[i], y[i]]), torch.cat([wa[i], -wb[i]]), u))
    return batch_shape, items


def _kernel_loss(a: Measure, b: Measure, kernel: _Kernel, truncate, backend) -> torch.Tensor:
    _check_options(truncate, backend)
    batch_shape, items = _flat(a, b, kernel.orientation is not None)
    chosen = "torch" if backend == "auto" else backend
    values = [_KernelNorm.apply(z, w, u, kernel, truncate, chosen) for z, w, u in items]
    return torch.stack(values).reshape(batch_shape)


def mmd(a: Measure, b: Measure, *, kernel: str = "gaussian", blur: float | None = None,
        truncate: float | None = 1e-9, backend: str = "auto") -> torch.Tensor:
    r"""Kernel (MMD) loss ½‖α − β‖²_k between two measures, in (mass unit)².

    Parameters
    ----------
    a, b : Measure
        Points (N, D) and (M, D) in mm with their weights, or equal batches (..., N, D) / (..., M, D). Weights are
        used as given (mm³, mm², counts): normalise them (:meth:`Measure.normalized`) to compare shapes, not sizes.
        Normals are ignored.
    kernel : {"gaussian", "laplacian", "energy"}
        See the module docstring for the formulas.
    blur : float
        Kernel width σ in mm (Gaussian, Laplacian); must be None for the energy kernel.
    truncate : float or None
        Kernel values below this are skipped, block by block (error at most ½·truncate·(Σ|a| + Σ|b|)²); None
        computes every pair. Ignored by the energy kernel.
    backend : {"auto", "torch", "keops"}

    Returns
    -------
    Tensor of the batch shape (a scalar for single measures), differentiable w.r.t. points and weights.
    """
    _check_kernel(kernel, blur)
    return _kernel_loss(a, b, _Kernel(kernel, blur), truncate, backend)


def varifold_distance(a: Measure, b: Measure, *, blur: float, kind: str = "oriented", orientation_width: float = 0.5,
                      truncate: float | None = 1e-9, backend: str = "auto") -> torch.Tensor:
    r"""Varifold or current loss ½‖μ_a − μ_b‖² between two surfaces, in mm⁴.

    Parameters
    ----------
    a, b : Measure
        Surface measures with normals: centroids (N, 3) in mm, areas (mm²), unit normals — from
        :meth:`Measure.from_mesh`, or :meth:`Measure.from_triangles` to differentiate w.r.t. the vertices.
    blur : float
        Width σ (mm) of the Gaussian kernel on positions.
    kind : {"oriented", "unoriented", "current"}
        Orientation kernel (see the module docstring): oriented varifold (default), unoriented varifold (normal
        signs ignored), or current (linear in the normals).
    orientation_width : float
        Width τ of the oriented varifold's kernel on normals (``kind="oriented"`` only): 0.5 weighs normals
        60° apart by e^{-2}.
    truncate, backend
        As in :func:`mmd`.

    Returns
    -------
    Tensor of the batch shape, differentiable w.r.t. points, weights and normals.
    """
    if kind not in ORIENTATIONS:
        raise ValueError(f"kind must be one of {ORIENTATIONS}, got {kind!r}")
    _check_kernel("gaussian", blur)
    if not math.isfinite(orientation_width) or orientation_width <= 0:
        raise ValueError(f"orientation_width must be positive, got {orientation_width!r}")
    return _kernel_loss(a, b, _Kernel("gaussian", blur, kind, orientation_width), truncate, backend)


class _PairLoss(nn.Module):
    def forward(self, a: Measure | Sequence[Measure], b: Measure | Sequence[Measure]) -> torch.Tensor:
        if isinstance(a, Measure) and isinstance(b, Measure):
            return self._loss(a, b)
        if isinstance(a, Sequence) and isinstance(b, Sequence) and len(a) == len(b) and len(a) > 0:
            return torch.stack([self._loss(ai, bi) for ai, bi in zip(a, b, strict=True)])
        raise TypeError("a and b must both be Measures, or sequences of Measures of the same non-zero length")

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class KernelLoss(_PairLoss):
    """:func:`mmd` as a loss module: ``KernelLoss(kernel="gaussian", blur=2.0)(a, b)``; for sequences of measures,
    the values stacked (len(a),)."""

    def __init__(self, *, kernel: str = "gaussian", blur: float | None = None, truncate: float | None = 1e-9,
                 backend: str = "auto"):
        super().__init__()
        _check_kernel(kernel, blur)
        _check_options(truncate, backend)
        self.options = dict(kernel=kernel, blur=blur, truncate=truncate, backend=backend)

    def _loss(self, a: Measure, b: Measure) -> torch.Tensor:
        return mmd(a, b, **self.options)


class VarifoldLoss(_PairLoss):
    """:func:`varifold_distance` as a loss module: ``VarifoldLoss(blur=3.0, kind="oriented")(a, b)``."""

    def __init__(self, *, blur: float, kind: str = "oriented", orientation_width: float = 0.5,
                 truncate: float | None = 1e-9, backend: str = "auto"):
        super().__init__()
        if kind not in ORIENTATIONS:
            raise ValueError(f"kind must be one of {ORIENTATIONS}, got {kind!r}")
        _check_kernel("gaussian", blur)
        _check_options(truncate, backend)
        self.options = dict(blur=blur, kind=kind, orientation_width=orientation_width, truncate=truncate,
                            backend=backend)

    def _loss(self, a: Measure, b: Measure) -> torch.Tensor:
        return varifold_distance(a, b, **self.options)
