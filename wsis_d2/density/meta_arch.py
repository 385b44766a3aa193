"""
Point-supervised density-map counting: Lempitsky & Zisserman, "Learning to count objects in images"
(NIPS 2010), with the fully convolutional regressors of Xie et al. (FCRN-A/B, 2016) and U-Net.

Each annotated point P_i contributes a Gaussian kernel to the target density, D(p) = Σ_i N(p; P_i,
σ_i²I), so that the count of any region is the integral of D over it. The network F regresses the
scaled map s·D; the count of class c is ∫ F_c / s.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..utils.checks import (
    check_finite,
    check_floating_dtype,
    check_integer_dtype,
    check_number,
    check_tensor,
)

__all__ = [
    "DensityCounter",
    "gaussian_density_map",
    "adaptive_sigmas",
    "density_mse_loss",
    "fit_count_calibration",
]

CALIBRATION_MODES = ("none", "gain", "affine")


def check_calibration_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`CALIBRATION_MODES`, else a ValueError naming the field."""
    if mode not in CALIBRATION_MODES:
        raise ValueError(
            f"MODEL.DENSITY.CALIBRATION.MODE must be one of {CALIBRATION_MODES}, got {mode!r}"
        )
    return mode


def adaptive_sigmas(
    points: torch.Tensor,
    k: int,
    beta: float,
    default_sigma: float,
    sigma_range: Tuple[float, float] = (1.0, 20.0),
) -> torch.Tensor:
    """
    Geometry-adaptive kernel widths (Zhang et al., "Single-image crowd counting via multi-column
    CNN", CVPR 2016): σ_i = β · d̄_i, with d̄_i the mean distance from P_i to its k nearest points.

    Args:
        points: (P, 2) x, y.
        k: number of neighbours; images with fewer than k + 1 points use ``default_sigma``
            for every point (the neighbourhood is undefined).
        beta: β. default_sigma: the fixed σ. sigma_range: (min, max) clamp of σ_i.

    Returns:
        (P,) σ_i.
    """
    where = "adaptive_sigmas"
    check_tensor("points", points, (None, 2), where)
    check_floating_dtype("points", points, where)
    check_finite("points", points, where)
    check_number("k", k, low=0, integer=True, where=where)
    check_number("beta", beta, low=0.0, low_open=True, where=where)
    check_number("default_sigma", default_sigma, low=0.0, low_open=True, where=where)
    if len(sigma_range) != 2 or not 0 < sigma_range[0] <= sigma_range[1]:
        raise ValueError(
            f"{where}: 'sigma_range' must be (min, max) with 0 < min <= max, got {sigma_range!r}"
        )
    num = points.shape[0]
    if num <= k or k <= 0:
        return points.new_full((num,), float(default_sigma))
    # a k-d tree: O(P log P) time and O(P·k) memory, where a (P, P) distance matrix took 0.8 GB at
    # P = 10⁴ and 80 GB at 10⁵ (tools/benchmark_knn.py)
    xy = points.detach().to("cpu", torch.float64).numpy()
    dist, _ = cKDTree(xy).query(xy, k=k + 1)
    knn = torch.from_numpy(dist[:, 1:])  # drop the point itself (distance 0, first)
    return (beta * knn.mean(dim=1)).clamp(*sigma_range).to(points.device, points.dtype)


def _pixel_masses(centres: torch.Tensor, sigmas: torch.Tensor, length: int) -> torch.Tensor:
    """
    Mass of N(centre, σ²) in each pixel [j, j + 1) of a 1-D axis of ``length`` pixels, renormalised
    to sum to 1 over the axis (the part of the kernel outside the image is given back to it).

    Returns:
        (P, length).
    """
    edges = torch.arange(length + 1, dtype=torch.float64, device=centres.device)
    z = (edges[None, :] - centres[:, None].double()) / (sigmas[:, None].double() * math.sqrt(2.0))
    cdf = 0.5 * (1.0 + torch.erf(z))
    mass = cdf[:, 1:] - cdf[:, :-1]
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-300)


