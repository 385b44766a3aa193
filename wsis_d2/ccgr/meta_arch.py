"""
``CCGRNet``: the MIL and SS branches of CCGR ("Center-context-gap Refinement for Weakly Supervised
Instance Segmentation", AAAI 2020) on one shared backbone, trained from image-level labels and
the round's cues; its inference turns a training image into pseudo instance labels.

- Backbone: any detectron2 backbone (the configs use MobileNetV2-FPN).
- MIL branch: :class:`wsis_d2.ccgr.wsddn_head.WSDDNROIHeads` (``MODEL.ROI_HEADS.NAME``) over
  the bags of :func:`wsis_d2.ccgr.labels.build_bags`.
- SS branch: a ``SEM_SEG_HEADS_REGISTRY`` head (``MODEL.SEM_SEG_HEAD.NAME``, e.g. ``PSPHead``)
  over C object classes + background, trained on the pseudo semantic labels.

The instance-segmentation branch of CCGR is the stock Mask R-CNN, trained on this model's pseudo
labels (it is a separate detectron2 model).
"""

import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    Backbone,
    build_backbone,
    build_roi_heads,
    build_sem_seg_head,
)
from detectron2.structures import Boxes, ImageList
from detectron2.utils.events import get_event_storage

from .. import layers as wsis_layers
from ..layers import IntegralImage
from .labels import (
    IGNORE,
    assign_pixels,
    bags_from_boxes,
    build_bags,
    component_instances,
    grabcut_masks,
    pseudo_instances,
    refine_boxes,
    region_mean_scores,
)

