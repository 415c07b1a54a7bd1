r"""The ``triton`` softmin: fused online log-sum-exp kernels for GPUs, written in Triton.

Each program takes ``BLOCK_N`` rows of ``x`` and sweeps the columns of ``y`` in blocks of ``BLOCK_M``, computing
the costs :math:`C(x_i, y_j) = |x_i - y_j|^p / p` in registers and folding them into a running maximum and sum
(the "online" log-sum-exp):

.. math::  m \leftarrow \max(m, \max_j \ell_{ij}), \qquad
           s \leftarrow s\, e^{m_\text{old} - m} + \textstyle\sum_j e^{\ell_{ij} - m},
           \qquad \ell_{ij} = h_j - C(x_i, y_j)/\varepsilon,

so nothing of size N × M ever reaches memory: the same algorithm as KeOps' online reductions, for GPUs where KeOps
cannot build (seen here: KeOps 2.3 crashes under CUDA 13). The soft averages
:math:`A_i(v) = \sum_j e^{\ell_{ij} + s_i/\varepsilon} v_j` need no running maximum (the softmin :math:`s_i` is
known) and run as one block matrix product per column block, in IEEE precision (no TF32). For ``p = 1`` the
envelope gradient :math:`\sum_j w_{ij} (x_i - y_j)/|x_i - y_j|` is the same kernel with the weights divided by the
distance, applied to ``[y, 1]``.

Block shapes are tuned by Triton's autotuner on first use per dimension and ``p``. With ``TRITON_INTERPRET=1``
the kernels run on CPU tensors through Triton's interpreter (one fixed block shape): this is how the tests check
them without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_power_of_two(value: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (value - 1).bit_length())


class _FusedAverages:
    """The soft average and the ``p = 1`` cost gradient of a fused softmin, both from its ``_weighted_sum`` (one
    kernel: Σ_j w_ij v_j, or Σ_j w_ij v_j / |x_i − y_j|)."""

    def average(self, eps, x, y, h, softmin, values):
        return self._weighted_sum(eps, x, y, h, softmin, values, divide_by_distance=False)

    def cost_gradient(self, eps, x, y, h, softmin):
        """Σ_j w_ij ∇_x C(x_i, y_j) for p = 1: Σ_j w_ij (x_i − y_j)/|x_i − y_j| (0 where x_i = y_j), (B, N, D)."""
        ones = torch.ones(*y.shape[:-1], 1, dtype=y.dtype, device=y.device)
        sums = self._weighted_sum(eps, x, y, h, softmin, torch.cat([y, ones], -1), divide_by_distance=True)
        return x * sums[..., -1:] - sums[..., :-1]


class TritonSoftmin(_FusedAverages):
    """Softmin and soft averages as fused Triton kernels (GPU); O(N + M) memory, ``p`` in {1, 2}."""

    name = "triton"

    def __init__(self, p: int = 2):
        self.p = p

    def __call__(self, eps, x, y, h):
        batch, n, dim = x.shape
        out = torch.empty(batch, n, dtype=x.dtype, device=x.device)
        _softmin_kernel[_grid(n, batch)](
            x.contiguous(), y.contiguous(), h.contiguous(), out, n, y.shape[1], _inverse(eps, x),
            D=dim, DP=_next_power_of_two(dim), P=self.p)
        return out.mul_(-eps)

    def _weighted_sum(self, eps, x, y, h, softmin, values, *, divide_by_distance):
        batch, n, dim = x.shape
        k = values.shape[-1]
        out = torch.empty(batch, n, k, dtype=x.dtype, device=x.device)
        lse = (-softmin / eps).contiguous()
        _average_kernel[_grid(n, batch)](
            x.contiguous(), y.contiguous(), h.contiguous(), lse, values.contiguous(), out, n, y.shape[1],
            _inverse(eps, x),
            K=k, KP=_next_power_of_two(k, 16), D=dim, DP=_next_power_of_two(dim), P=self.p,
            DIVIDE=divide_by_distance)
        return out


def _inverse(eps: float, x: torch.Tensor) -> torch.Tensor:
    """1/ε as a one-element tensor of the points' dtype: Triton passes Python floats as float32, which would cap
    float64 solves at float32 accuracy."""
    return torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)


def _grid(n: int, batch: int):
    return lambda meta: ((n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"], batch)


if _INTERPRETED:
    _CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_M": 32})]
else:
    _CONFIGS = [triton.Config({"BLOCK_N": rows, "BLOCK_M": cols}, num_warps=warps)
                for rows, cols, warps in [(64, 64, 4), (128, 64, 4), (128, 128, 8), (64, 128, 4), (256, 64, 8)]]
_tuned = triton.autotune(configs=_CONFIGS, key=["D", "P"])


@triton.jit
def _logits(xs, y_ptr, h_ptr, cols, m, inv_eps, D: tl.constexpr, DP: tl.constexpr, P: tl.constexpr):
    """h_j − C(x_i, y_j)/ε for a block of rows (their coordinates xs, (BLOCK_N, DP)) and of columns, and the
    squared distances; columns past m get −∞."""
    dims = tl.arange(0, DP)
    col_ok = cols < m
    ys = tl.load(y_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
    squared = tl.zeros((xs.shape[0], ys.shape[0]), dtype=xs.dtype)
    for d in tl.static_range(D):
        xd = tl.sum(tl.where(dims[None, :] == d, xs, 0.0), 1)
        yd = tl.sum(tl.where(dims[None, :] == d, ys, 0.0), 1)
        difference = xd[:, None] - yd[None, :]
        squared += difference * difference
    if P == 2:
        cost = squared * 0.5
    else:
        cost = tl.sqrt(squared)
    h = tl.load(h_ptr + cols, mask=col_ok, other=-float("inf"))
    logits = tl.where(col_ok[None, :], h[None, :] - cost * inv_eps, -float("inf"))
    return logits, squared


@triton.jit
def _lse_step(xs, y_ptr, h_ptr, cols, m, inv_eps, peak, total, D: tl.constexpr, DP: tl.constexpr,
              P: tl.constexpr):
    """Fold one block of columns (those below m) into the rows' running maximum and sum (online log-sum-exp)."""
    logits, _ = _logits(xs, y_ptr, h_ptr, cols, m, inv_eps, D, DP, P)
    new_peak = tl.maximum(peak, tl.max(logits, 1))
    shift = tl.where(new_peak == -float("inf"), 0.0, new_peak)
    total = total * tl.exp(peak - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
    return new_peak, total


@triton.jit
def _average_step(xs, y_ptr, h_ptr, v_ptr, lse, cols, m, inv_eps, total, K: tl.constexpr, KP: tl.constexpr,
                  D: tl.constexpr, DP: tl.constexpr, P: tl.constexpr, DIVIDE: tl.constexpr):
    """Add one block of columns (those below m) to the rows' soft averages Σ_j exp(ℓ_ij − lse_i) v_j (divided by
    |x_i − y_j| if DIVIDE), an IEEE block product."""
    logits, squared = _logits(xs, y_ptr, h_ptr, cols, m, inv_eps, D, DP, P)
    weights = tl.exp(logits - lse[:, None])
    if DIVIDE:
        positive = squared > 0
        weights = tl.where(positive, weights / tl.sqrt(tl.where(positive, squared, 1.0)), 0.0)
    channels = tl.arange(0, KP)
    values = tl.load(v_ptr + cols[:, None] * K + channels[None, :],
                     mask=(cols[:, None] < m) & (channels[None, :] < K), other=0.0)
    return total + tl.dot(weights, values, input_precision="ieee")


@triton.jit
def _load_rows(x_ptr, rows, n, D: tl.constexpr, DP: tl.constexpr):
    dims = tl.arange(0, DP)
    return tl.load(x_ptr + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < n) & (dims[None, :] < D),
                   other=0.0)


