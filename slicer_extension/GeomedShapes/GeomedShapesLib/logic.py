"""What the GeomedShapes module does, as adapters: MRML nodes in, geomed computes, new MRML nodes out.

Nothing here needs the Slicer application: every function takes the MRML scene explicitly, so the same code runs in
Slicer (``slicer.mrmlScene``) and in tests on the ``slicer-core`` package's MRML. Input nodes are never modified;
every output is a new node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geomed.io import file_stem

from .nodes import (add_grid_transform, add_histogram_plot, add_linear_transform, add_model, add_table,
                    image_from_segment, image_from_volume, mesh_from_model, save_node)

_PREVIEW = "GeomedShapes.preview"
_GRID_SPACING_MM = 2.0
_GRID_MARGIN_MM = 10.0


@dataclass
class RegistrationOutputs:
    """The new nodes of one registration (``plot`` is None unless asked for), and geomed's own result."""

    transform: object
    warped: object
    table: object
    plot: object
    result: object

    def nodes(self) -> list:
        """The output nodes that hold data (transform, warped model, quality table), for :func:`export_nodes`."""
        return [self.transform, self.warped, self.table]


def shape_from_node(node, label: int | None = None, segment: str | None = None):
    """A model node's surface, a volume / labelmap node's boundary surface (of the label value ``label``, default
    every non-zero voxel), or the surface of a segmentation node's ``segment`` (name or id), as a geomed Mesh in
    world RAS mm."""
    if node is None:
        raise ValueError("select an input node")
    if node.IsA("vtkMRMLModelNode"):
        return mesh_from_model(node)
    if node.IsA("vtkMRMLScalarVolumeNode"):
        return _surface_of(node, image_from_volume(node), label)
    if node.IsA("vtkMRMLSegmentationNode"):
        if not segment:
            raise ValueError(f"choose a segment of {node.GetName()!r}")
        return _surface_of(node, image_from_segment(node, segment), None)
    raise ValueError(f"{node.GetName()!r} is a {node.GetClassName()}: use a model, labelmap, volume or "
                     "segmentation node")


def _surface_of(node, image, label: int | None):
    """The mask's boundary surface; geomed's complaint (empty mask, absent label) prefixed with the node's name."""
    from geomed import mask_to_mesh

    try:
        return mask_to_mesh(image, label)
    except ValueError as error:
        raise ValueError(f"{node.GetName()!r}: {error}") from None


def preview_nodes(scene, moving, fixed, *, label: int | None = None, moving_segment: str | None = None,
                  fixed_segment: str | None = None):
    """Show the two surfaces a registration would take (a labelmap's label, a segment, a model through its parent
    transform), before running it: two model nodes, the fixed one yellow and the moving one blue, half transparent.

    They are scratch nodes: not saved with the scene, and replaced by the next preview. Returns (moving, fixed).
    """
    shapes = [shape_from_node(moving, label, moving_segment), shape_from_node(fixed, label, fixed_segment)]
    for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
        if node.GetAttribute(_PREVIEW) is not None:
            for display in [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]:
                scene.RemoveNode(display)
            scene.RemoveNode(node)
    shown = []
    for role, node, mesh, colour in (("moving", moving, shapes[0], (0.3, 0.55, 1.0)),
                                      ("fixed", fixed, shapes[1], (1.0, 0.85, 0.3))):
        model = add_model(scene, mesh, f"{node.GetName()} ({role}, preview)")
        model.SetAttribute(_PREVIEW, role)
        model.SetSaveWithScene(False)
        display = model.GetDisplayNode()
        if display is not None:
            display.SetColor(*colour)
            display.SetOpacity(0.6)
        shown.append(model)
    return tuple(shown)


