"""Entropic optimal transport between measures: the debiased Sinkhorn divergence and its backends."""

from .grid import grid_sinkhorn_divergence
from .result import OTResult, ScheduleStep
from .sinkhorn import SinkhornLoss, sinkhorn_divergence

__all__ = ["OTResult", "ScheduleStep", "SinkhornLoss", "grid_sinkhorn_divergence", "sinkhorn_divergence"]