def gaussian_density_map(
    points: torch.Tensor,
    image_size: Tuple[int, int],
    sigma: Union[float, torch.Tensor],
    classes: Optional[torch.Tensor] = None,
    num_classes: int = 1,
) -> torch.Tensor:
    """
    The target density D_c(p) = Σ_{i: c_i = c} N(p; P_i, σ_i²I), integrated exactly over every pixel
    and renormalised per point, so that Σ_p D_c(p) equals the number of points of class c, also for
    points near (or on) the border.

    Args:
        points: (P, 2) x, y in continuous pixel coordinates (pixel j covers [j, j + 1)).
        image_size: (H, W).
        sigma: a float σ or a (P,) tensor (or list) of σ_i.
        classes: (P,) int64 in 0..C-1, or None (all 0).
        num_classes: C.

    Returns:
        (C, H, W) float32 on the device of ``points``.
    """
    where = "gaussian_density_map"
    check_tensor("points", points, (None, 2), where)
    check_finite("points", points, where)
    if len(image_size) != 2 or any(int(v) != v or v < 0 for v in image_size):
        raise ValueError(
            f"{where}: 'image_size' must be (H, W), two integers >= 0, got {image_size!r}"
        )
    check_number("num_classes", num_classes, low=1, integer=True, where=where)
    height, width = int(image_size[0]), int(image_size[1])
    device = points.device
    num = points.shape[0]
    if isinstance(sigma, (list, tuple)):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device)
    if torch.is_tensor(sigma):
        check_tensor("sigma", sigma, ndim=(0, 1), where=where)
        if sigma.dim() == 1 and sigma.shape[0] != num:
            raise ValueError(
                f"{where}: 'sigma' must be a number or a (P,) tensor with P = {num} (the rows of "
                f"points), got shape {tuple(sigma.shape)}"
            )
    else:
        check_number("sigma", sigma, where=where)
    if classes is not None:
        check_tensor("classes", classes, (num,), where)
        check_integer_dtype("classes", classes, where)
    if num == 0:
        return torch.zeros((num_classes, height, width), device=device)
    sigmas = sigma if torch.is_tensor(sigma) else torch.full((num,), float(sigma), device=device)
    sigmas = sigmas.expand(num)
    if not bool(torch.all(sigmas > 0)):
        raise ValueError(f"{where}: Gaussian kernel widths 'sigma' must be positive, got {sigma}")
    gx = _pixel_masses(points[:, 0], sigmas, width)  # (P, W)
    gy = _pixel_masses(points[:, 1], sigmas, height)  # (P, H)
    if classes is None:
        classes = torch.zeros(num, dtype=torch.long, device=device)
    if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"{where}: 'classes' must lie in 0..{num_classes - 1} (num_classes {num_classes}), "
            f"got {classes.min().item()}..{classes.max().item()}"
        )
    onehot = F.one_hot(classes.long(), num_classes).double()  # (P, C)
    # D[c, y, x] = Σ_i onehot[i, c] gy[i, y] gx[i, x]: a (C·H, P) x (P, W) product
    left = (onehot[:, :, None] * gy[:, None, :]).reshape(num, num_classes * height)
    return (left.t() @ gx).reshape(num_classes, height, width).float()


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