def torch_device(use_gpu: bool) -> str:
    """The torch device the computation runs on: "cuda" when asked for and available, else "cpu"."""
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def register_nodes(scene, moving, fixed, *, model: str = "rigid", preset: str | None = None,
                   label: int | None = None, moving_segment: str | None = None, fixed_segment: str | None = None,
                   loss: str = "sinkhorn", blur: float | None = None, reach: float | None = None,
                   use_gpu: bool = False, plot: bool = False,
                   progress: Callable[[str, int, float], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> RegistrationOutputs:
    """Register ``moving`` onto ``fixed`` (model, labelmap or volume nodes) and add the results as new nodes.

    Parameters
    ----------
    scene : vtkMRMLScene
    moving, fixed : MRML nodes
        Models, labelmap / scalar volumes, or segmentations.
    model : {"rigid", "similarity", "affine", "deformable", "diffeomorphic"}
    preset : {"brain", "knee", "heart"}, optional
        Anatomy scales; default scaled to the fixed shape.
    label : int, optional
        The label value to take from labelmap inputs (default: every non-zero voxel).
    moving_segment, fixed_segment : str, optional
        The segment (name or id) to take from a segmentation input.
    loss, blur, reach
        What the deformable stages minimise, and its scales in mm (see :func:`geomed.registration.deformable_loss`).
    use_gpu : bool
        Run on CUDA when available.
    plot : bool
        Also add a plot chart of the surface distances to the fixed shape before and after.
    progress, cancel : callables
        As :func:`geomed.register`: progress(stage, iteration, value) and cancel() → bool.

    Returns
    -------
    RegistrationOutputs
        ``transform`` (a linear transform node, or a grid transform node for deformations; it moves ``moving``
        onto ``fixed``), ``warped`` (a model with point arrays ``displacement``, ``normal displacement`` and
        ``jacobian``, coloured by the normal displacement), ``table`` (quality metrics), ``plot`` (a chart, or
        None) and geomed's result.
    """
    from geomed import register
    from geomed.registration import AffineTransform, deformable_loss
    from geomed.surface import distance_to_surface

    started = time.perf_counter()
    moving_mesh = shape_from_node(moving, label, moving_segment)
    fixed_mesh = shape_from_node(fixed, label, fixed_segment)
    device = torch_device(use_gpu)
    result = register(moving_mesh, fixed_mesh, model=model, preset=preset,
                      loss=deformable_loss(loss, preset, blur, reach, fixed_mesh), progress=progress, cancel=cancel,
                      device=device)
    name = f"{moving.GetName()} to {fixed.GetName()}"
    if isinstance(result.transform, AffineTransform):
        transform = add_linear_transform(scene, result.transform.homogeneous, f"{name} ({model})")
    else:
        transform = _grid_transform(scene, result, moving_mesh, f"{name} ({model})")
    warped = add_model(scene, result.warped, f"{moving.GetName()} warped ({model})", scalars="normal displacement")
    before = distance_to_surface(moving_mesh.vertices, fixed_mesh)
    after = distance_to_surface(result.warped.vertices, fixed_mesh)
    rows = _quality(moving_mesh, fixed_mesh, result, before, after, time.perf_counter() - started, device)
    table = add_table(scene, rows, f"{name} quality")
    chart = add_histogram_plot(scene, {"before": before, "after": after}, f"{name} surface distance",
                               "distance to the fixed surface (mm)") if plot else None
    return RegistrationOutputs(transform, warped, table, chart, result)


def _grid_transform(scene, result, moving_mesh, name: str):
    """The deformation sampled as a displacement grid over the moving shape (2 mm, 10 mm margin)."""
    lower = moving_mesh.vertices.min(axis=0) - _GRID_MARGIN_MM
    upper = moving_mesh.vertices.max(axis=0) + _GRID_MARGIN_MM
    shape = np.ceil((upper - lower) / _GRID_SPACING_MM).astype(int) + 1
    axes = [lower[k] + _GRID_SPACING_MM * np.arange(shape[k]) for k in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    moved = np.asarray(result.transform(grid))
    return add_grid_transform(scene, lower, _GRID_SPACING_MM, (moved - grid).reshape(*shape, 3), name)


def _quality(moving, fixed, result, before, after, seconds: float, device: str) -> list[tuple[str, object, str]]:
    from geomed.morphometry import volume

    rows = [
        ("mean surface distance before", float(before.mean()), "mm"),
        ("mean surface distance after", float(after.mean()), "mm"),
        ("95% surface distance before", float(np.percentile(before, 95)), "mm"),
        ("95% surface distance after", float(np.percentile(after, 95)), "mm"),
        ("minimum Jacobian", result.min_jacobian, ""),
    ]
    if moving.is_closed and fixed.is_closed:
        before_volume, fixed_volume = volume(moving), volume(fixed)
        rows += [("moving volume", before_volume / 1000.0, "mL"), ("fixed volume", fixed_volume / 1000.0, "mL"),
                 ("volume change", 100.0 * (fixed_volume - before_volume) / before_volume, "%")]
    rows += [("time", seconds, "s"), ("backend", device, "")]
    return rows


def measure_nodes(scene, nodes, label: int | None = None, segment: str | None = None):
    """A table node of each input's enclosed volume (mL) and surface area (cm²)."""
    from geomed.morphometry import surface_area, volume

    rows = []
    for node in nodes:
        mesh = shape_from_node(node, label, segment)
        rows += [(f"{node.GetName()} volume", volume(mesh) / 1000.0, "mL"),
                 (f"{node.GetName()} area", surface_area(mesh) / 100.0, "cm²")]
    return add_table(scene, rows, "geomed measurements")


def longitudinal_nodes(scene, nodes, years, *, label: int | None = None, segment: str | None = None,
                       preset: str | None = None,
                       progress: Callable[[str, int, float], None] | None = None,
                       cancel: Callable[[], bool] | None = None):
    """One subject's timepoints: percent volume change of every interval (direct and registration-based, as
    ``geomed study`` measures) and the change map of the whole span.

    Parameters
    ----------
    nodes : sequence of MRML nodes
        The timepoints, in any order.
    years : sequence of float, or str
        Each node's time in years (``"0 1 2.5"`` as typed in the module also works); the timepoints are taken in
        the order of their years, which must differ.

    Returns
    -------
    (table node, change-map model node)
        The table has one row per interval and the annual rate; the model is the first scan carried onto the last
        along its normals, coloured by the ``normal displacement`` (mm).
    """
    from geomed import register
    from geomed.morphometry import percent_volume_change, surface_change

    years = parse_years(years) if isinstance(years, str) else [float(year) for year in years]
    if len(nodes) < 2 or len(years) != len(nodes):
        raise ValueError(f"give at least two timepoints and a year for each: {len(nodes)} timepoints, "
                         f"{len(years)} years")
    order = sorted(range(len(nodes)), key=years.__getitem__)
    nodes, years = [nodes[i] for i in order], [years[i] for i in order]
    for (a, first), (b, second) in zip(zip(years, nodes), zip(years[1:], nodes[1:])):
        if not b > a:
            raise ValueError(f"{first.GetName()!r} and {second.GetName()!r} have the same year ({a:g})")
    meshes = [shape_from_node(node, label, segment) for node in nodes]
    rows, logs = [], []
    for index in range(len(meshes) - 1):
        before, after = meshes[index], meshes[index + 1]
        aligned = register(before, after, model="rigid", preset=preset, progress=progress, cancel=cancel)
        change = percent_volume_change(before, after, surface_change(before, after, aligned.transform))
        span = f"{nodes[index].GetName()} → {nodes[index + 1].GetName()}"
        rows += [(f"{span}: direct", change["direct_percent"], "%"),
                 (f"{span}: registration", change["registration_percent"], "%")]
        logs.append(np.log1p(change["registration_percent"] / 100.0))
    slope = np.polyfit(years, np.concatenate([[0.0], np.cumsum(logs)]), 1)[0]
    rows.append(("annual rate (registration)", 100.0 * float(np.expm1(slope)), "%/year"))
    whole = register(meshes[0], meshes[-1], model="rigid", preset=preset, progress=progress, cancel=cancel)
    carried = surface_change(meshes[0], meshes[-1], whole.transform)
    baseline = meshes[0].with_point_data(**{name: carried.point_data[name]
                                            for name in ("normal displacement", "area change")})
    table = add_table(scene, rows, f"{nodes[0].GetName()} longitudinal change")  # nodes only once all is computed
    change_map = add_model(scene, baseline, f"{nodes[0].GetName()} change map", scalars="normal displacement")
    return table, change_map


def parse_years(text: str) -> list[float]:
    """Years typed as numbers separated by spaces or commas (``"0 1 2.5"``, ``"0, 1.5"``)."""
    years = []
    for word in text.replace(",", " ").split():
        try:
            years.append(float(word))
        except ValueError:
            raise ValueError(f"years: {word!r} is not a number (type them as '0 1 2.5')") from None
    return years


def export_nodes(nodes, folder: str | Path) -> list[Path]:
    """Write output nodes (models ``.vtk``, transforms ``.h5``, tables ``.csv``) into ``folder``, each atomically,
    named after the nodes. A node listed twice is written once; distinct nodes of the same name get ``_2``, ``_3``…
    rather than overwriting each other.

    Returns the files written, in order.
    """
    written, stems, seen = [], set(), set()
    for node in nodes:
        if node.GetID() in seen:
            continue
        seen.add(node.GetID())
        stem, count = file_stem(node.GetName()), 1
        while stem in stems:
            count += 1
            stem = f"{file_stem(node.GetName())}_{count}"
        stems.add(stem)
        written += save_node(node, Path(folder), stem)
    return written
