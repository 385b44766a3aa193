"""
CCGR's MIL branch: WSDDN (Bilen & Vedaldi, CVPR 2016) over peak bags, as detectron2 ROI heads.

Proposal features come from detectron2's ``ROIPooler`` (ROIAlign on the shared backbone's
``MODEL.ROI_HEADS.IN_FEATURES``, levels assigned by box size as in Mask R-CNN) and box head
(``MODEL.ROI_BOX_HEAD.NAME``, e.g. ``FastRCNNConvFCHead`` with ``NUM_FC`` fully connected layers);
:class:`WSDDNOutputLayers` (the ROI heads' ``box_predictor``, as detectron2's
``FastRCNNOutputLayers``) owns the two streams x^cls and x^det (R, C), the bag scores, the loss
and the inference. The bags are built by :class:`wsis_d2.ccgr.bags.BagBuilder`, the functions of
the scores and the loss are in :mod:`wsis_d2.ccgr.wsddn_loss`.
"""

from typing import Dict, List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import build_box_head
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage

from ..utils.checks import check_number
from ..utils.dist import mean_over_processes
from .wsddn_loss import wsddn_bag_scores, wsddn_loss

__all__ = ["WSDDNOutputLayers", "WSDDNROIHeads"]


class WSDDNOutputLayers(nn.Module):
    """
    WSDDN's two streams over the box features of the proposals, x^cls = W_cls·x and
    x^det = W_det·x (R, C), and what follows from them: the bag scores φ_B
    (:func:`wsddn_bag_scores`), the loss L_MIL (:func:`wsddn_loss`) in training and the bag scores
    with each member's contribution at inference.

    ``bags`` below is a list over the N images of (B_i, K_i) long rows into the rows of
    ``predictions`` (the proposals of all images), −1 padding; ``bag_labels`` a list of (B_i,)
    long classes.
    """

    @configurable
    def __init__(
        self,
        input_shape: Union[ShapeSpec, int],
        *,
        num_classes: int,
        eps: float = 1e-6,
        loss_normalization: str = "bags",
        loss_weight: float = 1.0,
    ):
        """
        Args:
            input_shape: shape of the box head's output (its features are flattened).
            num_classes: C object classes (no background class: a bag's φ_B is over C).
            eps: ε of the clamp of φ_B.
            loss_normalization: "bags" or "none" (see :func:`wsddn_loss`).
            loss_weight: weight of ``loss_mil``.
        """
        super().__init__()
        if isinstance(input_shape, int):
            input_shape = ShapeSpec(channels=input_shape)
        dim = input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
        self.num_classes = int(num_classes)
        self.cls_score = nn.Linear(dim, self.num_classes)
        self.det_score = nn.Linear(dim, self.num_classes)
        for layer in (self.cls_score, self.det_score):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        if loss_normalization not in ("bags", "none"):
            raise ValueError(
                "MODEL.CCGR.WSDDN.LOSS_NORMALIZATION must be 'bags' or 'none', got "
                f"{loss_normalization!r}"
            )
        if not 0.0 < eps < 0.5:
            raise ValueError(f"MODEL.CCGR.WSDDN.EPS must be in (0, 0.5), got {eps}")
        check_number(
            "MODEL.CCGR.WSDDN.LOSS_WEIGHT", loss_weight, low=0.0, where="WSDDNOutputLayers"
        )
        self.eps = float(eps)
        self.loss_normalization = loss_normalization
        self.loss_weight = float(loss_weight)

    @classmethod
    def from_config(cls, cfg, input_shape):
        w = cfg.MODEL.CCGR.WSDDN
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "eps": w.EPS,
            "loss_normalization": w.LOSS_NORMALIZATION,
            "loss_weight": w.LOSS_WEIGHT,
        }

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (R, ...) box features of R proposals.

        Returns:
            (x^cls, x^det), each (R, C) float32 (also under autocast: the softmaxes of the bag
            scores need it).
        """
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return self.cls_score(x).float(), self.det_score(x).float()

    def bag_scores(
        self, predictions: Tuple[torch.Tensor, torch.Tensor], bags: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        φ_B of every bag of the batch (:func:`wsddn_bag_scores`), the images' bags padded to
        one K = max K_i.

        Returns:
            phi (Σ B_i, C), contributions (Σ B_i, K, C).
        """
        k = max([b.shape[1] for b in bags], default=1)
        bags = [F.pad(b, (0, k - b.shape[1]), value=-1) for b in bags]
        cat_bags = torch.cat(bags) if bags else torch.zeros(0, k, dtype=torch.long)
        return wsddn_bag_scores(*predictions, cat_bags)

    def losses(
        self,
        predictions: Tuple[torch.Tensor, torch.Tensor],
        bags: List[torch.Tensor],
        bag_labels: List[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            predictions: return value of :meth:`forward`.
            bags, bag_labels: see the class docstring.

        Returns:
            {"loss_mil": L_MIL · ``loss_weight``}; logs "wsddn/bags_per_image" and
            "wsddn/bag_score" (mean φ_B of the bags' classes).
        """
        phi, _ = self.bag_scores(predictions, bags)
        labels = torch.cat(list(bag_labels)) if bag_labels else phi.new_zeros(0).long()
        # every process's bags count alike: divide by the mean number over the processes
        num_bags = mean_over_processes(torch.tensor(float(phi.shape[0]))).item()
        loss = wsddn_loss(phi, labels, self.eps, self.loss_normalization, num_bags)
        storage = get_event_storage()
        storage.put_scalar("wsddn/bags_per_image", phi.shape[0] / max(1, len(bags)))
        if phi.shape[0] > 0:
            storage.put_scalar("wsddn/bag_score", phi.gather(1, labels[:, None]).mean().detach())
        return {"loss_mil": loss * self.loss_weight}

    def inference(
        self, predictions: Tuple[torch.Tensor, torch.Tensor], bags: List[torch.Tensor]
    ) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            predictions: return value of :meth:`forward`.
            bags: see the class docstring.

        Returns:
            per image {"phi": (B_i, C) φ_B, "contributions": (B_i, K, C) σ_cls ⊙ σ_det of each
            member, K = max K_i} (see :func:`wsddn_bag_scores`).
        """
        phi, contributions = self.bag_scores(predictions, bags)
        out, start = [], 0
        for b in bags:
            n = b.shape[0]
            out.append(
                {"phi": phi[start : start + n], "contributions": contributions[start : start + n]}
            )
            start += n
        return out


@ROI_HEADS_REGISTRY.register()
class WSDDNROIHeads(nn.Module):
    """
    WSDDN over bags. ``forward(features, proposal_boxes, bags, bag_labels)``:

    - features: {name: (N, C_f, h, w)} backbone outputs;
    - proposal_boxes: list of N ``Boxes`` (R_i, 4) in input pixels;
    - bags: list of N (B_i, K) long rows into that image's proposals, −1 padding;
    - bag_labels: list of N (B_i,) long classes.

    Training: {"loss_mil": L_MIL}. Inference: per image a dict with "phi" (B_i, C) bag scores and
    "contributions" (B_i, K, C) (:meth:`WSDDNOutputLayers.inference`).
    """

    # 2: x^cls and x^det in ``box_predictor`` (1: "cls_score" and "det_score" of the heads)
    _version = 2

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        box_pooler: ROIPooler,
        box_head: nn.Module,
        box_predictor: nn.Module,
    ):
        """
        Args:
            in_features: backbone features pooled.
            box_pooler: detectron2 ROIPooler over them.
            box_head: maps pooled features to box features (``output_shape``).
            box_predictor: :class:`WSDDNOutputLayers` on the box features.
        """
        super().__init__()
        self.in_features = list(in_features)
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor

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
        return {
            "in_features": in_features,
            "box_pooler": pooler,
            "box_head": head,
            "box_predictor": WSDDNOutputLayers(cfg, head.output_shape),
        }

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # checkpoints of version 1 (written before WSDDNOutputLayers) keep loading; by key, not
        # by version, so that a state dict without its metadata converts too
        for old in [k for k in state_dict if k.startswith(prefix)]:
            name = old[len(prefix) :]
            if name.split(".")[0] in ("cls_score", "det_score"):
                state_dict[f"{prefix}box_predictor.{name}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def proposal_logits(
        self, features: Dict[str, torch.Tensor], boxes: List[Boxes]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x^cls, x^det), each (Σ R_i, C) float32, for the proposals of all images."""
        x = self.box_pooler([features[f] for f in self.in_features], boxes)
        return self.box_predictor(self.box_head(x))

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
        if offset > 0:
            predictions = self.proposal_logits(features, used)
        else:
            dev = next(iter(features.values())).device
            empty = torch.zeros(0, self.box_predictor.num_classes, device=dev)
            predictions = (empty, empty)
        if not self.training:
            return self.box_predictor.inference(predictions, all_bags)
        losses = self.box_predictor.losses(predictions, all_bags, bag_labels)
        if offset == 0:
            # no bag in the batch: a zero loss still connected to every parameter (DDP)
            zero = sum(p.sum() * 0.0 for p in self.parameters())
            losses = {k: v + zero for k, v in losses.items()}
        return losses
