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
from ._files import atomic_path, file_suffix, spreadsheet_safe
from .io import IMAGE_FORMATS, MESH_FORMATS, read_image, read_mesh
from .mesh import Mesh
from .mesh_repair import DEFAULT_MAX_HOLE_RADIUS
from .morphometry import structure_measurements
from .registration import MODELS, PRESETS
from .surface import METHODS

logger = logging.getLogger("geomed")

COLUMNS = ("source", "structure", "label", "voxels", "voxel_volume_ml", "surface_volume_ml", "surface_area_cm2",
           "closed")
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


_DEMO_HELP = """\
The main job: a longitudinal atrophy study on a synthetic cohort built from real anatomy.

geomed writes a cohort (hippocampi of six real brains and the MNI lateral ventricles, three real knees' femoral
cartilage, a real LV myocardium) whose structures shrink or grow by known amounts each year, with random
repositioning and segmentation jitter at every scan, then runs `geomed study` on it: every consecutive pair of
scans registered both ways, percent volume change direct and registration-based, change maps, annual rates per
group with 95% confidence intervals. OUTPUT/index.html shows the report; OUTPUT/validation.csv compares every
measured change with the exact truth."""

_DEMO_EPILOG = """\
examples:
  geomed demo -o demo_output                       # the whole demo (a few minutes on 2 cores)
  geomed demo -o quick --subjects 1 --structures hippocampus lateral_ventricles"""

_STUDY_HELP = """\
Measure a longitudinal cohort: for every subject and structure, each pair of consecutive scans is aligned by a
rigid Sinkhorn registration (both ways), the baseline surface is carried along its normals onto the follow-up,
and the percent volume change is computed directly and from that motion (SIENA-like), with a change map per
interval and annual rates per subject and group.

TABLE is a CSV or Parquet file with columns subject, timepoint (years, or dates), path (mesh, label map or
probability map, relative to the table's folder), and optionally label (structure; the label id or name for label
maps, empty for a probability map, the channel index of a multi-channel one) and group.
Outputs in OUTPUT: scans/changes/rates/groups as .parquet and .csv, failures.csv, warnings.csv,
subjects/<id>/maps/*.vtp, figures/*.png and index.html. A re-run skips subjects already measured with the same
files and parameters. A subject that cannot be measured (a bad row, file or surface) is listed in failures.csv
with the reason and the exit status is 1; the others are measured. One study at a time per OUTPUT."""

_STUDY_EPILOG = """\
examples:
  geomed study cohort.csv -o results
  geomed study cohort.parquet -o results --preset brain --workers 4
  geomed study cohort.csv -o results --scheduler tcp://10.0.0.5:8786     # an existing Dask cluster

Subjects run as Dask tasks, in-process by default. With --scheduler, the cluster's workers need geomed installed
and must see the input paths; results are written by this machine, only under OUTPUT."""

_DISTANCE_HELP = """\
Distances between two shapes (meshes, masks or label maps), in mm: mean and 95th-percentile surface distance
(symmetric), Hausdorff distance, and the debiased Sinkhorn divergence of their surface measures (balanced: unit
mass each; also reported as an optimal-transport distance sqrt(2 S) in mm), with both volumes."""

