"""Registration presets per anatomy: the scales (mm) of the coarse-to-fine schedule rigid → affine → deformable.

Each scale follows from the size of the structure and of the detail that matters:

``brain`` — hippocampus-sized structures (≈ 40 × 20 × 20 mm, surfaces from 1 mm MRI). Correspondences from blurs of
    8 → 3 → 1 mm (a fifth of the length down to a voxel); deformation kernels of 10 then 5 mm (head/body/tail
    bends, then the subfield-scale bulges atrophy shows); correspondences within 3 mm (three voxels), so that a
    cropped or partly segmented structure is not dragged onto the whole one; deformations pulled across up to
    10 mm (a quarter of the length: the spread between subjects after an affine alignment).
``knee`` — distal femur (≈ 80 × 70 × 60 mm, 0.3–0.7 mm MRI). Blurs 12 → 4 → 1.5 mm (the condyles first, then the
    trochlea and notch, down to the cartilage-plate scale); kernels 20, 10 then 5 mm (condyle width, the notch,
    then the trochlear and epicondylar relief); correspondences within 3 mm (twice the finest blur) for scans
    cropped at different heights of the shaft; deformations pulled across up to 20 mm (condyle-sized differences
    between subjects); a lighter regularisation (3·10⁻⁴) than the default, as the sub-millimetre femur surfaces
    support the 5 mm detail.
``heart`` — left-ventricular myocardium (≈ 90 mm base to apex, 50 mm across, 10 mm wall, 1 mm CT). Blurs
    10 → 4 → 1.5 mm; kernels 25 then 12 mm (the cavity's global shape, then the wall's regional bulges);
    correspondences within 3 mm (twice the finest blur) for base planes cut at different levels; deformations
    pulled across up to 15 mm (wall thickness and cavity differences between subjects and phases).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A registration schedule.

    Parameters
    ----------
    name : str
    blurs : tuple of float
        Sinkhorn blurs (mm) of the linear stages, coarse to fine; the last one is also the deformable loss's blur
        unless a ``loss`` is given.
    kernel_scales : tuple of float
        Widths σ (mm) of the deformation kernel, coarse to fine, one deformable stage each.
    reach : float or None
        Unbalanced transport reach (mm) of the linear stages' correspondences: points farther apart are not
        matched, so a part one shape lacks does not pull the other (a few times the finest blur).
    deformable_reach : float or None
        Reach (mm) of the default deformable loss: the largest mismatch the deformation is pulled across (the
        anatomy's variability after an affine alignment).
    regularisation : float
        Weight of the deformation's kinetic energy (mm² per mm² of loss) in the deformable stages.
    iterations : int
        L-BFGS iterations per deformable stage.
    steps : int
        Time steps of the diffeomorphic (LDDMM) flow.
    """

    name: str
    blurs: tuple[float, ...]
    kernel_scales: tuple[float, ...]
    reach: float | None
    deformable_reach: float | None
    regularisation: float = 1e-3
    iterations: int = 30
    steps: int = 10

    @classmethod
    def for_size(cls, diameter: float) -> Preset:
        """A schedule scaled to a shape of the given diameter (mm) when no anatomy is named: blurs of 1/8, 1/20
        and 1/60 of it, kernels of 1/4 and 1/8, a correspondence reach of 1/20 (three times the finest blur) and a
        deformable reach of 1/6."""
        return cls("size", (diameter / 8, diameter / 20, diameter / 60), (diameter / 4, diameter / 8), diameter / 20,
                   diameter / 6)


PRESETS: dict[str, Preset] = {
    "brain": Preset("brain", (8.0, 3.0, 1.0), (10.0, 5.0), 3.0, 10.0),
    "knee": Preset("knee", (12.0, 4.0, 1.5), (20.0, 10.0, 5.0), 3.0, 20.0, regularisation=3e-4),
    "heart": Preset("heart", (10.0, 4.0, 1.5), (25.0, 12.0), 3.0, 15.0),
}


def preset(name: str | Preset) -> Preset:
    """The preset called ``name`` ("brain", "knee", "heart"), or ``name`` itself if it is a :class:`Preset`."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a Preset, got {name!r}")
    return PRESETS[name]
