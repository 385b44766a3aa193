"""Point detections from a predicted density map (``MODEL.DENSITY.PEAKS``)."""

import math
from typing import Optional

import torch

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from ..layers import find_peaks

__all__ = ["DensityPointDetector", "build_point_detector"]


class DensityPointDetector:
    """
    Local maxima of the density (``wsis_d2.layers.find_peaks``) as point detections: a peak must
    reach ``threshold`` times the height 1/(2πσ²) of an isolated kernel, and gets a square box of
    side ``box_size`` around its pixel.
    """

    @configurable
    def __init__(
        self, *, radius: int = 2, threshold: float = 0.3, box_size: float = 12.0, sigma: float = 3.0
    ):
        """
        Args:
            radius: r, non-maximum window radius (pixels).
            threshold: t, fraction of an isolated kernel's height.
            box_size: side of the boxes drawn around peaks (output pixels).
            sigma: σ of the training kernels (the kernel height the threshold refers to).
        """
        self.radius = int(radius)
        self.threshold = float(threshold)
        self.box_size = float(box_size)
        self.sigma = float(sigma)

    @classmethod
    def from_config(cls, cfg):
        p = cfg.MODEL.DENSITY.PEAKS
        return {
            "radius": p.RADIUS,
            "threshold": p.THRESHOLD,
            "box_size": p.BOX_SIZE,
            "sigma": cfg.MODEL.DENSITY.SIGMA,
        }

    def __call__(self, density: torch.Tensor) -> Instances:
        """
        Args:
            density: (C, H, W) unscaled density of the output image.

        Returns:
            Instances of size (H, W) with pred_boxes (square, centred on each peak pixel), scores
            (the peak density) and pred_classes.
        """
        height, width = density.shape[-2:]
        threshold = self.threshold / (2.0 * math.pi * self.sigma**2)
        peaks = find_peaks(density[None], radius=self.radius, threshold=threshold)
        idx = peaks.indices
        cx = idx[:, 3].to(density.dtype) + 0.5
        cy = idx[:, 2].to(density.dtype) + 0.5
        half = self.box_size / 2.0
        boxes = Boxes(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        boxes.clip((height, width))
        instances = Instances((height, width))
        instances.pred_boxes = boxes
        instances.scores = density[idx[:, 1], idx[:, 2], idx[:, 3]]
        instances.pred_classes = idx[:, 1]
        return instances


def build_point_detector(cfg) -> Optional[DensityPointDetector]:
    """The detector of ``MODEL.DENSITY.PEAKS``, or None when it is not ENABLED."""
    return DensityPointDetector(cfg) if cfg.MODEL.DENSITY.PEAKS.ENABLED else None
