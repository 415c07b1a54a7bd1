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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..measure import Measure
from .result import SolvedItem
from .schedule import level_for

_TILE_ENTRIES = 2**24
_GPU_TILE_ENTRIES = 2**27
_BOUND = 200.0
_CLAMP = -460.0
_COARSEST = 16


class GridSoftmin:
    """Separable softmin on a grid of spatial ``shape`` with ``spacing`` (mm) per axis, ``p = 2``.

    Inputs follow the softmin protocol with the grid flattened: ``h (B, N)``, N = prod(shape); ``x`` and ``y``
    (B, N, D) are accepted and ignored (both measures live on this grid). :meth:`between` makes the softmin of
    one grid's voxels against another's (the fine voxels against a coarse level of the pyramid).
    """

    name = "grid"
    p = 2

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]):
        if len(shape) != len(spacing):
            raise ValueError(f"shape {tuple(shape)} and spacing {tuple(spacing)} must have one entry per axis")
        self.rows = self.cols = [torch.arange(int(n), dtype=torch.float64) * float(s) for n, s in zip(shape, spacing)]
        self._kernels: dict = {}

    @classmethod
    def between(cls, rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor]) -> GridSoftmin:
        """The softmin of the voxels with per-axis coordinates ``rows`` (mm) against those with ``cols``."""
        softmin = cls.__new__(cls)
        softmin.rows, softmin.cols, softmin._kernels = list(rows), list(cols), {}
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
        batch = h.shape[0]
        field = h.to(torch.float64).reshape(batch, *[len(c) for c in self.cols])
        for axis, kernel in enumerate(self._axis_kernels(eps, h.device)):
            field = axis_logsumexp(field, axis + 1, kernel)
        return field.reshape(batch, -1).to(h.dtype)

    def _axis_kernels(self, eps: float, device: torch.device) -> list[AxisKernel]:
        """The per-axis constants at this ε on this device, kept while ε stays (the four problems of a Sinkhorn
        step, and the averages, share them)."""
        key = (eps, device)
        if key not in self._kernels:
            self._kernels = {key: [AxisKernel.build(rows, cols, eps, device)
                                   for rows, cols in zip(self.rows, self.cols)]}
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
    """

    order = None
    kept = 1.0
    pattern_bytes = 0

    def __init__(self, x, y, alpha, beta, shape: Sequence[int], spacing: Sequence[float], damping):
        self.damping = damping
        self._fine = (x, y)
        coordinates = [torch.arange(int(n), dtype=torch.float64) * float(s) for n, s in zip(shape, spacing)]
        self.levels = [(coordinates, alpha.log(), beta.log())]
        self.cells = [0.0]
        while max(len(c) for c in coordinates) > _COARSEST:
            alpha, beta = (_pool_weights(w, [len(c) for c in coordinates]) for w in (alpha, beta))
            coordinates = [_pool_coordinates(c) for c in coordinates]
            self.levels.append((coordinates, alpha.log(), beta.log()))
            self.cells.append(max(float(c[1] - c[0]) for c in coordinates if len(c) > 1))
        self.level = len(self.levels) - 1
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
        """Move to the level suited to ``eps`` (the input grid if ``final``), extrapolating the potentials."""
        target = 0 if final else level_for(eps, GridSoftmin.p, self.cells)
        while self.level > target:
            potentials = self._jump(eps, potentials)
        return potentials

    def _jump(self, eps: float, potentials: list) -> list:
        coarse, coarse_a, coarse_b = self.levels[self.level]
        fine = self.levels[self.level - 1][0]
        extend = GridSoftmin.between(fine, coarse)
        sides = (("x", coarse_b, 1), ("y", coarse_a, 0), ("x", coarse_a, 2), ("y", coarse_b, 3))
        extrapolated = [None if potentials[own] is None else
                        self.damping(eps, side) * extend(eps, None, None, log_weights + potentials[other] / eps)
                        for (side, log_weights, other), own in zip(sides, range(4))]
        self.level -= 1
        self._set_softmins()
        return extrapolated

    def _set_softmins(self) -> None:
        coordinates = self.levels[self.level][0]
        softmin = GridSoftmin.between(coordinates, coordinates)
        self.softmins = {"xy": softmin, "yx": softmin, "xx": softmin, "yy": softmin}


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
    chunk = max(1, budget // (blocks * length * after))
    parts = [_blocked_products(lines[start : start + chunk], kernel.shifts, kernel.matrices)
             for start in range(0, before, chunk)]
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    out = out.add_(kernel.offsets.unsqueeze(-1))
    out = out if blocks * size == kernel.rows else out[:, : kernel.rows]
    return out.reshape(*field.shape[:axis], kernel.rows, *field.shape[axis + 1 :])


@dataclass(frozen=True)
class AxisKernel:
    """The constants of one axis's blocked reduction (:func:`axis_logsumexp`) for given rows, columns and ε:
    ``shifts`` (n_blocks, L) = (ρ − c_j)²/2ε, ``matrices`` G (n_blocks, S, L), ``offsets`` a_i (n_blocks · S,) —
    float64 on the field's device — and the number of output ``rows`` (the last block repeats the last row)."""

    rows: int
    shifts: torch.Tensor
    matrices: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def build(cls, rows: torch.Tensor, cols: torch.Tensor, eps: float, device: torch.device) -> AxisKernel:
        """From ascending per-axis coordinates (mm) of the output ``rows`` and input ``cols``; computed on the CPU
        and moved once."""
        rows, cols = rows.to("cpu", torch.float64), cols.to("cpu", torch.float64)
        blocks = -(-len(rows) // _block_size(rows, cols, eps))
        size = -(-len(rows) // blocks)
        block_rows = rows[torch.arange(blocks * size).clamp_max(len(rows) - 1).view(blocks, size)]
        centres = 0.5 * (block_rows[:, :1] + block_rows[:, -1:])
        middle = 0.5 * (cols[0] + cols[-1])
        shifts = (centres - cols).square_().div_(2 * eps)
        matrices = ((block_rows - centres).unsqueeze(-1) * (cols - middle) / eps).exp_()
        offsets = ((centres - block_rows) * (centres + block_rows - 2 * middle) / (2 * eps)).reshape(-1)
        return cls(len(rows), shifts.to(device), matrices.to(device), offsets.to(device))


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


def _block_size(rows: torch.Tensor, cols: torch.Tensor, eps: float) -> int:
    """The most output rows per block (consecutive, ascending ``rows``; ascending ``cols``) with |log G| ≤
    ``_BOUND`` in every block: |log G_ij| = |r_i − ρ| |c_j − c̄| / ε ≤ (half width) · (extent of the columns) / 2ε."""
    half_width = 2 * _BOUND * eps / max(float(cols[-1] - cols[0]), 1e-300)
    size = len(rows)
    while size > 1:
        starts = torch.arange(0, len(rows), size)
        widths = rows[(starts + size - 1).clamp_max(len(rows) - 1)] - rows[starts]
        if float(widths.max()) <= 2 * half_width:
            return size
        size = max(1, min(size - 1, int(size * 2 * half_width / float(widths.max()))))
    return 1


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
    index_a = torch.stack(torch.unravel_index(a.grid.index.cpu(), a.grid.shape), -1)
    index_b = torch.stack(torch.unravel_index(b.grid.index.cpu(), b.grid.shape), -1)
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
