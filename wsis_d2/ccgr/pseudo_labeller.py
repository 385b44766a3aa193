"""
CCGR's last step as a component: :class:`PseudoLabeller` turns the refined boxes of an image and
its SS-branch scores S into pseudo instances (``MODEL.CCGR.MASK_THRESHOLD``, ``NMS_THRESHOLD``,
``SCORE_MODE`` with the regions of ``MODEL.SEGMENTS``, ``MASK_REFINE``, ``GRABCUT_ITERS``).
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.structures import Instances

from .. import layers as wsis_layers
from ..utils.checks import check_number
from .labels import (
    assign_pixels,
    component_instances,
    grabcut_masks,
    pseudo_instances,
    region_mean_scores,
)

__all__ = ["PseudoLabeller"]


class PseudoLabeller(nn.Module):
    """
    Pseudo instances of one image from its class scores S (C + 1, H, W) (C object classes, the
    background last; the SS branch's softmax at the output size) and boxes in those pixels:

    1. :meth:`score_maps`: the S that the refinement and the masks read, S itself ("pixels", the
       paper) or S̄, S averaged over the graph-based regions of the image ("regions",
       :func:`region_mean_scores`), so that boxes and masks follow image edges;
    2. :meth:`instances`: per box of class c the pixels with S_c >= ``mask_threshold``; NMS per
       class at box IoU ``nms_threshold``; each pixel to the best-scored mask
       (:func:`pseudo_instances`); then with ``mask_refine`` "grabcut" each mask re-labelled by
       GrabCut on the image colours inside the box's context box (C/B = ``context_scale``,
       :func:`grabcut_masks`) and the pixels assigned again (:func:`assign_pixels`).

    ``forward(sem_seg, boxes, classes, scores, inp)`` runs both (the ablations' entry point);
    :meth:`component_instances` is the variant without MIL boxes, for inputs without cues.
    """

    @configurable
    def __init__(
        self,
        *,
        mask_threshold: float = 0.5,
        nms_threshold: float = 0.5,
        score_mode: str = "regions",
        segment_scale: float = 300.0,
        segment_sigma: float = 0.8,
        segment_min_size: int = 20,
        mask_refine: str = "grabcut",
        grabcut_iters: int = 3,
        context_scale: float = 1.5,
        grabcut_max_upscale: float = 4.0,
    ):
        """
        Args:
            mask_threshold: a pixel of a box of class c is in its mask when S_c >= this.
            nms_threshold: boxes of one class overlapping a better-scored one at IoU > this are
                dropped (1.0: none).
            score_mode: "pixels" or "regions" (see the class docstring).
            segment_scale, segment_sigma, segment_min_size: those regions (k, σ and the minimum
                size in input pixels of :func:`wsis_d2.layers.graph_segment`).
            mask_refine: "grabcut" or "none" (the thresholded scores, the paper).
            grabcut_iters: GrabCut iterations of ``mask_refine`` "grabcut".
            context_scale: C/B of GrabCut's background ring (the refinement's context).
            grabcut_max_upscale: GrabCut runs at the masks' size, or where that is more than
                this many times the input image's size, at this many times it (masks, boxes
                and image resized there, the refined masks back); 0: always the masks' size.
        """
        super().__init__()
        where = "PseudoLabeller"
        check_number("MODEL.CCGR.MASK_THRESHOLD", mask_threshold, 0.0, 1.0, where=where)
        check_number("MODEL.CCGR.NMS_THRESHOLD", nms_threshold, 0.0, 1.0, where=where)
        if score_mode not in ("pixels", "regions"):
            raise ValueError(
                f"MODEL.CCGR.SCORE_MODE must be 'pixels' or 'regions', got {score_mode!r}"
            )
        if mask_refine not in ("none", "grabcut"):
            raise ValueError(
                f"MODEL.CCGR.MASK_REFINE must be 'none' or 'grabcut', got {mask_refine!r}"
            )
        if mask_refine == "grabcut":
            check_number("MODEL.CCGR.GRABCUT_ITERS", grabcut_iters, 1, integer=True, where=where)
            check_number("MODEL.CCGR.CONTEXT_SCALE", context_scale, low=1.0, where=where)
            check_number(
                "MODEL.CCGR.GRABCUT_MAX_UPSCALE", grabcut_max_upscale, low=0.0, where=where
            )
        self.mask_threshold = float(mask_threshold)
        self.nms_threshold = float(nms_threshold)
        self.score_mode = score_mode
        self.segment_params = (float(segment_scale), float(segment_sigma), int(segment_min_size))
        self.mask_refine = mask_refine
        self.grabcut_iters = int(grabcut_iters)
        self.context_scale = float(context_scale)
        self.grabcut_max_upscale = float(grabcut_max_upscale)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CCGR
        return {
            "mask_threshold": c.MASK_THRESHOLD,
            "nms_threshold": c.NMS_THRESHOLD,
            "score_mode": c.SCORE_MODE,
            "segment_scale": cfg.MODEL.SEGMENTS.SCALE,
            "segment_sigma": cfg.MODEL.SEGMENTS.SIGMA,
            "segment_min_size": cfg.MODEL.SEGMENTS.MIN_SIZE,
            "mask_refine": c.MASK_REFINE,
            "grabcut_iters": c.GRABCUT_ITERS,
            "context_scale": c.CONTEXT_SCALE,
            "grabcut_max_upscale": c.GRABCUT_MAX_UPSCALE,
        }

    def extra_repr(self) -> str:
        return (
            f"mask_threshold={self.mask_threshold}, nms_threshold={self.nms_threshold}, "
            f"score_mode={self.score_mode!r}, segment_params={self.segment_params}, "
            f"mask_refine={self.mask_refine!r}, grabcut_iters={self.grabcut_iters}, "
            f"context_scale={self.context_scale}"
        )

    @property
    def needs_input(self) -> bool:
        """Whether :meth:`score_maps` and :meth:`instances` read the input image."""
        return self.score_mode == "regions" or self.mask_refine == "grabcut"

    def regions(self, inp: Dict, size) -> torch.Tensor:
        """(height, width) long labels of the graph-based regions of the input's "image"
        (3, H, W), resized to ``size`` by nearest neighbour; on the CPU."""
        regions = wsis_layers.graph_segment(
            inp["image"].detach().float().clamp(0, 255).cpu(), *self.segment_params
        )
        regions = F.interpolate(regions[None, None].float(), size=tuple(size), mode="nearest")
        return regions[0, 0].long()

    def score_maps(self, scores: torch.Tensor, inp: Optional[Dict] = None) -> torch.Tensor:
        """
        Args:
            scores: (K, H, W) S at the output size.
            inp: the model input of the image (its "image"), needed by "regions".

        Returns:
            (K, H, W): ``scores`` itself ("pixels") or S̄ ("regions").
        """
        if self.score_mode == "pixels":
            return scores
        regions = self.regions(inp, scores.shape[1:]).to(scores.device)
        return region_mean_scores(scores, regions)

    def instances(
        self,
        score_maps: torch.Tensor,
        boxes: torch.Tensor,
        classes: torch.Tensor,
        scores: torch.Tensor,
        inp: Optional[Dict] = None,
    ) -> Instances:
        """
        Args:
            score_maps: (C, H, W) the object classes of :meth:`score_maps`.
            boxes: (B, 4) XYXY in pixels of ``score_maps``; classes (B,) long; scores (B,).
            inp: the model input of the image (its "image" (3, H_in, W_in)), needed by "grabcut".

        Returns:
            Instances((H, W)) with pred_boxes, pred_masks, pred_classes, scores, sorted by score.
        """
        inst = pseudo_instances(
            score_maps,
            boxes,
            classes,
            scores,
            mask_threshold=self.mask_threshold,
            nms_threshold=self.nms_threshold,
        )
        if self.mask_refine == "none" or len(inst) == 0:
            return inst
        size = tuple(score_maps.shape[1:])
        image = inp["image"].detach().float()
        work = self.grabcut_size(tuple(image.shape[1:]), size)
        if tuple(image.shape[1:]) != work:
            image = F.interpolate(image[None], size=work, mode="bilinear", align_corners=False)[0]
        masks, boxes = inst.pred_masks, inst.pred_boxes.tensor
        if work != size:
            masks = F.interpolate(masks[:, None].float(), size=work, mode="area")[:, 0] >= 0.5
            boxes = boxes * boxes.new_tensor([work[1] / size[1], work[0] / size[0]] * 2)
        refined = grabcut_masks(
            image, boxes, masks, iterations=self.grabcut_iters, context_scale=self.context_scale
        )
        if work != size:
            # the masks GrabCut changed back at the full size; the others stay as they were
            changed = (refined != masks).flatten(1).any(dim=1)
            up = F.interpolate(
                refined[changed][:, None].float(), size=size, mode="bilinear", align_corners=False
            )
            refined = inst.pred_masks.clone()
            refined[changed] = up[:, 0] >= 0.5
        inst.pred_masks = refined
        return assign_pixels(inst)

    def grabcut_size(self, input_size, size):
        """
        The (h, w) GrabCut works at for masks of ``size`` (H, W) and an input image of
        ``input_size``: ``size``, or where its shorter side is more than ``grabcut_max_upscale``
        × the input's, ``size`` scaled down to that.
        """
        limit = self.grabcut_max_upscale * min(input_size)
        if self.grabcut_max_upscale <= 0 or min(size) <= limit:
            return tuple(size)
        factor = limit / min(size)
        return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))

    def forward(
        self,
        sem_seg: torch.Tensor,
        boxes: torch.Tensor,
        classes: torch.Tensor,
        scores: torch.Tensor,
        inp: Optional[Dict] = None,
    ) -> Instances:
        """
        Pseudo instances of ``boxes`` (e.g. the MIL boxes or the boxes after t steps of a
        model's "ccgr" output) on ``sem_seg`` (C + 1, H, W), the model's "sem_seg" output.
        ``inp``, the model input of the image, is needed by "regions" and "grabcut".
        """
        if inp is None and self.needs_input:
            raise ValueError(
                "PseudoLabeller: MODEL.CCGR.SCORE_MODE 'regions' and MASK_REFINE 'grabcut' need "
                "the input"
            )
        return self.instances(self.score_maps(sem_seg[:-1], inp), boxes, classes, scores, inp)

    @staticmethod
    def component_instances(sem_seg: torch.Tensor) -> Instances:
        """
        The variant without MIL boxes (:func:`component_instances`) for an input without cues:
        the connected components of each class that is the argmax somewhere in ``sem_seg``
        (C + 1, H, W).
        """
        num_classes = sem_seg.shape[0] - 1
        labels = torch.zeros(num_classes)
        present = torch.unique(sem_seg.argmax(dim=0))
        labels[present[present < num_classes].cpu()] = 1.0
        return component_instances(sem_seg, labels)
