r"""Sinkhorn on voxel grids: the soft c-transform as separable 1-D log-sum-exps, one axis at a time.

Masks and soft segmentations live on a regular grid :math:`x_i = o + R\,\mathrm{diag}(s)\,i` (origin o, direction
R, spacing s in mm, integer index i). The direction matrix of an image is a rotation, so it leaves distances
unchanged: :math:`|x_i - x_j|^2 = \sum_k s_k^2 (i_k - j_k)^2`. For ``p = 2`` the Gaussian kernel of the softmin
therefore factorises over the axes,

.. math:: \sum_j e^{h_j - |x_i - x_j|^2 / 2\varepsilon}
          = \sum_{j_1} e^{-s_1^2 (i_1 - j_1)^2 / 2\varepsilon} \sum_{j_2} e^{-s_2^2 (i_2 - j_2)^2 / 2\varepsilon}
            \sum_{j_3} e^{h_{j_1 j_2 j_3} - s_3^2 (i_3 - j_3)^2 / 2\varepsilon},

and a softmin over the N voxels of an I × J × K grid costs N (I + J + K) kernel products instead of N²: one
log-sum-exp along each axis in turn, each an exact log-domain reduction (no underflow at small blurs, where a
plain kernel convolution in the linear domain would lose the far-transported mass). Each reduction runs as
matrix products on blocks of neighbouring output voxels, stabilised per block (:func:`axis_logsumexp`): a few
exponentials per voxel instead of one per kernel entry, and BLAS does the rest. The cost
:math:`|x - y|` of ``p = 1`` does not factorise: grids need ``p = 2``.

:class:`GridSoftmin` implements the softmin protocol of :mod:`geomed.ot.softmin` on the flattened grid (the
coordinates passed in are not read: the grid is), so the ε-scaling loop of :mod:`geomed.ot.solver` runs
unchanged and its envelope-theorem gradients hold: w.r.t. the weights (a soft segmentation's probabilities), and
w.r.t. the voxel positions through one soft average, computed as two more separable reductions (values split into
their positive and negative parts, each carried in the log domain).

:func:`sinkhorn_divergence` takes this path by itself when both measures come from masks on one voxel grid
(:meth:`geomed.Measure.from_mask`, :meth:`~geomed.Measure.from_labels` of one image): the grid is cropped to the
bounding box of both supports first. :func:`~geomed.ot.grid_divergence.grid_sinkhorn_divergence` takes dense
``(B, C, *spatial)`` weight tensors directly — the MONAI-shaped entry point for soft segmentations.

Only what is needed
    Masks fill a few percent of their bounding box (the femoral and tibial cartilages of a knee: 6% of 3.4·10⁶
    voxels). In a Sinkhorn update h = log β + g/ε is −∞ off the voxels of β, and the potential is wanted only on
    the voxels of α. So a pass along one axis reduces only the lines that hold a voxel of β (the first pass) and
    writes only the outputs that a later pass reads, down to α's voxels (the last): :class:`_SupportPlan`, with
    the axes taken in the order that costs least at each ε. Every value it computes is an exact log-sum-exp of
    the full grid's passes, equal to theirs up to float rounding (1e-12 in float64); on the cartilages a softmin
    costs 7–27× less than on the whole box (2× for the femoral cartilage against itself). Dense weights (soft
    segmentations) keep their potentials on every voxel and skip only the voxels without mass as inputs.

Final blur on the coarse levels first
    The final blur needs many Sinkhorn iterations (about a hundred on the cartilages at blur 1 mm), most of them
    spent on the slow, large-scale modes of the potentials — which a coarser grid represents as well. When the
    first pyramid level's voxels are at most 1.5 blurs wide, :class:`GridPyramid` solves the problem at the
    final blur to the solve's ``tol`` on the coarse levels first (the solver's own loop on each level), and the
    input grid starts from their extrapolation: on the cartilages 12 iterations at full resolution instead of
    102, for about a hundred on the 8× smaller level 1. The result is the input grid's converged solution, to
    the same ``tol``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..measure import Measure
from .problem import Problem
from .result import SolvedItem
from .schedule import EpsilonSchedule, level_for
from .solver import sinkhorn_loop

_TILE_ENTRIES = 2**19  # 4 MB of float64: the passes over a tile of exponentials stay in the CPU's cache
_GPU_TILE_ENTRIES = 2**27
_BOUND = 200.0
_CLAMP = -460.0
_COARSEST = 16
_COARSE_FIRST = 1.5
_PRODUCTS_PER_EXPONENTIAL = 48
_KERNEL_CACHE_BYTES = 2**28


class GridSoftmin:
    """Separable softmin on a grid of spatial ``shape`` with ``spacing`` (mm) per axis, ``p = 2``.

    Inputs follow the softmin protocol with the grid flattened: ``h (B, N)``, N = prod(shape); ``x`` and ``y``
    (B, N, D) are accepted and ignored (both measures live on this grid). :meth:`between` makes the softmin of
    one grid's voxels against another's (the fine voxels against a coarse level of the pyramid), optionally
    restricted to the voxels that carry mass (:class:`_SupportPlan`).
    """

    name = "grid"
    p = 2

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]):
        if len(shape) != len(spacing):
            raise ValueError(f"shape {tuple(shape)} and spacing {tuple(spacing)} must have one entry per axis")
        self.rows = self.cols = [torch.arange(int(n), dtype=torch.float64) * float(s) for n, s in zip(shape, spacing)]
        self._plan: _SupportPlan | None = None
        self._kernels: dict = {}

    @classmethod
    def between(cls, rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor],
                row_support: torch.Tensor | None = None, col_support: torch.Tensor | None = None) -> GridSoftmin:
        """The softmin of the voxels with per-axis coordinates ``rows`` (mm) against those with ``cols``.

        ``row_support`` (flat C-order indices of row voxels): only these rows are computed, the others are 0;
        ``col_support`` (flat indices of column voxels): only these entries of h are read, the others are taken as
        −∞ (the caller's h must be −∞ there: log-weights of a measure on its support). None: all voxels.
        """
        softmin = cls.__new__(cls)
        softmin.rows, softmin.cols, softmin._kernels = list(rows), list(cols), {}
        row_shape, col_shape = [len(c) for c in rows], [len(c) for c in cols]
        row_support = None if row_support is None or len(row_support) == math.prod(row_shape) else row_support
        col_support = None if col_support is None or len(col_support) == math.prod(col_shape) else col_support
        softmin._plan = (None if row_support is None and col_support is None else
                         _SupportPlan(row_shape, col_shape, row_support, col_support))
        return softmin

    def __call__(self, eps, x, y, h):
        return self._logsumexp(h, eps).mul_(-eps)

    def average(self, eps, x, y, h, softmin, values):
        """Σ_j w_ij v_j as exp(LSE(h + log v⁺) − lse) − exp(LSE(h + log v⁻) − lse), column by column."""
        lse = (-softmin / eps).unsqueeze(-1)
        parts = []
        for k in range(values.shape[-1]):
            column = values[..., k]
            positive = self._logsumexp(h + column.clamp_min(0).log(), eps)
            negative = self._logsumexp(h + (-column).clamp_min(0).log(), eps)
            parts.append(torch.exp(positive - lse[..., 0]) - torch.exp(negative - lse[..., 0]))
        return torch.stack(parts, -1)

    def _logsumexp(self, h: torch.Tensor, eps: float) -> torch.Tensor:
        """log Σ_j exp(h_j − |x_i − y_j|²/2ε) for every row voxel i: (B, M) → (B, N)."""
        kernels, order = self._axis_kernels(eps, h.device)
        if self._plan is not None:
            return self._plan.logsumexp(h, kernels, order)
        batch = h.shape[0]
        field = h.to(torch.float64).reshape(batch, *[len(c) for c in self.cols])
        for axis, kernel in enumerate(kernels):
            field = axis_logsumexp(field, axis + 1, kernel)
        return field.reshape(batch, -1).to(h.dtype)

    def _axis_kernels(self, eps: float, device: torch.device) -> tuple[list[AxisKernel], tuple[int, ...]]:
        """The per-axis constants at this ε on this device, and the order of the axes' passes; kept while ε stays
        (the four problems of a Sinkhorn step, and the averages, share them)."""
        key = (eps, device)
        if key not in self._kernels:
            if self._plan is None:
                kernels = [axis_kernels.get(rows, cols, eps, device) for rows, cols in zip(self.rows, self.cols)]
                order = tuple(range(len(kernels)))
            else:
                kernels = [axis_kernels.get(rows[used_rows], cols[used_cols], eps, device) for rows, cols, used_rows,
                           used_cols in zip(self.rows, self.cols, self._plan.row_axes, self._plan.col_axes)]
                order = self._plan.cheapest_order(kernels)
            self._kernels = {key: (kernels, order)}
        return self._kernels[key]


class GridPyramid:
    """Coarse-to-fine levels of two measures on one grid, driven by the ε-scaling loop (a
    :class:`~geomed.ot.geometry.Geometry`: the grid's :class:`~geomed.ot.multiscale.Multiscale`).

    Level k + 1 merges pairs of voxels of level k along every axis longer than one voxel (any size: an odd axis
    ends on a single voxel), summing the weights; the coarse voxels sit at the mean of their members' coordinates,
    so each level is again a separable grid. Levels stop when the longest axis has at most ``_COARSEST`` voxels.
    The loop starts on the coarsest level whose voxels are no larger than the blur and moves down as ε decreases;
    on each jump the potentials are extrapolated by one softmin of the finer voxels against the coarser measure
    (:meth:`GridSoftmin.between`), so that the full-resolution grid only sees the last few ε steps.

    Every softmin reads only the voxels that carry mass and, with ``on_support``, computes only those
    (:class:`_SupportPlan`); without it the input grid's softmins compute every voxel (the potentials of dense
    weights are returned everywhere, and the gradients w.r.t. zero weights need them). With ``full_passes`` every
    softmin reduces the whole grid instead, reading −∞ off the supports (the same values up to rounding): more
    work on the CPU, but shapes that do not depend on the weights and no read of them on the host — what a CUDA
    graph needs (:mod:`geomed.ot.grid_graphs`).

    With a ``problem`` that has a ``tol`` and level 1 voxels at most ``_COARSE_FIRST`` (1.5) blurs wide, the final
    blur is solved on the coarse levels first: the ε-scaling stays on level 1 or coarser, and at the final ε the
    problem is solved to its ``tol`` on the working level, then on each finer one down to level 1, each
    warm-started by the extrapolation of the previous (see the module docstring).

    Parameters
    ----------
    x, y : Tensor (B, N, D)
        The voxel positions (mm) that the level-0 softmins receive (not read by them).
    alpha, beta : Tensor (B, N)
        Weights on the flattened grid (C order), ≥ 0.
    shape, spacing : sequence of int, sequence of float
        The grid and its voxel size per axis (mm).
    damping : callable
        λ(ε, side) of the Sinkhorn update (:meth:`geomed.ot.problem.Problem.damping`).
    problem : Problem, optional
        The solve's problem, for the final blur on the coarse levels (None: the input grid only).
    on_support : bool
        Whether only the potentials on the voxels with mass are wanted (masks).
    full_passes : bool
        Whether every softmin reduces the whole grid (fixed shapes, no host reads; excludes ``on_support``).
    """

    order = None
    kept = 1.0
    pattern_bytes = 0

    def __init__(self, x, y, alpha, beta, shape: Sequence[int], spacing: Sequence[float], damping, *,
                 problem: Problem | None = None, on_support: bool = False, full_passes: bool = False):
        if on_support and full_passes:
            raise ValueError("on_support and full_passes exclude each other")
        self.damping = damping
        self._fine = (x, y)
        self._on_support = on_support

        def supports(alpha, beta):
            return (None, None) if full_passes else (_support(alpha), _support(beta))

        coordinates = [torch.arange(int(n), dtype=torch.float64) * float(s) for n, s in zip(shape, spacing)]
        self.levels = [(coordinates, alpha.log(), beta.log())]
        self.supports = [supports(alpha, beta)]
        self.cells = [0.0]
        while max(len(c) for c in coordinates) > _COARSEST:
            alpha, beta = (_pool_weights(w, [len(c) for c in coordinates]) for w in (alpha, beta))
            coordinates = [_pool_coordinates(c) for c in coordinates]
            self.levels.append((coordinates, alpha.log(), beta.log()))
            self.supports.append(supports(alpha, beta))
            self.cells.append(max(float(c[1] - c[0]) for c in coordinates if len(c) > 1))
        self.level = len(self.levels) - 1
        self._coarse_first = problem if (problem is not None and problem.tol is not None and problem.max_iter > 0
                                         and len(self.levels) > 1 and self.cells[1] <= _COARSE_FIRST * problem.blur
                                         ) else None
        self._set_softmins()

    @property
    def scale(self) -> float:
        """Voxel size (mm, largest axis) of the working level; 0 for the input grid."""
        return self.cells[self.level]

    def measures(self):
        coordinates, log_a, log_b = self.levels[self.level]
        if self.level == 0:
            return (*self._fine, log_a, log_b)
        placeholder = log_a.new_zeros(log_a.shape[0], log_a.shape[1], len(coordinates))
        return placeholder, placeholder, log_a, log_b

    def advance(self, eps: float, potentials: list, final: bool) -> list:
        """Move to the level suited to ``eps`` (the input grid if ``final``), extrapolating the potentials; at the
        final ε with a ``problem``, solve it on each coarse level on the way."""
        target = 0 if final else level_for(eps, GridSoftmin.p, self.cells)
        target = target if final or self._coarse_first is None else max(target, 1)
        while self.level > target:
            if final and self._coarse_first is not None:
                potentials = self._solve_final_blur(potentials)
            potentials = self._jump(eps, potentials)
        return potentials

    def _solve_final_blur(self, potentials: list) -> list:
        """The problem at its final blur solved to its ``tol`` on the working level, from ``potentials``: the
        solver's loop on this level alone, with a one-step schedule (the final ε)."""
        problem = self._coarse_first
        schedule = EpsilonSchedule(problem.blur, problem.blur, problem.p, problem.schedule.scaling)
        return sinkhorn_loop(_WarmStart(self, potentials), replace(problem, schedule=schedule)).potentials

    def _jump(self, eps: float, potentials: list) -> list:
        coarse, coarse_a, coarse_b = self.levels[self.level]
        support_a, support_b = self.supports[self.level]
        fine = self.levels[self.level - 1][0]
        rows_a, rows_b = self._rows(self.level - 1)
        sides = (("x", coarse_b, support_b, rows_a, 1), ("y", coarse_a, support_a, rows_b, 0),
                 ("x", coarse_a, support_a, rows_a, 2), ("y", coarse_b, support_b, rows_b, 3))
        extrapolated = [None if potentials[own] is None else self.damping(eps, side) * GridSoftmin.between(
                            fine, coarse, rows, cols)(eps, None, None, log_weights + potentials[other] / eps)
                        for (side, log_weights, cols, rows, other), own in zip(sides, range(4))]
        self.level -= 1
        self._set_softmins()
        return extrapolated

    def _rows(self, level: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The voxels of ``a`` and ``b`` whose potentials the softmins of ``level`` compute (None: all)."""
        return (None, None) if level == 0 and not self._on_support else self.supports[level]

    def _set_softmins(self) -> None:
        coordinates = self.levels[self.level][0]
        support_a, support_b = self.supports[self.level]
        rows_a, rows_b = self._rows(self.level)
        self.softmins = {name: GridSoftmin.between(coordinates, coordinates, rows, cols) for name, rows, cols in
                         (("xy", rows_a, support_b), ("yx", rows_b, support_a), ("xx", rows_a, support_a),
                          ("yy", rows_b, support_b))}


class _WarmStart:
    """The working level of a :class:`GridPyramid` as a one-level :class:`~geomed.ot.geometry.Geometry` whose
    first ε step starts from the given potentials [f, g, f_aa, g_bb] (those that the loop initialises from zero
    are dropped): the final blur solved on a coarse level, warm-started by the ε-scaling or the coarser level."""

    level = 0
    kept = 1.0
    pattern_bytes = 0
    order = None

    def __init__(self, pyramid: GridPyramid, potentials: list):
        self.scale, self.softmins, self._measures = pyramid.scale, pyramid.softmins, pyramid.measures()
        self._start = potentials

    def measures(self):
        return self._measures

    def advance(self, eps: float, potentials: list, final: bool) -> list:
        start, self._start = self._start, None
        return potentials if start is None else start


def _support(weights: torch.Tensor) -> torch.Tensor:
    """The flat indices of the voxels with positive weight in some item of ``weights`` (B, N)."""
    return torch.nonzero((weights > 0).any(0)).squeeze(1)


def _pool_coordinates(coordinates: torch.Tensor) -> torch.Tensor:
    """Mean coordinate of each pair of neighbouring voxels (the last one alone on an odd axis)."""
    if len(coordinates) == 1:
        return coordinates
    pairs = torch.cat([coordinates, coordinates[-1:]]) if len(coordinates) % 2 else coordinates
    merged = pairs.view(-1, 2).mean(-1)
    if len(coordinates) % 2:
        merged[-1] = coordinates[-1]
    return merged


def _pool_weights(weights: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The summed weights of each 2 × … × 2 block, (B, N) → (B, N_coarse).

    Not :func:`geomed._spatial.cell_sums`: that adds the members of a cell one after the other, this sums pairs
    along one axis at a time ((w₀₀ + w₁₀) + (w₀₁ + w₁₁) in 2-D), a different order of float additions, and it is
    a reshape rather than an index scatter.
    """
    field = weights.reshape(weights.shape[0], *shape)
    for axis, length in enumerate(shape, start=1):
        if length == 1:
            continue
        if length % 2:
            field = torch.cat([field, field.new_zeros((*field.shape[:axis], 1, *field.shape[axis + 1 :]))], axis)
        field = field.unflatten(axis, (-1, 2)).sum(axis + 1)
    return field.reshape(weights.shape[0], -1)


def axis_logsumexp(field: torch.Tensor, axis: int, kernel: AxisKernel) -> torch.Tensor:
    r"""out[..., i, ...] = log Σ_j exp(field[..., j, ...] − (r_i − c_j)²/2ε) along ``axis``; lines of −∞ stay −∞.

    An exact log-domain reduction computed as matrix products. The output rows are cut into blocks of
    neighbouring voxels with centre :math:`\rho`; with :math:`\bar c` the middle of the columns' range,
    :math:`(\rho - c)^2 - (r - c)^2 = (\rho - r)(\rho + r - 2\bar c) + 2 (r - \rho)(c - \bar c)`, so for a block

    .. math:: \log \sum_j e^{h_j - (r_i - c_j)^2/2\varepsilon}
              = m + a_i + \log \sum_j \underbrace{e^{u_j - m}}_{\le 1}\;
                \underbrace{e^{(r_i - \rho)(c_j - \bar c)/\varepsilon}}_{G_{ij}},
        \qquad u_j = h_j - (\rho - c_j)^2/2\varepsilon,\; m = \max_j u_j,\;
        a_i = (\rho - r_i)(\rho + r_i - 2\bar c)/2\varepsilon,

    so one exponential per (line, block, column) and one product with the fixed matrix G per block, instead of
    one exponential per (line, row, column). The blocks are as wide as :math:`|\log G_{ij}| \le` ``_BOUND`` (200)
    allows — a half-width of 2 ``_BOUND`` ε / (the columns' extent): the sum is at least :math:`e^{-200}` (the
    term of the maximal :math:`u_j`), so in float64 nothing that matters underflows, and the clamp of
    :math:`u_j - m` at ``_CLAMP`` (−460, which keeps every product of the GEMM above the slow denormals) changes
    the result by less than :math:`L e^{-60}` relative. Large blurs give one block (a plain per-line stabilised
    product); at blurs far below the grid's extent the blocks shrink to single rows — the direct log-sum-exp.
    ``field`` is float64; ``kernel`` holds the blocks' constants (:meth:`AxisKernel.build`).
    """
    before, length, after = math.prod(field.shape[:axis]), field.shape[axis], math.prod(field.shape[axis + 1 :])
    lines = field.reshape(before, length, after)
    blocks, size = kernel.matrices.shape[:2]
    budget = _GPU_TILE_ENTRIES if field.is_cuda else _TILE_ENTRIES
    width = min(after, max(1, budget // (blocks * length)))
    chunk = max(1, budget // (blocks * length * width))
    parts = [[_blocked_products(lines[start : start + chunk, :, column : column + width], kernel.shifts, kernel.matrices)
              for column in range(0, after, width)] for start in range(0, before, chunk)]
    out = _concatenate([_concatenate(row, 2) for row in parts], 0)
    out = out.add_(kernel.offsets.unsqueeze(-1))
    if kernel.take is not None:
        out = out.index_select(1, kernel.take)
    elif blocks * size != kernel.rows:
        out = out[:, : kernel.rows]
    return out.reshape(*field.shape[:axis], kernel.rows, *field.shape[axis + 1 :])


@dataclass(frozen=True)
class AxisKernel:
    """The constants of one axis's blocked reduction (:func:`axis_logsumexp`) for given rows, columns and ε:
    ``shifts`` (n_blocks, L) = (ρ − c_j)²/2ε, ``matrices`` G (n_blocks, S, L), ``offsets`` a_i (n_blocks · S,) —
    float64 on the field's device —, the number of output ``rows``, and ``take``, the position of each output row
    among the n_blocks · S outputs of the blocks (None when they are the first ``rows``: every block holds S
    consecutive rows but the last, which repeats its last row)."""

    rows: int
    shifts: torch.Tensor
    matrices: torch.Tensor
    offsets: torch.Tensor
    take: torch.Tensor | None = None

    @classmethod
    def build(cls, rows: torch.Tensor, cols: torch.Tensor, eps: float, device: torch.device) -> AxisKernel:
        """From ascending per-axis coordinates (mm) of the output ``rows`` and input ``cols``; computed on the CPU
        and moved once."""
        rows, cols = rows.to("cpu", torch.float64), cols.to("cpu", torch.float64)
        starts = _block_starts(rows, cols, eps)
        counts = torch.diff(starts, append=torch.tensor([len(rows)]))
        size = int(counts.max())
        members = torch.minimum(starts.unsqueeze(1) + torch.arange(size), (starts + counts - 1).unsqueeze(1))
        block_rows = rows[members]
        centres = 0.5 * (block_rows[:, :1] + block_rows[:, -1:])
        middle = 0.5 * (cols[0] + cols[-1])
        shifts = (centres - cols).square_().div_(2 * eps)
        matrices = ((block_rows - centres).unsqueeze(-1) * (cols - middle) / eps).exp_()
        offsets = ((centres - block_rows) * (centres + block_rows - 2 * middle) / (2 * eps)).reshape(-1)
        take = None
        if bool((counts[:-1] < size).any()):
            take = (torch.arange(len(rows)) + torch.repeat_interleave(torch.arange(len(starts)) * size - starts,
                                                                       counts)).to(device)
        return cls(len(rows), shifts.to(device), matrices.to(device), offsets.to(device), take)

    @property
    def nbytes(self) -> int:
        """Device memory held by the constants."""
        tensors = [self.shifts, self.matrices, self.offsets] + ([] if self.take is None else [self.take])
        return sum(t.numel() * t.element_size() for t in tensors)


class AxisKernelCache:
    """The :class:`AxisKernel` of given rows, columns, ε and device, built once and kept while they fit in
    ``budget`` bytes (the least recently used go first).

    A training loop solves grids of the same shape and spacing at the same ε at every step: building the
    constants on the host and copying them to the device each time would cost hundreds of small copies per step,
    more than the device's work. :meth:`recording` lists the kernels handed out meanwhile, for a CUDA graph that
    reads them (:mod:`geomed.ot.grid_graphs`) to keep them alive.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[tuple, AxisKernel] = OrderedDict()
        self._bytes = 0
        self._recorders: list[list[AxisKernel]] = []

    def get(self, rows: torch.Tensor, cols: torch.Tensor, eps: float, device: torch.device) -> AxisKernel:
        """The kernel of ascending per-axis coordinates ``rows`` and ``cols`` (mm, CPU float64) at ``eps``."""
        key = (rows.numpy().tobytes(), cols.numpy().tobytes(), float(eps), torch.device(device))
        kernel = self._entries.get(key)
        if kernel is None:
            kernel = AxisKernel.build(rows, cols, eps, device)
            self._entries[key] = kernel
            self._bytes += kernel.nbytes
            while self._bytes > self.budget and len(self._entries) > 1:
                self._bytes -= self._entries.popitem(last=False)[1].nbytes
        else:
            self._entries.move_to_end(key)
        for recorder in self._recorders:
            recorder.append(kernel)
        return kernel

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[AxisKernel]]:
        """A list that receives every kernel handed out inside the ``with`` block."""
        recorder: list[AxisKernel] = []
        self._recorders.append(recorder)
        try:
            yield recorder
        finally:
            self._recorders.remove(recorder)


axis_kernels = AxisKernelCache(_KERNEL_CACHE_BYTES)
"""The process's kernels (256 MB at most)."""


def _concatenate(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _blocked_products(lines: torch.Tensor, shift: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """m + log(G · exp(u − m)) for lines (P, L, R), shifts (n_blocks, L), kernel G (n_blocks, S, L) →
    (P, n_blocks · S, R); a line of −∞ gives −∞."""
    before, length, after = lines.shape
    blocks, size = kernel.shape[:2]
    if after == 1:
        logits = lines.reshape(1, before, length) - shift.unsqueeze(1)
        peak = logits.amax(-1, keepdim=True)
        sums = torch.bmm(_stabilised_exp(logits, peak), kernel.transpose(1, 2)).log_().add_(peak)
        return sums.permute(1, 0, 2).reshape(before, blocks * size, 1)
    logits = lines.unsqueeze(1) - shift.unsqueeze(-1)
    peak = logits.amax(2, keepdim=True)
    sums = torch.matmul(kernel, _stabilised_exp(logits, peak)).log_().add_(peak)
    return sums.reshape(before, blocks * size, after)


def _stabilised_exp(logits: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """In place exp(max(logits − peak, −700)); a peak of −∞ (an empty line) is taken as 0, and adding it back to
    the log of the sums gives −∞ again."""
    return logits.sub_(torch.where(torch.isinf(peak), 0.0, peak)).clamp_min_(_CLAMP).exp_()


def _block_starts(rows: torch.Tensor, cols: torch.Tensor, eps: float) -> torch.Tensor:
    """The first row of each block: consecutive ascending ``rows`` (which may have gaps: the voxels of a support)
    whose width keeps |log G| ≤ ``_BOUND`` for the ascending ``cols``: |log G_ij| = |r_i − ρ| |c_j − c̄| / ε ≤
    (width / 2) · (extent of the columns / 2) / ε. As few blocks as the greedy cut gives, then as even as that
    number allows (equal blocks where the rows are evenly spaced)."""
    width = 4 * _BOUND * eps / max(float(cols[-1] - cols[0]), 1e-300)
    values = rows.numpy()
    starts = [0]
    while (stop := max(starts[-1] + 1, int(np.searchsorted(values, values[starts[-1]] + width, "right")))) < len(rows):
        starts.append(stop)
    even = torch.arange(0, len(rows), -(-len(rows) // len(starts)))
    if len(even) == len(starts):
        ends = torch.cat([even[1:] - 1, torch.tensor([len(rows) - 1])])
        if float((rows[ends] - rows[even]).max()) <= width:
            return even
    return torch.tensor(starts)


@dataclass(frozen=True)
class _Pass:
    """One per-axis pass of a support-restricted softmin (:class:`_SupportPlan`): it reduces ``lines`` lines of
    ``width`` inputs along ``axis``, read from the previous field's lines at ``scatter`` (flat positions in
    (lines, width)), and keeps the outputs at ``keep`` (flat positions in (rows of the axis, box); None: all)."""

    axis: int
    lines: int
    width: int
    scatter: torch.Tensor
    keep: torch.Tensor | None


class _SupportPlan:
    r"""The per-axis passes of a softmin that reads h only on the column voxels C and writes only the row voxels R.

    A pass along axis a reduces lines along a; a line needs computing only if it holds a voxel of C (the first
    pass) and only at the outputs that a later pass reads, down to the voxels of R (the last pass). With the axes
    taken in the order :math:`a_1, \dots, a_D`, pass t reads the lines of the distinct tuples of C's coordinates
    along :math:`a_{t+1}, \dots, a_D`, each at the coordinates along :math:`a_t` where C has voxels, times the
    distinct tuples of R's coordinates along :math:`a_1, \dots, a_{t-1}` (the outputs of the earlier passes that
    are still needed), and writes the coordinates along :math:`a_t` where R has voxels. Every value computed is
    the exact log-sum-exp of the full-grid passes at that voxel (the skipped inputs are −∞); only outputs that
    cannot reach R are skipped. The order of the axes is chosen per ε by the cost of the passes
    (:meth:`cheapest_order`).

    Coordinates are kept compact: each axis's coordinates are numbered within those that hold a voxel of R
    (``row_axes``) or of C (``col_axes``).
    """

    def __init__(self, row_shape: Sequence[int], col_shape: Sequence[int], row_support: torch.Tensor | None,
                 col_support: torch.Tensor | None):
        self.row_support, self.col_support, self.row_count = row_support, col_support, math.prod(row_shape)
        rows = _unravel(torch.arange(self.row_count) if row_support is None else row_support.cpu(), row_shape)
        cols = _unravel(torch.arange(math.prod(col_shape)) if col_support is None else col_support.cpu(), col_shape)
        (self.row_axes, self._rows), (self.col_axes, self._cols) = _compact(rows), _compact(cols)
        self._passes: dict = {}
        self._counts: dict = {}

    def cheapest_order(self, kernels: list[AxisKernel]) -> tuple[int, ...]:
        """The order of the axes whose passes cost least with these per-axis kernels: per input value, one
        exponential per block (with its subtraction, maximum and clamp) and one product per output row of a
        block, ``_PRODUCTS_PER_EXPONENTIAL`` (48) products costing as much as an exponential on a CPU."""
        def cost(order):
            total = 0.0
            for t, axis in enumerate(order):
                blocks, size = kernels[axis].matrices.shape[:2]
                inputs = self._distinct("cols", order[t + 1 :]) * len(self.col_axes[axis]) * self._distinct(
                    "rows", order[:t])
                total += inputs * (blocks + blocks * size / _PRODUCTS_PER_EXPONENTIAL)
            return total

        return min(itertools.permutations(range(len(kernels))), key=cost)

    def logsumexp(self, h: torch.Tensor, kernels: list[AxisKernel], order: tuple[int, ...]) -> torch.Tensor:
        """log Σ_j exp(h_j − |x_i − y_j|²/2ε) on the row voxels of R, 0 at the others: (B, M) → (B, N)."""
        passes, col_support, row_support = self._on(order, h.device)
        batch = h.shape[0]
        field = (h if col_support is None else h.index_select(1, col_support)).to(torch.float64).unsqueeze(-1)
        for step in passes:
            inputs = field.new_full((batch, step.lines * step.width, field.shape[-1]), -math.inf)
            inputs = inputs.index_copy_(1, step.scatter, field).view(batch * step.lines, step.width, -1)
            field = axis_logsumexp(inputs, 1, kernels[step.axis]).view(batch, step.lines, -1)
            field = field if step.keep is None else field.index_select(2, step.keep)
        values = field.reshape(batch, -1).to(h.dtype)
        return values if row_support is None else values.new_zeros(batch, self.row_count).index_copy_(1, row_support,
                                                                                                     values)

    def _distinct(self, side: str, axes: tuple[int, ...]) -> int:
        """The number of distinct tuples of coordinates along ``axes`` among the voxels of R (``side`` "rows") or
        C ("cols"); counted once."""
        key = (side, frozenset(axes))
        if key not in self._counts:
            points = self._rows if side == "rows" else self._cols
            extents = [int(points[:, k].max()) + 1 for k in axes]
            occupied = torch.zeros(math.prod(extents), dtype=torch.bool)
            occupied[_ravel(points[:, list(axes)], extents)] = True
            self._counts[key] = int(occupied.sum())
        return self._counts[key]

    def _on(self, order: tuple[int, ...], device: torch.device) -> tuple[list[_Pass], torch.Tensor | None,
                                                                         torch.Tensor | None]:
        """The passes in this order, and the supports, on ``device`` (built once per order)."""
        key = (order, device)
        if key not in self._passes:
            passes = [replace(step, scatter=step.scatter.to(device),
                              keep=None if step.keep is None else step.keep.to(device)) for step in self._build(order)]
            self._passes[key] = (passes, *[None if support is None else support.to(device)
                                           for support in (self.col_support, self.row_support)])
        return self._passes[key]

    def _build(self, order: tuple[int, ...]) -> list[_Pass]:
        lines = self._cols[:, list(order)]  # the tuples of coordinates not yet reduced, one per line of the field
        box, box_of_row = 1, torch.zeros(len(self._rows), dtype=torch.int64)
        passes = []
        for t, axis in enumerate(order):
            grouped, line_of = _distinct_tuples(lines[:, 1:], [len(self.col_axes[k]) for k in order[t + 1 :]])
            width, outputs = len(self.col_axes[axis]), len(self.row_axes[axis])
            position = self._rows[:, axis] * box + box_of_row
            if t == len(order) - 1:
                keep = None if torch.equal(position, torch.arange(len(position))) else position
            else:
                kept, box_of_row = torch.unique(position, return_inverse=True)
                keep = None if len(kept) == outputs * box else kept
                box = outputs * box if keep is None else len(kept)
            passes.append(_Pass(axis, len(grouped), width, line_of * width + lines[:, 0], keep))
            lines = grouped
        return passes


def _compact(points: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The coordinates along each axis that the integer points (n, D) hold (ascending), and the points numbered
    within them (n, D)."""
    pairs = [torch.unique(points[:, k], return_inverse=True) for k in range(points.shape[1])]
    return [axis for axis, _ in pairs], torch.stack([inverse for _, inverse in pairs], -1)


def _unravel(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Multi-indices (n, D) of flat C-order indices (the inverse of :func:`_ravel`)."""
    index = []
    for length in reversed(shape):
        index.append(flat % length)
        flat = flat // length
    return torch.stack(index[::-1], -1)


def _distinct_tuples(tuples: torch.Tensor, extents: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows (ascending) of integer tuples (n, k) with entries below ``extents``, and the row of each;
    k = 0 gives the one empty tuple."""
    if tuples.shape[1] == 0:
        return tuples[:1], torch.zeros(len(tuples), dtype=torch.int64)
    distinct, inverse = torch.unique(_ravel(tuples, extents), return_inverse=True)
    return _unravel(distinct, extents), inverse


@dataclass(frozen=True)
class DenseGrid:
    """The grid of dense ``(B, C, *spatial)`` weights: spatial shape and spacing (mm)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class SharedGrid:
    """Two mask measures on one voxel grid, cropped to the bounding box of both supports.

    ``shape``/``spacing`` describe the crop; ``centres`` (n, D) are its voxel centres in world mm (C order);
    ``support_a``/``support_b`` the crop voxel of each point of ``a``/``b``.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    centres: torch.Tensor
    support_a: torch.Tensor
    support_b: torch.Tensor

    def embed(self, a: Measure, b: Measure) -> tuple[torch.Tensor, ...]:
        """x (1, n, D), α (1, n), y (1, n, D), β (1, n) on the crop: the measures' points and weights at their
        voxels (differentiable), voxel centres and zero weights elsewhere."""
        dtype = torch.promote_types(a.dtype, b.dtype)
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        centres = self.centres.to(dtype)
        embedded = []
        for measure, support in ((a, self.support_a), (b, self.support_b)):
            points = centres.index_put((support,), measure.points.to(dtype))
            weights = centres.new_zeros(len(centres)).index_put((support,), measure.weights.to(dtype))
            embedded += [points.unsqueeze(0), weights.unsqueeze(0)]
        return tuple(embedded)

    def restrict(self, item: SolvedItem) -> SolvedItem:
        """A solved item with potentials and plan on the measures' own points instead of the whole crop."""

        def pick(potential, support):
            return None if potential is None else potential.index_select(1, support)

        plan = replace(item.plan, support_x=self.support_a, support_y=self.support_b)
        return replace(item, f=pick(item.f, self.support_a), g=pick(item.g, self.support_b),
                       f_aa=pick(item.f_aa, self.support_a), g_bb=pick(item.g_bb, self.support_b), plan=plan)


def shared_grid(a: Measure, b: Measure, p: int) -> tuple[SharedGrid | None, str]:
    """The cropped common grid of two mask measures, or (None, why the grid path does not apply)."""
    if a.grid is None or b.grid is None:
        return None, "a and b must both be masks on a voxel grid (Measure.from_mask or Measure.from_labels)"
    if not a.grid.same_geometry(b.grid):
        return None, (f"a and b lie on different voxel grids (shapes {a.grid.shape} and {b.grid.shape}, or "
                      "different affines); resample one image onto the other's grid")
    if not a.grid.is_orthogonal():
        return None, "the grid's affine is sheared (non-orthogonal voxel axes): the kernel does not factorise"
    if p != 2:
        return None, f"the grid path needs p=2 (|x−y|^p does not factorise over the axes for p={p})"
    shape = torch.tensor(a.grid.shape)
    index_a, index_b = _unravel(a.grid.index.cpu(), a.grid.shape), _unravel(b.grid.index.cpu(), b.grid.shape)
    lower = torch.minimum(index_a.amin(0), index_b.amin(0))
    crop = (torch.maximum(index_a.amax(0), index_b.amax(0)) + 1 - lower).clamp_max(shape)
    crop_shape = tuple(int(n) for n in crop)
    device = a.device
    supports = [_ravel(index - lower, crop_shape).to(device) for index in (index_a, index_b)]
    centres = _centres(a.grid.affine, lower.tolist(), crop_shape, a.dtype, device)
    spacing = tuple(float(s) for s in a.grid.spacing)
    tolerance = 1e-3 * min(spacing) + 1e-6 * float(centres.abs().max())
    for name, measure, support in (("a", a, supports[0]), ("b", b, supports[1])):
        if not torch.allclose(measure.points.detach(), centres[support].to(measure.dtype), rtol=0, atol=tolerance):
            return None, f"the points of {name} are no longer at the centres of its grid's voxels"
    return SharedGrid(crop_shape, spacing, centres, supports[0], supports[1]), ""


def grid_pays_off(grid: SharedGrid, n: int, m: int) -> bool:
    """Whether a grid softmin (n_crop × Σ_k crop_k kernel evaluations) costs less than the N × M of the dense
    point-cloud one: for masks that fill their bounding box, always; for thin or far-apart masks in a large box,
    not always, and ``auto`` then takes the point-cloud path."""
    return len(grid.centres) * sum(grid.shape) <= n * m


def _ravel(index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    flat = torch.zeros(len(index), dtype=torch.int64)
    for axis, length in enumerate(shape):
        flat = flat * length + index[:, axis]
    return flat


def _centres(affine: np.ndarray, lower: list[int], shape: tuple[int, ...], dtype: torch.dtype,
             device) -> torch.Tensor:
    """World coordinates (n, D) of the voxels ``lower + [0, shape)`` in C order, axis by axis in float64."""
    dim = len(shape)
    total = torch.tensor(affine[:dim, dim], dtype=torch.float64).reshape(*([1] * dim), dim).clone()
    for axis, (start, length) in enumerate(zip(lower, shape)):
        steps = torch.arange(start, start + length, dtype=torch.float64).unsqueeze(-1)
        column = steps * torch.tensor(affine[:dim, axis], dtype=torch.float64)
        total = total + column.reshape(*[length if k == axis else 1 for k in range(dim)], dim)
    return total.reshape(-1, dim).to(dtype=dtype, device=device)
