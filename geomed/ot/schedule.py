r"""The ε-schedule of every solver in :mod:`geomed.ot`: one place to change it.

ε-scaling solves the entropic problem at a decreasing sequence of temperatures, each solution warm-starting the
next: ε decreases geometrically from :math:`\mathrm{diameter}^p` to :math:`\mathrm{blur}^p` by factors
:math:`\mathrm{scaling}^p` (the blurs :math:`\varepsilon^{1/p}` from the diameter to ``blur`` by factors
``scaling``). Multiscale geometries (point clusters, grid pyramids) work at each ε on the coarsest level whose cells
are no larger than the blur of that ε (:func:`level_for`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def blur_of(eps: float, p: int) -> float:
    """The blur ε^(1/p) (mm) of a temperature ε (mm^p)."""
    return eps ** (1 / p)


def level_for(eps: float, p: int, scales: Sequence[float]) -> int:
    """The coarsest level whose cell side (``scales[k]``, mm, level 0 the input with side 0) is no larger than the
    blur of ``eps``."""
    blur = blur_of(eps, p)
    return max([k for k, side in enumerate(scales) if side <= blur], default=0)


@dataclass(frozen=True)
class EpsilonSchedule:
    """ε from ``diameter**p`` down to ``blur**p`` by factors ``scaling**p``.

    Parameters
    ----------
    diameter : float
        The first blur (mm): the largest distance between points.
    blur : float
        The final blur (mm).
    p : {1, 2}
        Exponent of the cost |x − y|^p / p.
    scaling : float in (0, 1)
        Ratio between successive blurs.
    """

    diameter: float
    blur: float
    p: int
    scaling: float

    @property
    def epsilons(self) -> list[float]:
        """The temperatures (mm^p), decreasing; the last entry is exactly ``blur**p``."""
        diameter, blur, p, scaling = self.diameter, self.blur, self.p, self.scaling
        steps = max(0, math.ceil(math.log(diameter / blur) / -math.log(scaling))) if diameter > blur else 0
        return [max(diameter * scaling**k, blur) ** p for k in range(steps)] + [blur**p]

    @property
    def final(self) -> float:
        """The final temperature ε = blur^p (mm^p)."""
        return self.blur**self.p

    def blur_of(self, eps: float) -> float:
        """The blur ε^(1/p) (mm) of a temperature ε (mm^p)."""
        return blur_of(eps, self.p)
