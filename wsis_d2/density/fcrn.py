"""
Fully convolutional regression networks FCRN-A and FCRN-B (Xie, Noble & Zisserman, "Microscopy cell
counting and detection with fully convolutional regression networks", 2016) as detectron2 backbones.

Both are plain encoder-decoders without skip connections: ``len(CHANNELS)`` blocks of 3x3 convs each
followed by 2x2 max pooling (widths growing), a wide 3x3 block at the lowest resolution (the paper's
"fully connected" layer), and mirrored blocks each preceded by x2 up-sampling. FCRN-A pools after every
convolution; FCRN-B pools after every second one (two convs per block), which gives it more
convolutions per resolution. The output is one stride-1 feature map ``"dense"``; the meta-architecture
maps it to density with a 1x1 conv.
"""

from typing import List

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["block_norm", "conv_block", "EncoderDecoder", "FCRN", "FCRN_A", "FCRN_B"]


def block_norm(norm: str, channels: int):
    """
    detectron2's ``get_norm``, except that "GN" uses ``min(32, max(channels // 8, 1))`` groups of
    at least 8 channels (detectron2's fixed 32 groups cannot divide the narrow widths of these
    networks). GN and "" do not depend on the batch, so training crops and whole test images are
    normalised alike.
    """
    if norm == "GN":
        return nn.GroupNorm(min(32, max(channels // 8, 1)), channels)
    return get_norm(norm, channels)


def conv_block(in_channels: int, out_channels: int, num_convs: int, norm: str) -> nn.Sequential:
    """
    ``num_convs`` 3x3 convolutions (padding 1) with normalisation and ReLU.

    Args:
        in_channels, out_channels: widths of the first input and of every output.
        num_convs: >= 1. norm: "BN", "GN", "" (see detectron2's ``get_norm``).

    Returns:
        a module mapping (N, in_channels, H, W) to (N, out_channels, H, W).
    """
    if num_convs < 1:
        raise ValueError(f"A conv block needs at least one convolution, got num_convs={num_convs}")
    layers = []
    for i in range(num_convs):
        conv = Conv2d(
            in_channels if i == 0 else out_channels,
            out_channels,
            kernel_size=3,
            padding=1,
            bias=not norm,
            norm=block_norm(norm, out_channels),
            activation=F.relu,
        )
        weight_init.c2_msra_fill(conv)
        layers.append(conv)
    return nn.Sequential(*layers)


def upsample_to(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour up-sampling of (N, C, h, w) to (N, C, *size) (x2 for even sizes)."""
    return F.interpolate(x, size=tuple(size), mode="nearest")


class EncoderDecoder(Backbone):
    """
    The body FCRN and U-Net share: ``down`` blocks (each followed by 2x2 max pooling in
    ``forward``), a ``mid`` block at the lowest resolution and mirrored ``up`` blocks, with one
    stride-1 output ``"dense"`` of width ``channels[0]``. Subclasses write ``forward``.
    """

    def _build_blocks(
        self, in_channels, channels, mid_channels, convs_per_block, norm, *, skips: bool, key: str
    ):
        """``skips``: each up block also takes the down block's output of its resolution (U-Net's
        concatenation); ``key`` names the config node in the error for an empty ``channels``."""
        if not channels:
            raise ValueError(f"MODEL.{key}.CHANNELS must list at least one block width")
        self.down = nn.ModuleList()
        prev = in_channels
        for ch in channels:
            self.down.append(conv_block(prev, ch, convs_per_block, norm))
            prev = ch
        self.mid = conv_block(prev, mid_channels, convs_per_block, norm)
        self.up = nn.ModuleList()
        prev = mid_channels
        for ch in reversed(channels):
            self.up.append(conv_block(prev + ch if skips else prev, ch, convs_per_block, norm))
            prev = ch
        self._depth = len(channels)
        self._out_features = ["dense"]
        self._out_feature_channels = {"dense": channels[0]}
        self._out_feature_strides = {"dense": 1}

    @property
    def size_divisibility(self) -> int:
        return 2**self._depth


class FCRN(EncoderDecoder):
    """
    FCRN encoder-decoder. Input (N, C_in, H, W) of any size; output ``{"dense": (N, C_0, H, W)}``
    with C_0 = ``channels[0]``.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        channels: List[int],
        mid_channels: int,
        convs_per_block: int,
        norm: str = "BN",
    ):
        """
        Args:
            in_channels: input image channels.
            channels: encoder block widths; ``len(channels)`` poolings and up-samplings.
            mid_channels: width of the block at the lowest resolution.
            convs_per_block: 3x3 convs per block (FCRN-A: 1, FCRN-B: 2).
            norm: normalisation after each conv.
        """
        super().__init__()
        self._build_blocks(
            in_channels, channels, mid_channels, convs_per_block, norm, skips=False, key="FCRN"
        )

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec, default_convs: int = 1):
        convs = cfg.MODEL.FCRN.CONVS_PER_BLOCK or default_convs
        return {
            "in_channels": input_shape.channels,
            "channels": list(cfg.MODEL.FCRN.CHANNELS),
            "mid_channels": cfg.MODEL.FCRN.MID_CHANNELS,
            "convs_per_block": convs,
            "norm": cfg.MODEL.FCRN.NORM,
        }

    def forward(self, x: torch.Tensor):
        """
        Args:
            x: (N, C_in, H, W).

        Returns:
            {"dense": (N, channels[0], H, W)}.
        """
        sizes = []
        for block in self.down:
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(block(x), kernel_size=2, ceil_mode=True)
        x = self.mid(x)
        for block, size in zip(self.up, reversed(sizes)):
            x = block(upsample_to(x, size))
        return {"dense": x}


@BACKBONE_REGISTRY.register()
class FCRN_A(FCRN):  # noqa: N801  (the paper's name)
    """FCRN-A: pooling after every 3x3 conv (``MODEL.FCRN.CONVS_PER_BLOCK`` 0 means 1)."""

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        return super().from_config(cfg, input_shape, default_convs=1)


@BACKBONE_REGISTRY.register()
class FCRN_B(FCRN):  # noqa: N801  (the paper's name)
    """FCRN-B: pooling after every second 3x3 conv (``MODEL.FCRN.CONVS_PER_BLOCK`` 0 means 2)."""

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        return super().from_config(cfg, input_shape, default_convs=2)
