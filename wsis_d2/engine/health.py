"""
Training health of the counting models (density regressors and LC / ILC).

A counting network can collapse to a constant output early in training (a U-Net on VGG cells did:
every image counted 168.2). Its loss then stays at the loss of the best constant output, its
predicted counts on the training images have no spread, and a count calibration fitted on them
maps the constant to the mean training count, which gives an ordinary-looking MAE. This module
tells such a model apart at the end of training and logs a WARNING saying what to try; the count
calibrations (:mod:`wsis_d2.lc.calibration`, :mod:`wsis_d2.density.calibration`) refuse to calibrate a collapsed class.
"""

import logging
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.engine import HookBase

from ..utils.dist import unwrap

__all__ = [
    "COLLAPSE_ADVICE",
    "collapsed_classes",
    "loss_at_constant_output",
    "warn_collapsed",
    "CountHealthCheck",
]

logger = logging.getLogger(__name__)

COLLAPSE_ADVICE = (
    "try a lower SOLVER.BASE_LR (or a longer warm-up), check MODEL.PIXEL_MEAN / MODEL.PIXEL_STD "
    "against the images' value range, and check the targets' scale (MODEL.DENSITY.SCALE)"
)

# predicted counts whose spread over the images is below this fraction of the true counts'
# spread count as constant: a working model's spread is of the order of the truth's
SPREAD_RATIO = 0.05
# a final loss within this fraction of the best constant output's loss has learnt nothing
LOSS_RATIO = 0.98


def _flat(p: torch.Tensor, t: torch.Tensor, ratio: float) -> torch.Tensor:
    """(C,) bool: cv(p_c) <= ratio · cv(t_c) where std_i(t_ic) > 0, with cv = std / |mean| over
    the images (compared without dividing, so that an all-zero prediction counts as flat)."""
    p_std, t_std = p.std(dim=0), t.std(dim=0)
    p_mean, t_mean = p.mean(dim=0).abs(), t.mean(dim=0).abs()
    # relative spreads: an uncalibrated model whose counts are off by a factor is not flat
    return (t_std > 0) & (p_std * t_mean <= ratio * t_std * p_mean)


def collapsed_classes(
    pred: torch.Tensor,
    true: torch.Tensor,
    areas: Optional[torch.Tensor] = None,
    ratio: float = SPREAD_RATIO,
) -> List[int]:
    """
    The classes whose predicted counts have (almost) no spread over the images although the true
    counts do: cv_i(ĉ_ic) <= ratio · cv_i(c_ic) with std_i(c_ic) > 0, where cv = std / |mean| is
    the spread relative to the mean (uncalibrated counts may be off by a factor); with
    ``areas``, also those whose predicted count per pixel ĉ_ic / |Ω_i| has none while the true
    c_ic / |Ω_i| has (a constant output map on images of different sizes).

    Args:
        pred: (N, C) predicted counts ĉ_ic of N images. true: (N, C) true counts c_ic.
        areas: (N,) |Ω_i|, the counted pixels of each image, or None.
        ratio: the spread ratio under which a class counts as collapsed.

    Returns:
        the collapsed classes c (empty with fewer than 2 images: no spread to measure).
    """
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(true, dtype=torch.float64)
    if p.dim() != 2 or p.shape != t.shape:
        raise ValueError(
            f"collapsed_classes: 'pred' and 'true' must both be (N, C), got {tuple(p.shape)} and "
            f"{tuple(t.shape)}"
        )
    if p.shape[0] < 2:
        return []
    if not bool(torch.isfinite(p).all()):
        # NaN counts are a collapse of their own: report every class
        return list(range(p.shape[1]))
    flat = _flat(p, t, ratio)
    if areas is not None:
        a = torch.as_tensor(areas, dtype=torch.float64).reshape(-1, 1)
        if a.shape[0] != p.shape[0] or not bool((a > 0).all()):
            raise ValueError(
                f"collapsed_classes: 'areas' must be ({p.shape[0]},) positive pixel counts, got "
                f"shape {tuple(a.shape[:1])}"
            )
        flat |= _flat(p / a, t / a, ratio)
    return [c for c in range(p.shape[1]) if bool(flat[c])]