@_tuned
@triton.jit
def _softmin_kernel(x_ptr, y_ptr, h_ptr, out_ptr, n, m, inv_eps_ptr, D: tl.constexpr, DP: tl.constexpr,
                    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """log Σ_j exp(h_j − C(x_i, y_j)/ε) for a block of rows (the caller multiplies by −ε)."""
    batch = tl.program_id(1)
    x_ptr += batch * n * D
    y_ptr += batch * m * D
    h_ptr += batch * m
    out_ptr += batch * n
    inv_eps = tl.load(inv_eps_ptr)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    xs = _load_rows(x_ptr, rows, n, D, DP)
    peak = tl.full((BLOCK_N,), -float("inf"), dtype=xs.dtype)
    total = tl.zeros((BLOCK_N,), dtype=xs.dtype)
    for start in range(0, m, BLOCK_M):
        peak, total = _lse_step(xs, y_ptr, h_ptr, start + tl.arange(0, BLOCK_M), m, inv_eps, peak, total, D, DP, P)
    tl.store(out_ptr + rows, peak + tl.log(total), mask=rows < n)


@_tuned
@triton.jit
def _average_kernel(x_ptr, y_ptr, h_ptr, lse_ptr, v_ptr, out_ptr, n, m, inv_eps_ptr, K: tl.constexpr,
                    KP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, P: tl.constexpr, DIVIDE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Σ_j exp(h_j − C(x_i, y_j)/ε − lse_i) v_j (divided by |x_i − y_j| if DIVIDE) for a block of rows."""
    batch = tl.program_id(1)
    x_ptr += batch * n * D
    y_ptr += batch * m * D
    h_ptr += batch * m
    lse_ptr += batch * n
    v_ptr += batch * m * K
    out_ptr += batch * n * K
    inv_eps = tl.load(inv_eps_ptr)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    xs = _load_rows(x_ptr, rows, n, D, DP)
    lse = tl.load(lse_ptr + rows, mask=rows < n, other=0.0)
    channels = tl.arange(0, KP)
    total = tl.zeros((BLOCK_N, KP), dtype=xs.dtype)
    for start in range(0, m, BLOCK_M):
        total = _average_step(xs, y_ptr, h_ptr, v_ptr, lse, start + tl.arange(0, BLOCK_M), m, inv_eps, total, K, KP,
                              D, DP, P, DIVIDE)
    tl.store(out_ptr + rows[:, None] * K + channels[None, :], total,
             mask=(rows[:, None] < n) & (channels[None, :] < K))
