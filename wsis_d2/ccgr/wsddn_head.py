"""
CCGR's MIL branch: WSDDN (Bilen & Vedaldi, CVPR 2016) over peak bags, as detectron2 ROI heads.

Proposal features come from detectron2's ``ROIPooler`` (ROIAlign on the shared backbone's
``MODEL.ROI_HEADS.IN_FEATURES``, levels assigned by box size as in Mask R-CNN) and box head
(``MODEL.ROI_BOX_HEAD.NAME``, e.g. ``FastRCNNConvFCHead`` with ``NUM_FC`` fully connected layers);
two linear layers give x^cls and x^det (R, C). The bags and the loss are in
:func:`wsis_d2.ccgr.labels.build_bags` and :mod:`wsis_d2.ccgr.wsddn_loss`.
"""

from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import build_box_head
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage

from ..utils.dist import mean_over_processes
from .wsddn_loss import wsddn_bag_scores, wsddn_loss

__all__ = ["WSDDNROIHeads"]


@ROI_HEADS_REGISTRY.register()
class WSDDNROIHeads(nn.Module):
    """
    WSDDN over bags. ``forward(features, proposal_boxes, bags, bag_labels)``:

    - features: {name: (N, C_f, h, w)} backbone outputs;
    - proposal_boxes: list of N ``Boxes`` (R_i, 4) in input pixels;
    - bags: list of N (B_i, K) long rows into that image's proposals, −1 padding;
    - bag_labels: list of N (B_i,) long classes.

    Training: {"loss_mil": L_MIL}. Inference: per image a dict with "phi" (B_i, C) bag scores and
    "contributions" (B_i, K, C) (see :func:`wsddn_bag_scores`).
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        box_pooler: ROIPooler,
        box_head: nn.Module,
        num_classes: int,
        eps: float = 1e-6,
        loss_normalization: str = "bags",
        loss_weight: float = 1.0,
    ):
        """
        Args:
            in_features: backbone features pooled.
            box_pooler: detectron2 ROIPooler over them.
            box_head: maps pooled features to (R, D) vectors (``output_shape.channels`` D).
            num_classes: C object classes.
            eps: ε of the clamp of φ_B.
            loss_normalization: "bags" or "none" (see :func:`wsddn_loss`).
            loss_weight: weight of ``loss_mil``.
        """
        super().__init__()
        self.in_features = list(in_features)
        self.box_pooler = box_pooler
        self.box_head = box_head
        dim = box_head.output_shape.channels
        self.num_classes = int(num_classes)
        self.cls_score = nn.Linear(dim, self.num_classes)
        self.det_score = nn.Linear(dim, self.num_classes)
        for layer in (self.cls_score, self.det_score):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        self.eps = float(eps)
        self.loss_normalization = loss_normalization
        self.loss_weight = float(loss_weight)
        wsddn_loss(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), self.eps, loss_normalization)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.ROI_HEADS.IN_FEATURES: {missing} are not backbone outputs "
                f"{sorted(input_shape)}"
            )
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES {in_features} differ in channels")
        res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        pooler = ROIPooler(
            output_size=res,
            scales=tuple(1.0 / input_shape[f].stride for f in in_features),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        head = build_box_head(cfg, ShapeSpec(channels=channels.pop(), height=res, width=res))
        w = cfg.MODEL.CCGR.WSDDN
        return {
            "in_features": in_features,
            "box_pooler": pooler,
            "box_head": head,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "eps": w.EPS,
            "loss_normalization": w.LOSS_NORMALIZATION,
            "loss_weight": w.LOSS_WEIGHT,
        }

    def proposal_logits(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]):
        """(x^cls, x^det), each (Σ R_i, C) float32, for the proposals of all images."""
        x = self.box_pooler([features[f] for f in self.in_features], boxes)
        x = self.box_head(x)
        return self.cls_score(x).float(), self.det_score(x).float()

    def forward(self, features, proposal_boxes: List[Boxes], bags, bag_labels):
        # only the proposals that are in some bag are pooled: a few dozen instead of thousands
        used, offset, all_bags = [], 0, []
        for boxes, b in zip(proposal_boxes, bags):
            rows = torch.unique(b[b >= 0])
            remap = torch.full((len(boxes),), -1, dtype=torch.long, device=b.device)
            remap[rows] = torch.arange(rows.numel(), device=b.device) + offset
            all_bags.append(torch.where(b >= 0, remap[b.clamp_min(0)], b))
            used.append(boxes[rows])
            offset += rows.numel()
        k = max([b.shape[1] for b in bags], default=1)
        all_bags = [torch.nn.functional.pad(b, (0, k - b.shape[1]), value=-1) for b in all_bags]
        if offset > 0:
            cls_logits, det_logits = self.proposal_logits(features, used)
        else:
            dev = next(iter(features.values())).device
            cls_logits = det_logits = torch.zeros(0, self.num_classes, device=dev)
        cat_bags = torch.cat(all_bags) if all_bags else torch.zeros(0, k, dtype=torch.long)
        phi, contributions = wsddn_bag_scores(cls_logits, det_logits, cat_bags)
        if self.training:
            labels = torch.cat(list(bag_labels)) if bag_labels else phi.new_zeros(0).long()
            # every process's bags count alike: divide by the mean number over the processes
            num_bags = mean_over_processes(torch.tensor(float(phi.shape[0]))).item()
            loss = wsddn_loss(phi, labels, self.eps, self.loss_normalization, num_bags)
            if offset == 0:
                # no bag in the batch: a zero loss still connected to every parameter
                loss = loss + sum(p.sum() * 0.0 for p in self.parameters())
            storage = get_event_storage()
            storage.put_scalar("wsddn/bags_per_image", phi.shape[0] / max(1, len(bags)))
            if phi.shape[0] > 0:
                storage.put_scalar(
                    "wsddn/bag_score", phi.gather(1, labels[:, None]).mean().detach()
                )
            return {"loss_mil": loss * self.loss_weight}
        out, start = [], 0
        for b in bags:
            n = b.shape[0]
            out.append({"phi": phi[start : start + n], "contributions": contributions[start : start + n]})
            start += n
        return out