__all__ = ["CCGRNet"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class CCGRNet(nn.Module):
    """
    Input per image (``CCGRDatasetMapper``): "image" (3, H, W) in ``INPUT.FORMAT``; "height",
    "width" of the output; "labels" (C,) image-level labels; "proposals" (Instances with
    proposal_boxes and objectness_logits, input pixels); "peaks" (P, 4) rows (class, x, y, value)
    in input pixels; optional "seed_boxes" (P, 6) rows (class, x1, y1, x2, y2, score), the boxes
    that seed the bags in rounds k >= 2 (row p the box of peak p); for training "sem_seg" (H, W)
    long pseudo labels (C = background, the ignore value ignored).

    Training returns {"loss_mil", "loss_sem_seg"}. Inference returns per image:

    - "sem_seg": (C + 1, height, width) class scores S: the softmax over the classes; for an
      input with image-level labels (the training images whose pseudo labels are being made),
      over its present classes and the background only (absent classes score 0), as
      image-label-supervised methods use the labels they are given;
    - "instances": the pseudo instances (:func:`pseudo_instances` of the refined MIL boxes, their
      masks re-labelled by :func:`grabcut_masks` under ``MODEL.CCGR.MASK_REFINE`` "grabcut"), or,
      for an input without peaks or labels, the connected components of the segmentation;
    - "ccgr": {"classes", "peaks" (rows of the output-size peaks), "bag_boxes" (B, K, 4) the
      boxes of each bag, "mil_boxes", "mil_scores",
      "refined_boxes", "snapshots" {step: boxes}} at the output size, for the ablations.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        roi_heads: nn.Module,
        sem_seg_head: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        ignore_value: int = IGNORE,
        bag_size: int = 10,
        bag_seg_weight: float = 0.1,
        seed_in_bag: bool = True,
        refine_steps: int = 200,
        refine_lr: float = 0.5,
        context_scale: float = 1.5,
        min_box_size: float = 4.0,
        refine_grow_only: bool = True,
        refine_search: bool = True,
        mask_threshold: float = 0.5,
        nms_threshold: float = 0.5,
        score_mode: str = "regions",
        segment_scale: float = 300.0,
        segment_sigma: float = 0.8,
        segment_min_size: int = 20,
        mask_refine: str = "grabcut",
        grabcut_iters: int = 3,
    ):
        """
        Args:
            backbone, roi_heads, sem_seg_head: the shared backbone and the two branches.
            num_classes: C object classes (the SS head predicts C + 1).
            pixel_mean, pixel_std: input normalisation.
            ignore_value: the ignore label of the pseudo semantic labels.
            bag_size, bag_seg_weight: K and γ of the bags (Eq. 4).
            seed_in_bag: rounds k >= 2: each seed box (the IS branch's box) is an instance of its
                own bag, beside the K - 1 boxes of highest IoU among the proposals and the other
                seed boxes (False: its K proposals of highest IoU only).
            refine_steps, refine_lr, context_scale, min_box_size: the refinement (Eq. 2–3).
            refine_grow_only: keep each refined box containing its MIL box (projected descent,
                ``grow_only`` of :func:`wsis_d2.layers.refine_context_gap`); False: the paper's
                unconstrained descent.
            refine_search: move each box to the least L that a global search over the allowed
                boxes finds before the descent (``search`` of
                :func:`wsis_d2.layers.refine_context_gap`: the descent alone stalls on flat
                score regions); False: the paper's pure descent.
            mask_threshold, nms_threshold: the pseudo masks.
            score_mode: what the refinement and the pseudo masks read: "pixels" (S per pixel, as
                the paper) or "regions" (S averaged over the graph-based regions of the image,
                :func:`region_mean_scores`, so that boxes and masks follow image edges).
            segment_scale, segment_sigma, segment_min_size: those regions (k, σ, minimum size
                in input pixels; ``MODEL.CCGR.SEGMENT_*``, shared with the round-1 cues).
            mask_refine: "grabcut" (each pseudo mask re-labelled on the image colours by
                :func:`grabcut_masks`, ``grabcut_iters`` iterations) or "none" (the paper).
        """
        super().__init__()
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.sem_seg_head = sem_seg_head
        self.num_classes = int(num_classes)
        self.ignore_value = int(ignore_value)
        self.bag_size = int(bag_size)
        if self.bag_size < 1:
            raise ValueError(f"MODEL.CCGR.BAG_SIZE must be >= 1, got {bag_size}")
        self.bag_seg_weight = float(bag_seg_weight)
        self.seed_in_bag = bool(seed_in_bag)
        self.refine_steps = int(refine_steps)
        self.refine_lr = float(refine_lr)
        self.context_scale = float(context_scale)
        self.min_box_size = float(min_box_size)
        self.refine_grow_only = bool(refine_grow_only)
        self.refine_search = bool(refine_search)
        self.mask_threshold = float(mask_threshold)
        self.nms_threshold = float(nms_threshold)
        if score_mode not in ("pixels", "regions"):
            raise ValueError(
                f"MODEL.CCGR.SCORE_MODE must be 'pixels' or 'regions', got {score_mode!r}"
            )
        self.score_mode = score_mode
        self.segment_params = (float(segment_scale), float(segment_sigma), int(segment_min_size))
        if mask_refine not in ("none", "grabcut"):
            raise ValueError(
                f"MODEL.CCGR.MASK_REFINE must be 'none' or 'grabcut', got {mask_refine!r}"
            )
        self.mask_refine = mask_refine
        self.grabcut_iters = int(grabcut_iters)
        # refinement steps at which inference also reports the boxes (benchmarks)
        self.refine_snapshots: Sequence[int] = ()
        # training images that gave no bag (no peak of a present class, or no proposal for it)
        self.images_without_bags = 0
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != num_classes + 1:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES ({cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}) must be "
                f"MODEL.ROI_HEADS.NUM_CLASSES + 1 ({num_classes + 1}): the object classes and "
                "background"
            )
        c = cfg.MODEL.CCGR
        return {
            "backbone": backbone,
            "roi_heads": build_roi_heads(cfg, backbone.output_shape()),
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "num_classes": num_classes,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "bag_size": c.BAG_SIZE,
            "bag_seg_weight": c.BAG_SEG_WEIGHT,
            "seed_in_bag": c.SEED_IN_BAG,
            "refine_steps": c.REFINE_STEPS,
            "refine_lr": c.REFINE_LR,
            "context_scale": c.CONTEXT_SCALE,
            "refine_grow_only": c.REFINE_GROW_ONLY,
            "refine_search": c.REFINE_SEARCH,
            "min_box_size": c.MIN_BOX_SIZE,
            "mask_threshold": c.MASK_THRESHOLD,
            "nms_threshold": c.NMS_THRESHOLD,
            "score_mode": c.SCORE_MODE,
            "segment_scale": cfg.MODEL.SEGMENTS.SCALE,
            "segment_sigma": cfg.MODEL.SEGMENTS.SIGMA,
            "segment_min_size": cfg.MODEL.SEGMENTS.MIN_SIZE,
            "mask_refine": c.MASK_REFINE,
            "grabcut_iters": c.GRABCUT_ITERS,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def _fields(self, inp: Dict, i: int):
        """(proposal Boxes, objectness B_S, peaks (P, 4)) of one input, on the device."""
        where = inp.get("file_name", f"input {i}")
        proposals = inp.get("proposals")
        if proposals is None:
            raise ValueError(f"CCGRNet: input {where} has no 'proposals' (MODEL.LOAD_PROPOSALS)")
        boxes = proposals.proposal_boxes.to(self.device)
        scores = torch.sigmoid(proposals.objectness_logits.to(self.device).float())
        peaks = inp.get("peaks")
        peaks = (
            torch.zeros(0, 4, device=self.device)
            if peaks is None
            else torch.as_tensor(peaks, dtype=torch.float32, device=self.device).reshape(-1, 4)
        )
        return boxes, scores, peaks

    def _bags(self, x: Dict, i: int, boxes: Boxes, objectness, peaks, seg_scores):
        """
        Bags of one input: from its "seed_boxes" (rounds k >= 2: the IS branch's boxes, each with
        its K proposals of highest IoU; with ``seed_in_bag`` the seed boxes join the proposals
        first, so that each bag holds its own seed box and its K - 1 nearest boxes) when
        present, else from its peaks (Eq. 4). Peaks (and seed boxes) of classes the image-level
        labels call absent are dropped first.

        Returns:
            bags (B, K), bag_labels (B,), bag_peaks (B,) rows of the returned peaks, peaks (P, 4),
            boxes: the Boxes the bags index (``boxes``, or ``boxes`` followed by the seed boxes).
        """
        keep = self._present(peaks, x)
        peaks = peaks[keep]
        seeds = x.get("seed_boxes")
        if seeds is None:
            bags, labels, rows = build_bags(
                boxes.tensor, objectness, peaks, seg_scores, self.bag_size, self.bag_seg_weight
            )
            return bags, labels, rows, peaks, boxes
        seeds = torch.as_tensor(seeds, dtype=torch.float32, device=self.device).reshape(-1, 6)
        if seeds.shape[0] != keep.shape[0]:
            raise ValueError(
                f"CCGRNet: input {x.get('file_name', i)} has {seeds.shape[0]} seed boxes but "
                f"{keep.shape[0]} peaks (one per box)"
            )
        seeds = seeds[keep]
        if self.seed_in_bag and seeds.shape[0] > 0:
            boxes = Boxes(torch.cat([boxes.tensor, seeds[:, 1:5].to(boxes.tensor.dtype)]))
        bags, labels, rows = bags_from_boxes(
            boxes.tensor, seeds[:, 1:5], seeds[:, 0].long(), self.bag_size
        )
        return bags, labels, rows, peaks, boxes

    def _seg_scores_from_labels(self, sem_seg: torch.Tensor) -> torch.Tensor:
        """(C, H, W) O from pseudo labels: 1 for the class, 0 elsewhere, 0.5 where ignored."""
        onehot = F.one_hot(sem_seg.clamp(max=self.num_classes).long(), self.num_classes + 1)
        o = onehot[..., : self.num_classes].permute(2, 0, 1).float()
        ignored = sem_seg == self.ignore_value
        return torch.where(ignored[None], torch.full_like(o, 0.5), o)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        for i, x in enumerate(batched_inputs):
            if "sem_seg" not in x:
                raise ValueError(
                    f"CCGRNet: training input {x.get('file_name', i)} has no 'sem_seg' (pseudo "
                    "labels: INPUT.CCGR.CUES_FILE)"
                )
        targets = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.ignore_value,
        ).tensor
        boxes, bags, bag_labels = [], [], []
        for i, x in enumerate(batched_inputs):
            b, s, peaks = self._fields(x, i)
            o = self._seg_scores_from_labels(x["sem_seg"].to(self.device))
            bag, label, _, _, b = self._bags(x, i, b, s, peaks, o)
            boxes.append(b)
            bags.append(bag)
            bag_labels.append(label)
            if bag.shape[0] == 0:
                if self.images_without_bags == 0:
                    logger.warning(
                        f"CCGRNet: training image {x.get('file_name', i)} gives no bag (no peak of "
                        "a present class with a proposal); such images train the SS branch only. "
                        "They are counted in 'ccgr/images_without_bags'."
                    )
                self.images_without_bags += 1
        get_event_storage().put_scalar("ccgr/images_without_bags", self.images_without_bags)
        losses = dict(self.roi_heads(features, boxes, bags, bag_labels))
        _, seg_losses = self.sem_seg_head(features, targets)
        losses.update(seg_losses)
        return losses

    def _present(self, peaks: torch.Tensor, inp: Dict) -> torch.Tensor:
        """(P,) bool: the peaks of the classes that the image-level labels say are present."""
        labels = inp.get("labels")
        if labels is None or peaks.shape[0] == 0:
            return torch.ones(peaks.shape[0], dtype=torch.bool, device=peaks.device)
        present = torch.as_tensor(labels, device=peaks.device).reshape(-1) > 0.5
        return present[peaks[:, 0].long()]

    # ---------------------------------------------------------------------------------------
    # inference

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        logits, _ = self.sem_seg_head(features, None)
        results = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            results.append(self._inference_single(features, logits, i, x, (h, w)))
        return results

    def _inference_single(self, features, logits, i, x, size) -> Dict:
        h, w = size
        out_h, out_w = int(x.get("height", h)), int(x.get("width", w))
        logits = logits[i : i + 1, :, :h, :w].float()
        if "labels" in x:
            absent = torch.as_tensor(x["labels"], device=logits.device).reshape(-1) < 0.5
            keep = torch.cat([~absent, absent.new_ones(1)])  # the background stays
            logits = logits.masked_fill(~keep[None, :, None, None], float("-inf"))
        scores_in = F.softmax(logits, dim=1)
        scores_out = F.interpolate(scores_in, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        result = {"sem_seg": scores_out}
        has_cues = "proposals" in x and "peaks" in x and "labels" in x
        if not has_cues:
            labels = torch.zeros(self.num_classes)
            present = torch.unique(scores_out.argmax(dim=0))
            labels[present[present < self.num_classes].cpu()] = 1.0
            result["instances"] = component_instances(scores_out, labels)
            return result
        boxes, objectness, peaks = self._fields(x, i)
        bags, bag_labels, bag_peaks, peaks, boxes = self._bags(
            x, i, boxes, objectness, peaks, scores_in[0, : self.num_classes]
        )
        feats = {k: v[i : i + 1] for k, v in features.items()}
        mil = self.roi_heads(feats, [boxes], [bags], [bag_labels])[0]
        member = mil["contributions"].gather(
            2, bag_labels[:, None, None].expand(-1, bags.shape[1], 1)
        )[..., 0]  # (B, K) σ_cls · σ_det for the bag's class
        mil_scores, best = member.max(dim=1)
        scale = torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h], device=self.device)
        mil_boxes = boxes.tensor[bags.gather(1, best[:, None])[:, 0]] * scale
        peaks_out = peaks.clone()
        peaks_out[:, 1] *= out_w / w
        peaks_out[:, 2] *= out_h / h
        regions = self._regions(x, (out_h, out_w))
        if bags.shape[0] == 0:
            refined = mil_boxes
            snapshots = {int(t): mil_boxes for t in self.refine_snapshots}
        else:
            refined, snapshots = self._refine(
                self._region_scores(scores_out, regions), mil_boxes, bag_labels, peaks_out,
                bag_peaks,
            )
        result["instances"] = self._pseudo_instances(
            self._region_scores(scores_out[: self.num_classes], regions),
            refined,
            bag_labels,
            mil_scores.detach(),
            x,
        )
        result["ccgr"] = {
            "classes": bag_labels,
            "peaks": peaks_out[bag_peaks],
            "bag_boxes": boxes.tensor[bags] * scale,
            "mil_boxes": mil_boxes,
            "mil_scores": mil_scores.detach(),
            "refined_boxes": refined,
            "snapshots": snapshots,
        }
        return result

    def _regions(self, x: Dict, size) -> Optional[torch.Tensor]:
        """
        (out_h, out_w) long labels of the graph-based regions of the input image (resized by
        nearest neighbour) for ``score_mode`` "regions"; None for "pixels".
        """
        if self.score_mode == "pixels":
            return None
        regions = wsis_layers.graph_segment(
            x["image"].detach().float().clamp(0, 255).cpu(), *self.segment_params
        )
        regions = F.interpolate(regions[None, None].float(), size=tuple(size), mode="nearest")
        return regions[0, 0].long().to(self.device)

    @staticmethod
    def _region_scores(scores: torch.Tensor, regions: Optional[torch.Tensor]) -> torch.Tensor:
        """The scores the refinement and the pseudo masks read: ``scores`` (K, H, W) itself, or
        their means over ``regions`` (:func:`region_mean_scores`)."""
        return scores if regions is None else region_mean_scores(scores, regions)

    def _refine(self, scores_out, boxes, classes, peaks, own):
        """CCGR refinement of one image's MIL boxes on its output-size class scores."""
        # integral images of the classes that have boxes only (float64 cumulative sums of every
        # class map would cost more than the refinement itself)
        present = torch.unique(classes)
        integral = IntegralImage(scores_out[None, present])
        local = torch.searchsorted(present, classes)
        peaks_local = peaks.clone()
        keep = torch.isin(peaks_local[:, 0].long(), present)
        peaks_local[keep, 0] = torch.searchsorted(present, peaks_local[keep, 0].long()).float()
        peaks_local[~keep, 0] = -1  # classes without boxes guard nothing
        refined, snapshots, _ = refine_boxes(
            integral,
            boxes,
            local,
            peaks_local,
            own,
            steps=self.refine_steps,
            lr=self.refine_lr,
            context_scale=self.context_scale,
            min_size=self.min_box_size,
            snapshots=self.refine_snapshots,
            grow_only=self.refine_grow_only,
            search=self.refine_search,
        )
        return refined, snapshots

    def pseudo_instances_from_boxes(
        self,
        sem_seg: torch.Tensor,
        boxes: torch.Tensor,
        classes: torch.Tensor,
        scores,
        inp: Optional[Dict] = None,
    ):
        """
        :func:`pseudo_instances` with this model's mask settings (for the ablations); ``inp``,
        the model input of the image, is needed by ``score_mode`` "regions" and ``mask_refine``
        "grabcut".
        """
        if inp is None and (self.score_mode == "regions" or self.mask_refine == "grabcut"):
            raise ValueError(
                "pseudo_instances_from_boxes: SCORE_MODE 'regions' and MASK_REFINE 'grabcut' "
                "need the input"
            )
        return self._pseudo_instances(
            self._region_scores(
                sem_seg[: self.num_classes],
                None if inp is None else self._regions(inp, sem_seg.shape[1:]),
            ),
            boxes,
            classes,
            scores,
            inp,
        )

    def _pseudo_instances(self, scores, boxes, classes, mil_scores, inp: Optional[Dict]):
        """:func:`pseudo_instances` on ``scores`` (K, height, width), then, for ``mask_refine``
        "grabcut", :func:`grabcut_masks` on the input image resized to that size."""
        inst = pseudo_instances(
            scores,
            boxes,
            classes,
            mil_scores,
            mask_threshold=self.mask_threshold,
            nms_threshold=self.nms_threshold,
        )
        if self.mask_refine == "none" or len(inst) == 0:
            return inst
        image = inp["image"].detach().float()
        if tuple(image.shape[1:]) != tuple(scores.shape[1:]):
            image = F.interpolate(
                image[None], size=tuple(scores.shape[1:]), mode="bilinear", align_corners=False
            )[0]
        inst.pred_masks = grabcut_masks(
            image,
            inst.pred_boxes.tensor,
            inst.pred_masks,
            iterations=self.grabcut_iters,
            context_scale=self.context_scale,
        )
        return assign_pixels(inst)
