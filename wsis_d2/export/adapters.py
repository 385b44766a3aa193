"""
Inference functions that make wsis_d2's models traceable by detectron2's ``TracingAdapter``
(``detectron2.export``): each takes ``(model, batched_inputs)`` with inputs holding only "image"
and returns a list of dicts of tensors (or detectron2 ``Instances``), which the adapter flattens.

- ``DensityCounter`` (FCRN-A, FCRN-B, U-Net): its own ``forward`` at inference, image → density map
  and counts; detections from density peaks are left out (a data-dependent number of boxes).
- ``ImageLevelCounter`` (LC / ILC): image → density maps, counts and class probabilities. The
  instance masks are not exported: each peak response map is the gradient of a peak with respect
  to the input image, i.e. a backward pass at inference, which neither a traced TorchScript graph
  nor ONNX holds.
- ``GeneralizedRCNN`` (CCGR's IS branch, the stock Mask R-CNN): detectron2's own recipe
  (``tools/deploy/export_model.py``), ``inference(..., do_postprocess=False)``: instances at the
  network's input resolution, masks as 28×28 (ROI) mask probabilities.
"""

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, ImageList

from ..layers.peaks import peak_mask_reference
from ..lc.losses import estimate_counts
from ..density.meta_arch import DensityCounter
from ..lc.meta_arch import ImageLevelCounter
from ..lc.prm import PRMInstanceDecoder

__all__ = [
    "density_inference",
    "lc_counting_inference",
    "lc_counting_vs_model",
    "rcnn_inference",
    "inference_function",
    "ScriptableRCNN",
    "RCNN_SCRIPT_FIELDS",
]


def density_inference(model: DensityCounter, batched_inputs: List[Dict]) -> List[Dict]:
    """
    Args:
        batched_inputs: [{"image": (3, H, W)}] in ``cfg.INPUT.FORMAT``.

    Returns:
        [{"counts": (C,), "density": (C, H, W)}] per image, calibrated (as ``model(inputs)``).
    """
    if model.point_detector is not None:
        raise ValueError(
            "MODEL.DENSITY.PEAKS.ENABLED must be False for export: the peak detections have a "
            "data-dependent number of boxes (export the density and find its peaks afterwards)"
        )
    return [{"counts": r["counts"], "density": r["density"]} for r in model(batched_inputs)]


def lc_counting_inference(model: ImageLevelCounter, batched_inputs: List[Dict]) -> List[Dict]:
    """
    The counting part of ``ImageLevelCounter.inference_single`` in traceable operations: the peak
    mask by max-pooling (``peak_mask_reference``, the op's definition), the class score as the mean
    of the peak values (the map's maximum where it has none), the image's map cells from the
    padded valid-pixel mask (a map cell counts when it covers an image pixel).

    Args:
        batched_inputs: [{"image": (3, H, W)}] in ``cfg.INPUT.FORMAT``.

    Returns:
        per image {"counts": (C,) the model's counts (t̂ rounded for present classes, else 0),
        "count_estimate": (C,) t̂ = Σ α_c·D^c before rounding, "class_probs": (C,)
        sigmoid(s_c), "density": (C, h, w) α_c·D^c over the padded map grid, 0 outside the
        image (the model's "density" is its top-left ceil(H/stride) × ceil(W/stride) block)}.
    """
    if model.peak_threshold not in (None, "median") and not isinstance(model.peak_threshold, float):
        raise ValueError(f"cannot export MODEL.LC.PEAK_FILTER {model.peak_threshold!r}")
    images = model.preprocess_image(batched_inputs)
    class_maps, density_maps = model.predict_maps(images.tensor)
    density_maps = density_maps * model.count_gain[None, :, None, None]
    divisor = max(int(model.backbone.size_divisibility), model.feature_stride)
    ones = [torch.ones_like(x["image"][:1], dtype=torch.float32) for x in batched_inputs]
    inside = ImageList.from_tensors(ones, divisor, pad_value=0.0).tensor
    # the maps' stride is a constant of the architecture (a head may upsample its feature)
    stride = int(inside.shape[-2]) // int(class_maps.shape[-2])
    if stride < 1 or [int(v) * stride for v in class_maps.shape[-2:]] != list(inside.shape[-2:]):
        raise ValueError(
            f"cannot export: map size {tuple(class_maps.shape[-2:])} does not divide the padded "
            f"input {tuple(inside.shape[-2:])}"
        )
    valid = F.max_pool2d(inside, kernel_size=stride, stride=stride)  # (N, 1, h, w)
    # outside the image no peak (-inf) and no median contribution: as the model crops the maps
    masked = torch.where(valid > 0, class_maps, torch.full_like(class_maps, float("-inf")))
    peaks = peak_mask_reference(masked, model.peak_radius) & (valid > 0)
    if model.peak_threshold == "median":
        # the median of the cells inside the image: -inf cells sort first, skip them
        flat = masked.flatten(2).sort(dim=2).values
        outside = (valid == 0).flatten(2).sum(dim=2)  # (N, 1)
        inside_n = (valid > 0).flatten(2).sum(dim=2)
        index = (outside + torch.div(inside_n - 1, 2, rounding_mode="floor")).long()
        median = flat.gather(2, index[:, :, None].expand(-1, flat.shape[1], 1))[:, :, 0]
        peaks = peaks & (class_maps >= median[:, :, None, None])
    elif isinstance(model.peak_threshold, float):
        peaks = peaks & (class_maps >= model.peak_threshold)
    weights = peaks.to(class_maps.dtype)
    nums = weights.sum(dim=(2, 3))
    scores = (class_maps * weights).sum(dim=(2, 3)) / nums.clamp_min(1.0)
    scores = torch.where(nums > 0, scores, masked.flatten(2).amax(dim=2))
    estimate = estimate_counts(density_maps, valid, model.count_mode)
    probs = torch.sigmoid(scores)
    counts = torch.where(
        probs > model.class_threshold, estimate.round().clamp_min(0.0), torch.zeros_like(estimate)
    )
    density = density_maps * valid
    return [
        {
            "counts": counts[i],
            "count_estimate": estimate[i],
            "class_probs": probs[i],
            "density": density[i],
        }
        for i in range(len(batched_inputs))
    ]


