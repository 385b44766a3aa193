"""
CCGR's bags (Eq. 4) as a component: :class:`BagBuilder` holds ``MODEL.CCGR.BAG_SIZE`` (K),
``BAG_SEG_WEIGHT`` (γ) and ``SEED_IN_BAG`` and builds the bags of one model input.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.structures import Boxes

from ..utils.checks import check_number
from .labels import bags_from_boxes, build_bags

__all__ = ["BagBuilder"]


class BagBuilder(nn.Module):
    """
    The bags of one image for the MIL branch. Round 1: every peak of a present class is a bag of
    that class whose instances are the K proposals that hold the peak and no other peak of its
    class, ranked by R(B) = B_S − γ · Σ_{p ∈ B}(1 − O_p) / |B| (Eq. 4, :func:`build_bags`).
    Rounds k >= 2 (an input with "seed_boxes", the IS branch's boxes): every seed box is a bag of
    its class, its instances the K proposals of highest IoU with it (:func:`bags_from_boxes`);
    with ``seed_in_bag`` the seed boxes join the proposals first, so that each bag holds its own
    seed box and its K − 1 nearest boxes. Peaks (and seed boxes) of classes that the image-level
    labels call absent are dropped first.

    ``forward(inp, boxes, objectness, peaks, seg_scores, name)``:

    - inp: the model input (its "labels" (C,) and optional "seed_boxes" (P, 6) rows
      (class, x1, y1, x2, y2, score), row p the box of peak p);
    - boxes: the proposal ``Boxes`` (R, 4); objectness: (R,) B_S in [0, 1];
    - peaks: (P, 4) rows (class, x, y, value), all in input pixels;
    - seg_scores: (C, H, W) O, the current segmentation scores (round 1 only);
    - name: the input's name in error messages.

    Returns bags (B, K) long rows into the returned boxes (−1 padding), bag_labels (B,), bag_peaks
    (B,) rows of the returned peaks, the peaks (P', 4) of present classes, and the ``Boxes`` that
    the bags index (``boxes``, or ``boxes`` followed by the seed boxes).
    """

    @configurable
    def __init__(self, *, bag_size: int = 10, seg_weight: float = 0.1, seed_in_bag: bool = True):
        """
        Args:
            bag_size: K, instances per bag.
            seg_weight: γ of Eq. 4 (0.1 in the paper).
            seed_in_bag: rounds k >= 2: each seed box is an instance of its own bag, beside the
                K − 1 boxes of highest IoU among the proposals and the other seed boxes (False:
                its K proposals of highest IoU only).
        """
        super().__init__()
        if isinstance(bag_size, bool) or int(bag_size) < 1:
            raise ValueError(f"MODEL.CCGR.BAG_SIZE must be >= 1, got {bag_size}")
        check_number("MODEL.CCGR.BAG_SEG_WEIGHT", seg_weight, low=0.0, where="BagBuilder")
        self.bag_size = int(bag_size)
        self.seg_weight = float(seg_weight)
        self.seed_in_bag = bool(seed_in_bag)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CCGR
        return {
            "bag_size": c.BAG_SIZE,
            "seg_weight": c.BAG_SEG_WEIGHT,
            "seed_in_bag": c.SEED_IN_BAG,
        }

    def extra_repr(self) -> str:
        return (
            f"bag_size={self.bag_size}, seg_weight={self.seg_weight}, "
            f"seed_in_bag={self.seed_in_bag}"
        )

    @staticmethod
    def present(peaks: torch.Tensor, inp: Dict) -> torch.Tensor:
        """(P,) bool: the peaks of the classes that the image-level labels say are present."""
        labels = inp.get("labels")
        if labels is None or peaks.shape[0] == 0:
            return torch.ones(peaks.shape[0], dtype=torch.bool, device=peaks.device)
        present = torch.as_tensor(labels, device=peaks.device).reshape(-1) > 0.5
        return present[peaks[:, 0].long()]

    def forward(
        self,
        inp: Dict,
        boxes: Boxes,
        objectness: torch.Tensor,
        peaks: torch.Tensor,
        seg_scores: Optional[torch.Tensor],
        name: str = "",
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Boxes]:
        keep = self.present(peaks, inp)
        peaks = peaks[keep]
        seeds = inp.get("seed_boxes")
        if seeds is None:
            bags, labels, rows = build_bags(
                boxes.tensor, objectness, peaks, seg_scores, self.bag_size, self.seg_weight
            )
            return bags, labels, rows, peaks, boxes
        device = boxes.tensor.device
        seeds = torch.as_tensor(seeds, dtype=torch.float32, device=device).reshape(-1, 6)
        if seeds.shape[0] != keep.shape[0]:
            raise ValueError(
                f"CCGRNet: input {name} has {seeds.shape[0]} seed boxes but {keep.shape[0]} "
                "peaks (one per box)"
            )
        seeds = seeds[keep]
        if self.seed_in_bag and seeds.shape[0] > 0:
            boxes = Boxes(torch.cat([boxes.tensor, seeds[:, 1:5].to(boxes.tensor.dtype)]))
        bags, labels, rows = bags_from_boxes(
            boxes.tensor, seeds[:, 1:5], seeds[:, 0].long(), self.bag_size
        )
        return bags, labels, rows, peaks, boxes
