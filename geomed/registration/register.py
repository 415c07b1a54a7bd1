"""``geomed.register``: one call from two shapes to a transform, coarse to fine, with progress and cancel."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..image import Image
from ..kernels import VarifoldLoss
from ..measure import Measure
from ..mesh import Mesh
from ..ot import SinkhornLoss
from .deformable import WarpedShape, fit_deformation
from .linear import LINEAR_MODELS, fit_linear
from .presets import Preset, preset as _preset
from .result import RegistrationResult, summarise
from .transforms import AffineTransform

logger = logging.getLogger(__name__)

MODELS = (*LINEAR_MODELS, "deformable", "diffeomorphic")
_CORRESPONDENCE_ITERATIONS = 15


class RegistrationCancelled(RuntimeError):
    """Raised by :func:`register` when its ``cancel`` callback returned True (within one iteration)."""


def register(
    moving: Mesh | Measure | Image,
    fixed: Mesh | Measure | Image,
    *,
    model: str = "rigid",
    loss: torch.nn.Module | None = None,
    preset: str | Preset | None = None,
    progress: Callable[[str, int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``: the transform φ with φ(moving) ≈ fixed, in world RAS mm.

    Parameters
    ----------
    moving, fixed : Mesh, Measure or Image
        Surface meshes, measures, or masks (an :class:`~geomed.Image` whose non-zero voxels are the shape).
        Mixed inputs work: when one is a mesh and the other a mask, the mask's boundary surface is used, so that
        both are surfaces.
    model : {"rigid", "similarity", "affine", "deformable", "diffeomorphic"}
        Rigid (rotation + translation), similarity (+ isotropic scale), affine; deformable (smooth kernel
        displacement after an affine stage) or diffeomorphic (LDDMM geodesic shooting after an affine stage:
        invertible, folds nothing).
    loss : geomed loss module, optional
        What the deformable stages minimise: ``SinkhornLoss`` (``reach`` for partial scans), ``KernelLoss``
        (MMD) or ``VarifoldLoss`` (meshes); coarser stages use it at a larger blur, the last at its own. Default:
        an unbalanced ``SinkhornLoss`` at the preset's finest blur and ``deformable_reach``. The linear stages
        always use Sinkhorn correspondences within the preset's ``reach``; correspondences near an open boundary
        of a mesh (a crop) are left out of their fits (partial overlap).
    preset : {"brain", "knee", "heart"} or Preset, optional
        The anatomy's scales (see :mod:`geomed.registration.presets`); default: scaled to the fixed shape's size.
    progress : callable(stage, iteration, value), optional
        Called after every correspondence step or objective evaluation.
    cancel : callable() -> bool, optional
        Polled at the same points; returning True stops with :class:`RegistrationCancelled`.
    dtype, device
        Precision and device of the losses (transforms are fitted in float64).

    Returns
    -------
    RegistrationResult
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    start = time.perf_counter()
    moving_shape, fixed_shape = _comparable(moving, "moving", fixed), _comparable(fixed, "fixed", moving)
    moving_measure, fixed_measure = (_as_measure(shape, dtype, device) for shape in (moving_shape, fixed_shape))
    if moving_measure.dim != fixed_measure.dim:
        raise ValueError(f"moving and fixed must have the same dimension, got {moving_measure.dim}-D and "
                         f"{fixed_measure.dim}-D points")
    for name, measure in (("moving", moving_measure), ("fixed", fixed_measure)):
        _check_extent(measure, name, model)
    scale = fixed_measure.total_mass
    moving_measure = Measure(moving_measure.points, moving_measure.weights / scale, moving_measure.normals)
    fixed_measure = Measure(fixed_measure.points, fixed_measure.weights / scale, fixed_measure.normals)
    schedule = _preset(preset) if preset is not None else Preset.for_size(_diameter(fixed_measure))
    history: list[tuple[str, int, float]] = []
    timings: dict[str, float] = {}

    def report(stage: str, iteration: int, value: float) -> None:
        history.append((stage, iteration, value))
        logger.debug("%s iteration %d: %.6g", stage, iteration, value)
        if progress is not None:
            progress(stage, iteration, value)
        if cancel is not None and cancel():
            raise RegistrationCancelled(f"registration cancelled during {stage}, iteration {iteration}")

    transform = _centroid_alignment(moving_measure, fixed_measure)
    rims = {"moving_rim": _rim_distance(moving_shape, moving_measure),
            "fixed_rim": _rim_distance(fixed_shape, fixed_measure)}
    for index, (stage, blurs) in enumerate(_linear_stages(model, schedule.blurs)):
        stage_start = time.perf_counter()
        transform = fit_linear(moving_measure, fixed_measure, stage, blurs=blurs, reach=schedule.reach,
                               initial=transform, aligned=index > 0, iterations=_CORRESPONDENCE_ITERATIONS,
                               report=report, **rims)
        timings[stage] = time.perf_counter() - stage_start
    if model in ("deformable", "diffeomorphic"):
        stage_start = time.perf_counter()
        base = loss if loss is not None else SinkhornLoss(blur=schedule.blurs[-1], reach=schedule.deformable_reach)
        scales = schedule.kernel_scales
        losses = [_at_blur(base, scale / 4) for scale in scales[:-1]] + [base]
        warped = WarpedShape(moving_shape if isinstance(moving_shape, Mesh) else moving_measure, dtype,
                             mass_scale=float(scale) if isinstance(moving_shape, Mesh) else 1.0,
                             exact_normals=isinstance(base, VarifoldLoss))
        transform = fit_deformation(warped, fixed_measure, initial=transform, scales=scales, losses=losses,
                                    steps=schedule.steps if model == "diffeomorphic" else 1,
                                    regularisation=schedule.regularisation, iterations=schedule.iterations,
                                    report=report)
        timings[model] = time.perf_counter() - stage_start
    timings["total"] = time.perf_counter() - start
    backend = str(moving_measure.device)
    moving_output = moving_shape if isinstance(moving_shape, Mesh) else _as_measure(moving_shape, dtype, device)
    return summarise(transform, moving_output, history=history, timings=timings, model=model, backend=backend)


def _linear_stages(model: str, blurs: tuple[float, ...]) -> list[tuple[str, tuple[float, ...]]]:
    """The linear stages and their blurs: rigid first (the coarsest blurs find the pose), then the model's own
    stage from the second blur on (at the coarsest blur the entropic shrinkage of the correspondences would be
    fitted as a scale); the rigid stage stops where the next one takes over."""
    if model == "rigid":
        return [("rigid", blurs)]
    return [("rigid", blurs[:-1] or blurs), ("similarity" if model == "similarity" else "affine", blurs[1:] or blurs)]


def _comparable(shape, name: str, other):
    """``shape`` as a Mesh or Measure: a mask becomes its boundary mesh when ``other`` is a mesh."""
    if isinstance(shape, Image):
        if isinstance(other, Mesh):
            from ..surface import mask_to_mesh

            return mask_to_mesh(shape)
        return shape
    if isinstance(shape, (Mesh, Measure)):
        return shape
    raise TypeError(f"{name} must be a Mesh, a Measure or an Image (mask), got {type(shape).__name__}")


def _as_measure(shape, dtype, device) -> Measure:
    if isinstance(shape, Mesh):
        if shape.n_triangles == 0:
            raise ValueError("a mesh to register has no triangles")
        return Measure.from_mesh(shape, dtype=dtype, device=device)
    if isinstance(shape, Image):
        return Measure.from_mask(shape, dtype=dtype, device=device)
    return shape.to(device=device, dtype=dtype)


def _rim_distance(shape, measure: Measure) -> torch.Tensor | None:
    """Each point's distance (mm) to the open boundary of a mesh with one (a crop or a hole); None otherwise."""
    if not isinstance(shape, Mesh):
        return None
    rim = np.unique(shape.boundary_edges())
    if len(rim) == 0:
        return None
    distances, _ = cKDTree(shape.vertices[rim]).query(measure.points.detach().cpu().double().numpy())
    return torch.as_tensor(distances, dtype=torch.float64, device=measure.device)


