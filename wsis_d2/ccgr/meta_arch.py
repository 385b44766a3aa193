"""
``CCGRNet``: the MIL and SS branches of CCGR ("Center-context-gap Refinement for Weakly Supervised
Instance Segmentation", AAAI 2020) on one shared backbone, trained from image-level labels and
the round's cues; its inference turns a training image into pseudo instance labels.

Components, each built by its own ``from_config``:

- backbone: any detectron2 backbone (the configs use MobileNetV2-FPN);
- MIL branch: :class:`wsis_d2.ccgr.wsddn_head.WSDDNROIHeads` (``MODEL.ROI_HEADS.NAME``) with
  :class:`wsis_d2.ccgr.wsddn_head.WSDDNOutputLayers`, over the bags of
  :class:`wsis_d2.ccgr.bags.BagBuilder` (Eq. 4);
- SS branch: a ``SEM_SEG_HEADS_REGISTRY`` head (``MODEL.SEM_SEG_HEAD.NAME``, e.g. ``PSPHead``)
  over C object classes + background, trained on the pseudo semantic labels;
- inference: :class:`wsis_d2.ccgr.refiner.ContextGapRefiner` (Eq. 2–3) on the MIL boxes, then
  :class:`wsis_d2.ccgr.pseudo_labeller.PseudoLabeller` from the refined boxes to pseudo instances.

The instance-segmentation branch of CCGR is the stock Mask R-CNN, trained on this model's pseudo
labels (it is a separate detectron2 model).
"""

import logging
from typing import Dict, List, Sequence

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
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage

from .bags import BagBuilder
from .labels import IGNORE
from .pseudo_labeller import PseudoLabeller
from .refiner import ContextGapRefiner

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
    - "instances": the pseudo instances of the refined MIL boxes (``labeller``), or, for an input
      without peaks or labels, the connected components of the segmentation;
    - "ccgr": {"classes", "peaks" (rows of the output-size peaks), "bag_boxes" (B, K, 4) the
      boxes of each bag, "mil_boxes", "mil_scores",
      "refined_boxes", "snapshots" {step: boxes} (the refiner's ``snapshots``)} at the output
      size, for the ablations.

    An ablation runs a trained model under another setting through a model that shares all its
    modules but the component of that setting (:meth:`replace`), built from a clone of the config,
    e.g. ``model.replace(refiner=ContextGapRefiner(cfg_variant))`` with
    ``MODEL.CCGR.REFINE_GROW_ONLY`` changed in ``cfg_variant``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        roi_heads: nn.Module,
        sem_seg_head: nn.Module,
        bag_builder: BagBuilder,
        refiner: ContextGapRefiner,
        labeller: PseudoLabeller,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        ignore_value: int = IGNORE,
    ):
        """
        Args:
            backbone, roi_heads, sem_seg_head: the shared backbone and the MIL and SS branches.
            bag_builder: the bags of the MIL branch (Eq. 4).
            refiner: the refinement of the MIL boxes (Eq. 2–3).
            labeller: refined boxes and S -> pseudo instances.
            num_classes: C object classes (the SS head predicts C + 1).
            pixel_mean, pixel_std: input normalisation.
            ignore_value: the ignore label of the pseudo semantic labels.
        """
        super().__init__()
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.sem_seg_head = sem_seg_head
        self.bag_builder = bag_builder
        self.refiner = refiner
        self.labeller = labeller
        self.num_classes = int(num_classes)
        self.ignore_value = int(ignore_value)
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
        return {
            "backbone": backbone,
            "roi_heads": build_roi_heads(cfg, backbone.output_shape()),
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "bag_builder": BagBuilder(cfg),
            "refiner": ContextGapRefiner(cfg),
            "labeller": PseudoLabeller(cfg),
            "num_classes": num_classes,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def replace(self, **components) -> "CCGRNet":
        """
        A CCGRNet with ``components`` (keyword arguments of ``__init__``) in place of this
        model's, sharing every other module (and so the trained weights) with this one, on its
        device and in its mode. This model is not changed.
        """
        parts = {
            "backbone": self.backbone,
            "roi_heads": self.roi_heads,
            "sem_seg_head": self.sem_seg_head,
            "bag_builder": self.bag_builder,
            "refiner": self.refiner,
            "labeller": self.labeller,
            "num_classes": self.num_classes,
            "pixel_mean": self.pixel_mean.flatten().tolist(),
            "pixel_std": self.pixel_std.flatten().tolist(),
            "ignore_value": self.ignore_value,
        }
        unknown = sorted(set(components) - set(parts))
        if unknown:
            raise ValueError(f"CCGRNet.replace: {unknown} are not components of CCGRNet")
        parts.update(components)
        return type(self)(**parts).to(self.device).train(self.training)

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
            bag, label, _, _, b = self.bag_builder(x, b, s, peaks, o, x.get("file_name", i))
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
        scores_out = F.interpolate(
            scores_in, size=(out_h, out_w), mode="bilinear", align_corners=False
        )[0]
        result = {"sem_seg": scores_out}
        if not ("proposals" in x and "peaks" in x and "labels" in x):
            result["instances"] = self.labeller.component_instances(scores_out)
            return result
        boxes, objectness, peaks = self._fields(x, i)
        bags, bag_labels, bag_peaks, peaks, boxes = self.bag_builder(
            x, boxes, objectness, peaks, scores_in[0, : self.num_classes], x.get("file_name", i)
        )
        feats = {k: v[i : i + 1] for k, v in features.items()}
        mil = self.roi_heads(feats, [boxes], [bags], [bag_labels])[0]
        # (B, K) σ_cls · σ_det of each member for the bag's class
        index = bag_labels[:, None, None].expand(-1, bags.shape[1], 1)
        member = mil["contributions"].gather(2, index)[..., 0]
        mil_scores, best = member.max(dim=1)
        scale = torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h], device=self.device)
        mil_boxes = boxes.tensor[bags.gather(1, best[:, None])[:, 0]] * scale
        peaks_out = peaks.clone()
        peaks_out[:, 1] *= out_w / w
        peaks_out[:, 2] *= out_h / h
        # the S that both the refinement and the masks read (per pixel or per image region)
        s = self.labeller.score_maps(scores_out, x)
        refined, snapshots = self.refiner(s, mil_boxes, bag_labels, peaks_out, bag_peaks)
        result["instances"] = self.labeller.instances(
            s[: self.num_classes], refined, bag_labels, mil_scores.detach(), x
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
