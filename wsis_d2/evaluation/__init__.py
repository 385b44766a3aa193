"""Evaluators: instance segmentation mAP^r / mAP^b and counting errors."""
from .counting import CountingEvaluator, counting_metrics
from .density import DensityEvaluator
from .instance_ap import InstanceAPEvaluator

__all__ = ["InstanceAPEvaluator", "CountingEvaluator", "counting_metrics", "DensityEvaluator"]
