r"""A synthetic longitudinal cohort on real anatomy, with exactly known volume change (:func:`synthetic_cohort`).

No public data set scans the same subject twice, so change is simulated on the real shapes shipped with geomed:
left hippocampi of the six Allen brain donors, the lateral ventricles of the MNI template, the femoral cartilage
of the three knees and the left-ventricular myocardium. Each subject gets

- an **anatomy**: one of those shapes, given an identity of its own by a random anisotropic scaling (±5%) about
  its centroid when a source shape is reused;
- a **change**: the smooth, invertible contraction (expansion for a negative amplitude) towards a focus c inside
  the shape, :math:`\varphi_a(x) = c + (x - c)\,(1 - a\, e^{-|x-c|^2/\sigma^2})`, with σ a third of the shape's
  diameter and the amplitude :math:`a_t` at year t solved so that the volume is :math:`V_0 (1 + r/100)^t` for the
  subject's annual rate r (its group's mean plus a subject effect);
- at every scan, **rescan noise**: a random rigid repositioning (rotation ≈ 2°, translation ≈ 2 mm) and a smooth
  random boundary jitter along the normals (≈ 0.1 mm RMS over ≈ 6 mm patches, as segmentations differ from scan
  to scan), after which the shape is rescaled about its centroid (by ~10⁻⁴) so that the jitter changes its shape
  but not its volume.

The ground truth is the volume enclosed by each written mesh (divergence theorem on φ applied to every vertex):
the same triangles move with the continuous map, so it is the warped shape's volume to within ~10⁻³ percentage
points (checked against the same map applied to a 4× and 16× subdivided baseline in the tests). Change is never
simulated by eroding a label map (one voxel removes ~45% of a hippocampus).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import datasets
from ._files import atomic_path
from .image import Image
from .io import write_mesh
from .mesh import Mesh
from .morphometry import enclosed_volume, volume
from .surface import mask_to_mesh, smooth_mesh

logger = logging.getLogger(__name__)

STRUCTURES = ("hippocampus", "lateral_ventricles", "femoral_cartilage", "lv_myocardium")
GROUPS = ("control", "patient")
ANNUAL_CHANGE = {
    # % volume per year (control, patient): ageing vs Alzheimer's disease (hippocampus, ventricles), vs
    # osteoarthritis (femoral cartilage), vs hypertrophic remodelling (LV myocardium).
    "hippocampus": (-1.0, -3.5),
    "lateral_ventricles": (1.5, 4.0),
    "femoral_cartilage": (-0.5, -2.0),
    "lv_myocardium": (0.0, 2.5),
}
ANATOMY = {"hippocampus": "brain", "lateral_ventricles": "brain", "femoral_cartilage": "knee", "lv_myocardium": "heart"}
_SUBJECT_RATE_SD = 0.25  # subject effect, as a fraction of max(|group rate|, 1 %/yr)
_ROTATION_SD_DEG = 2.0
_TRANSLATION_SD_MM = 2.0
_JITTER_PATCH_MM = 6.0
_CARTILAGE_SPACING_MM = 0.7
_SMOOTHING = 150


@dataclass(frozen=True)
class SyntheticCohort:
    """Where :func:`synthetic_cohort` wrote the cohort.

    Attributes
    ----------
    folder : Path
        Root of the cohort (one sub-folder of ``.vtp`` meshes per subject).
    table : Path
        ``cohort.csv``: the study table (``subject, timepoint, path, label, group``; ``timepoint`` in years,
        ``path`` relative to the table's folder, ``label`` the structure).
    truth : Path
        ``truth.csv``: per scan ``subject, structure, group, timepoint, path, volume_mm3`` (exact),
        ``annual_rate_percent`` (the subject's simulated rate) and ``rescan`` (1 for a same-day repeat scan).
    """

    folder: Path
    table: Path
    truth: Path

    def validate(self, changes):
        """Compare a study's measured changes (``run_study(cohort.table, ...).changes``) with the exact truth.

        Returns
        -------
        pandas.DataFrame
            One row per measured interval: ``subject, structure, group, from_timepoint, to_timepoint, rescan``,
            ``true_percent`` (100·(V₁/V₀ − 1) of the written meshes), the measured ``direct_percent``,
            ``registration_percent``, ``forward_percent``, ``backward_percent``, ``consistency_pp``, and
            ``error_pp`` (registration − true) and ``direct_error_pp``.
        """
        import pandas as pd

        truth = pd.read_csv(self.truth)
        volumes = dict(zip(truth["path"], truth["volume_mm3"]))
        missing = sorted((set(changes["from_path"]) | set(changes["to_path"])) - set(volumes))
        if missing:
            raise ValueError(f"changes name scans that are not in {self.truth}: {missing[:3]}")
        table = changes[["subject", "structure", "group", "from_timepoint", "to_timepoint", "rescan",
                         "direct_percent", "registration_percent", "forward_percent", "backward_percent",
                         "consistency_pp"]].copy()
        table.insert(6, "true_percent", [100.0 * (volumes[b] / volumes[a] - 1.0)
                                         for a, b in zip(changes["from_path"], changes["to_path"])])
        table["error_pp"] = table["registration_percent"] - table["true_percent"]
        table["direct_error_pp"] = table["direct_percent"] - table["true_percent"]
        return table.reset_index(drop=True)


def synthetic_cohort(
    folder: str | Path,
    *,
    subjects_per_group: int = 4,
    structures: tuple[str, ...] = STRUCTURES,
    years: tuple[float, ...] = (0.0, 1.0, 2.0),
    rescan: bool = True,
    noise: float = 0.1,
    seed: int = 0,
) -> SyntheticCohort:
    """Write a synthetic longitudinal cohort on real anatomy with exactly known volume change.

    Parameters
    ----------
    folder : str or Path
        Output folder (created; files already there with the same names are replaced atomically).
    subjects_per_group : int
        Subjects per group ("control", "patient") *per anatomy*: brain subjects carry a hippocampus and lateral
        ventricles, knee subjects femoral cartilage, heart subjects an LV myocardium.
    structures : tuple of str
        Any of ``STRUCTURES``: "hippocampus", "lateral_ventricles", "femoral_cartilage", "lv_myocardium".
    years : tuple of float
        Scan times in years from baseline (increasing, starting at 0).
    rescan : bool
        Add a same-day repeat of the baseline scan (true change 0: the rescan distribution).
    noise : float
        RMS of the boundary jitter of every scan along the normals (mm); 0 for none.
    seed : int
        Random seed: the same arguments write the same cohort.

    Returns
    -------
    SyntheticCohort

    Notes
    -----
    Annual rates per group are in ``ANNUAL_CHANGE`` (% volume per year); each subject's rate adds a normal subject
    effect of SD 25% of the group's rate (at least 0.25 %/yr).
    """
    unknown = sorted(set(structures) - set(STRUCTURES))
    if unknown or not structures:
        raise ValueError(f"structures must be a non-empty selection of {STRUCTURES}, got {structures!r}")
    if not isinstance(subjects_per_group, (int, np.integer)) or subjects_per_group < 1:
        raise ValueError(f"subjects_per_group must be a positive integer, got {subjects_per_group!r}")
    years = tuple(float(year) for year in years)
    if len(years) < 2 or years[0] != 0.0 or any(b <= a for a, b in zip(years, years[1:])):
        raise ValueError(f"years must increase from 0 with at least two scans, got {years!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (mm), got {noise}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources: dict[str, list[Mesh]] = {}
    scans: list[dict[str, object]] = []
    for anatomy in ("brain", "knee", "heart"):
        chosen = [name for name in structures if ANATOMY[name] == anatomy]
        if not chosen:
            continue
        for group_index, group in enumerate(GROUPS):
            for number in range(subjects_per_group):
                subject = f"{anatomy}-{group}-{number + 1:02d}"
                for structure in chosen:
                    shapes = sources.setdefault(structure, _source_shapes(structure))
                    index = (number * len(GROUPS) + group_index) % len(shapes)
                    reused = number * len(GROUPS) + group_index >= len(shapes) or len(shapes) == 1
                    anatomy_mesh = _identity(shapes[index], rng) if reused else shapes[index]
                    rate = _subject_rate(ANNUAL_CHANGE[structure][group_index], rng)
                    scans += _write_subject_structure(root, subject, group, structure, anatomy_mesh, rate, years,
                                                      rescan, noise, rng)
    table = root / "cohort.csv"
    _write_csv(table, ["subject", "timepoint", "path", "label", "group"],
               [{key: scan[key] for key in ("subject", "timepoint", "path", "label", "group")} for scan in scans])
    truth = root / "truth.csv"
    _write_csv(truth, ["subject", "structure", "group", "timepoint", "path", "volume_mm3", "annual_rate_percent",
                       "rescan"],
               [{**{key: scan[key] for key in ("subject", "group", "timepoint", "path", "volume_mm3",
                                               "annual_rate_percent", "rescan")}, "structure": scan["label"]}
                for scan in scans])
    logger.info("synthetic cohort: %d scans of %d structures in %s", len(scans), len(structures), root)
    return SyntheticCohort(root, table, truth)


def _source_shapes(structure: str) -> list[Mesh]:
    """The real shapes a structure's subjects start from, smoothed as a segmentation pipeline's meshes are
    (``_SMOOTHING`` windowed-sinc iterations; the raw LV mesh is folded at the scale of its 2 mm edges)."""
    if structure == "hippocampus":
        return [mask_to_mesh(datasets.brain_labels(donor), "left_hippocampus", smoothing_iterations=_SMOOTHING)
                for donor in datasets.BRAIN_DONORS]
    if structure == "lateral_ventricles":
        return [mask_to_mesh(datasets.mni_lateral_ventricles(), smoothing_iterations=_SMOOTHING)]
    if structure == "femoral_cartilage":
        return [mask_to_mesh(_resampled_mask(datasets.knee_labels(knee), 1), smoothing_iterations=_SMOOTHING)
                for knee in datasets.KNEES]
    return [smooth_mesh(datasets.heart_myocardium("lv"), _SMOOTHING)]


def _resampled_mask(labels: Image, label: int) -> Image:
    """One label as a mask on a grid of about ``_CARTILAGE_SPACING_MM`` (every n-th voxel: ~35k vertices, not
    ~100k, for the knees' 0.35 mm voxels)."""
    step = np.maximum(1, np.round(_CARTILAGE_SPACING_MM / labels.spacing)).astype(int)
    array = labels.array[:: step[0], :: step[1], :: step[2]] == label
    affine = labels.affine.copy()
    affine[:3, :3] = affine[:3, :3] * step
    return Image(array.astype(np.uint8), affine)


def _identity(mesh: Mesh, rng: np.random.Generator) -> Mesh:
    """A new subject's version of a shape: anisotropic scaling by N(1, 0.05) along random axes about its
    centroid."""
    axes, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    stretch = axes @ np.diag(np.clip(rng.normal(1.0, 0.05, 3), 0.85, 1.15)) @ axes.T
    centre = mesh.vertices.mean(axis=0)
    return Mesh((mesh.vertices - centre) @ stretch.T + centre, mesh.triangles)


def _subject_rate(group_rate: float, rng: np.random.Generator) -> float:
    return float(group_rate + rng.normal(0.0, _SUBJECT_RATE_SD * max(abs(group_rate), 1.0)))


def _write_subject_structure(root: Path, subject: str, group: str, structure: str, anatomy: Mesh, rate: float,
                             years: tuple[float, ...], rescan: bool, noise: float,
                             rng: np.random.Generator) -> list[dict[str, object]]:
    """Simulate and write one subject's scans of one structure; their rows for the tables."""
    vertices = anatomy.vertices
    focus = _focus(anatomy, rng)
    width = np.linalg.norm(vertices.max(axis=0) - vertices.min(axis=0)) / 3.0
    baseline_volume = volume(anatomy)
    folder = root / subject
    folder.mkdir(exist_ok=True)
    scans = [(year, False) for year in years]
    if rescan:
        scans.insert(1, (0.0, True))
    rows = []
    for year, repeat in scans:
        target = baseline_volume * (1.0 + rate / 100.0) ** year
        amplitude = _amplitude_for(anatomy, focus, width, target)
        shape = Mesh(_contraction(vertices, focus, width, amplitude), anatomy.triangles)
        observed = _rescanned(shape, noise, rng)
        name = f"{structure}_y{year:g}{'_rescan' if repeat else ''}.vtp"
        with atomic_path(folder / name) as partial:
            write_mesh(observed, partial)
        rows.append({"subject": subject, "timepoint": year, "path": f"{subject}/{name}", "label": structure,
                     "group": group, "volume_mm3": volume(observed), "annual_rate_percent": rate,
                     "rescan": int(repeat)})
    return rows


def _focus(mesh: Mesh, rng: np.random.Generator) -> np.ndarray:
    """A random point inside the shape: a random vertex pulled 30% of the way towards the centroid."""
    vertex = mesh.vertices[rng.integers(mesh.n_vertices)]
    return vertex + 0.3 * (mesh.vertices.mean(axis=0) - vertex)


def _contraction(points: np.ndarray, focus: np.ndarray, width: float, amplitude: float) -> np.ndarray:
    """φ_a(x) = c + (x − c)(1 − a·exp(−|x − c|²/σ²)) (invertible while |a| < e^{3/2}/2 ≈ 2.2)."""
    offset = points - focus
    return focus + offset * (1.0 - amplitude * np.exp(-(offset**2).sum(axis=1, keepdims=True) / width**2))


def _amplitude_for(mesh: Mesh, focus: np.ndarray, width: float, target: float) -> float:
    """The amplitude a whose contraction encloses ``target`` mm³ (secant iterations on the smooth, nearly linear
    volume of a, to 10⁻¹¹ relative)."""
    def excess(amplitude: float) -> float:
        return enclosed_volume(_contraction(mesh.vertices, focus, width, amplitude), mesh.triangles) - target

    previous, current = 0.0, 0.01
    low, high = excess(previous), excess(current)
    for _ in range(50):
        if abs(high) <= 1e-11 * target or high == low:
            break
        previous, current, low = current, current - high * (current - previous) / (high - low), high
        high = excess(current)
    else:
        raise RuntimeError(f"no contraction reaches {target:g} mm³ (the secant iterations did not converge)")
    return current


def _rescanned(mesh: Mesh, noise: float, rng: np.random.Generator) -> Mesh:
    """The shape as one scan sees it: volume-neutral boundary jitter, then a random rigid repositioning."""
    vertices = mesh.vertices
    centre = vertices.mean(axis=0)
    if noise > 0:
        patches = vertices[rng.integers(mesh.n_vertices, size=64)]
        weights = np.exp(-((vertices[:, None, :] - patches[None]) ** 2).sum(-1) / _JITTER_PATCH_MM**2)
        jitter = weights @ rng.normal(size=len(patches))
        areas = mesh.vertex_areas()
        jitter -= areas @ jitter / areas.sum()
        jitter *= noise / max(float(np.sqrt(areas @ jitter**2 / areas.sum())), 1e-12)
        jittered = Mesh(vertices + jitter[:, None] * mesh.vertex_normals(), mesh.triangles)
        scale = (volume(mesh) / volume(jittered)) ** (1.0 / 3.0)
        vertices = centre + (jittered.vertices - centre) * scale
    rotation = _rotation(rng.normal(size=3) * np.radians(_ROTATION_SD_DEG))
    moved = (vertices - centre) @ rotation.T + centre + rng.normal(size=3) * _TRANSLATION_SD_MM
    return Mesh(moved, mesh.triangles)


def _rotation(vector: np.ndarray) -> np.ndarray:
    """The rotation matrix of a rotation vector (axis × angle in radians), Rodrigues' formula."""
    angle = float(np.linalg.norm(vector))
    if angle == 0.0:
        return np.eye(3)
    k = vector / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, object]]) -> None:
    with atomic_path(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({key: _cell(row[key]) for key in columns} for row in rows)


def _cell(value: object) -> object:
    return repr(value) if isinstance(value, float) else value
