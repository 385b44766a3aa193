"""
MobileNetV2 (Sandler et al., CVPR 2018) as a detectron2 backbone, so that the image-level models
(LC / ILC) can start from ImageNet weights where no ImageNet ResNet is at hand. The layers are
torchvision's ``mobilenet_v2().features`` (its parameter names, so torchvision's ImageNet file
converts by a key prefix: :func:`convert_torchvision_mobilenet_v2`); this module only splits them
into stages by output stride, freezes and re-normalises them.

Stages (input stride of their output, channels at width 1.0):

    "m1": stride 2,  16    features[0:2]
    "m2": stride 4,  24    features[2:4]
    "m3": stride 8,  32    features[4:7]
    "m4": stride 16, 96    features[7:14]
    "m5": stride 32, 320   features[14:18]   (the final 1x1 conv to 1280 channels is dropped)

``MODEL.MOBILENET.M5_DILATION = 2`` keeps "m5" at stride 16 (its stride-2 depthwise conv becomes
stride 1 with dilation 2 in the following depthwise convs), as ``RES5_DILATION`` does for ResNet.

:func:`build_mobilenet_v2_fpn_backbone` puts detectron2's own ``FPN`` (with ``LastLevelMaxPool``)
on these stages, for the stock Mask R-CNN (the fully supervised reference and CCGR's
instance-segmentation branch). The backbone-only ImageNet checkpoint ("backbone.features.*") loads
into it unchanged.
"""

import math
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from ..layers.batch_norm import fuse_frozen_batchnorm

__all__ = [
    "MobileNetV2Backbone",
    "build_mobilenet_v2_backbone",
    "build_mobilenet_v2_fpn_backbone",
    "convert_torchvision_mobilenet_v2",
    "MOBILENET_V2_STAGES",
]

# stage name -> (first, last + 1) index into torchvision's features, output stride, channels
MOBILENET_V2_STAGES = {
    "m1": ((0, 2), 2, 16),
    "m2": ((2, 4), 4, 24),
    "m3": ((4, 7), 8, 32),
    "m4": ((7, 14), 16, 96),
    "m5": ((14, 18), 32, 320),
}
_ORDER = list(MOBILENET_V2_STAGES)


