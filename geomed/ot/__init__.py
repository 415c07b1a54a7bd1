"""Entropic optimal transport between measures: the debiased Sinkhorn divergence and its backends."""

from .barycenter import BarycenterResult, grid_sinkhorn_barycenter, sinkhorn_barycenter
from .grid import grid_sinkhorn_divergence
from .result import OTResult, ScheduleStep
from .sinkhorn import SinkhornLoss, sinkhorn_divergence

__all__ = ["BarycenterResult", "OTResult", "ScheduleStep", "SinkhornLoss", "grid_sinkhorn_barycenter",
           "grid_sinkhorn_divergence", "sinkhorn_barycenter", "sinkhorn_divergence"]
