"""The ``geomed`` command line."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__, datasets
from .image import Image
from ._files import atomic_path, file_suffix
from .io import IMAGE_FORMATS, MESH_FORMATS, read_image, read_mesh
from .mesh import Mesh
from .morphometry import structure_measurements
from .registration import MODELS, PRESETS
from .surface import METHODS

logger = logging.getLogger("geomed")

COLUMNS = ("source", "structure", "label", "voxels", "voxel_volume_ml", "surface_volume_ml", "surface_area_cm2", "closed")
DEMO_GROUPS = ("brain", "knee", "femur", "heart")

_DESCRIPTION = """\
geomed: geometric shape analysis for medical imaging, in world millimetres (RAS).
Shapes are read from meshes (.vtk .vtp .stl .ply .obj .gii) and images (NIfTI, NRRD, MHA, DICOM folders)."""

_MEASURE_HELP = """\
Measure the volume and surface area of every structure in label maps and meshes.

For a label map, each label gets its voxel volume (voxel count x voxel volume, from the image's own spacing)
and the volume and area of its boundary surface (surface nets smoothed by a windowed-sinc filter, in world mm).
For a mesh, the enclosed volume (divergence theorem) and area. With no INPUT, geomed measures its bundled demo
anatomy: subcortical structures of 6 brains, 3 knee segmentations, 5 femur surfaces and 3 heart myocardia."""

_MEASURE_EPILOG = """\
examples:
  geomed measure                                   # the bundled demo anatomy
  geomed measure --demo brain -o brain.csv         # bundled brains only, saved as CSV
  geomed measure aseg.nii.gz --labels 17 53        # two labels of your own label map
  geomed measure femur.stl --space LPS             # a mesh exported in LPS without a SPACE record

units: volumes in mL (= 1000 mm^3), areas in cm^2 (= 100 mm^2)."""


_REGISTER_HELP = """\
Register MOVING onto FIXED (meshes, masks or label maps; a mask becomes its boundary surface) and write the
warped moving mesh with point arrays "displacement", "normal displacement" (mm) and "jacobian", the transform
for ITK / 3D Slicer (transform.h5: fixed -> moving in LPS, as ITK resamples) and a JSON of the parameters and
quality metrics (surface distances before and after, minimum Jacobian, timings)."""

_REGISTER_EPILOG = """\
examples:
  geomed register femur_1.vtp femur_2.vtp -o out --preset knee --model diffeomorphic
  geomed register aseg_a.nii.gz aseg_b.nii.gz --label 17 -o hippocampus --preset brain --model affine

models: rigid, similarity, affine (Sinkhorn correspondences), deformable, diffeomorphic (LDDMM, folds nothing)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``geomed`` command (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="geomed", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"geomed {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    measure = commands.add_parser(
        "measure",
        help="volumes and areas of structures in label maps and meshes",
        description=_MEASURE_HELP,
        epilog=_MEASURE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    measure.add_argument(
        "inputs", nargs="*", metavar="INPUT", type=Path,
        help="label map or mesh files (or DICOM folders); default: the bundled demo anatomy",
    )
    measure.add_argument(
        "--demo", action="append", choices=DEMO_GROUPS, metavar="GROUP",
        help=f"measure only these bundled groups ({', '.join(DEMO_GROUPS)}); repeatable",
    )
    measure.add_argument(
        "--labels", nargs="+", metavar="LABEL",
        help="label ids or names to measure in label maps (default: every non-zero label)",
    )
    measure.add_argument(
        "--space", choices=("RAS", "LPS"),
        help="frame of the mesh files' coordinates, overriding a SPACE record (default: the record, else RAS)",
    )
    measure.add_argument(
        "--method", choices=METHODS, default="surface_nets",
        help="surface extraction for label maps (default: %(default)s)",
    )
    measure.add_argument(
        "-o", "--output", type=Path, metavar="FILE",
        help="also write the table to FILE (.csv or .json), atomically",
    )
    measure.set_defaults(run=_run_measure)
    register = commands.add_parser(
        "register",
        help="register a moving shape onto a fixed one (rigid ... diffeomorphic)",
        description=_REGISTER_HELP,
        epilog=_REGISTER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register.add_argument("fixed", type=Path, metavar="FIXED", help="the shape to register onto (mesh or mask)")
    register.add_argument("moving", type=Path, metavar="MOVING", help="the shape that moves (mesh or mask)")
    register.add_argument("-o", "--output", type=Path, required=True, metavar="FOLDER",
                          help="folder for warped.vtp, transform.h5 and registration.json (created if missing)")
    register.add_argument("--model", choices=MODELS, default="rigid", help="transform model (default: %(default)s)")
    register.add_argument("--preset", choices=sorted(PRESETS),
                          help="anatomy scales (default: scaled to the fixed shape's size)")
    register.add_argument("--label", metavar="LABEL",
                          help="label id or name to take from label-map inputs (default: every non-zero voxel)")
    register.add_argument("--space", choices=("RAS", "LPS"),
                          help="frame of the mesh files' coordinates, overriding a SPACE record")
    register.set_defaults(run=_run_register)
    return parser


def _read_surface(path: Path, label: str | None, space: str | None) -> Mesh:
    """A mesh file, or the boundary surface of a mask / one label of a label map."""
    if file_suffix(path) in MESH_FORMATS:
        return read_mesh(path, space=space)
    if path.is_dir() or file_suffix(path) in IMAGE_FORMATS:
        from .surface import mask_to_mesh

        return mask_to_mesh(read_image(path), None if label is None else _parse_label(label))
    raise ValueError(f"{path}: unknown format {file_suffix(path)!r}; meshes: {' '.join(MESH_FORMATS)}; "
                     f"images: {' '.join(IMAGE_FORMATS)} or a DICOM folder")


def _run_register(args: argparse.Namespace) -> int:
    from .io import write_mesh
    from .registration import register
    from .surface import distance_to_surface

    fixed = _read_surface(args.fixed, args.label, args.space)
    moving = _read_surface(args.moving, args.label, args.space)
    with tqdm(desc=f"{args.model} registration", unit="step", disable=None) as bar:
        def progress(stage: str, iteration: int, value: float) -> None:
            bar.set_postfix_str(f"{stage}: {value:.4g}")
            bar.update()

        result = register(moving, fixed, model=args.model, preset=args.preset, progress=progress)
    before = distance_to_surface(moving.vertices, fixed)
    after = distance_to_surface(result.warped.vertices, fixed)
    args.output.mkdir(parents=True, exist_ok=True)
    write_mesh(result.warped, args.output / "warped.vtp")
    with atomic_path(args.output / "transform.h5") as temporary:
        result.write_transform(temporary)
    report = {
        "fixed": str(args.fixed), "moving": str(args.moving), "model": args.model, "preset": args.preset,
        "label": args.label, "backend": result.backend, "seconds": result.timings,
        "mean_surface_distance_mm": {"before": float(before.mean()), "after": float(after.mean())},
        "hausdorff95_mm": {"before": float(np.percentile(before, 95)), "after": float(np.percentile(after, 95))},
        "min_jacobian": result.min_jacobian,
        "mean_abs_normal_displacement_mm": float(np.abs(result.normal_displacement).mean()),
        "invertible": result.transform.is_invertible,
    }
    with atomic_path(args.output / "registration.json") as temporary:
        temporary.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report["mean_surface_distance_mm"]), file=sys.stderr)
    print(f"wrote warped.vtp, transform.h5 and registration.json to {args.output}", file=sys.stderr)
    return 0


def _parse_label(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _demo_shapes(groups: Sequence[str]) -> Iterator[tuple[str, Callable[[], Image | Mesh]]]:
    loaders = {
        "brain": (datasets.BRAIN_DONORS, datasets.brain_labels, "brain/{}"),
        "knee": (datasets.KNEES, datasets.knee_labels, "knee/{}"),
        "femur": (datasets.FEMURS, datasets.femur, "femur/{}"),
        "heart": (datasets.HEART_PARTS, datasets.heart_myocardium, "heart/{}_myocardium"),
    }
    for group in DEMO_GROUPS:
        if group in groups:
            names, loader, source = loaders[group]
            for name in names:
                yield source.format(name), lambda loader=loader, name=name: loader(name)


def _file_shapes(paths: Sequence[Path], space: str | None) -> Iterator[tuple[str, Callable[[], Image | Mesh]]]:
    for path in paths:
        if file_suffix(path) in MESH_FORMATS:
            yield str(path), lambda path=path: read_mesh(path, space=space)
        elif path.is_dir() or file_suffix(path) in IMAGE_FORMATS:
            yield str(path), lambda path=path: read_image(path)
        else:
            raise ValueError(
                f"{path}: unknown format {file_suffix(path)!r}; meshes: {' '.join(MESH_FORMATS)}; "
                f"images: {' '.join(IMAGE_FORMATS)} or a DICOM folder"
            )


def _run_measure(args: argparse.Namespace) -> int:
    if args.inputs and args.demo:
        raise ValueError("give INPUT files or --demo groups, not both")
    sources = list(_file_shapes(args.inputs, args.space) if args.inputs else _demo_shapes(args.demo or DEMO_GROUPS))
    labels = [_parse_label(text) for text in args.labels] if args.labels else None
    rows = []
    for source, load in tqdm(sources, desc="measuring", unit="shape", disable=None):
        shape = load()
        logger.info("measuring %s: %r", source, shape)
        shape_labels = labels if isinstance(shape, Image) else None
        rows.extend({"source": source, **row} for row in structure_measurements(shape, shape_labels, method=args.method))
    sys.stdout.write(format_table(rows))
    if args.output:
        _write_table(rows, args.output)
        print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)
    return 0


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """Render measurement rows as an aligned plain-text table."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    table = [list(COLUMNS)] + [[cell(row.get(column)) for column in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(text.ljust(w) if i < 2 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _write_table(rows: Sequence[dict[str, object]], path: Path) -> None:
    suffix = file_suffix(path)
    if suffix not in (".csv", ".json"):
        raise ValueError(f"{path}: --output must end in .csv or .json")
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        text = json.dumps(list(rows), indent=1)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geomed`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.exit(2, f"geomed: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