def _check_extent(measure: Measure, name: str, model: str) -> None:
    """Refuse shapes a registration cannot place: no extent at all, or (affine and beyond, which fit a general
    linear map) points that do not span every dimension."""
    points = measure.points.detach().double()
    weights = measure.weights.detach().double()
    points = points[weights > 0]
    spread = points - points.mean(0)
    singular = torch.linalg.svdvals(spread) if len(points) > 1 else torch.zeros(1, dtype=points.dtype)
    if float(singular.max()) == 0.0:
        raise ValueError(f"{name} has no extent: its {len(points)} point(s) with mass all sit at one place, so "
                         "there is nothing to align")
    rank = int((singular > singular.max() * 1e-9).sum())
    if model != "rigid" and model != "similarity" and rank < measure.dim:
        shape = {1: "on a line", 2: "in a plane"}.get(rank, f"in a {rank}-D subspace")
        raise ValueError(f"{name}'s {len(points)} points lie {shape}: {'an' if model[0] in 'aeiou' else 'a'} {model} registration fits a general linear "
                         f"map, which needs points spanning all {measure.dim} dimensions (use model='rigid' or "
                         "'similarity')")


def _diameter(measure: Measure) -> float:
    points = measure.points.detach()
    return float((points.amax(0) - points.amin(0)).norm())


def _centroid_alignment(moving: Measure, fixed: Measure) -> AffineTransform:
    """The translation that puts the moving centroid on the fixed one (the start of the rigid stage)."""
    def centroid(measure: Measure) -> torch.Tensor:
        weights = measure.weights.detach().double()
        return weights @ measure.points.detach().double() / weights.sum()

    dim = moving.dim
    return AffineTransform(torch.eye(dim, dtype=torch.float64), centroid(fixed) - centroid(moving))


def _at_blur(loss: torch.nn.Module, blur: float) -> torch.nn.Module:
    """A copy of a geomed loss module with its blur raised to at least ``blur`` (mm) for a coarse stage."""
    if not hasattr(loss, "options") or loss.options.get("blur") is None:
        return loss
    coarse = copy.copy(loss)
    coarse.options = {**loss.options, "blur": max(float(loss.options["blur"]), blur)}
    return coarse