@torch.no_grad()
def lc_counting_vs_model(model: ImageLevelCounter, image: torch.Tensor) -> Dict[str, float]:
    """
    Largest absolute differences between :func:`lc_counting_inference` and the model's own
    ``inference_single`` on one (3, H, W) image: "counts" and "density" (the model's cropped maps
    against the same block of the exported grid), and "density_outside" (the exported grid's
    largest |value| outside that block, 0 by construction).
    """
    ours = lc_counting_inference(model, [{"image": image}])[0]
    # the counting part only: the PRMs do not change counts or density
    theirs = model.inference_single({"image": image}, decoder=PRMInstanceDecoder(enabled=False))
    mh, mw = theirs["density"].shape[-2:]
    outside = ours["density"].clone()
    outside[:, :mh, :mw] = 0
    return {
        "counts": float((ours["counts"] - theirs["counts"]).abs().max()),
        "density": float((ours["density"][:, :mh, :mw] - theirs["density"]).abs().max()),
        "density_outside": float(outside.abs().max()),
    }


def rcnn_inference(model: GeneralizedRCNN, batched_inputs: List[Dict]) -> List[Dict]:
    """
    detectron2's tracing recipe for R-CNN (``tools/deploy/export_model.py``): no postprocessing,
    so that the masks stay the ROI mask head's output and the boxes are in input pixels.

    Returns:
        [{"instances": Instances(pred_boxes, scores, pred_classes, pred_masks (R, 1, 28, 28))}].
    """
    return [{"instances": inst} for inst in model.inference(batched_inputs, do_postprocess=False)]


# the Instances fields of R-CNN inference and their types, for scripting_with_instances
RCNN_SCRIPT_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": torch.Tensor,
    "pred_boxes": Boxes,
    "scores": torch.Tensor,
    "pred_classes": torch.Tensor,
    "pred_masks": torch.Tensor,
}


class ScriptableRCNN(nn.Module):
    """
    detectron2's scripting recipe for R-CNN (``tools/deploy/export_model.py``): inference without
    postprocessing, each image's Instances returned as its dict of fields (a scripted model cannot
    return the generated Instances class).
    """

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tuple[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
        instances = self.model.inference(inputs, do_postprocess=False)
        return [i.get_fields() for i in instances]


def inference_function(model: torch.nn.Module) -> Callable:
    """The function above for ``model``'s class; ValueError for a model that has none."""
    if isinstance(model, DensityCounter):
        return density_inference
    if isinstance(model, ImageLevelCounter):
        return lc_counting_inference
    if isinstance(model, GeneralizedRCNN):
        return rcnn_inference
    raise ValueError(
        f"no export for MODEL.META_ARCHITECTURE {type(model).__name__}: DensityCounter, "
        "ImageLevelCounter and GeneralizedRCNN (CCGR's IS branch) are exported; CCGRNet's "
        "pseudo labels are a training-time product"
    )
