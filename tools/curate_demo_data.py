"""Rebuild the demo data shipped in ``geomed/data`` from the full data set in ``../shared/data``.

Run from the repository root: ``python tools/curate_demo_data.py [SHARED_DATA_DIR]``. What it does, so that the
shipped subset can be checked against its source:

- brain: the six Desikan-Killiany label maps, cropped to the bounding box of the 14 subcortical structures
  (labels 35–41 and 76–82) plus a 4-voxel margin. Cortical labels, which the crop would cut, are set to 0; the
  subcortical voxels are untouched and the affine is moved with the crop, so world positions are unchanged.
  Stored as uint8.
- knee: the three label maps as they are (oblique, anisotropic), and the five femur surfaces.
- heart: the LV, RV and septum myocardium surfaces with their anatomical coordinates (apico-basal, transmural,
  rotational) and fibre/sheet directions; book-keeping arrays of the meshing tool are dropped.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from geomed.image import Image
from geomed.io import read_image, read_mesh, write_image, write_mesh

SUBCORTICAL = [*range(35, 42), *range(76, 83)]
MARGIN = 4
HEART_POINT_ARRAYS = ("apico-basal", "transmural", "rotational")
HEART_CELL_ARRAYS = ("fiber", "sheet")


def _crop_subcortical(image: Image) -> Image:
    array = np.where(np.isin(image.array, SUBCORTICAL), image.array, 0).astype(np.uint8)
    occupied = np.argwhere(array > 0)
    lower = np.maximum(occupied.min(axis=0) - MARGIN, 0)
    upper = np.minimum(occupied.max(axis=0) + 1 + MARGIN, image.shape)
    return image.with_array(array).crop(tuple(lower), tuple(upper))


def main(shared: Path, target: Path) -> None:
    (target / "brain").mkdir(parents=True, exist_ok=True)
    (target / "knee").mkdir(parents=True, exist_ok=True)
    (target / "heart").mkdir(parents=True, exist_ok=True)
    for folder in sorted((shared / "brain" / "native_dk").iterdir()):
        if folder.is_dir():
            image = read_image(folder / "atlas-desikankilliany.nii.gz")
            write_image(_crop_subcortical(image), target / "brain" / f"{folder.name}.nii.gz")
    for name in ("atlas-desikankilliany.csv", "donor_info.csv"):
        shutil.copyfile(shared / "brain" / "native_dk" / name, target / "brain" / name)
    for path in sorted((shared / "knee" / "labelmaps").glob("*.nii.gz")):
        shutil.copyfile(path, target / "knee" / path.name)
    for path in sorted((shared / "knee" / "femur_meshes").glob("*.vtp")):
        write_mesh(read_mesh(path), target / "knee" / path.name)
    for part in ("lv", "rv", "septum"):
        mesh = read_mesh(shared / "heart" / f"rodero01_{part}_myocardium.vtp")
        point_data = {k: v for k, v in mesh.point_data.items() if k in HEART_POINT_ARRAYS}
        cell_data = {k: v for k, v in mesh.cell_data.items() if k in HEART_CELL_ARRAYS}
        mesh = type(mesh)(mesh.vertices, mesh.triangles, point_data, cell_data)
        write_mesh(mesh, target / "heart" / f"rodero01_{part}_myocardium.vtp")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared" / "data"
    main(source, root / "geomed" / "data")
