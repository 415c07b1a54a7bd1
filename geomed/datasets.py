"""Real anatomy shipped with geomed: brain, knee and heart shapes for demos, tests and tutorials.

Everything loads in world RAS millimetres, with label names attached to label maps. Sources and licences are in
``geomed/data/README.md`` (:func:`attribution` returns it).

>>> from geomed import datasets
>>> datasets.available()["knee_labels"]
['A', 'B', 'C']
>>> brain = datasets.brain_labels("9861")          # Image with label_names
>>> femur = datasets.femur(1)                      # Mesh with cartilage thickness (mm)
>>> t1, labels = datasets.mni_hippocampi()         # MNI T1 crop and its hippocampus labels, same grid
>>> ventricles = datasets.mni_lateral_ventricles()  # MNI lateral ventricles, labels 1 (left) and 2 (right)
"""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from .image import Image
from .io import read_image, read_mesh
from .mesh import Mesh

BRAIN_DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")
KNEES = ("A", "B", "C")
FEMURS = (1, 2, 3, 4, 5)
HEART_PARTS = ("lv", "rv", "septum")
MNI_VENTRICLE_NAMES = {1: "left_lateral_ventricle", 2: "right_lateral_ventricle"}
KNEE_LABEL_NAMES = {
    1: "femoral_cartilage",
    2: "medial_tibial_cartilage",
    3: "lateral_tibial_cartilage",
    4: "patellar_cartilage",
    5: "femur",
    6: "tibia",
    7: "patella",
    8: "fibula",
    9: "lateral_meniscus",
    10: "medial_meniscus",
}


