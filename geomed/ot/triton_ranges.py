r"""The block-sparse softmin on GPUs: the ranges of a :class:`~geomed.ot.blocksparse.RangePattern` reduced by fused
Triton kernels.

One program per row chunk of the pattern: it takes the chunk's rows ``BLOCK_N`` at a time and sweeps only the
chunk's kept column ranges, ``BLOCK_M`` columns at a time, computing the costs in registers and folding them into
one running (online) log-sum-exp per row, as :mod:`geomed.ot.triton_softmin` does over all columns — so the work is
the kept entries, not N × M, and nothing of that size reaches memory. The soft averages (gradients, plans,
barycentric maps) are the same sweep with the row's log-sum-exp known: one block matrix product per column block,
in IEEE float32 (no TF32: the averages feed the gradients, whose accuracy the tests pin). Chunks and ranges come
straight from the CPU engine's pruning (:mod:`geomed.ot.multiscale`); on CUDA tensors the multiscale geometry
builds :class:`TritonRangeSoftmin` instead of the torch tiles of :class:`~geomed.ot.blocksparse.RangeSoftmin`.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (how the tests check them without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .blocksparse import RangePattern, RangeSoftmin
from .triton_softmin import _average_step, _FusedAverages, _inverse, _load_rows, _lse_step, _next_power_of_two

__all__ = ["TritonRangeSoftmin"]

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_M": 32})]
else:
    _CONFIGS = [triton.Config({"BLOCK_N": rows, "BLOCK_M": cols}, num_warps=warps)
                for rows, cols, warps in [(32, 64, 4), (32, 128, 4), (64, 64, 4), (16, 128, 4), (64, 128, 8)]]
_tuned = triton.autotune(configs=_CONFIGS, key=["D", "P"])


class TritonRangeSoftmin(_FusedAverages, RangeSoftmin):
    """:class:`~geomed.ot.blocksparse.RangeSoftmin` (batch of one) with the softmin, the soft averages and the
    ``p = 1`` cost gradient computed by fused Triton kernels over the pattern's ranges; O(N + kept ranges)
    memory."""

    name = "multiscale"

    def __init__(self, p: int, pattern: RangePattern, cache_bytes: int = 0):
        super().__init__(p, pattern)  # no tile cache: the kernels compute their tiles on the fly
        self._ranges = tuple(t.contiguous() for t in (pattern.chunk_start, pattern.chunk_stop, pattern.range_ptr,
                                                      pattern.range_start.long(), pattern.range_stop.long()))

    def __call__(self, eps, x, y, h):
        out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
        _range_softmin_kernel[(len(self._ranges[0]),)](
            x[0].contiguous(), y[0].contiguous(), h[0].contiguous(), out, *self._ranges, _inverse(eps, x),
            D=x.shape[-1], DP=_next_power_of_two(x.shape[-1]), P=self.p)
        return out.mul_(-eps).unsqueeze(0)

    def _weighted_sum(self, eps, x, y, h, softmin, values, *, divide_by_distance):
        k = values.shape[-1]
        out = torch.zeros(x.shape[1], k, dtype=x.dtype, device=x.device)
        lse = (-softmin[0] / eps).contiguous()
        _range_average_kernel[(len(self._ranges[0]),)](
            x[0].contiguous(), y[0].contiguous(), h[0].contiguous(), lse, values[0].contiguous(), out,
            *self._ranges, _inverse(eps, x), K=k, KP=_next_power_of_two(k, 16), D=x.shape[-1],
            DP=_next_power_of_two(x.shape[-1]), P=self.p, DIVIDE=divide_by_distance)
        return out.unsqueeze(0)


@triton.jit
def _chunk(chunk_start_ptr, chunk_stop_ptr, range_ptr_ptr):
    """This program's chunk: its rows [row_begin, row_end) and its ranges [first, last)."""
    chunk = tl.program_id(0)
    return (tl.load(chunk_start_ptr + chunk), tl.load(chunk_stop_ptr + chunk), tl.load(range_ptr_ptr + chunk),
            tl.load(range_ptr_ptr + chunk + 1))


@_tuned
@triton.jit
def _range_softmin_kernel(x_ptr, y_ptr, h_ptr, out_ptr, chunk_start_ptr, chunk_stop_ptr, range_ptr_ptr,
                          range_start_ptr, range_stop_ptr, inv_eps_ptr, D: tl.constexpr, DP: tl.constexpr,
                          P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """log Σ_{j in the chunk's ranges} exp(h_j − C(x_i, y_j)/ε) for the rows of one chunk (the caller × −ε)."""
    row_begin, row_end, first, last = _chunk(chunk_start_ptr, chunk_stop_ptr, range_ptr_ptr)
    inv_eps = tl.load(inv_eps_ptr)
    for row0 in range(row_begin, row_end, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        xs = _load_rows(x_ptr, rows, row_end, D, DP)
        peak = tl.full((BLOCK_N,), -float("inf"), dtype=xs.dtype)
        total = tl.zeros((BLOCK_N,), dtype=xs.dtype)
        for r in range(first, last):
            column_end = tl.load(range_stop_ptr + r)
            for start in range(tl.load(range_start_ptr + r), column_end, BLOCK_M):
                peak, total = _lse_step(xs, y_ptr, h_ptr, start + tl.arange(0, BLOCK_M), column_end, inv_eps, peak,
                                        total, D, DP, P)
        tl.store(out_ptr + rows, peak + tl.log(total), mask=rows < row_end)


@_tuned
@triton.jit
def _range_average_kernel(x_ptr, y_ptr, h_ptr, lse_ptr, v_ptr, out_ptr, chunk_start_ptr, chunk_stop_ptr,
                          range_ptr_ptr, range_start_ptr, range_stop_ptr, inv_eps_ptr, K: tl.constexpr,
                          KP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, P: tl.constexpr,
                          DIVIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Σ_{j in the chunk's ranges} exp(h_j − C(x_i, y_j)/ε − lse_i) v_j (÷ |x_i − y_j| if DIVIDE), one chunk."""
    row_begin, row_end, first, last = _chunk(chunk_start_ptr, chunk_stop_ptr, range_ptr_ptr)
    inv_eps = tl.load(inv_eps_ptr)
    channels = tl.arange(0, KP)
    for row0 in range(row_begin, row_end, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        xs = _load_rows(x_ptr, rows, row_end, D, DP)
        lse = tl.load(lse_ptr + rows, mask=rows < row_end, other=0.0)
        total = tl.zeros((BLOCK_N, KP), dtype=xs.dtype)
        for r in range(first, last):
            column_end = tl.load(range_stop_ptr + r)
            for start in range(tl.load(range_start_ptr + r), column_end, BLOCK_M):
                total = _average_step(xs, y_ptr, h_ptr, v_ptr, lse, start + tl.arange(0, BLOCK_M), column_end,
                                      inv_eps, total, K, KP, D, DP, P, DIVIDE)
        tl.store(out_ptr + rows[:, None] * K + channels[None, :], total,
                 mask=(rows[:, None] < row_end) & (channels[None, :] < K))
