r"""Grid solves of a fixed shape on a GPU, captured once as a CUDA graph and replayed.

A training loss solves the same problem at every step: segmentations of one shape and spacing, the same blur,
reach and ε-schedule; only the weights change. Its solve (:func:`~geomed.ot.grid_divergence.
grid_sinkhorn_divergence` with ``tol=None, max_iter=0``, the default of
:class:`monai_losses.SinkhornSegmentationLoss`) is a fixed sequence of device work: pool the weights into the
pyramid, one symmetric update per ε on the level suited to it, extrapolate to the input grid. Run eagerly it is
thousands of small kernel launches (about 5,400 on (2, 3, 64³) segmentations, for 9 ms of GPU work), so the GPU
waits on Python.

:func:`solve_as_graph` records that sequence once per problem and input shape as a ``torch.cuda.CUDAGraph`` and
replays it on the next calls: one launch for the whole solve. What makes the sequence fixed:

* the pyramid's softmins reduce the whole grid (``GridPyramid(full_passes=True)``), not the voxels with mass, so
  no shape depends on the weights and nothing is read on the host;
* the per-axis kernel constants come from :data:`geomed.ot.grid.axis_kernels`, built by a warm-up run before the
  capture and kept alive by the graph (:meth:`~geomed.ot.grid.AxisKernelCache.recording`);
* the solver reads no marginal error on the host when it stops at the extrapolation (the error stays a device
  tensor: :attr:`geomed.ot.OTResult.marginal_error` reads it when asked).

The graph's inputs and outputs are its own buffers: the weights are copied in, the potentials copied out, so a
result stays valid after the next replay. The value and its gradients are computed after the replay, eagerly,
from the potentials (:func:`geomed.ot.divergence.divergence`). The schedule of a replayed solve is the captured
one, with ``seconds`` NaN (its steps are not timed apart). The first call returns the eager solve that precedes
the recording, and checks that a first replay gives the same potentials. Should a capture fail (an operation that
CUDA graphs refuse) or its replay differ, the solve runs eagerly from then on, with a logged warning.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from .grid import AxisKernel, DenseGrid, GridPyramid, SharedGrid, axis_kernels
from .problem import Problem
from .result import ScheduleStep, Solution
from .softmin import Softmin
from .solver import sinkhorn_loop

__all__ = ["graph_applies", "solve_as_graph"]

logger = logging.getLogger(__name__)

_CAPACITY = 8  # graphs kept (each holds its own memory pool), least recently used first out


@dataclass(frozen=True)
class _Captured:
    """A recorded solve: the graph, its input and output buffers, what it reports, what it reads."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor]
    outputs: tuple[torch.Tensor | None, ...]
    schedule: list[ScheduleStep]
    softmins: dict[str, Softmin]
    kernels: list[AxisKernel]


_graphs: OrderedDict[tuple, _Captured | None] = OrderedDict()


def graph_applies(grid: DenseGrid | SharedGrid, problem: Problem, device: torch.device) -> bool:
    """Whether the solve is a fixed sequence of device work worth capturing: dense weights on a grid (the masks
    of a :class:`~geomed.ot.grid.SharedGrid` are cropped to their supports, a shape that changes), on CUDA,
    stopping at the extrapolation (``tol=None, max_iter=0``)."""
    return (device.type == "cuda" and isinstance(grid, DenseGrid) and problem.tol is None
            and problem.max_iter == 0)


def solve_as_graph(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, grid: DenseGrid,
                   problem: Problem) -> tuple[Solution, dict[str, Softmin]]:
    """The solution of the grid problem (as :func:`~geomed.ot.solver.sinkhorn_loop` on a
    :class:`~geomed.ot.grid.GridPyramid` finds it) and the input grid's softmins, by replaying the graph recorded
    for this problem and these shapes (recorded on the first call).

    Parameters
    ----------
    x, y : Tensor (B, N, D)
        The voxel centres (mm); not read by the grid's softmins.
    alpha, beta : Tensor (B, N)
        Detached weights on the flattened grid, on a CUDA device.
    grid : DenseGrid
    problem : Problem
        With ``tol=None`` and ``max_iter=0`` (:func:`graph_applies`).
    """
    key = (grid, problem, tuple(alpha.shape), tuple(beta.shape), alpha.dtype, alpha.device)
    if key in _graphs:
        _graphs.move_to_end(key)
        captured = _graphs[key]
        return _solve(x, y, alpha, beta, grid, problem) if captured is None else _replay(captured, alpha, beta)
    captured, eager = _capture(x, y, alpha, beta, grid, problem)
    if captured is not None and not _agrees(_replay(captured, alpha, beta)[0], eager[0]):
        logger.warning("the CUDA graph of the grid solve of shape %s does not replay the eager solve; it runs "
                       "eagerly", grid.shape)
        captured = None
    _graphs[key] = captured
    while len(_graphs) > _CAPACITY:
        _graphs.popitem(last=False)
    return eager


def _replay(captured: _Captured, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[Solution, dict[str, Softmin]]:
    captured.inputs[0].copy_(alpha)
    captured.inputs[1].copy_(beta)
    captured.graph.replay()
    f, g, f_aa, g_bb, error = (None if t is None else t.clone() for t in captured.outputs)
    return Solution(f, g, f_aa, g_bb, error, False, captured.schedule), captured.softmins


def _agrees(replayed: Solution, eager: Solution) -> bool:
    """Whether a first replay gives the eager solve's potentials (the same operations: equal up to rounding) — a
    check, at capture time only, that the graph recorded the whole solve."""
    return all(a is None and b is None or a is not None and b is not None and torch.allclose(a, b, rtol=1e-5,
                                                                                            atol=1e-6)
               for a, b in zip(replayed.potentials, eager.potentials))


def _solve(x, y, alpha, beta, grid: DenseGrid, problem: Problem) -> tuple[Solution, dict[str, Softmin]]:
    """The solve, eagerly, with the whole-grid passes: the sequence that the graph records."""
    pyramid = GridPyramid(x, y, alpha, beta, grid.shape, grid.spacing, problem.damping, full_passes=True)
    return sinkhorn_loop(pyramid, problem), pyramid.softmins


def _capture(x, y, alpha, beta, grid: DenseGrid, problem: Problem
             ) -> tuple[_Captured | None, tuple[Solution, dict[str, Softmin]]]:
    """The solve run eagerly on a side stream (it also builds the kernel constants and cuBLAS's workspaces), then
    recorded; returns the recording (None if CUDA refused it) and the eager solve."""
    inputs = (alpha.clone(), beta.clone())
    current = torch.cuda.current_stream(alpha.device)
    side = torch.cuda.Stream(alpha.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        eager = _solve(x, y, *inputs, grid, problem)
    current.wait_stream(side)
    for tensor in (*eager[0].potentials, eager[0].error):  # made on the side stream, used on this one
        if isinstance(tensor, torch.Tensor):
            tensor.record_stream(current)
    try:
        graph = torch.cuda.CUDAGraph()
        with axis_kernels.recording() as kernels, torch.cuda.graph(graph):
            solution, softmins = _solve(x, y, *inputs, grid, problem)
    except RuntimeError as error:
        logger.warning("the grid solve of shape %s could not be captured as a CUDA graph (%s); it runs eagerly",
                       grid.shape, error)
        return None, eager
    error = solution.error if isinstance(solution.error, torch.Tensor) else torch.tensor(solution.error)
    schedule = [replace(step, seconds=math.nan) for step in solution.schedule]
    return _Captured(graph, inputs, (*solution.potentials, error), schedule, softmins, kernels), eager
