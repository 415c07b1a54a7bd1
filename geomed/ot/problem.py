r"""The entropic OT problem a solve works on: argument checks, marginal penalties and their damping.

Unbalanced OT penalises the marginals by :math:`\rho\,\mathrm{KL}` with :math:`\rho = \mathrm{reach}^p` (mm^p),
one ρ per side (None for a balanced side). In the Sinkhorn updates a penalty appears as the damping
:math:`\lambda = 1/(1 + \varepsilon/\rho)` of the softmin (1 when balanced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .schedule import EpsilonSchedule

Reach = float | None | tuple[float | None, float | None]
"""A reach in mm: None (balanced), a number (both sides), or one per side."""

BACKENDS = ("auto", "dense", "online", "keops", "triton", "multiscale", "grid")


def check_arguments(blur: float, p: int, scaling: float, backend: str, tol: float | None, max_iter: int,
                    diameter: float | None) -> None:
    """Raise a ValueError naming the first of the solver options that is out of its range (see
    :func:`geomed.sinkhorn_divergence` for their meaning)."""
    if not (isinstance(blur, (int, float)) and math.isfinite(blur) and blur > 0):
        raise ValueError(f"blur must be a positive number of mm, got {blur!r}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if not (isinstance(scaling, (int, float)) and 0 < scaling < 1):
        raise ValueError(f"scaling must be in (0, 1), got {scaling!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be None or a positive number, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 0):
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if diameter is not None and not (isinstance(diameter, (int, float)) and math.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be None or a positive number of mm, got {diameter!r}")


def reaches(reach: Reach, p: int) -> tuple[float | None, float | None]:
    """The marginal penalties (ρ_a, ρ_b) = reach^p (mm^p) of both sides, None for a balanced side."""
    pair = reach if isinstance(reach, tuple) else (reach, reach)
    if len(pair) != 2:
        raise ValueError(f"reach must be None, a positive number (mm) or a pair of them, got {reach!r}")
    for value in pair:
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"reach must be None, a positive number (mm) or a pair of them, got {reach!r}")
    return tuple(None if value is None else float(value) ** p for value in pair)  # type: ignore[return-value]


def damping(eps: float, rho: float | None) -> float:
    """λ = 1/(1 + ε/ρ) of the unbalanced Sinkhorn update at temperature ``eps`` (mm^p); 1 when balanced."""
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


@dataclass(frozen=True)
class Problem:
    """What one solve is asked: cost, penalties, schedule and stopping rule.

    Attributes
    ----------
    p : {1, 2}
        Exponent of the cost |x − y|^p / p.
    blur : float
        Final blur (mm).
    rho_a, rho_b : float or None
        Marginal penalties reach^p (mm^p) of ``a``'s and ``b``'s side; None for a balanced side.
    debias : bool
        Whether the value is the Sinkhorn divergence (True) or the raw OT_ε.
    identical : bool
        Whether both measures are the same (then S = 0 and the symmetric problems are the cross problem).
    tol : float or None
        Marginal error at which the final blur stops; None runs ``max_iter`` iterations.
    max_iter : int
        Cap on the iterations at the final blur.
    schedule : EpsilonSchedule
    """

    p: int
    blur: float
    rho_a: float | None
    rho_b: float | None
    debias: bool
    identical: bool
    tol: float | None
    max_iter: int
    schedule: EpsilonSchedule

    @property
    def symmetric(self) -> bool:
        """Whether the symmetric problems (α, α), (β, β) must be solved: debiased, and the measures differ."""
        return self.debias and not self.identical

    def damping(self, eps: float, side: str) -> float:
        """λ of the Sinkhorn update of side "x" (``a``'s potentials) or "y" (``b``'s) at ``eps``."""
        return damping(eps, self.rho_a if side == "x" else self.rho_b)
