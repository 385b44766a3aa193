"""
Deployment: TorchScript / ONNX export of the density models, LC's counting part and CCGR's IS
branch (the stock Mask R-CNN) through detectron2's ``TracingAdapter`` (``tools/export_model.py``).
"""

from .adapters import (
    density_inference,
    inference_function,
    lc_counting_inference,
    lc_counting_vs_model,
    rcnn_inference,
)
from .api import (
    FORMATS,
    METHODS,
    ExportedModel,
    compare_outputs,
    export_model,
    flat_output_names,
    load_exported,
    median_seconds,
    reference_outputs,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