def _dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    """Turn the stride-2 depthwise conv of a stage into stride 1 and dilate the later ones."""
    first = True
    for module in stage.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.kernel_size[0] > 1:
            if first:
                module.stride = (1, 1)
                first = False
                continue
            module.dilation = (dilation, dilation)
            module.padding = (dilation * (module.kernel_size[0] // 2),) * 2


def _drop_batchnorm_statistics(state_dict, prefix, *args):
    """Load pre-hook of a GroupNorm that replaced a BatchNorm2d: a BN checkpoint's running
    statistics have no meaning for it (only γ, β are loaded), so they are dropped silently."""
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        state_dict.pop(prefix + name, None)


def _batchnorm_to_groupnorm(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """
    Replace every ``nn.BatchNorm2d`` in ``module`` by a ``GroupNorm`` with gcd(32, C) groups
    (MobileNetV2 has C = 16, 24, 144, ... channels, which 32 groups do not all divide), γ and β
    copied. Returns ``module``.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            gn = nn.GroupNorm(math.gcd(max_groups, c), c, eps=child.eps)
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
            gn._register_load_state_dict_pre_hook(_drop_batchnorm_statistics)
            setattr(module, name, gn)
        else:
            _batchnorm_to_groupnorm(child, max_groups)
    return module


class MobileNetV2Backbone(Backbone):
    """
    MobileNetV2 feature stages. Input (N, 3, H, W) normalised RGB (torchvision's ImageNet
    statistics: ``MODEL.PIXEL_MEAN`` [123.675, 116.28, 103.53], ``PIXEL_STD`` [58.395, 57.12,
    57.375] with ``INPUT.FORMAT`` "RGB"); output {name: (N, C_name, ⌈H/s⌉, ⌈W/s⌉)} for each name
    in ``out_features``.
    """

    @configurable
    def __init__(
        self,
        *,
        out_features: List[str],
        freeze_at: int = 0,
        norm: str = "FrozenBN",
        m5_dilation: int = 1,
        channels_last: bool = False,
    ):
        """
        Args:
            out_features: stage names to return, from "m1".."m5".
            freeze_at: the first ``freeze_at`` stages keep their weights (0: train all).
            norm: "FrozenBN" (fixed ImageNet statistics, for fine-tuning from weights), "BN"
                (trainable, batch statistics) or "GN" (GroupNorm, gcd(32, C) groups; γ, β
                are loaded from a BN checkpoint, its running statistics are not used).
            m5_dilation: 1, or 2 to keep "m5" at stride 16.
            channels_last: weights and input in channels-last (NHWC) memory format, which
                oneDNN runs faster on CPU (``MODEL.CHANNELS_LAST``); same results up to rounding.
        """
        super().__init__()
        import torchvision  # torchvision's layer definitions; weights come from MODEL.WEIGHTS

        unknown = [f for f in out_features if f not in MOBILENET_V2_STAGES]
        if not out_features or unknown:
            raise ValueError(
                f"MODEL.MOBILENET.OUT_FEATURES must name stages of {_ORDER}, got {out_features}"
            )
        if not 0 <= freeze_at <= len(_ORDER):
            raise ValueError(f"MODEL.MOBILENET.FREEZE_AT must be in 0..5, got {freeze_at}")
        if norm not in ("FrozenBN", "BN", "GN"):
            raise ValueError(
                f"MODEL.MOBILENET.NORM must be 'FrozenBN', 'BN' or 'GN', got {norm!r}"
            )
        if m5_dilation not in (1, 2):
            raise ValueError(f"MODEL.MOBILENET.M5_DILATION must be 1 or 2, got {m5_dilation}")
        last = max(_ORDER.index(f) for f in out_features)
        features = torchvision.models.mobilenet_v2(weights=None).features
        # keep torchvision's parameter names ("features.<i>..."), dropping unused later blocks
        self.features = nn.Sequential(
            *list(features.children())[: MOBILENET_V2_STAGES[_ORDER[last]][0][1]]
        )
        if norm == "FrozenBN":
            # fused frozen BN: one op also when gradients flow through (training, PRMs)
            self.features = fuse_frozen_batchnorm(
                FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)
            )
        elif norm == "GN":
            _batchnorm_to_groupnorm(self.features)
        self._stages = _ORDER[: last + 1]
        self._out_features = list(out_features)
        # read by Backbone.output_shape
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        for name in self._stages:
            (start, stop), stride, channels = MOBILENET_V2_STAGES[name]
            if name == "m5" and m5_dilation == 2:
                _dilate_stage(self.features[start:stop], 2)
                stride = 16
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = channels
        for name in self._stages[:freeze_at]:
            (start, stop), _, _ = MOBILENET_V2_STAGES[name]
            for p in self.features[start:stop].parameters():
                p.requires_grad_(False)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec = None):
        if input_shape is not None and input_shape.channels not in (None, 3):
            raise ValueError(
                f"MobileNetV2 takes 3-channel images, got {input_shape.channels} "
                "(len(MODEL.PIXEL_MEAN))"
            )
        m = cfg.MODEL.MOBILENET
        return {
            "out_features": list(m.OUT_FEATURES),
            "freeze_at": m.FREEZE_AT,
            "norm": m.NORM,
            "m5_dilation": m.M5_DILATION,
            "channels_last": cfg.MODEL.CHANNELS_LAST,
        }

    @property
    def size_divisibility(self) -> int:
        return max(self._out_feature_strides.values())

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, 3, H, W) normalised RGB.

        Returns:
            {name: (N, C_name, H/s_name, W/s_name)} for the ``out_features``.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MobileNetV2 expects (N, 3, H, W) images, got {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = {}
        for name in self._stages:
            (start, stop), _, _ = MOBILENET_V2_STAGES[name]
            for i in range(start, stop):
                x = self.features[i](x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg, input_shape: ShapeSpec) -> MobileNetV2Backbone:
    """``MODEL.BACKBONE.NAME: "build_mobilenet_v2_backbone"`` (keys under ``MODEL.MOBILENET``)."""
    return MobileNetV2Backbone(cfg, input_shape)


def _bottom_up_checkpoint_keys(state_dict, prefix, *args):
    """
    Load pre-hook of the FPN: a backbone-only MobileNetV2 checkpoint (``MODEL.WEIGHTS`` of the
    LC models, e.g. ``weights/mobilenet_v2_imagenet.pth``: "backbone.features.*") names the layers
    that the FPN holds as "backbone.bottom_up.features.*". Renamed here, so the same file serves
    both and no key is reported missing; a Mask R-CNN checkpoint already has the FPN's names.
    """
    old = prefix + "features."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "bottom_up." + key[len(prefix) :]] = state_dict.pop(key)


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """
    ``MODEL.BACKBONE.NAME: "build_mobilenet_v2_fpn_backbone"``: detectron2's ``FPN`` with
    ``LastLevelMaxPool`` ("p6") on the MobileNetV2 stages ``MODEL.FPN.IN_FEATURES`` (e.g.
    "m2".."m5" -> "p2".."p6", strides 4..64, ``MODEL.FPN.OUT_CHANNELS`` channels each).
    ``MODEL.MOBILENET.*`` configure the bottom-up network (norm, freeze-at, dilation);
    ``MODEL.FPN.NORM`` / ``FUSE_TYPE`` the FPN, as for detectron2's ResNet-FPN. With
    ``MODEL.CHANNELS_LAST`` the FPN's weights are channels-last too, so that the convolutions of
    the whole backbone (and of the heads, which follow their input's layout) run in NHWC.
    """
    bottom_up = MobileNetV2Backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features}: {missing} not in MODEL.MOBILENET.OUT_FEATURES "
            f"{list(cfg.MODEL.MOBILENET.OUT_FEATURES)}"
        )
    backbone = FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    if cfg.MODEL.CHANNELS_LAST:
        backbone.to(memory_format=torch.channels_last)
    backbone._register_load_state_dict_pre_hook(_bottom_up_checkpoint_keys)
    return backbone


def convert_torchvision_mobilenet_v2(
    state_dict: Dict[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """
    torchvision's ``mobilenet_v2`` state dict (e.g. ImageNet ``mobilenet_v2-b0353104.pth``) ->
    keys of a detectron2 model whose ``backbone`` is a :class:`MobileNetV2Backbone`
    ("features.<i>..." -> "backbone.features.<i>..."); the classifier is dropped.

    Raises:
        ValueError if the dict holds no "features." keys.
    """
    out = {
        "backbone." + k: v
        for k, v in state_dict.items()
        if k.startswith("features.") and not k.endswith("num_batches_tracked")
    }
    if not out:
        raise ValueError(
            "not a torchvision mobilenet_v2 state dict: no 'features.*' keys "
            f"(first keys: {list(state_dict)[:5]})"
        )
    return out
