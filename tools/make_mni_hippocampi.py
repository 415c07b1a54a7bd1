"""Cut the MNI hippocampus demo crop shipped as ``geomed/data/brain/mni_hippocampi_{t1,labels}.nii.gz``.

Run from the repository root: ``python tools/make_mni_hippocampi.py [SHARED_DATA_DIR]`` (default
``../shared/data``). What it does, so that the crop can be checked against its source:

- reads the ICBM152 2009a symmetric T1 template (1 mm, uint8) and the Desikan-Killiany atlas in the same MNI
  space; the atlas is stored on a smaller grid (146×182×155, shifted by whole voxels), so it is resampled onto
  the T1 grid by nearest neighbour, which moves no label;
- keeps the left and right hippocampus labels (40 and 81) and sets every other label to 0;
- crops both images to the bounding box of the two hippocampi plus a 6-voxel (6 mm) margin. Voxel values are
  untouched and the origin moves with the crop, so world positions are unchanged.

The output is deterministic: the same input gives the same voxels and geometry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from _grids import same_grid  # tools/_grids.py (the tools run as scripts from this folder)

HIPPOCAMPI = (40, 81)
MARGIN = 6
T1 = Path("brain", "mni152_2009a", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
ATLAS = Path("brain", "mni_dk_atlas.nii.gz")


def _on_grid(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    if same_grid(labels, reference):
        return labels
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def _hippocampi_only(labels: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(labels)
    kept = sitk.GetImageFromArray(np.where(np.isin(array, HIPPOCAMPI), array, 0).astype(np.uint8))
    kept.CopyInformation(labels)
    return kept


def _box(labels: sitk.Image) -> tuple[slice, slice, slice]:
    occupied = np.argwhere(sitk.GetArrayFromImage(labels).T > 0)
    lower = np.maximum(occupied.min(axis=0) - MARGIN, 0)
    upper = np.minimum(occupied.max(axis=0) + 1 + MARGIN, labels.GetSize())
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(lower, upper))


def main(shared: Path, target: Path) -> None:
    t1 = sitk.ReadImage(str(shared / T1))
    labels = _hippocampi_only(_on_grid(sitk.ReadImage(str(shared / ATLAS)), t1))
    box = _box(labels)
    target.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(t1[box], str(target / "mni_hippocampi_t1.nii.gz"), useCompression=True)
    sitk.WriteImage(labels[box], str(target / "mni_hippocampi_labels.nii.gz"), useCompression=True)
    print(f"crop {[s.stop - s.start for s in box]} voxels from {[s.start for s in box]} of the T1 grid -> {target}")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shared", type=Path, nargs="?", default=root.parent / "shared" / "data",
                        help="the full data set (default: ../shared/data beside the repository)")
    arguments = parser.parse_args()
    main(arguments.shared, root / "geomed" / "data" / "brain")
