"""Entropic optimal transport between measures: the debiased Sinkhorn divergence, barycentres and their backends.

Layers (each module one job): the front-ends :mod:`~geomed.ot.sinkhorn`, :mod:`~geomed.ot.grid_divergence` and
:mod:`~geomed.ot.barycenter`; the problem (:mod:`~geomed.ot.problem`) and its ε-schedule
(:mod:`~geomed.ot.schedule`); the dispatcher :mod:`~geomed.ot.solve`; the loop :mod:`~geomed.ot.solver` and the
value with its gradients :mod:`~geomed.ot.divergence`; the geometries (:mod:`~geomed.ot.geometry`,
:mod:`~geomed.ot.multiscale`, :mod:`~geomed.ot.grid`) and their softmins (:mod:`~geomed.ot.softmin`,
:mod:`~geomed.ot.triton_softmin`); what a solve returns (:mod:`~geomed.ot.result`).
"""

from .barycenter import BarycenterResult, grid_sinkhorn_barycenter, sinkhorn_barycenter
from .geometry import Geometry
from .grid_divergence import grid_sinkhorn_divergence
from .problem import BACKENDS
from .result import OTResult, ScheduleStep
from .schedule import EpsilonSchedule
from .sinkhorn import SinkhornLoss, sinkhorn_divergence
from .softmin import Softmin

__all__ = ["BACKENDS", "BarycenterResult", "EpsilonSchedule", "Geometry", "OTResult", "ScheduleStep", "SinkhornLoss",
           "Softmin", "grid_sinkhorn_barycenter", "grid_sinkhorn_divergence", "sinkhorn_barycenter",
           "sinkhorn_divergence"]
