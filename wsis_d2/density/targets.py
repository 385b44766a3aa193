"""
Density targets from point labels (Lempitsky & Zisserman 2010): each annotated point P_i contributes
a Gaussian kernel, D(p) = Σ_i N(p; P_i, σ_i²I), so that the count of any region is the integral of D
over it; fixed σ or geometry-adaptive σ_i (Zhang et al. 2016). :class:`DensityTargets` builds the
scaled targets s·D of a training batch.
"""

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from detectron2.config import configurable
from detectron2.structures import ImageList

from ..utils.checks import (
    check_finite,
    check_floating_dtype,
    check_integer_dtype,
    check_number,
    check_tensor,
)

__all__ = ["DensityTargets", "adaptive_sigmas", "gaussian_density_map"]


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




class DensityTargets:
    """
    The training targets of a density regressor: per image the scaled density s·D (C, H, W) of
    its points (:func:`gaussian_density_map`, fixed σ or geometry-adaptive σ_i) and the region Ω
    of the loss (the image, its ROI and its loss mask; not the padding).
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int = 1,
        sigma: float = 3.0,
        adaptive_k: int = 0,
        adaptive_beta: float = 0.3,
        adaptive_sigma_range: Tuple[float, float] = (1.0, 20.0),
        scale: float = 100.0,
    ):
        """
        Args:
            num_classes: C density channels (points carry "point_classes" in [0, C)).
            sigma: fixed kernel σ (pixels of the network input), also σ_i's default.
            adaptive_k, adaptive_beta, adaptive_sigma_range: geometry-adaptive σ_i = β·d̄_i over
                the k nearest points, clamped (k = 0: fixed σ).
            scale: s; the network regresses s·D.
        """
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.adaptive_k = int(adaptive_k)
        self.adaptive_beta = float(adaptive_beta)
        self.adaptive_sigma_range = tuple(float(v) for v in adaptive_sigma_range)
        self.scale = float(scale)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DENSITY
        return {
            "num_classes": d.NUM_CLASSES,
            "sigma": d.SIGMA,
            "adaptive_k": d.ADAPTIVE_K,
            "adaptive_beta": d.ADAPTIVE_BETA,
            "adaptive_sigma_range": tuple(d.ADAPTIVE_SIGMA_RANGE),
            "scale": d.SCALE,
        }

    def density(self, points: torch.Tensor, classes, image_size) -> torch.Tensor:
        """
        The unscaled target D (C, H, W) of one image from its points (P, 2) x, y and classes
        (P,) or None (all class 0).
        """
        sigma = self.sigma
        if self.adaptive_k > 0:
            sigma = adaptive_sigmas(
                points, self.adaptive_k, self.adaptive_beta, self.sigma, self.adaptive_sigma_range
            )
        return gaussian_density_map(points, image_size, sigma, classes, self.num_classes)

    def __call__(self, batched_inputs: List[Dict], images: ImageList):
        """
        Args:
            batched_inputs: the model's training inputs ("points", optional "point_classes",
                "roi", "loss_mask"; see ``DensityDatasetMapper``).
            images: the padded batch.

        Returns:
            target: (N, C, H_pad, W_pad) scaled density s·D, zero in the padding.
            valid: (N, 1, H_pad, W_pad) 1 inside each image (and its ROI and loss_mask), 0
                elsewhere.
        """
        device = images.tensor.device
        n = len(batched_inputs)
        h_pad, w_pad = images.tensor.shape[-2:]
        target = torch.zeros((n, self.num_classes, h_pad, w_pad), device=device)
        valid = torch.zeros((n, 1, h_pad, w_pad), device=device)
        for i, (inp, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            if "points" not in inp:
                raise ValueError(
                    f"Training input {inp.get('file_name', i)} has no 'points' "
                    "(use DensityDatasetMapper)"
                )
            points = torch.as_tensor(inp["points"], dtype=torch.float32, device=device)
            points = points.reshape(-1, 2)
            classes = inp.get("point_classes")
            if classes is not None:
                classes = torch.as_tensor(classes, dtype=torch.long, device=device)
            density = self.density(points, classes, (h, w))
            region = torch.ones((h, w), device=device)
            if inp.get("roi") is not None:
                region = torch.as_tensor(inp["roi"], device=device).to(torch.float32)
                if region.shape != (h, w):
                    raise ValueError(
                        f"ROI of {inp.get('file_name', i)} has shape {tuple(region.shape)}, "
                        f"image has {(h, w)}"
                    )
            if inp.get("loss_mask") is not None:
                loss_mask = torch.as_tensor(inp["loss_mask"], device=device)
                if loss_mask.shape != (h, w):
                    raise ValueError(
                        f"loss_mask of {inp.get('file_name', i)} has shape "
                        f"{tuple(loss_mask.shape)}, image has {(h, w)}"
                    )
                region = region * loss_mask.to(torch.float32)
            target[i, :, :h, :w] = density * self.scale
            valid[i, 0, :h, :w] = region
        return target, valid