_DISTANCE_EPILOG = """\
examples:
  geomed distance femur_1.vtp femur_2.vtp
  geomed distance seg_a.nii.gz seg_b.nii.gz --label 17 --blur 0.5 --json"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``geomed`` command (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="geomed", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"geomed {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug, and tracebacks of errors)")
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
    _add_study_commands(commands)
    return parser


def _add_study_commands(commands) -> None:
    from .synthetic_cohort import STRUCTURES

    demo = commands.add_parser("demo", help="the main job: a longitudinal atrophy study on a synthetic cohort",
                               description=_DEMO_HELP, epilog=_DEMO_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("-o", "--output", type=Path, default=Path("demo_output"), metavar="FOLDER",
                      help="report folder (default: %(default)s); the cohort goes to FOLDER/cohort")
    demo.add_argument("--subjects", type=int, default=3, metavar="N",
                      help="subjects per group and anatomy (default: %(default)s)")
    demo.add_argument("--structures", nargs="+", choices=STRUCTURES, default=list(STRUCTURES), metavar="NAME",
                      help=f"structures to simulate (default: all: {', '.join(STRUCTURES)})")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the cohort (default: %(default)s)")
    _add_dask_options(demo)
    demo.set_defaults(run=_run_demo)
    study = commands.add_parser("study", help="measure a longitudinal cohort (volume change, maps, rates)",
                                description=_STUDY_HELP, epilog=_STUDY_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_argument("table", type=Path, metavar="TABLE", help="cohort table (.csv, .tsv or .parquet)")
    study.add_argument("-o", "--output", type=Path, required=True, metavar="FOLDER", help="results folder")
    study.add_argument("--preset", choices=sorted(PRESETS),
                       help="registration scales of the anatomy (default: scaled to each shape's size)")
    study.add_argument("--max-distance", type=float, default=3.0, metavar="MM",
                       help="largest surface motion searched between consecutive scans (default: %(default)s mm)")
    study.add_argument("--method", choices=METHODS, default="surface_nets",
                       help="surface extraction for label maps (default: %(default)s)")
    study.add_argument("--max-hole-radius", type=float, default=DEFAULT_MAX_HOLE_RADIUS, metavar="MM",
                       help="holes of a mesh up to this radius are closed, with a warning in warnings.csv; larger "
                            "ones fail the subject (default: %(default)s mm)")
    _add_dask_options(study)
    study.set_defaults(run=_run_study)
    distance = commands.add_parser("distance", help="surface and Sinkhorn distances between two shapes",
                                   description=_DISTANCE_HELP, epilog=_DISTANCE_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    distance.add_argument("first", type=Path, metavar="A", help="a mesh, mask or label map")
    distance.add_argument("second", type=Path, metavar="B", help="a mesh, mask or label map")
    distance.add_argument("--label", metavar="LABEL", help="label id or name to take from label maps")
    distance.add_argument("--blur", type=float, default=1.0, metavar="MM",
                          help="Sinkhorn blur: details finer than this are smoothed out (default: %(default)s mm)")
    distance.add_argument("--space", choices=("RAS", "LPS"), help="frame of mesh files without a SPACE record")
    distance.add_argument("--json", action="store_true", help="print JSON instead of a table")
    distance.set_defaults(run=_run_distance)


def _add_dask_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="a running dask.distributed scheduler, e.g. tcp://host:8786 (default: in-process, on "
                             "loopback only). dask.distributed's protocol is unauthenticated: whoever reaches the "
                             "scheduler can run code on its workers and read the data. Outside a trusted network "
                             "use tls://host:8786 with Dask's TLS settings (distributed.comm.tls.* in the Dask "
                             "configuration; see 'TLS/SSL' in the dask.distributed documentation)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="subjects measured at once in-process (default: 2, or 1 on one core)")


def _run_study(args: argparse.Namespace) -> int:
    from .study import StudyParameters, run_study

    parameters = StudyParameters(preset=args.preset, max_distance=args.max_distance, method=args.method,
                                 max_hole_radius=args.max_hole_radius)
    result = run_study(args.table, args.output, parameters=parameters, scheduler=args.scheduler,
                       workers=args.workers)
    _print_study(result)
    return 1 if len(result.failures) else 0


def _run_demo(args: argparse.Namespace) -> int:
    from .study import run_study
    from .synthetic_cohort import synthetic_cohort

    if args.subjects < 1:
        raise ValueError(f"--subjects must be at least 1, got {args.subjects}")
    args.output.mkdir(parents=True, exist_ok=True)
    print(f"writing the synthetic cohort to {args.output / 'cohort'}", file=sys.stderr)
    cohort = synthetic_cohort(args.output / "cohort", subjects_per_group=args.subjects,
                              structures=tuple(args.structures), seed=args.seed)
    result = run_study(cohort.table, args.output, scheduler=args.scheduler, workers=args.workers)
    validation = cohort.validate(result.changes)
    with atomic_path(args.output / "validation.csv") as temporary:
        validation.to_csv(temporary, index=False)
    _print_study(result)
    errors = validation.loc[~validation["rescan"], "error_pp"].abs()
    print(f"percent volume change error vs truth: median {errors.median():.3f} pp, 90th percentile "
          f"{errors.quantile(0.9):.3f} pp ({len(errors)} intervals; validation.csv)", file=sys.stderr)
    return 1 if len(result.failures) else 0


def _print_study(result) -> None:
    groups = result.groups
    columns = [c for c in ("structure", "group", "n", "mean_rate", "ci_low", "ci_high", "p_value", "cohens_d")
               if c in groups.columns]
    print(groups[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"report: {result.report}" if result.report else f"results in {result.output}", file=sys.stderr)
    if len(result.failures):
        print(f"{len(result.failures)} subject(s) failed; see {result.output / 'failures.csv'}", file=sys.stderr)


def _run_distance(args: argparse.Namespace) -> int:
    from .measure import Measure
    from .morphometry import volume
    from .ot import sinkhorn_divergence
    from .surface import distance_to_surface

    first = _read_surface(args.first, args.label, args.space)
    second = _read_surface(args.second, args.label, args.space)
    if args.blur <= 0:
        raise ValueError(f"--blur must be positive (mm), got {args.blur}")
    forward, backward = distance_to_surface(first.vertices, second), distance_to_surface(second.vertices, first)
    both = np.concatenate([forward, backward])
    divergence = float(sinkhorn_divergence(Measure.from_mesh(first), Measure.from_mesh(second), blur=args.blur).value)
    report = {
        "mean_surface_distance_mm": float(both.mean()), "surface_distance_p95_mm": float(np.percentile(both, 95)),
        "hausdorff_mm": float(both.max()), "sinkhorn_divergence_mm2": divergence,
        "ot_distance_mm": float(np.sqrt(max(2.0 * divergence, 0.0))), "blur_mm": args.blur,
        "volume_a_ml": volume(first) / 1000.0 if first.is_closed else None,
        "volume_b_ml": volume(second) / 1000.0 if second.is_closed else None,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key.ljust(width)}  {'-' if value is None else f'{value:.4f}'}")
    return 0


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

    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"--output {args.output} is a file; register writes warped.vtp, transform.h5 and "
                         "registration.json into a folder")
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
        measured = structure_measurements(shape, shape_labels, method=args.method)
        rows.extend({"source": source, **row} for row in measured)
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
        writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
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
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        if args.verbose >= 2:
            raise
        parser.exit(2, f"geomed: error: {_one_line(error)}\n")
    except Exception as error:  # a bug: still one line, the traceback on request
        if args.verbose >= 2:
            raise
        parser.exit(2, f"geomed: error: {type(error).__name__}: {_one_line(error)} (run with -vv for the "
                       "traceback)\n")


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (an OSError names its file)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
