"""Custom ops of wsis_d2 (compiled in ``wsis_d2._C``) with their pure-PyTorch references."""

from ._ext import compiled_ops_available, cuda_ops_available
from .batch_norm import FusedFrozenBatchNorm2d, fuse_frozen_batchnorm
from .box_score import (
    IntegralImage,
    box_context_gap,
    box_mean,
    box_sum,
    box_sum_reference,
    context_boxes,
)
from .box_refine import refine_context_gap, refine_context_gap_reference
from .graph_segment import edge_weights, graph_segment, graph_segment_reference, graph_segment_scales
from .selective_search import (
    box_straddling,
    box_straddling_reference,
    hierarchical_grouping,
    hierarchical_grouping_reference,
)
from .peaks import (
    Peaks,
    find_peaks,
    find_peaks_reference,
    kth_peak_value,
    peak_mask_reference,
    prominent_peaks,
)

__all__ = [
    "FusedFrozenBatchNorm2d",
    "fuse_frozen_batchnorm",
    "Peaks",
    "find_peaks",
    "find_peaks_reference",
    "kth_peak_value",
    "peak_mask_reference",
    "prominent_peaks",
    "IntegralImage",
    "box_sum",
    "box_mean",
    "box_context_gap",
    "box_sum_reference",
    "context_boxes",
    "refine_context_gap",
    "refine_context_gap_reference",
    "edge_weights",
    "graph_segment",
    "graph_segment_reference",
    "graph_segment_scales",
    "hierarchical_grouping",
    "hierarchical_grouping_reference",
    "box_straddling",
    "box_straddling_reference",
    "compiled_ops_available",
    "cuda_ops_available",
]
