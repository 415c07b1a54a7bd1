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

With ``scans="label_map"`` or ``"probability"`` the same shapes are written as images, as users' segmentations
are: sampled with their exact partial volume on a voxel grid repositioned at every scan, optionally after a smooth
segmentation error, then thresholded at 0.5 or turned into a calibrated-looking probability
(:func:`calibrated_probability`).
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
from .io import write_image, write_mesh
from .mesh import Mesh
from .morphometry import enclosed_volume, volume
from .surface import mask_to_mesh, smooth_mesh
from .voxelize import mesh_to_partial_volume

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
SCANS = ("mesh", "label_map", "probability")
LABEL_IDS = {"hippocampus": 17, "lateral_ventricles": 4, "femoral_cartilage": 2, "lv_myocardium": 205}
# Image scans: voxel size (mm) and base axes (columns, RAS) per anatomy. Brains: 1 mm axial grids; knees: the
# sagittal 0.365 × 0.365 × 0.7 mm grids of the shipped knee MRIs, tilted 8° (oblique); hearts: 1.25 mm isotropic,
# as cardiac CT and 3-D whole-heart MR (short-axis cine stacks with 8 mm slices would not resolve a 2.5% change).
_TILT = np.radians(8.0)
IMAGE_GRIDS = {
    "brain": ((1.0, 1.0, 1.0), np.eye(3)),
    "knee": ((0.365, 0.365, 0.7), np.array([[-np.sin(_TILT), 0.0, np.cos(_TILT)], [-np.cos(_TILT), 0.0, -np.sin(_TILT)],
                                            [0.0, -1.0, 0.0]])),
    "heart": ((1.25, 1.25, 1.25), np.eye(3)),
}
_GRID_ROTATION_SD_DEG = 3.0
_GRID_MARGIN_VOXELS = 4
_PROBABILITY_STEEPNESS = 8.0
_SUB_COLUMN_MM = 0.125  # partial volume: sub-columns at most this far apart across the sampling lines


@dataclass(frozen=True)
class SyntheticCohort:
    """Where :func:`synthetic_cohort` wrote the cohort.

    Attributes
    ----------
    folder : Path
        Root of the cohort (one sub-folder per subject of ``.vtp`` meshes or ``.nii.gz`` images, one per scan and
        structure).
    table : Path
        ``cohort.csv``: the study table (``subject, timepoint, path, label, group``; ``timepoint`` in years,
        ``path`` relative to the table's folder, ``label`` the structure — for label maps its id in
        ``LABEL_IDS``).
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
            One row per measured interval: ``subject, structure, group, from_timepoint, to_timepoint, rescan``
            (``structure`` the simulated one, also where the table's ``label`` is a label id),
            ``true_percent`` (100·(V₁/V₀ − 1) of the continuous shapes), the measured ``direct_percent``,
            ``registration_percent``, ``forward_percent``, ``backward_percent``, ``consistency_pp``, and
            ``error_pp`` (registration − true) and ``direct_error_pp``. For image scans also, each minus the truth
            (pp): ``voxel_count_error_pp`` (the difference of the voxel counts of the label maps),
            ``probability_sum_error_pp`` (of the probability maps' sums) and ``floor_error_pp`` (of the exact
            volumes of the sampled, segmentation-noisy shapes: the noise floor).
        """
        import pandas as pd

        truth = pd.read_csv(self.truth).set_index("path")
        missing = sorted((set(changes["from_path"]) | set(changes["to_path"])) - set(truth.index))
        if missing:
            raise ValueError(f"changes name scans that are not in {self.truth}: {missing[:3]}")
        table = changes[["subject", "structure", "group", "from_timepoint", "to_timepoint", "rescan",
                         "direct_percent", "registration_percent", "forward_percent", "backward_percent",
                         "consistency_pp"]].copy()
        table["structure"] = truth.loc[changes["from_path"], "structure"].to_numpy()

        def percent(column: str) -> np.ndarray:
            before = truth.loc[changes["from_path"], column].to_numpy(dtype=float)
            return 100.0 * (truth.loc[changes["to_path"], column].to_numpy(dtype=float) / before - 1.0)

        table.insert(6, "true_percent", percent("volume_mm3"))
        table["error_pp"] = table["registration_percent"] - table["true_percent"]
        table["direct_error_pp"] = table["direct_percent"] - table["true_percent"]
        for column, name in (("voxel_count_mm3", "voxel_count_error_pp"),
                             ("probability_sum_mm3", "probability_sum_error_pp"),
                             ("segmented_volume_mm3", "floor_error_pp")):
            if column in truth.columns:
                table[name] = percent(column) - table["true_percent"]
        return table.reset_index(drop=True)