def loss_at_constant_output(
    losses: Sequence[float], constant_losses: Sequence[float], ratio: float = LOSS_RATIO
) -> bool:
    """
    Whether the training loss of the last iterations sits at the loss of the best constant output
    on the same batches: median(losses) >= ratio · median(constant_losses).

    Args:
        losses: the loss of the last iterations. constant_losses: the best constant output's loss
            on the same iterations (e.g. ``density/loss_constant``).
    """
    if len(losses) == 0 or len(constant_losses) == 0:
        return False
    floor = float(np.median(constant_losses))
    return floor > 0 and float(np.median(losses)) >= ratio * floor


def warn_collapsed(what: str, classes: Sequence[int], pred: torch.Tensor, true: torch.Tensor):
    """One WARNING line naming the collapsed classes, their counts and what to try."""
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(true, dtype=torch.float64)
    parts = [
        f"class {c}: predicted {float(p[:, c].mean()):.4g} +- {float(p[:, c].std()):.2g}, true "
        f"{float(t[:, c].mean()):.4g} +- {float(t[:, c].std()):.2g}"
        for c in classes
    ]
    logger.warning(
        "%s: the model has COLLAPSED to a constant count on %d training images (%s); %s",
        what,
        p.shape[0],
        "; ".join(parts),
        COLLAPSE_ADVICE,
    )


class CountHealthCheck(HookBase):
    """
    After the last training iteration of a counting model: a WARNING when the loss of the last
    iterations sits at the loss of the best constant output (models that log
    ``density/loss_constant``), and when the counts predicted on up to ``max_images`` training
    images have no spread. The method package that adds the hook says how its model counts.
    """

    def __init__(
        self,
        cfg,
        count_predictions: Optional[Callable] = None,
        what: str = "training",
        max_images: int = 32,
        window: int = 20,
    ):
        """
        Args:
            cfg: the training config.
            count_predictions: ``fn(net, cfg, max_images) -> (pred, true, areas)``, per-image
                lists of predicted (C,) and true (C,) counts and of the count of a unit density
                (a constant output's counts grow with it); None: no spread check (a count
                calibration checks its own images).
            what: the name of the run in the warning, e.g. "LC training".
            max_images: training images of the spread check, evenly spaced.
            window: last iterations of the loss check.
        """
        self._cfg = cfg.clone()
        self._count_predictions = count_predictions
        self._what = what
        self._max_images = int(max_images)
        self._window = int(window)
        self.report: Dict[str, object] = {}

    def _loss_check(self) -> None:
        history = self.trainer.storage.histories()
        if "loss_density" not in history or "density/loss_constant" not in history:
            return
        losses = [v for v, _ in history["loss_density"].values()[-self._window :]]
        floor = [v for v, _ in history["density/loss_constant"].values()[-self._window :]]
        collapsed = loss_at_constant_output(losses, floor)
        self.report["loss_at_constant"] = collapsed
        if collapsed:
            logger.warning(
                "%s: the loss of the last %d iterations (median %.4g) sits at the loss of the "
                "best constant output (median %.4g): the model has COLLAPSED to a constant "
                "output; %s",
                self._what,
                len(losses),
                float(np.median(losses)),
                float(np.median(floor)),
                COLLAPSE_ADVICE,
            )

    def _spread_check(self) -> None:
        model = self.trainer.model
        net = unwrap(model)
        pred, true, areas = self._count_predictions(net, self._cfg, self._max_images)
        if not pred:
            return
        p, t = torch.stack(pred), torch.stack(true).double()
        collapsed = collapsed_classes(p, t, torch.tensor(areas, dtype=torch.float64))
        self.report["collapsed_classes"] = collapsed
        if collapsed:
            warn_collapsed(self._what, collapsed, p, t)

    def after_step(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            return
        self._loss_check()
        if self._count_predictions is not None:
            self._spread_check()
