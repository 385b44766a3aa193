"""
U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) for density regression, as a detectron2 backbone:
an encoder of ``len(CHANNELS)`` conv blocks each followed by 2x2 max pooling, a bottleneck block, and a
decoder that up-samples x2, concatenates the encoder feature of the same resolution (skip connection)
and applies a conv block. The output is one stride-1 feature map ``"dense"``.
"""

from typing import List

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from .fcrn import EncoderDecoder, upsample_to

__all__ = ["UNet"]


@BACKBONE_REGISTRY.register()
class UNet(EncoderDecoder):
    """
    U-Net encoder-decoder with skip connections. Input (N, C_in, H, W) of any size; output
    ``{"dense": (N, channels[0], H, W)}``.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        channels: List[int],
        mid_channels: int,
        convs_per_block: int = 2,
        norm: str = "BN",
    ):
        """
        Args:
            in_channels: input image channels.
            channels: encoder block widths; ``len(channels)`` poolings and up-samplings.
            mid_channels: bottleneck width.
            convs_per_block: 3x3 convs per block.
            norm: normalisation after each conv ("BN", "GN", "").
        """
        super().__init__()
        self._build_blocks(
            in_channels, channels, mid_channels, convs_per_block, norm, skips=True, key="UNET"
        )

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        return {
            "in_channels": input_shape.channels,
            "channels": list(cfg.MODEL.UNET.CHANNELS),
            "mid_channels": cfg.MODEL.UNET.MID_CHANNELS,
            "convs_per_block": cfg.MODEL.UNET.CONVS_PER_BLOCK,
            "norm": cfg.MODEL.UNET.NORM,
        }

    def forward(self, x: torch.Tensor):
        """
        Args:
            x: (N, C_in, H, W).

        Returns:
            {"dense": (N, channels[0], H, W)}.
        """
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, kernel_size=2, ceil_mode=True)
        x = self.mid(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([upsample_to(x, skip.shape[-2:]), skip], dim=1))
        return {"dense": x}