def _data_file(*parts: str) -> Path:
    path = Path(str(resources.files("geomed").joinpath("data", *parts)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: geomed's demo data is missing; reinstall geomed")
    return path


def _check(value: object, choices: tuple, what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; available: {', '.join(map(str, choices))}")


def _with_present_names(image: Image, names: dict[int, str]) -> Image:
    present = set(np.unique(image.array).tolist())
    return Image(image.array, image.affine, {k: v for k, v in names.items() if k in present})


def available() -> dict[str, list]:
    """What the loaders accept: ``{loader name: [valid arguments]}``."""
    return {
        "brain_labels": list(BRAIN_DONORS),
        "knee_labels": list(KNEES),
        "femur": list(FEMURS),
        "heart_myocardium": list(HEART_PARTS),
    }


@cache
def brain_label_names() -> dict[int, str]:
    """Desikan-Killiany label names, ``{40: "left_hippocampus", 81: "right_hippocampus", ...}`` (lower case)."""
    with open(_data_file("brain", "atlas-desikankilliany.csv"), newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    side = {"L": "left_", "R": "right_", "B": ""}
    return {int(row["id"]): f"{side[row['hemisphere']]}{row['label']}" for row in rows}


def brain_donors() -> list[dict[str, str]]:
    """Age and sex of the six brain donors, one dict per donor (columns as in the source table)."""
    with open(_data_file("brain", "donor_info.csv"), newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def brain_labels(donor: str | int) -> Image:
    """Subcortical Desikan-Killiany label map of one Allen Human Brain Atlas donor, native space, 1 mm.

    Cropped around the 14 subcortical structures (thalamus, caudate, putamen, pallidum, accumbens, hippocampus,
    amygdala; left ids 35–41, right 76–82); cortical labels are removed. ``label_names`` holds names such as
    ``"left_hippocampus"``.

    Parameters
    ----------
    donor : str or int
        One of ``BRAIN_DONORS``: "9861", "10021", "12876", "14380", "15496", "15697".
    """
    donor = str(donor)
    _check(donor, BRAIN_DONORS, "brain donor")
    return _with_present_names(read_image(_data_file("brain", f"{donor}.nii.gz")), brain_label_names())


def mni_hippocampi() -> tuple[Image, Image]:
    """T1 MRI of the ICBM152 2009a template cropped around both hippocampi, with their label map.

    A 92×53×52 box of the 1 mm MNI152 2009a symmetric template (uint8 intensities), the bounding box of the two
    hippocampi plus a 6 mm margin, and the Desikan-Killiany atlas on the same grid restricted to the left (40) and
    right (81) hippocampus: a small real image-and-segmentation pair for training networks in tests and tutorials.
    Made by ``tools/make_mni_hippocampi.py``; see :func:`attribution` for the MNI copyright notice.

    Returns
    -------
    t1 : Image
        uint8 T1 intensities (0–255), affine voxel → RAS mm.
    labels : Image
        uint8 label map with the same affine; ``label_names`` ``{40: "left_hippocampus", 81: "right_hippocampus"}``.
    """
    t1 = read_image(_data_file("brain", "mni_hippocampi_t1.nii.gz"))
    labels = read_image(_data_file("brain", "mni_hippocampi_labels.nii.gz"))
    return t1, _with_present_names(labels, brain_label_names())


def mni_lateral_ventricles() -> Image:
    """Label map of the two lateral brain ventricles, derived from the ICBM152 2009a symmetric template.

    A 75×94×39 box (1 mm, uint8) of the MNI152 2009a grid: the bounding box of both lateral ventricles plus a 4 mm
    margin, world positions unchanged. The ventricles are the CSF inside the brain (grey + white matter probability
    < 0.2 within the hole-filled brain mask, T1 < 120) split by the septum into one connected component per side,
    with enclosed holes filled: 6.0 mL each (5998 voxels), mirror images of each other as the template is
    symmetric. The frontal horns, bodies, atria and occipital horns are included; the thin temporal horns and the
    third ventricle are not. Made by ``tools/make_mni_ventricles.py``; see :func:`attribution` for the MNI
    copyright notice.

    Returns
    -------
    Image
        uint8 label map, affine voxel → RAS mm; ``label_names``
        ``{1: "left_lateral_ventricle", 2: "right_lateral_ventricle"}`` (left is world x < 0).
    """
    labels = read_image(_data_file("brain", "mni_ventricles_labels.nii.gz"))
    return _with_present_names(labels, MNI_VENTRICLE_NAMES)


def knee_labels(name: str) -> Image:
    """Knee MRI segmentation "A", "B" or "C" (oblique, 0.35–0.7 mm voxels) with its label names.

    Labels: femoral, medial/lateral tibial and patellar cartilage, femur (cropped by the field of view), tibia,
    patella; knee B also fibula and menisci.
    """
    name = str(name).upper()
    _check(name, KNEES, "knee")
    return _with_present_names(read_image(_data_file("knee", f"knee_{name}.nii.gz")), KNEE_LABEL_NAMES)


def femur(index: int) -> Mesh:
    """Distal femur surface 1–5 (about 20k vertices), with point arrays ``thickness (mm)`` and ``Cartilage Region``."""
    index = int(index) if str(index).isdigit() else index
    _check(index, FEMURS, "femur")
    return read_mesh(_data_file("knee", f"femur_{index}.vtp"))


def heart_myocardium(part: str = "lv") -> Mesh:
    """Closed myocardium surface of one adult heart (end-diastolic CT): "lv", "rv" or "septum".

    Point arrays ``apico-basal``, ``transmural``, ``rotational`` (universal ventricular coordinates); cell arrays
    ``fiber`` and ``sheet`` (unit directions).
    """
    part = str(part).lower()
    _check(part, HEART_PARTS, "heart part")
    return read_mesh(_data_file("heart", f"rodero01_{part}_myocardium.vtp"))


def attribution() -> str:
    """Sources and licences of the demo data (the text of ``geomed/data/README.md``)."""
    return _data_file("README.md").read_text(encoding="utf-8")


__all__ = [
    "BRAIN_DONORS", "FEMURS", "HEART_PARTS", "KNEES", "attribution", "available", "brain_donors",
    "brain_label_names", "brain_labels", "femur", "heart_myocardium", "knee_labels", "mni_hippocampi",
    "mni_lateral_ventricles",
]
