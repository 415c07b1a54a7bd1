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

Implementations (all exact; they differ in speed and memory):

``dense``
    Materialises the (B, N, M) cost matrix: fastest for small problems, O(N M) memory. Any ``p``.
``online``
    Pure torch, tiled, ``p = 2``: memory of one tile, no compiler needed (Windows, Slicer). Its compiled variant
    ``online-compiled`` runs each row block as one ``torch.compile`` kernel (Inductor emits a fused, vectorised
    loop that never stores the cost matrix); on CPUs it beats KeOps' CPU backend (``benchmarks/sinkhorn.py``).
``keops``
    KeOps online reductions (CPU or GPU), O(N + M) memory, any ``p``; the GPU default.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


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


def cost(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """C(x_i, y_j) = |x_i − y_j|^p / p for x (..., n, D), y (..., m, D) → (..., n, m)."""
    if p == 2:
        return ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1) / 2
    return (x.unsqueeze(-2) - y.unsqueeze(-3)).norm(dim=-1)


class DenseSoftmin:
    """Softmin on the full (B, N, M) cost matrix; differentiable by plain autograd."""

    name = "dense"

    def __init__(self, p: int = 2):
        self.p = p

    def __call__(self, eps, x, y, h):
        return -eps * torch.logsumexp(h.unsqueeze(-2) - cost(x, y, self.p) / eps, dim=-1)

    def average(self, eps, x, y, h, softmin, values):
        weights = torch.exp(h.unsqueeze(-2) - cost(x, y, self.p) / eps + softmin.unsqueeze(-1) / eps)
        return weights @ values


def _block_logsumexp(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, inv_eps: torch.Tensor) -> torch.Tensor:
    """log Σ_j exp(h_j − |x_i − y_j|²/(2ε)) for a row block x (n, D) against y (m, D)."""
    return torch.logsumexp(h - ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1) * (inv_eps / 2), dim=-1)


def _block_average(x, y, h, inv_eps, lse, values):
    """Σ_j exp(h_j − |x_i − y_j|²/(2ε) − lse_i) values_j for a row block."""
    weights = torch.exp(h - ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1) * (inv_eps / 2) - lse.unsqueeze(-1))
    return weights @ values


class OnlineSoftmin:
    """Tiled softmin in pure torch for ``p = 2``: memory of one tile, optionally one compiled kernel per row block.

    Parameters
    ----------
    compiled : bool
        Run each row block through ``torch.compile`` (a C++ compiler on the CPU, Triton on the GPU). Rows are padded
        to a fixed block size, so one kernel serves the whole problem; the first call compiles (seconds, cached).
    block_rows, block_cols : int
        Tile sizes (eager mode); in compiled mode a row block meets all columns in one fused kernel.
    """

    p = 2

    def __init__(self, *, compiled: bool = False, block_rows: int = 512, block_cols: int = 4096):
        self.compiled = compiled
        self.block_rows = block_rows
        self.block_cols = block_cols
        self.name = "online-compiled" if compiled else "online"
        self._lse = torch.compile(_block_logsumexp, dynamic=False) if compiled else _block_logsumexp
        self._average = torch.compile(_block_average, dynamic=False) if compiled else _block_average

    def _row_blocks(self, n: int):
        for start in range(0, n, self.block_rows):
            yield start, min(start + self.block_rows, n)

    def _pad(self, rows: torch.Tensor) -> torch.Tensor:
        missing = self.block_rows - len(rows)
        return torch.cat([rows, rows[-1:].expand(missing, *rows.shape[1:])]) if self.compiled and missing else rows

    def _col_blocks(self, m: int):
        step = m if self.compiled else self.block_cols
        for start in range(0, m, step):
            yield slice(start, min(start + step, m))

    def __call__(self, eps, x, y, h):
        inv_eps = torch.tensor(1.0 / eps, dtype=x.dtype, device=x.device)
        out = torch.empty(x.shape[:-1], dtype=x.dtype, device=x.device)
        for b in range(len(x)):
            for start, stop in self._row_blocks(x.shape[1]):
                rows = self._pad(x[b, start:stop])
                parts = [self._lse(rows, y[b, cols], h[b, cols], inv_eps) for cols in self._col_blocks(y.shape[1])]
                lse = torch.logsumexp(torch.stack(parts), dim=0) if len(parts) > 1 else parts[0]
                out[b, start:stop] = lse[: stop - start]
        return -eps * out

    def average(self, eps, x, y, h, softmin, values):
        inv_eps = torch.tensor(1.0 / eps, dtype=x.dtype, device=x.device)
        out = torch.zeros(*x.shape[:-1], values.shape[-1], dtype=x.dtype, device=x.device)
        for b in range(len(x)):
            for start, stop in self._row_blocks(x.shape[1]):
                rows = self._pad(x[b, start:stop])
                lse = self._pad(-softmin[b, start:stop] / eps)
                for cols in self._col_blocks(y.shape[1]):
                    block = self._average(rows, y[b, cols], h[b, cols], inv_eps, lse, values[b, cols])
                    out[b, start:stop] += block[: stop - start]
        return out


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


_KEOPS_STATUS: dict[str, bool] = {}


def keops_available() -> bool:
    """Whether pykeops imports and compiles here; a failure is logged once, with its reason, and remembered."""
    if "ok" not in _KEOPS_STATUS:
        try:
            x = torch.zeros(1, 2, 1)
            _KEOPS_STATUS["ok"] = bool(torch.isfinite(KeOpsSoftmin(2)(1.0, x, x, torch.zeros(1, 2))).all())
        except Exception as error:  # a broken KeOps build raises ImportError, RuntimeError, OSError, ...
            _KEOPS_STATUS["ok"] = False
            logger.warning("KeOps is unavailable (%s: %s); geomed uses its torch backends", type(error).__name__, error)
    return _KEOPS_STATUS["ok"]


BACKENDS = ("auto", "dense", "online", "online-compiled", "keops")


def make_softmin(backend: str, p: int, n: int, m: int, device: torch.device) -> Softmin:
    """The softmin for ``backend`` in :data:`BACKENDS`.

    ``auto`` takes dense up to 4·10⁶ cost entries per batch item; beyond, KeOps on GPUs and the online path on
    CPUs — compiled from 10⁸ entries on (where the one-off compilation pays for itself).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if n * m <= 4_000_000:
            backend = "dense"
        elif (device.type == "cuda" or p != 2) and keops_available():
            backend = "keops"
        elif p != 2:
            backend = "dense"
        else:
            backend = "online-compiled" if n * m >= 100_000_000 else "online"
    if backend == "dense":
        return DenseSoftmin(p)
    if backend == "keops":
        if not keops_available():
            raise ValueError("backend='keops' was asked for, but KeOps is unavailable here (see the logged warning)")
        return KeOpsSoftmin(p)
    if p != 2:
        raise ValueError(f"backend={backend!r} supports p=2 only; use 'dense' or 'keops' for p={p}")
    return OnlineSoftmin(compiled=backend == "online-compiled")
