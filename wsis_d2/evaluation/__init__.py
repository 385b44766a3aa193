"""Evaluators: instance segmentation mAP^r / mAP^b and counting errors."""
from .counting import CountingEvaluator, counting_metrics
from .density import DensityEvaluator
from .instance_ap import InstanceAPEvaluator
from .pseudo_labels import (
    CCGRStageDiagnostics,
    SemanticConfusion,
    instance_ground_truth,
    proposal_recall,
    semantic_ground_truth,
)

__all__ = [
    "InstanceAPEvaluator",
    "CountingEvaluator",
    "counting_metrics",
    "DensityEvaluator",
    "SemanticConfusion",
    "CCGRStageDiagnostics",
    "instance_ground_truth",
    "proposal_recall",
    "semantic_ground_truth",
]