def fit_count_calibration(
    pred_counts: torch.Tensor,
    areas: torch.Tensor,
    true_counts: torch.Tensor,
    mode: str = "affine",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Least-squares count calibration of a trained density regressor on images with known counts:

        "affine": min_{α_c, β_c} Σ_i (α_c·ĉ_ic + β_c·|Ω_i| − t_ic)²,
        "gain":   the same with β_c = 0,

    where ĉ_ic = ∫ D̂_c is the predicted count of class c in image i, |Ω_i| its number of counted
    pixels (image or ROI) and t_ic the true count. The calibrated density is α_c·D̂_c + β_c: α
    corrects a global over/under-estimate of the mass per object, β a constant background density
    (a count error that grows with the image area, not with the number of objects). Both vary
    from one training run to another; fitted on the training images they carry over to new images
    of the same kind as long as the network does not fit its training counts much better than
    others (the benchmark's U-Net: training-image MAE about the test MAE).

    "affine" falls back to "gain" for a class whose normal equations are singular (e.g. one image,
    or all images of one size with counts proportional to their area), "gain" to the identity for
    a class predicted empty everywhere.

    Args:
        pred_counts: (N, C) uncalibrated ĉ_ic.
        areas: (N,) |Ω_i| in pixels of the network input.
        true_counts: (N, C) t_ic.
        mode: "gain" or "affine" ("none" returns the identity).

    Returns:
        gain (C,) α and offset (C,) β (density per pixel), float64.
    """
    check_calibration_mode(mode)
    p = torch.as_tensor(pred_counts, dtype=torch.float64)
    t = torch.as_tensor(true_counts, dtype=torch.float64)
    a = torch.as_tensor(areas, dtype=torch.float64).reshape(-1)
    if p.dim() != 2 or p.shape != t.shape or a.shape[0] != p.shape[0]:
        raise ValueError(
            f"count calibration needs pred (N, C), true (N, C) and areas (N,); got "
            f"{tuple(p.shape)}, {tuple(t.shape)} and {tuple(a.shape)}"
        )
    num_classes = p.shape[1]
    gain = torch.ones(num_classes, dtype=torch.float64)
    offset = torch.zeros(num_classes, dtype=torch.float64)
    if mode == "none" or p.shape[0] == 0:
        return gain, offset
    for c in range(num_classes):
        pc, tc = p[:, c], t[:, c]
        spp, spa, saa = (pc * pc).sum(), (pc * a).sum(), (a * a).sum()
        spt, sat = (pc * tc).sum(), (a * tc).sum()
        det = spp * saa - spa * spa
        if mode == "affine" and det > 1e-9 * spp * saa:
            gain[c] = (saa * spt - spa * sat) / det
            offset[c] = (spp * sat - spa * spt) / det
        elif spp > 0:
            gain[c] = spt / spp
    return gain, offset


@META_ARCH_REGISTRY.register()
class DensityCounter(nn.Module):
    """
    Density-map regression for counting. A backbone (``FCRN_A``, ``FCRN_B``, ``UNet`` or any with a
    stride-1 output) and a 1x1 conv give C density channels at input resolution.

    Input per image (detectron2 list of dicts): "image" (C_in, H, W) in ``cfg.INPUT.FORMAT``;
    training also needs "points" (P, 2) x, y float and optionally "point_classes" (P,) int64,
    "roi" (H, W) bool and "loss_mask" (H, W) bool (pixels left out of the loss only, e.g. along
    crop cuts; see ``DensityDatasetMapper``). Output per image at test time: {"density":
    (C, height, width) with the density of the original image, "counts": (C,)} plus "instances"
    (one box per density peak) when ``MODEL.DENSITY.PEAKS.ENABLED``.

    Inference applies the count calibration D̂' = α·D̂ + β held in the buffers ``count_gain`` and
    ``count_offset`` (C,) (identity until :meth:`set_count_calibration`; saved in checkpoints;
    see :func:`fit_count_calibration` and ``MODEL.DENSITY.CALIBRATION``).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str = "dense",
        num_classes: int = 1,
        sigma: float = 3.0,
        adaptive_k: int = 0,
        adaptive_beta: float = 0.3,
        adaptive_sigma_range: Tuple[float, float] = (1.0, 20.0),
        density_scale: float = 100.0,
        loss_weight: float = 1.0,
        count_loss_weight: float = 0.0,
        count_loss_window: int = 16,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        peaks_enabled: bool = False,
        peak_radius: int = 2,
        peak_threshold: float = 0.3,
        peak_box_size: float = 12.0,
        channels_last: bool = False,
        test_dihedral: bool = False,
    ):
        """
        Args:
            backbone: produces ``in_feature`` at stride 1.
            num_classes: C density channels.
            sigma: fixed kernel σ (pixels of the network input).
            adaptive_k, adaptive_beta, adaptive_sigma_range: geometry-adaptive σ_i (k = 0: off).
            density_scale: s; the network regresses s·D.
            loss_weight: λ of the MSE loss.
            count_loss_weight: μ of the local count loss (0: off), see
                :func:`density_window_count_loss`.
            count_loss_window: its window side w.
            pixel_mean, pixel_std: input normalisation, one value per input channel.
            peaks_enabled: also return point detections.
            peak_radius: non-maximum window radius of the peak finder.
            peak_threshold: fraction of an isolated kernel's height 1/(2πσ²) a peak must reach.
            peak_box_size: side of the boxes drawn around peaks (output pixels).
            channels_last: keep weights and inputs in channels-last (NHWC) memory format.
            test_dihedral: at inference, average the density over the 8 flips and quarter turns
                of the input (each mapped back), 8x the cost.
        """
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        out_shape = backbone.output_shape()
        if in_feature not in out_shape:
            raise ValueError(
                f"MODEL.DENSITY.IN_FEATURE={in_feature!r} is not a backbone output: "
                f"{sorted(out_shape)}"
            )
        if out_shape[in_feature].stride not in (None, 1):
            raise ValueError(f"Backbone feature {in_feature!r} must have stride 1 for density maps")
        self.head = Conv2d(out_shape[in_feature].channels, num_classes, kernel_size=1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.constant_(self.head.bias, 0.0)
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.adaptive_k = int(adaptive_k)
        self.adaptive_beta = float(adaptive_beta)
        self.adaptive_sigma_range = tuple(float(v) for v in adaptive_sigma_range)
        self.density_scale = float(density_scale)
        self.loss_weight = float(loss_weight)
        self.count_loss_weight = float(count_loss_weight)
        self.count_loss_window = int(count_loss_window)
        if self.count_loss_window < 1:
            raise ValueError(
                f"MODEL.DENSITY.COUNT_LOSS_WINDOW must be >= 1, got {count_loss_window}"
            )
        self.peaks_enabled = peaks_enabled
        self.peak_radius = int(peak_radius)
        self.peak_threshold = float(peak_threshold)
        self.peak_box_size = float(peak_box_size)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if self.pixel_mean.shape != self.pixel_std.shape:
            raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length")
        # count calibration α, β (identity): set after training, saved with the weights
        self.register_buffer("count_gain", torch.ones(num_classes))
        self.register_buffer("count_offset", torch.zeros(num_classes))
        self.test_dihedral = bool(test_dihedral)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DENSITY
        return {
            "backbone": build_backbone(cfg),
            "in_feature": d.IN_FEATURE,
            "num_classes": d.NUM_CLASSES,
            "sigma": d.SIGMA,
            "adaptive_k": d.ADAPTIVE_K,
            "adaptive_beta": d.ADAPTIVE_BETA,
            "adaptive_sigma_range": tuple(d.ADAPTIVE_SIGMA_RANGE),
            "density_scale": d.SCALE,
            "loss_weight": d.LOSS_WEIGHT,
            "count_loss_weight": d.COUNT_LOSS_WEIGHT,
            "count_loss_window": d.COUNT_LOSS_WINDOW,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "peaks_enabled": d.PEAKS.ENABLED,
            "peak_radius": d.PEAKS.RADIUS,
            "peak_threshold": d.PEAKS.THRESHOLD,
            "peak_box_size": d.PEAKS.BOX_SIZE,
            "channels_last": cfg.MODEL.CHANNELS_LAST,
            "test_dihedral": d.TEST_DIHEDRAL,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def set_count_calibration(self, gain, offset) -> None:
        """
        Set the inference-time calibration D̂' = α·D̂ + β.

        Args:
            gain: (C,) α (or a float for all classes). offset: (C,) β, density per pixel.
        """
        gain = torch.as_tensor(gain, dtype=torch.float32).expand(self.num_classes)
        offset = torch.as_tensor(offset, dtype=torch.float32).expand(self.num_classes)
        if not torch.isfinite(gain).all() or not torch.isfinite(offset).all():
            raise ValueError(f"count calibration must be finite, got gain {gain}, offset {offset}")
        self.count_gain.copy_(gain)
        self.count_offset.copy_(offset)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad the images to a multiple of the backbone's size divisibility."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def predict_raw(self, images: ImageList) -> torch.Tensor:
        """
        (N, C, H_pad, W_pad) scaled density s·D̂ of a padded batch. Under autocast the backbone
        runs in the autocast dtype and the 1x1 head in float32, so that the regressed density (and
        the count, its integral over ~10^5 pixels) keeps float32 precision. At inference with
        ``test_dihedral``, the mean over the 8 flips / quarter turns of the batch.
        """
        if self.test_dihedral and not self.training:
            return self._predict_dihedral(images.tensor)
        return self._predict(images.tensor)

    def _predict_dihedral(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of :meth:`_predict` over the 8 flips / quarter turns of ``x`` (N, C, H, W),
        each prediction turned back: the padded size is a multiple of the backbone's size
        divisibility in both axes, so every turn is a valid input."""
        total = None
        # the 8 elements as flips then an optional transpose (each its own inverse): the same group
        # as quarter turns with flips, in operations ONNX has (it has no rot90)
        for transpose in (False, True):
            for dims in ((), (2,), (3,), (2, 3)):
                t = x.flip(dims) if dims else x
                t = t.transpose(2, 3) if transpose else t
                out = self._predict(t.contiguous())
                out = out.transpose(2, 3) if transpose else out
                out = out.flip(dims) if dims else out
                total = out if total is None else total + out
        return total / 8

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)[self.in_feature]
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            if self.channels_last:
                # the 1x1 head as a matrix product over the NHWC channels: float32 1x1
                # convolutions take PyTorch's slow im2col path on CPU (10 % of a U-Net step)
                out = F.linear(
                    features.permute(0, 2, 3, 1), self.head.weight.flatten(1), self.head.bias
                )
                return out.permute(0, 3, 1, 2)
            return self.head(features)

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts (see the class docstring).

        Returns:
            training: {"loss_density": scalar}. Inference: one dict per image with "density"
            (C, height, width), "counts" (C,) and, with peaks enabled, "instances".
        """
        images = self.preprocess_image(batched_inputs)
        pred = self.predict_raw(images)
        if self.training:
            target, valid = self.prepare_targets(batched_inputs, images)
            loss = density_mse_loss(pred, target, valid)
            with torch.no_grad():
                # both over the pixels of the loss (Ω), so that crop cuts left out of it do not
                # count as errors
                pred_counts = (pred.detach() * valid).sum(dim=(1, 2, 3)) / self.density_scale
                true_counts = (target * valid).sum(dim=(1, 2, 3)) / self.density_scale
                storage = get_event_storage()
                storage.put_scalar("density/count_mae", (pred_counts - true_counts).abs().mean())
                storage.put_scalar("density/true_count", true_counts.mean())
                # the loss of the best constant output (per class the mean target over Ω): a
                # loss that stays at it means a collapsed model (engine.health.CountHealthCheck)
                mean_c = (target * valid).sum(dim=(0, 2, 3)) / valid.sum().clamp_min(1.0)
                constant = mean_c[None, :, None, None].expand_as(target)
                storage.put_scalar(
                    "density/loss_constant",
                    self.loss_weight * float(density_mse_loss(constant, target, valid)),
                )
            losses = {"loss_density": self.loss_weight * loss}
            if self.count_loss_weight > 0:
                losses["loss_density_count"] = self.count_loss_weight * density_window_count_loss(
                    pred, target, valid, self.count_loss_window, self.density_scale
                )
            return losses
        return self.inference(pred, batched_inputs, images.image_sizes)

    def target_density(self, points: torch.Tensor, classes, image_size) -> torch.Tensor:
        """
        The unscaled target D (C, H, W) of one image (see :func:`gaussian_density_map`), with
        fixed or geometry-adaptive σ.
        """
        sigma = self.sigma
        if self.adaptive_k > 0:
            sigma = adaptive_sigmas(
                points, self.adaptive_k, self.adaptive_beta, self.sigma, self.adaptive_sigma_range
            )
        return gaussian_density_map(points, image_size, sigma, classes, self.num_classes)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList):
        """
        Returns:
            target: (N, C, H_pad, W_pad) scaled density s·D, zero in the padding.
            valid: (N, 1, H_pad, W_pad) 1 inside each image (and its ROI and loss_mask), 0
                elsewhere.
        """
        n = len(batched_inputs)
        h_pad, w_pad = images.tensor.shape[-2:]
        target = torch.zeros((n, self.num_classes, h_pad, w_pad), device=self.device)
        valid = torch.zeros((n, 1, h_pad, w_pad), device=self.device)
        for i, (inp, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            if "points" not in inp:
                raise ValueError(
                    f"Training input {inp.get('file_name', i)} has no 'points' "
                    "(use DensityDatasetMapper)"
                )
            points = torch.as_tensor(inp["points"], dtype=torch.float32, device=self.device)
            points = points.reshape(-1, 2)
            classes = inp.get("point_classes")
            if classes is not None:
                classes = torch.as_tensor(classes, dtype=torch.long, device=self.device)
            density = self.target_density(points, classes, (h, w))
            region = torch.ones((h, w), device=self.device)
            if inp.get("roi") is not None:
                region = torch.as_tensor(inp["roi"], device=self.device).to(torch.float32)
                if region.shape != (h, w):
                    raise ValueError(
                        f"ROI of {inp.get('file_name', i)} has shape {tuple(region.shape)}, "
                        f"image has {(h, w)}"
                    )
            if inp.get("loss_mask") is not None:
                loss_mask = torch.as_tensor(inp["loss_mask"], device=self.device)
                if loss_mask.shape != (h, w):
                    raise ValueError(
                        f"loss_mask of {inp.get('file_name', i)} has shape "
                        f"{tuple(loss_mask.shape)}, image has {(h, w)}"
                    )
                region = region * loss_mask.to(torch.float32)
            target[i, :, :h, :w] = density * self.density_scale
            valid[i, 0, :h, :w] = region
        return target, valid

    def inference(self, pred: torch.Tensor, batched_inputs: List[Dict], image_sizes):
        """
        Crop the padding, undo the scale s, calibrate (α·D̂ + β), mask by the ROI and resize to
        the original size keeping the integral (counts are integrals at network resolution).
        """
        results = []
        gain = self.count_gain.to(pred.dtype)[:, None, None]
        offset = self.count_offset.to(pred.dtype)[:, None, None]
        for i, (inp, (h, w)) in enumerate(zip(batched_inputs, image_sizes)):
            density = pred[i, :, :h, :w] * (gain / self.density_scale) + offset
            if inp.get("roi") is not None:
                density = density * torch.as_tensor(inp["roi"], device=density.device).to(
                    density.dtype
                )
            counts = density.sum(dim=(1, 2))
            out_h, out_w = inp.get("height", h), inp.get("width", w)
            if (out_h, out_w) != (h, w):
                density = F.interpolate(
                    density[None], size=(out_h, out_w), mode="bilinear", align_corners=False
                )[0] * (h * w / (out_h * out_w))
            result = {"density": density, "counts": counts}
            if self.peaks_enabled:
                result["instances"] = self.detect_points(density)
            results.append(result)
        return results

    def detect_points(self, density: torch.Tensor) -> Instances:
        """
        Point detections from the local maxima of the density (``wsis_d2.layers.find_peaks``).

        Args:
            density: (C, H, W) unscaled density of the output image.

        Returns:
            Instances of size (H, W) with pred_boxes (square, ``peak_box_size``, centred on each
            peak pixel), scores (the peak density) and pred_classes.
        """
        from wsis_d2.layers import find_peaks  # another part of the package; imported when used

        height, width = density.shape[-2:]
        threshold = self.peak_threshold / (2.0 * math.pi * self.sigma**2)
        peaks = find_peaks(density[None], radius=self.peak_radius, threshold=threshold)
        idx = peaks.indices
        cx = idx[:, 3].to(density.dtype) + 0.5
        cy = idx[:, 2].to(density.dtype) + 0.5
        half = self.peak_box_size / 2.0
        boxes = Boxes(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        boxes.clip((height, width))
        instances = Instances((height, width))
        instances.pred_boxes = boxes
        instances.scores = density[idx[:, 1], idx[:, 2], idx[:, 3]]
        instances.pred_classes = idx[:, 1]
        return instances
