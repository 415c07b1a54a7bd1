r"""Spatial helpers shared by :mod:`geomed.ot`, :mod:`geomed.kernels` and :mod:`geomed.registration`.

Z order
    :func:`morton_codes` numbers the cells of a grid along the Z (Morton) curve; sorting points by these codes
    (:func:`morton_order`) puts neighbouring points close in memory, and every cell of every coarser grid (a code
    shifted right by D bits per level) is then a contiguous run of points.
Ranges
    :func:`expand_ranges` turns (start, count) pairs into the concatenated indices, as :func:`index_dtype` integers
    (int32 where they fit: index tensors are most of the memory of the block-sparse tiles).
Cells and pooling
    :func:`grid_cells` numbers the occupied cubic cells of a grid of given side; :func:`cell_sums` and
    :func:`cell_means` pool values per cell (weighted sums, weighted means).
Stabilised tile log-sum-exp
    :func:`tile_logsumexp` and :func:`tile_average` reduce a tile of logits in place. Why the exponential pass
    clamps: exponentials of arguments below about −88 underflow float32, and the vectorised ``exp`` of PyTorch's
    CPU kernels takes a scalar slow path for them (measured here: 80× slower). Gaussian kernels underflow almost
    everywhere at small blurs, so each tile's logits are clamped at ``LOGIT_FLOOR`` (80) below their row's maximum
    first: a term of relative size :math:`e^{-80} \approx 2\cdot10^{-35}` is kept instead of a smaller one, a change
    far below float64 resolution.
Compiled backends
    :func:`keops_available` (probed once per process, in a child process) and :func:`triton_unusable`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LOGIT_FLOOR = -80.0
"""Logits of a tile are clamped at this value below their row's maximum before the exponential pass."""


def morton_codes(points: torch.Tensor, cell: float) -> tuple[torch.Tensor, float]:
    """Z-order codes of the grid cells of the points, and the cell side actually used.

    Parameters
    ----------
    points : Tensor (n, D)
        Points in mm (D ≤ 62; 62 // D bits per axis).
    cell : float
        Cell side (mm), coarsened so that the points' extent fits in the bits per axis.

    Returns
    -------
    codes : Tensor (n,), int64
    cell : float
        The cell side used (mm).
    """
    n, dim = points.shape
    bits = 62 // dim
    low = points.detach().amin(0)
    extent = float((points.detach().amax(0) - low).max())
    cell = max(cell, extent / (2**bits - 1) * (1 + 1e-6), 1e-12)
    cells = ((points.detach() - low) / cell).floor().long().clamp_(0, 2**bits - 1)
    code = torch.zeros(n, dtype=torch.long, device=points.device)
    columns = [cells[:, d].contiguous() for d in range(dim)]
    for bit in range(int(cells.max()).bit_length() if n else 0):
        for d in range(dim):
            code |= ((columns[d] >> bit) & 1) << (bit * dim + d)
    return code, cell


def morton_order(points: torch.Tensor, cell: float) -> torch.Tensor:
    """Permutation (n,) sorting points (n, D) along the Z curve of a grid of side ``cell`` (mm), coarsened to fit."""
    return torch.argsort(morton_codes(points, cell)[0], stable=True)


def index_dtype(bound: int) -> torch.dtype:
    """int32 for indices below ``bound`` < 2³¹ (the column indices of block-sparse tiles are most of the multiscale
    memory: half of it in int64), else int64."""
    return torch.int32 if bound < 2**31 else torch.long


