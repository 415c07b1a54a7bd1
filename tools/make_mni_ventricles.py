"""Derive the lateral-ventricle label map shipped as ``geomed/data/brain/mni_ventricles_labels.nii.gz``.

Run from the repository root: ``python tools/make_mni_ventricles.py [TEMPLATE_DIR]`` (default
``../shared/data/brain/mni152_2009a``). What it does, so that the label map can be checked against its source:

- reads the ICBM152 2009a symmetric T1 template and its grey- and white-matter probability maps (1 mm, uint8,
  probabilities ×255, all on the same 197×233×189 grid);
- brain mask: GM + WM probability > 0.5, with its holes filled, so that the ventricles enclosed by the brain are
  inside it and the CSF around the brain is not;
- candidates: voxels of the brain mask with GM + WM probability < 0.2 and a low T1 intensity (< 120, see
  ``T1_MAX``);
- keeps the largest 6-connected component lying wholly left of the midline (world RAS x < 0, checked with
  SimpleITK's own index → physical point map, which is LPS) as label 1 and the largest lying wholly right of it as
  label 2; they must be the two largest components overall, i.e. the midline septum keeps them apart and nothing
  joins them (the third ventricle is a separate, smaller component and is dropped, as are the few-voxel
  fragments of the temporal horns);
- fills the enclosed holes of each component (a light cleanup, +0.5 % of volume; no opening or erosion);
- crops to the bounding box of the two ventricles plus a 4 mm margin. The crop is done by SimpleITK, which moves
  the origin with it, so world positions are unchanged.

The output is deterministic: the same input gives the same voxels and geometry.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from _grids import same_grid  # tools/_grids.py (the tools run as scripts from this folder)

T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
BRAIN_MIN = 0.5  # GM + WM probability of the brain mask (before hole filling)
CSF_MAX = 0.2  # GM + WM probability below which a voxel inside the brain is CSF
# T1 ceiling of ventricular CSF. In this template, CSF inside the brain (GM + WM < 0.2) has T1 61–113 (5th percentile
# to maximum, median 71), grey matter (GM > 0.9) 154–177 and white matter (WM > 0.9) 213–233 (5th–95th percentiles),
# so the probability criterion alone already selects dark voxels and this one removes none. 120 lies between the
# brightest CSF and the darkest grey matter: it rejects tissue that the probability maps missed without cutting
# the partial-volume CSF at the ventricle walls (a ceiling of 100 would drop 5 % of each ventricle).
T1_MAX = 120
MARGIN_MM = 4.0
LEFT, RIGHT = 1, 2


def _read(folder: Path, name: str) -> sitk.Image:
    return sitk.ReadImage(str(folder / name))


def _ras_x(image: sitk.Image, index) -> float:
    """World RAS x (mm) of a voxel index (i, j, k), continuous or not; SimpleITK's physical space is LPS."""
    return -image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])[0]


def _side(image: sitk.Image, component: np.ndarray) -> int:
    """-1 if the component lies wholly at RAS x < 0, +1 if wholly at x > 0, 0 if it crosses the midline."""
    occupied = np.argwhere(component.T)  # (i, j, k) indices; the array is (k, j, i)
    corners = itertools.product(*zip(occupied.min(axis=0), occupied.max(axis=0)))
    signs = {np.sign(_ras_x(image, corner)) for corner in corners}  # the box's corners bound the component
    return int(signs.pop()) if len(signs) == 1 else 0


def _ventricles(t1: sitk.Image, gm: sitk.Image, wm: sitk.Image) -> sitk.Image:
    for other in (gm, wm):
        if not same_grid(t1, other):
            raise ValueError("the T1 and the probability maps must share one grid")
    tissue = sitk.GetArrayFromImage(gm).astype(np.int32) + sitk.GetArrayFromImage(wm)  # probability ×255
    intensity = sitk.GetArrayFromImage(t1)
    brain = ndimage.binary_fill_holes(tissue > BRAIN_MIN * 255)
    csf = brain & (tissue < CSF_MAX * 255)
    candidates = csf & (intensity < T1_MAX)
    print(f"CSF inside the brain: {csf.sum()} voxels, {candidates.sum()} of them with T1 < {T1_MAX}")
    components, _ = ndimage.label(candidates)  # 6-connectivity: a voxel diagonal across a wall is not joined
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(sizes, kind="stable")[::-1] + 1
    sides = {}
    for label in order:
        side = _side(t1, components == label)
        if side and side not in sides:
            sides[side] = label
        if len(sides) == 2:
            break
    if set(sides.values()) != set(order[:2].tolist()):
        raise RuntimeError(f"the two largest CSF components {order[:2].tolist()} are not one left and one right")
    labels = np.zeros(candidates.shape, np.uint8)
    for side, value in ((-1, LEFT), (1, RIGHT)):
        labels[ndimage.binary_fill_holes(components == sides[side])] = value
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(t1)
    return image


def _box(labels: sitk.Image) -> tuple[slice, slice, slice]:
    occupied = np.argwhere(sitk.GetArrayFromImage(labels).T > 0)
    margin = np.ceil(MARGIN_MM / np.asarray(labels.GetSpacing())).astype(int)
    lower = np.maximum(occupied.min(axis=0) - margin, 0)
    upper = np.minimum(occupied.max(axis=0) + 1 + margin, labels.GetSize())
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(lower, upper))


def _report(labels: sitk.Image) -> None:
    array = sitk.GetArrayFromImage(labels).T  # (i, j, k)
    voxel = float(np.prod(labels.GetSpacing()))
    volumes, centres = {}, {}
    for value, name in ((LEFT, "left"), (RIGHT, "right")):
        occupied = np.argwhere(array == value)
        world = np.array([labels.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in occupied.astype(float)])
        world[:, :2] *= -1  # LPS -> RAS
        volumes[name] = len(occupied) * voxel / 1000
        centres[name] = world.mean(axis=0)
        extent = world.max(axis=0) - world.min(axis=0) + np.asarray(labels.GetSpacing())
        print(
            f"{name} lateral ventricle (label {value}): {volumes[name]:.3f} mL, centroid RAS "
            f"{np.round(centres[name], 1).tolist()} mm, box {np.round(extent, 1).tolist()} mm "
            f"(voxel centres at x from {world[:, 0].min():.0f} to {world[:, 0].max():.0f} mm)"
        )
    ratio = volumes["left"] / volumes["right"]
    mirror = abs(centres["left"][0] + centres["right"][0])
    print(f"left/right volume ratio {ratio:.3f}; |x_left + x_right| = {mirror:.2f} mm (0 for mirror images)")


def main(template: Path, target: Path) -> None:
    t1 = _read(template, T1)
    labels = _ventricles(t1, _read(template, GM), _read(template, WM))
    box = _box(labels)
    cropped = labels[box]
    _report(cropped)
    target.mkdir(parents=True, exist_ok=True)
    path = target / "mni_ventricles_labels.nii.gz"
    sitk.WriteImage(cropped, str(path), useCompression=True)
    print(
        f"crop {[s.stop - s.start for s in box]} voxels from {[s.start for s in box]} of the T1 grid -> {path} "
        f"({path.stat().st_size} bytes)"
    )


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "template", type=Path, nargs="?", default=root.parent / "shared" / "data" / "brain" / "mni152_2009a",
        help="the folder of the ICBM152 2009a template files (default: ../shared/data/brain/mni152_2009a)",
    )
    arguments = parser.parse_args()
    main(arguments.template, root / "geomed" / "data" / "brain")