def synthetic_cohort(
    folder: str | Path,
    *,
    subjects_per_group: int = 4,
    structures: tuple[str, ...] = STRUCTURES,
    years: tuple[float, ...] = (0.0, 1.0, 2.0),
    rescan: bool = True,
    noise: float = 0.1,
    scans: str = "mesh",
    segmentation_noise: float = 0.0,
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
    scans : {"mesh", "label_map", "probability"}
        How each scan is written: the warped surface as a ``.vtp`` mesh; or the same continuous shape sampled with
        its partial volume on a voxel grid repositioned at every scan (``IMAGE_GRIDS``: 1 mm brains, 0.365 × 0.365 ×
        0.7 mm oblique knees, 1.25 mm hearts; rotated by ≈ 3° and shifted by a random fraction of a voxel) and
        written as NIfTI: a **label map** (``LABEL_IDS[structure]`` where the partial volume is ≥ 0.5, uint8; the
        table's ``label`` is that id) or a **probability map** (float32 in [0, 1]; the table's ``label`` names the
        structure). The probability is a calibrated-looking, monotone function of the partial volume f, not f
        itself: the logistic curve (σ(8(f − ½)) − σ(−4)) / (σ(4) − σ(−4)), 0 at f = 0, ½ at ½, 1 at 1, twice as
        steep as f in the middle and flat near 0 and 1 (a segmenter sure of most voxels that the boundary cuts).
    segmentation_noise : float
        Image scans only: RMS (mm) of a smooth random displacement of the boundary along its normals (≈ 6 mm
        patches) before sampling, as a segmenter's errors; unlike ``noise`` it changes the volume. 0 for none.
    seed : int
        Random seed: the same arguments write the same cohort.

    Returns
    -------
    SyntheticCohort

    Notes
    -----
    Annual rates per group are in ``ANNUAL_CHANGE`` (% volume per year); each subject's rate adds a normal subject
    effect of SD 25% of the group's rate (at least 0.25 %/yr). The truth of every kind of scan is the volume of the
    continuous shape: for meshes the enclosed volume of the warped, jittered mesh; for image scans the volume inside
    it (the sum of its exact partial volumes on the scan's grid, to ~10⁻⁵: where the jitter folds the tapered rim of
    a cartilage sheet over itself, the divergence theorem would count the fold twice, up to 10⁻³ of the volume).
    Image scans of the same arguments and seed sample the same shapes on the same grids whichever their kind, so a
    label-map and a probability cohort are two views of the same scans; their ``truth.csv`` adds
    ``segmented_volume_mm3`` (the exact volume of what was sampled, after the segmentation noise: the noise floor),
    ``voxel_count_mm3`` (voxels with partial volume ≥ 0.5: the label map's volume) and ``probability_sum_mm3`` (the
    probability map's sum times the voxel volume). A knee scan takes about a second to sample, a brain's less.
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
    if scans not in SCANS:
        raise ValueError(f"scans must be one of {SCANS}, got {scans!r}")
    if not segmentation_noise >= 0:
        raise ValueError(f"segmentation_noise must be >= 0 (mm), got {segmentation_noise}")
    if segmentation_noise > 0 and scans == "mesh":
        raise ValueError("segmentation_noise applies to image scans (scans='label_map' or 'probability')")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources: dict[str, list[Mesh]] = {}
    rows: list[dict[str, object]] = []
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
                    rows += _write_subject_structure(root, subject, group, structure, anatomy_mesh, rate, years,
                                                     rescan, noise, rng, _Scanner(scans, ANATOMY[structure],
                                                                                  segmentation_noise))
    table = root / "cohort.csv"
    _write_csv(table, ["subject", "timepoint", "path", "label", "group"],
               [{key: row[key] for key in ("subject", "timepoint", "path", "label", "group")} for row in rows])
    truth = root / "truth.csv"
    measured = [] if scans == "mesh" else ["segmented_volume_mm3", "voxel_count_mm3", "probability_sum_mm3"]
    _write_csv(truth, ["subject", "structure", "group", "timepoint", "path", "volume_mm3", *measured,
                       "annual_rate_percent", "rescan"],
               [{key: row[key] for key in ("subject", "structure", "group", "timepoint", "path", "volume_mm3",
                                           *measured, "annual_rate_percent", "rescan")} for row in rows])
    logger.info("synthetic cohort: %d %s scans of %d structures in %s", len(rows), scans, len(structures), root)
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
                             years: tuple[float, ...], rescan: bool, noise: float, rng: np.random.Generator,
                             scanner: _Scanner) -> list[dict[str, object]]:
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
        stem = f"{structure}_y{year:g}{'_rescan' if repeat else ''}"
        name, label, measured = scanner.write(observed, folder, stem, structure, rng)
        rows.append({"subject": subject, "timepoint": year, "path": f"{subject}/{name}", "label": label,
                     "structure": structure, "group": group, "volume_mm3": volume(observed), **measured,
                     "annual_rate_percent": rate, "rescan": int(repeat)})
    return rows


@dataclass(frozen=True)
class _Scanner:
    """How one anatomy's scans are written: ``kind`` in ``SCANS``, its grid, and the segmentation noise (mm)."""

    kind: str
    anatomy: str
    segmentation_noise: float

    def write(self, shape: Mesh, folder: Path, stem: str, structure: str,
              rng: np.random.Generator) -> tuple[str, str, dict[str, float]]:
        """Write one scan of ``shape``: its file name, its table ``label`` and its measured volumes (mm³)."""
        if self.kind == "mesh":
            with atomic_path(folder / f"{stem}.vtp") as partial:
                write_mesh(shape, partial)
            return f"{stem}.vtp", structure, {}
        affine, size = _scan_grid(shape, self.anatomy, rng)
        supersampling = max(4, int(np.ceil(max(IMAGE_GRIDS[self.anatomy][0][:2]) / _SUB_COLUMN_MM)))
        fractions = mesh_to_partial_volume(shape, affine, size, supersampling=supersampling).array
        grid = Image(np.zeros((1, 1, 1), np.uint8), affine)
        solid = float(fractions.sum()) * grid.voxel_volume
        if self.segmentation_noise > 0:
            segmented = _segmentation_error(shape, self.segmentation_noise, rng)
            fractions = mesh_to_partial_volume(segmented, affine, size, supersampling=supersampling).array
        probability = calibrated_probability(fractions).astype(np.float32)
        measured = {"volume_mm3": solid, "segmented_volume_mm3": float(fractions.sum()) * grid.voxel_volume,
                    "voxel_count_mm3": float(np.count_nonzero(fractions >= 0.5)) * grid.voxel_volume,
                    "probability_sum_mm3": float(probability.sum(dtype=np.float64)) * grid.voxel_volume}
        if self.kind == "label_map":
            label = str(LABEL_IDS[structure])
            write_image(Image(np.where(fractions >= 0.5, LABEL_IDS[structure], 0).astype(np.uint8), affine),
                        folder / f"{stem}.nii.gz")
        else:
            label = structure
            write_image(Image(probability, affine), folder / f"{stem}.nii.gz")
        return f"{stem}.nii.gz", label, measured


def calibrated_probability(fraction: np.ndarray) -> np.ndarray:
    """The probability map of the synthetic image scans as a function of the partial volume f in [0, 1].

    (σ(8(f − ½)) − σ(−4)) / (σ(4) − σ(−4)) with σ the logistic function: monotone, 0 at 0, ½ at ½ and 1 at 1,
    symmetric (p(1 − f) = 1 − p(f)), slope 2.07 at ½ and 0.04 at 0 and 1 — what a segmenter trained on binary
    labels gives (sure of most voxels the boundary cuts), not the fraction itself.

    Parameters
    ----------
    fraction : array
        Partial volumes in [0, 1], any shape.

    Returns
    -------
    array
        Probabilities, float64, the same shape.
    """
    steep = _PROBABILITY_STEEPNESS
    low, high = 1.0 / (1.0 + np.exp(steep / 2)), 1.0 / (1.0 + np.exp(-steep / 2))
    logistic = 1.0 / (1.0 + np.exp(-steep * (np.asarray(fraction, dtype=np.float64) - 0.5)))
    return np.clip((logistic - low) / (high - low), 0.0, 1.0)


def _scan_grid(shape: Mesh, anatomy: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A voxel grid around ``shape`` for one scan: the anatomy's spacing and axes (``IMAGE_GRIDS``) rotated by
    ≈ ``_GRID_ROTATION_SD_DEG`` and shifted by a uniform random fraction of a voxel; (affine (4, 4), shape)."""
    spacing, axes = IMAGE_GRIDS[anatomy]
    spacing = np.asarray(spacing)
    direction = _rotation(rng.normal(size=3) * np.radians(_GRID_ROTATION_SD_DEG)) @ axes
    index = shape.vertices @ direction / spacing  # continuous indices on a grid with its origin at 0
    first = np.floor(index.min(axis=0)) - _GRID_MARGIN_VOXELS - rng.uniform(size=3)
    size = tuple(int(n) for n in np.ceil(index.max(axis=0) - first) + _GRID_MARGIN_VOXELS + 1)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = direction @ (spacing * first)
    return affine, size


def _segmentation_error(mesh: Mesh, noise: float, rng: np.random.Generator) -> Mesh:
    """The shape as a segmenter outlines it: its boundary moved along the normals by a smooth random field of RMS
    ``noise`` mm over ≈ ``_JITTER_PATCH_MM`` patches (not volume-neutral: a segmenter's errors change volume)."""
    vertices = mesh.vertices
    patches = vertices[rng.integers(mesh.n_vertices, size=64)]
    weights = np.exp(-((vertices[:, None, :] - patches[None]) ** 2).sum(-1) / _JITTER_PATCH_MM**2)
    field = weights @ rng.normal(size=len(patches))
    areas = mesh.vertex_areas()
    field *= noise / max(float(np.sqrt(areas @ field**2 / areas.sum())), 1e-12)
    return Mesh(vertices + field[:, None] * mesh.vertex_normals(), mesh.triangles)


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
