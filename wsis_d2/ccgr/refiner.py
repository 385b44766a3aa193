"""
CCGR's refinement (Eq. 2–3) as a component: :class:`ContextGapRefiner` holds the settings of
``MODEL.CCGR.REFINE_*`` and runs :func:`wsis_d2.layers.refine_context_gap` on the MIL boxes of
one image.
"""

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable

from ..layers import IntegralImage, refine_context_gap
from ..utils.checks import check_number

__all__ = ["ContextGapRefiner"]


class ContextGapRefiner(nn.Module):
    """
    Center-context-gap refinement of the MIL boxes of one image (Eq. 2–3). Each box B of class c
    moves by Adam steps on its four coordinates to minimise

        L(B) = Φ_c(C) − Φ_c(B),

    Φ_c(·) the mean class score S_c over a region, C the context ring (B scaled by
    ``context_scale`` = C/B about its centre, minus B); both from integral images of S built once
    per image. A box stops where a step would take in a second peak of its class (the paper's
    guard). ``grow_only`` (``MODEL.CCGR.REFINE_GROW_ONLY``) projects the descent onto the boxes
    that contain the MIL box, ``search`` (``MODEL.CCGR.REFINE_SEARCH``) starts it from the box of
    least L that a global search over the allowed boxes finds; neither is in the paper (see
    :func:`wsis_d2.layers.refine_context_gap`).

    ``forward(score_maps, boxes, classes, peaks, own_peaks)``:

    - score_maps: (K, H, W) class scores S (e.g. the C + 1 of the SS branch), K > every class;
    - boxes: (B, 4) XYXY MIL boxes in pixels of S; classes: (B,) long;
    - peaks: (P, >= 3) rows (class, x, y, ...) of the image's peaks in pixels of S;
    - own_peaks: (B,) long row in ``peaks`` of each box's own peak (−1: none).

    Returns the refined (B, 4) boxes and {t: (B, 4)} the boxes after t steps for t in
    ``snapshots``.
    """

    @configurable
    def __init__(
        self,
        *,
        steps: int = 200,
        lr: float = 0.5,
        context_scale: float = 1.5,
        min_box_size: float = 4.0,
        grow_only: bool = True,
        search: bool = True,
        snapshots: Sequence[int] = (),
    ):
        """
        Args:
            steps: Adam steps (the paper's Fig. 4: 200).
            lr: Adam step size in pixels of S.
            context_scale: C/B, the side ratio of the context box C to the box B (1.5).
            min_box_size: boxes keep at least this width and height (pixels).
            grow_only: keep each refined box containing its MIL box (projected descent); False:
                the paper's unconstrained descent.
            search: move each box to the least L that a global search over the allowed boxes
                finds before the descent (the descent alone stalls on flat score regions);
                False: the paper's pure descent.
            snapshots: steps t (0..``steps``) after which the boxes are also returned (the
                ablations' refinement curve; not a config key).
        """
        super().__init__()
        where = "ContextGapRefiner"
        check_number("MODEL.CCGR.REFINE_STEPS", steps, low=0, integer=True, where=where)
        check_number("MODEL.CCGR.REFINE_LR", lr, low=0.0, low_open=True, where=where)
        check_number("MODEL.CCGR.CONTEXT_SCALE", context_scale, low=1.0, where=where)
        check_number("MODEL.CCGR.MIN_BOX_SIZE", min_box_size, low=0.0, where=where)
        if any(not 0 <= int(t) <= steps for t in snapshots):
            raise ValueError(
                f"{where}: snapshots must lie in [0, MODEL.CCGR.REFINE_STEPS = {steps}], got "
                f"{tuple(snapshots)}"
            )
        self.steps = int(steps)
        self.lr = float(lr)
        self.context_scale = float(context_scale)
        self.min_box_size = float(min_box_size)
        self.grow_only = bool(grow_only)
        self.search = bool(search)
        self.snapshots = tuple(int(t) for t in snapshots)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CCGR
        return {
            "steps": c.REFINE_STEPS,
            "lr": c.REFINE_LR,
            "context_scale": c.CONTEXT_SCALE,
            "min_box_size": c.MIN_BOX_SIZE,
            "grow_only": c.REFINE_GROW_ONLY,
            "search": c.REFINE_SEARCH,
        }

    def extra_repr(self) -> str:
        return (
            f"steps={self.steps}, lr={self.lr}, context_scale={self.context_scale}, "
            f"min_box_size={self.min_box_size}, grow_only={self.grow_only}, "
            f"search={self.search}, snapshots={self.snapshots}"
        )

    def forward(
        self,
        score_maps: torch.Tensor,
        boxes: torch.Tensor,
        classes: torch.Tensor,
        peaks: torch.Tensor,
        own_peaks: torch.Tensor,
    ) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        if boxes.shape[0] == 0:
            return boxes, {t: boxes for t in self.snapshots}
        # integral images of the classes that have boxes only (float64 cumulative sums of every
        # class map would cost more than the refinement itself)
        present = torch.unique(classes)
        integral = IntegralImage(score_maps[None, present])
        local = torch.searchsorted(present, classes)
        peaks_local = peaks.clone()
        keep = torch.isin(peaks_local[:, 0].long(), present)
        peaks_local[keep, 0] = torch.searchsorted(present, peaks_local[keep, 0].long()).float()
        peaks_local[~keep, 0] = -1  # classes without boxes guard nothing
        refined, snapshots, _ = refine_context_gap(
            integral,
            boxes,
            local,
            peaks_local,
            own_peaks,
            steps=self.steps,
            lr=self.lr,
            context_scale=self.context_scale,
            min_size=self.min_box_size,
            snapshots=self.snapshots,
            grow_only=self.grow_only,
            search=self.search,
        )
        return refined, snapshots
