"""Entropic optimal transport between measures: the debiased Sinkhorn divergence and its backends."""

from .result import OTResult, ScheduleStep
from .sinkhorn import SinkhornLoss, sinkhorn_divergence

__all__ = ["OTResult", "ScheduleStep", "SinkhornLoss", "sinkhorn_divergence"]
