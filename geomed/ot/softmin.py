r"""The soft c-transform ("softmin") that every Sinkhorn iteration calls, behind one small protocol.

For points :math:`x_i` (N, D), :math:`y_j` (M, D), log-weights-plus-potential :math:`h_j` (M,) and temperature
:math:`\varepsilon`, a softmin returns

.. math::  s_i = \mathrm{softmin}_\varepsilon(x, y, h)_i = -\varepsilon \log \sum_j \exp\big(h_j - C(x_i, y_j)/\varepsilon\big),

with the ground cost :math:`C(x, y) = |x - y|^p / p` (so :math:`|x-y|^2/2` for ``p = 2``). In the Sinkhorn loop
:math:`h = \log\beta + g/\varepsilon`. A softmin also computes *soft averages*

.. math::  A_i(v) = \sum_j w_{ij}\, v_j, \qquad w_{ij} = \exp\big(h_j - C_{ij}/\varepsilon + s_i/\varepsilon\big)
           \quad (\textstyle\sum_j w_{ij} = 1),

the one extra reduction behind exact gradients (for ``p = 2``, :math:`\partial s_i/\partial x_i = x_i - A_i(y)`,
by the envelope theorem), the barycentric map :math:`T(x_i) = A_i(y)` and the lazy transport plan. Inputs carry a
leading batch dimension: ``x (B, N, D)``, ``y (B, M, D)``, ``h (B, M)``, ``values (B, M, K)``.

Implementations (they differ in speed and memory, not in results):

``dense``
    One tile holding the whole (N, M) matrix: small problems.
``online``
    Pure torch, no compiler: tiles of 256 rows × 8192 columns on a CPU (they stay in cache), 4096 × 16384 on a
    GPU (enough work per kernel launch), memory of one tile. Any ``p``.

In both, for ``p = 2`` each tile is BLAS-shaped —
    :math:`h_j - |y_j - c|^2/2\varepsilon + \langle x_i - c, y_j - c\rangle/\varepsilon - |x_i - c|^2/2\varepsilon`,
    one ``addmm`` around the centre ``c`` of the tile's rows (points are sorted spatially by the solver, so the
rows of a tile are close together and float32 keeps its precision) — then one in-place exponential pass. Tiles
are not differentiated by autograd: the solver's envelope formula needs one soft average (``p = 2``) or
:meth:`TiledSoftmin.cost_gradient` (``p = 1``).

``keops``
    KeOps online reductions (CPU or GPU), O(N + M) memory, any ``p``; the GPU fallback where Triton is missing.

The fused GPU kernels (``triton``, the GPU default) live in :mod:`geomed.ot.triton_softmin`; the block-sparse
(multiscale) softmins in :mod:`geomed.ot.multiscale`, which reuse the tile code below.

Each tile is reduced by :func:`geomed._spatial.tile_logsumexp`, which clamps the logits at ``LOGIT_FLOOR`` below
their row's maximum before the exponential pass (why: see :mod:`geomed._spatial`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Protocol

import torch

from .._spatial import LOGIT_FLOOR, tile_average, tile_logsumexp


class Softmin(Protocol):
    """What the Sinkhorn loop needs from a backend."""

    name: str
    p: int

    def __call__(self, eps: float, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The softmin (B, N) of x (B, N, D) against y (B, M, D) with h (B, M)."""

    def average(
        self, eps: float, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, softmin: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """Soft averages Σ_j w_ij values_j (B, N, K) for values (B, M, K), given the softmin (B, N) of the inputs."""


def tile_logits(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, eps: float, p: int) -> torch.Tensor:
    """h_j − C(x_i, y_j)/ε for a tile x (n, D), y (m, D), h (m,) → a fresh (n, m) tensor (no autograd).

    Also for a stack of tiles x (k, n, D), y (k, m, D), h (k, m) → (k, n, m), each around its own centre.
    """
    return TileGeometry(x, y, p).logits(h, eps)


class TileGeometry:
    """The rows x (n, D) or (k, n, D) and columns y (m, D) or (k, m, D) of a tile, prepared for its logits.

    For p = 2 the points are centred on the tile's rows (float32 keeps its precision) and the rows' half squared
    norm rides in the matrix product as an extra coordinate,

        ``[x_c/ε, −|x_c|²/2ε] · [y_c, 1]ᵀ + (h_j − |y_c|²/2ε)``,

    so that the logits are one ``addmm``/``baddbmm``. Keep a geometry to reuse it while only h changes.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, p: int):
        self.p = p
        if p == 2:
            center = x.mean(-2, keepdim=True)
            self.x_centred = x - center
            augmented = torch.empty(*y.shape[:-1], y.shape[-1] + 1, dtype=y.dtype, device=y.device)
            y_centred = torch.sub(y, center, out=augmented[..., :-1])
            augmented[..., -1] = 1.0
            self.y_augmented_t = augmented.transpose(-1, -2)
            self.y_half_squares = (y_centred * y_centred).sum(-1).div_(2)
            self.eps, self.x_augmented = None, None
        else:
            self.x, self.y = x, y

    def logits(self, h: torch.Tensor, eps: float, shift: torch.Tensor | None = None) -> torch.Tensor:
        """h_j − C(x_i, y_j)/ε − shift_i → a fresh (n, m) or (k, n, m) tensor; ``shift`` (n,) or (k, n), default 0,
        rides in the matrix product (no extra pass)."""
        if self.p != 2:
            distance = torch.cdist(self.x, self.y, compute_mode="donot_use_mm_for_euclid_dist")
            distance = distance.div_(-eps).add_(h.unsqueeze(-2))
            return distance if shift is None else distance.sub_(shift.unsqueeze(-1))
        if self.eps != eps:
            half_squares = (self.x_centred * self.x_centred).sum(-1, keepdim=True).div_(-2 * eps)
            self.eps, self.x_augmented = eps, torch.cat([self.x_centred / eps, half_squares], -1)
        rows = self.x_augmented
        if shift is not None:
            rows = rows.clone()
            rows[..., -1] -= shift
        columns = (h - self.y_half_squares / eps).unsqueeze(-2)
        product = torch.baddbmm if self.x_centred.dim() == 3 else torch.addmm
        return product(columns, rows, self.y_augmented_t)


Tile = tuple[slice, "slice | torch.Tensor"]


class TiledSoftmin(ABC):
    """Softmin as a sum over tiles (row slice, column slice or index), reduced with :func:`tile_logsumexp`.

    Subclasses say which tiles of batch item ``b`` to visit; a row may appear in several tiles (their partial sums
    are merged in log space). Not differentiable: the solver differentiates through its own envelope formula.
    """

    name = "tiled"

    def __init__(self, p: int = 2):
        self.p = p

    @abstractmethod
    def tiles(self, b: int, n: int, m: int) -> Iterator[Tile]:
        """The (row slice, column slice or index) tiles of batch item ``b`` for n rows and m columns."""

    def __call__(self, eps, x, y, h):
        out = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)
        for b in range(x.shape[0]):
            for rows, cols in self.tiles(b, x.shape[1], y.shape[1]):
                lse = tile_logsumexp(tile_logits(x[b, rows], y[b, cols], h[b, cols], eps, self.p))
                out[b, rows] = torch.logaddexp(out[b, rows], lse)
        return out.mul_(-eps)

    def average(self, eps, x, y, h, softmin, values):
        out = torch.zeros(*x.shape[:-1], values.shape[-1], dtype=x.dtype, device=x.device)
        lse = -softmin / eps
        for b in range(x.shape[0]):
            for rows, cols in self.tiles(b, x.shape[1], y.shape[1]):
                logits = tile_logits(x[b, rows], y[b, cols], h[b, cols], eps, self.p)
                out[b, rows] += tile_average(logits, lse[b, rows], values[b, cols])
        return out

    def cost_gradient(self, eps, x, y, h, softmin):
        """Σ_j w_ij ∇_x C(x_i, y_j) for p = 1: Σ_j w_ij (x_i − y_j)/|x_i − y_j| (0 where x_i = y_j), (B, N, D)."""
        out = torch.zeros_like(x)
        lse = -softmin / eps
        for b in range(x.shape[0]):
            for rows, cols in self.tiles(b, x.shape[1], y.shape[1]):
                distance = torch.cdist(x[b, rows], y[b, cols], compute_mode="donot_use_mm_for_euclid_dist")
                weights = tile_logits(x[b, rows], y[b, cols], h[b, cols], eps, self.p).sub_(lse[b, rows].unsqueeze(-1))
                weights = weights.clamp_min_(LOGIT_FLOOR).exp_().div_(distance).nan_to_num_(0.0, 0.0, 0.0)
                out[b, rows] += x[b, rows] * weights.sum(-1, keepdim=True) - weights @ y[b, cols]
        return out


class DenseSoftmin(TiledSoftmin):
    """One tile holding the whole (N, M) matrix: the fastest for small problems, O(N M) memory."""

    name = "dense"

    def tiles(self, b, n, m):
        yield slice(0, n), slice(0, m)


class OnlineSoftmin(TiledSoftmin):
    """Every (row block, column block) tile: exact, memory of one tile, pure torch (no compiler)."""

    name = "online"

    def __init__(self, p: int = 2, *, block_rows: int = 256, block_cols: int = 8192):
        super().__init__(p)
        self.block_rows, self.block_cols = block_rows, block_cols

    @classmethod
    def for_device(cls, p: int, device: torch.device) -> OnlineSoftmin:
        """Tiles sized for ``device``: cache-sized on CPUs, large on GPUs."""
        return cls(p, block_rows=4096, block_cols=16384) if device.type == "cuda" else cls(p)

    def tiles(self, b, n, m):
        for start in range(0, n, self.block_rows):
            rows = slice(start, min(start + self.block_rows, n))
            for col_start in range(0, m, self.block_cols):
                yield rows, slice(col_start, min(col_start + self.block_cols, m))


class KeOpsSoftmin:
    """Softmin as a KeOps online reduction (symbolic LazyTensors, compiled once per formula); any ``p``."""

    name = "keops"

    def __init__(self, p: int = 2):
        from pykeops.torch import LazyTensor

        self.p = p
        self._lazy = LazyTensor

    def _logits(self, eps, x, y, h):
        xi = self._lazy(x.unsqueeze(-2))
        yj = self._lazy(y.unsqueeze(-3))
        hj = self._lazy(h.unsqueeze(-2).unsqueeze(-1))
        squared = ((xi - yj) ** 2).sum(-1)
        return hj - (squared / 2 if self.p == 2 else squared.sqrt()) / eps

    def __call__(self, eps, x, y, h):
        return -eps * self._logits(eps, x, y, h).logsumexp(dim=x.dim() - 1).squeeze(-1)

    def average(self, eps, x, y, h, softmin, values):
        return self._logits(eps, x, y, h).sumsoftmaxweight(self._lazy(values.unsqueeze(-3)), dim=x.dim() - 1)