def expand_ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(s, s + c) for each (s, c) of ``starts`` (k,) and ``counts`` (k,), as
    :func:`index_dtype` integers: a tensor (Σ counts,)."""
    total = int(counts.sum())
    dtype = index_dtype(max(total, int((starts + counts).max())) if len(starts) else total)
    nonempty = counts > 0
    starts, counts = starts[nonempty], counts[nonempty]
    steps = torch.ones(total, dtype=dtype, device=starts.device)
    if total:
        previous_last = torch.cat([starts.new_zeros(1), (starts + counts - 1)[:-1]])
        steps[torch.cumsum(counts, 0) - counts] = (starts - previous_last).to(dtype)
    return steps.cumsum_(0)


def grid_cells(points: torch.Tensor, cell: float) -> tuple[torch.Tensor, int]:
    """Each point's cubic cell of side ``cell`` (mm), numbered from 0, and the number of cells.

    Parameters
    ----------
    points : Tensor (N, D)
        Points in mm; the grid starts at their lower corner.
    cell : float
        Cell side (mm).

    Returns
    -------
    members : Tensor (N,), int64
        The cell of each point, numbered in the order of the cells' row-major grid indices.
    count : int
        The number of occupied cells.
    """
    keys = torch.floor((points - points.amin(0)) / cell).long()
    flat = torch.zeros_like(keys[:, 0])
    for axis in range(keys.shape[1]):  # one integer per cell: a 1-D unique (a sort) instead of a row-wise one
        flat = flat * (int(keys[:, axis].max()) + 1) + keys[:, axis]
    _, members = torch.unique(flat, return_inverse=True)
    return members, int(members.max()) + 1


def cell_sums(values: torch.Tensor, members: torch.Tensor, count: int) -> torch.Tensor:
    """The sum of ``values`` (N, ...) over the points of each cell → (count, ...) (differentiable w.r.t. the values).

    ``members`` (N,) holds each point's cell in [0, count).
    """
    sums = torch.zeros(count, *values.shape[1:], dtype=values.dtype, device=values.device)
    return sums.index_add_(0, members, values)


def cell_means(points: torch.Tensor, weights: torch.Tensor, members: torch.Tensor, count: int) -> torch.Tensor:
    """Weighted mean of the points (N, K) of each cell → (count, K), with weights (N,) (differentiable w.r.t. the
    points and weights); a cell of zero mass gives 0."""
    sums = cell_sums(points * weights[:, None], members, count)
    mass = cell_sums(weights, members, count)
    return sums / mass.clamp_min(torch.finfo(points.dtype).tiny)[:, None]


def tile_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """In-place log Σ_j exp(logits_ij) of a tile (..., n, m) → (..., n); rows of −∞ stay −∞."""
    peak = logits.amax(-1)
    finite = torch.isfinite(peak)
    shift = torch.where(finite, peak, torch.zeros_like(peak))
    total = logits.sub_(shift.unsqueeze(-1)).clamp_min_(LOGIT_FLOOR).exp_().sum(-1)
    return torch.where(finite, total.log_().add_(shift), peak)


def shifted_logsumexp(logits: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place log Σ_j exp(logits_ij) + shift_i of a tile whose logits (..., n, m) were computed minus a guess
    ``shift`` (..., n) of each row's log-sum-exp, and which rows (..., n) the guess served.

    Two passes fewer than :func:`tile_logsumexp` (no row maximum to find and subtract): the logits are clamped to
    [``LOGIT_FLOOR``, −``LOGIT_FLOOR``] and summed. A row is served when its sum lies within e^±40 — then its
    largest term is within e^40 of 1, nothing overflows, and the clamped-up terms change it by less than
    m·e^−40 relatively; the caller recomputes the other rows with :func:`tile_logsumexp`.
    """
    total = logits.clamp_(LOGIT_FLOOR, -LOGIT_FLOOR).exp_().sum(-1).log_()
    served = (total > -40.0) & (total < 40.0)
    return total.add_(shift), served


def tile_average(logits: torch.Tensor, lse: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """In-place Σ_j exp(logits_ij − lse_i) values_j of a tile, logits (..., n, m), lse (..., n), values (..., m, K)
    → (..., n, K); ``lse=None`` if the logits were computed minus it already."""
    if lse is not None:
        logits = logits.sub_(lse.unsqueeze(-1))
    return logits.clamp_min_(LOGIT_FLOOR).exp_() @ values


KEOPS_STATUS: dict[str, bool] = {}
"""What :func:`keops_available` found: ``{"ok": bool}`` once probed (clear it to probe again)."""

_KEOPS_PROBE = """
import torch
from geomed.ot.softmin import KeOpsSoftmin
for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:
    x = torch.zeros(1, 2, 1, device=device)
    assert torch.isfinite(KeOpsSoftmin(2)(1.0, x, x, torch.zeros(1, 2, device=device))).all(), device
"""


def keops_available() -> bool:
    """Whether KeOps compiles and runs here, on the CPU and on the GPU if there is one.

    Probed once per process, in a child process (a second or two, plus KeOps' first compilation), because a broken
    KeOps build can kill its process outright — seen here: a segmentation fault while generating code under
    CUDA 13 — and no ``try`` catches that. A failure is logged once, with its reason, and remembered
    (:data:`KEOPS_STATUS`); geomed then uses its torch backends.
    """
    if "ok" not in KEOPS_STATUS:
        reason = _probe_keops()
        KEOPS_STATUS["ok"] = reason is None
        if reason is not None:
            logger.warning("KeOps is unavailable (%s); geomed uses its torch backends", reason)
    return KEOPS_STATUS["ok"]


def _probe_keops() -> str | None:
    """Run one KeOps softmin in a child process; ``None`` if it worked, else why not."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        child = subprocess.run([sys.executable, "-c", _KEOPS_PROBE], capture_output=True, text=True, env=env,
                               timeout=600)
    except subprocess.TimeoutExpired:
        return "its test reduction did not finish within 10 minutes"
    if child.returncode == 0:
        return None
    if child.returncode < 0:
        how = f"its process killed by {signal.Signals(-child.returncode).name}"
    else:
        how = f"exit status {child.returncode}"
    last_line = (child.stderr.strip().splitlines() or ["no message"])[-1]
    return f"its test reduction failed, {how}: {last_line}"


def triton_unusable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None if they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"it runs on CUDA tensors (or under TRITON_INTERPRET=1, Triton's CPU interpreter), got {device.type}"
    return None
