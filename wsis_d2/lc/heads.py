"""
Two-branch head of LC / ILC (Cholakkal et al., "Object Counting and Instance Segmentation with
Image-level Supervision", CVPR 2019): from one backbone feature map it predicts the class
activation maps M (image-classification branch) and the category density maps D (density branch).
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.registry import Registry

__all__ = ["LC_HEAD_REGISTRY", "LCHead", "build_lc_head"]

LC_HEAD_REGISTRY = Registry("LC_HEAD")
LC_HEAD_REGISTRY.__doc__ = """
Registry for the heads of image-level counting models (LC / ILC).

A registered head is called as ``obj(cfg, input_shape)`` with ``input_shape`` the ShapeSpec of the
backbone feature ``cfg.MODEL.LC.IN_FEATURE``; its forward maps that feature (N, C_in, h, w) to
``(class_maps (N, C, H', W'), density_maps (N, C, H', W'))`` and it exposes ``out_stride``
(input pixels per output cell).
"""


def build_lc_head(cfg, input_shape: ShapeSpec) -> nn.Module:
    """Build the head named by ``cfg.MODEL.LC.HEAD_NAME``."""
    name = cfg.MODEL.LC.HEAD_NAME
    if name not in LC_HEAD_REGISTRY:
        raise ValueError(
            f"cfg.MODEL.LC.HEAD_NAME={name!r} is not a registered LC head; "
            f"known: {sorted(k for k, _ in LC_HEAD_REGISTRY)}"
        )
    return LC_HEAD_REGISTRY.get(name)(cfg, input_shape)


def _branch(in_channels: int, mid_channels: int, num_classes: int, norm: str) -> nn.Sequential:
    """1x1 conv (P channels) -> norm -> ReLU -> 1x1 conv (C channels)."""
    hidden = Conv2d(
        in_channels,
        mid_channels,
        kernel_size=1,
        bias=not norm,
        norm=get_norm(norm, mid_channels),
        activation=F.relu,
    )
    out = Conv2d(mid_channels, num_classes, kernel_size=1)
    nn.init.kaiming_normal_(hidden.weight, mode="fan_out", nonlinearity="relu")
    if hidden.bias is not None:
        nn.init.constant_(hidden.bias, 0.0)
    nn.init.normal_(out.weight, std=0.01)
    nn.init.constant_(out.bias, 0.0)
    return nn.Sequential(hidden, out)


@LC_HEAD_REGISTRY.register()
class LCHead(nn.Module):
    """
    The two branches of LC on a backbone feature map. Each branch is a 1x1 conv with P channels,
    a norm and a ReLU, then a 1x1 conv with C channels (the paper and the official code use
    P = 1.5·C). Both outputs are optionally upsampled bilinearly by ``upsample`` so that the peak
    finder works on a finer grid (the official code's ``sub_pixel_locating_factor``).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: ShapeSpec,
        num_classes: int,
        branch_channels: int = 0,
        norm: str = "BN",
        upsample: int = 1,
        density_backbone_grad: float = 1.0,
        density_norm: Optional[str] = None,
    ):
        """
        Args:
            input_shape: channels and stride of the input feature.
            num_classes: C.
            branch_channels: P; 0 means ceil(1.5·C).
            norm: normalisation after the first conv of each branch ("" for none).
            upsample: integer bilinear upsampling factor of M and D (1: none).
            density_backbone_grad: factor on the gradient that the density branch passes back
                into the backbone feature (1: the paper's joint training; 0: the density branch
                learns on the features the classification shapes). The forward is unchanged.
            density_norm: normalisation of the density branch (None: ``norm``).
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MODEL.LC.NUM_CLASSES must be >= 1, got {num_classes}")
        if upsample < 1:
            raise ValueError(f"MODEL.LC.UPSAMPLE must be >= 1, got {upsample}")
        mid = int(branch_channels) if branch_channels > 0 else int(math.ceil(1.5 * num_classes))
        self.num_classes = num_classes
        self.upsample = int(upsample)
        if not 0.0 <= density_backbone_grad <= 1.0:
            raise ValueError(
                f"MODEL.LC.DENSITY_BACKBONE_GRAD must be in [0, 1], got {density_backbone_grad}"
            )
        self.density_backbone_grad = float(density_backbone_grad)
        self.cls_branch = _branch(input_shape.channels, mid, num_classes, norm)
        self.density_branch = _branch(
            input_shape.channels, mid, num_classes, norm if density_norm is None else density_norm
        )
        in_stride = input_shape.stride or 1
        self.out_stride = in_stride / self.upsample

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.LC.NUM_CLASSES,
            "branch_channels": cfg.MODEL.LC.BRANCH_CHANNELS,
            "norm": cfg.MODEL.LC.NORM,
            "upsample": cfg.MODEL.LC.UPSAMPLE,
            "density_backbone_grad": cfg.MODEL.LC.DENSITY_BACKBONE_GRAD,
            "density_norm": (
                None if cfg.MODEL.LC.DENSITY_NORM == "same" else cfg.MODEL.LC.DENSITY_NORM
            ),
        }

    def forward(self, feature: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            feature: (N, C_in, h, w) backbone feature.

        Returns:
            class_maps M: (N, C, h·u, w·u); density_maps D: (N, C, h·u, w·u), u = ``upsample``.
        """
        class_maps = self.cls_branch(feature)
        g = self.density_backbone_grad
        if g < 1.0 and torch.is_grad_enabled():
            # same values, gradient into the backbone scaled by g
            feature = feature.detach() if g == 0.0 else g * feature + (1.0 - g) * feature.detach()
        density_maps = self.density_branch(feature)
        if self.upsample > 1:
            both = torch.cat([class_maps, density_maps], dim=1)
            both = F.interpolate(
                both, scale_factor=self.upsample, mode="bilinear", align_corners=False
            )
            class_maps, density_maps = both.split(self.num_classes, dim=1)
        return class_maps, density_maps

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            "class_maps": ShapeSpec(channels=self.num_classes, stride=self.out_stride),
            "density_maps": ShapeSpec(channels=self.num_classes, stride=self.out_stride),
        }
