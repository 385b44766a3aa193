"""
Losses of density-map regression: the pixel-wise squared error (Lempitsky & Zisserman 2010; Xie et
al. 2016) and a local count loss over windows; :class:`DensityLoss` applies both to a batch.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.utils.events import get_event_storage

from ..utils.checks import check_tensor

__all__ = ["DensityLoss", "density_mse_loss", "density_window_count_loss"]


def density_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Pixel-wise squared error of the scaled density (Lempitsky & Zisserman 2010, Eq. 5 with the
    Euclidean distance; Xie et al. 2016):

        L = 1 / (C·|Ω|) Σ_n Σ_c Σ_{p ∈ Ω_n} (F_c(p; X_n) − s·D_c^n(p))²,

    averaged over the valid pixels Ω (inside the image and its ROI, not padding).

    Args:
        pred: (N, C, H, W) network output F.
        target: (N, C, H, W) scaled target s·D.
        valid: (N, 1, H, W) 0/1 mask of Ω, or None (all pixels).

    Returns:
        scalar loss.
    """
    check_tensor("pred", pred, ndim=4, where="density_mse_loss")
    check_tensor("target", target, tuple(pred.shape), where="density_mse_loss")
    if valid is not None:
        n, _, h, w = pred.shape
        check_tensor("valid", valid, (n, 1, h, w), where="density_mse_loss")
    err = (pred - target) ** 2
    if valid is None:
        return err.mean()
    valid = valid.to(err.dtype)
    denom = (valid.sum() * pred.shape[1]).clamp_min(1.0)
    return (err * valid).sum() / denom


def density_window_count_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    window: int = 16,
    scale: float = 1.0,
) -> torch.Tensor:
    """
    Local count loss: the squared error of the counts in a grid of non-overlapping w×w windows
    W_k (the training-time counterpart of GAME),

        L_cnt = 1 / (C·K) Σ_n Σ_c Σ_k ( Σ_{p ∈ W_k ∩ Ω} (F_c(p) − s·D_c(p)) / s )²,

    in units of objects². Windows at the right and bottom edges may be partial; windows without
    any valid pixel do not count in K.

    Args:
        pred: (N, C, H, W) network output F.
        target: (N, C, H, W) scaled target s·D.
        valid: (N, 1, H, W) 0/1 mask of Ω, or None (all pixels).
        window: w, window side in pixels.
        scale: s.

    Returns:
        scalar loss.
    """
    if window < 1:
        raise ValueError(f"count-loss window must be >= 1, got {window}")
    diff = pred - target
    area = torch.ones_like(pred[:, :1]) if valid is None else valid.to(diff.dtype)
    diff = diff * area
    # window sums (divisor 1; ceil_mode keeps the partial windows at the edges)
    sums = F.avg_pool2d(diff, window, window, ceil_mode=True, divisor_override=1) / scale
    covered = F.avg_pool2d(area, window, window, ceil_mode=True, divisor_override=1) > 0
    err = (sums**2) * covered
    denom = (covered.sum() * pred.shape[1]).clamp_min(1)
    return err.sum() / denom




class DensityLoss:
    """
    The training losses of a density regressor: λ·L (:func:`density_mse_loss`) and, with μ > 0,
    μ·L_cnt (:func:`density_window_count_loss`). Also logs the batch's count error, its true
    count and the loss of the best constant output (a loss that stays at it means a collapsed
    model: ``wsis_d2.engine.health.CountHealthCheck``).
    """

    @configurable
    def __init__(
        self,
        *,
        loss_weight: float = 1.0,
        count_loss_weight: float = 0.0,
        count_loss_window: int = 16,
        scale: float = 100.0,
    ):
        """
        Args:
            loss_weight: λ of the MSE loss.
            count_loss_weight: μ of the local count loss (0: off).
            count_loss_window: its window side w (pixels).
            scale: s of the scaled density the network regresses.
        """
        self.loss_weight = float(loss_weight)
        self.count_loss_weight = float(count_loss_weight)
        self.count_loss_window = int(count_loss_window)
        if self.count_loss_window < 1:
            raise ValueError(
                f"MODEL.DENSITY.COUNT_LOSS_WINDOW must be >= 1, got {count_loss_window}"
            )
        self.scale = float(scale)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DENSITY
        return {
            "loss_weight": d.LOSS_WEIGHT,
            "count_loss_weight": d.COUNT_LOSS_WEIGHT,
            "count_loss_window": d.COUNT_LOSS_WINDOW,
            "scale": d.SCALE,
        }

    def __call__(
        self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            pred: (N, C, H, W) network output F; target: (N, C, H, W) s·D; valid: (N, 1, H, W) Ω.

        Returns:
            {"loss_density"} and, with μ > 0, {"loss_density_count"}.
        """
        loss = density_mse_loss(pred, target, valid)
        with torch.no_grad():
            # both over the pixels of the loss (Ω), so that crop cuts left out of it do not
            # count as errors
            pred_counts = (pred.detach() * valid).sum(dim=(1, 2, 3)) / self.scale
            true_counts = (target * valid).sum(dim=(1, 2, 3)) / self.scale
            storage = get_event_storage()
            storage.put_scalar("density/count_mae", (pred_counts - true_counts).abs().mean())
            storage.put_scalar("density/true_count", true_counts.mean())
            # the loss of the best constant output (per class the mean target over Ω)
            mean_c = (target * valid).sum(dim=(0, 2, 3)) / valid.sum().clamp_min(1.0)
            constant = mean_c[None, :, None, None].expand_as(target)
            storage.put_scalar(
                "density/loss_constant",
                self.loss_weight * float(density_mse_loss(constant, target, valid)),
            )
        losses = {"loss_density": self.loss_weight * loss}
        if self.count_loss_weight > 0:
            losses["loss_density_count"] = self.count_loss_weight * density_window_count_loss(
                pred, target, valid, self.count_loss_window, self.scale
            )
        return losses
