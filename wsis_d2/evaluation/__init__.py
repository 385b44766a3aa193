"""Evaluators: instance segmentation mAP^r / mAP^b, counting errors and COCO AP."""
from .coco_eval import FastCOCOEvaluator, default_coco_backend
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
    "FastCOCOEvaluator",
    "default_coco_backend",
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
