"""Eval metrics; importing this package registers every built-in metric in `METRICS`."""

from claas.eval.metrics import capability, collapse, compliance, margin
from claas.eval.metrics.base import METRICS, MeasureContext, Measurement, Metric, get_metric, register

__all__ = [
    "METRICS",
    "MeasureContext",
    "Measurement",
    "Metric",
    "capability",
    "collapse",
    "compliance",
    "get_metric",
    "margin",
    "register",
]
