"""
Point-supervised density-map counting: Lempitsky & Zisserman, "Learning to count objects in images"
(NIPS 2010), with the fully convolutional regressors of Xie et al. (FCRN-A/B, 2016) and U-Net.

Each annotated point P_i contributes a Gaussian kernel to the target density, D(p) = Σ_i N(p; P_i,
σ_i²I), so that the count of any region is the integral of D over it (:mod:`.targets`). The network
F regresses the scaled map s·D (:mod:`.losses`); the count of class c is ∫ F_c / s.
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList

from .losses import DensityLoss
from .postprocessing import DensityPointDetector, build_point_detector
from .targets import DensityTargets

__all__ = ["DensityCounter"]


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
        targets: DensityTargets,
        loss: DensityLoss,
        point_detector: Optional[DensityPointDetector] = None,
        in_feature: str = "dense",
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        channels_last: bool = False,
        test_dihedral: bool = False,
    ):
        """
        Args:
            backbone: produces ``in_feature`` at stride 1.
            targets: the scaled training targets s·D from points (C = ``targets.num_classes``
                density channels, s = ``targets.scale``).
            loss: the training losses (λ·L_MSE, μ·L_cnt).
            point_detector: also return point detections at inference (None: off).
            in_feature: the backbone output fed to the 1x1 head.
            pixel_mean, pixel_std: input normalisation, one value per input channel.
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
        self.targets = targets
        self.loss = loss
        self.point_detector = point_detector
        num_classes = targets.num_classes
        self.head = Conv2d(out_shape[in_feature].channels, num_classes, kernel_size=1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.constant_(self.head.bias, 0.0)
        self.num_classes = num_classes
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
            "targets": DensityTargets(cfg),
            "loss": DensityLoss(cfg),
            "point_detector": build_point_detector(cfg),
            "in_feature": d.IN_FEATURE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
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
            target, valid = self.targets(batched_inputs, images)
            return self.loss(pred, target, valid)
        return self.inference(pred, batched_inputs, images.image_sizes)

    def inference(self, pred: torch.Tensor, batched_inputs: List[Dict], image_sizes):
        """
        Crop the padding, undo the scale s, calibrate (α·D̂ + β), mask by the ROI and resize to
        the original size keeping the integral (counts are integrals at network resolution).
        """
        results = []
        gain = self.count_gain.to(pred.dtype)[:, None, None]
        offset = self.count_offset.to(pred.dtype)[:, None, None]
        for i, (inp, (h, w)) in enumerate(zip(batched_inputs, image_sizes)):
            density = pred[i, :, :h, :w] * (gain / self.targets.scale) + offset
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
            if self.point_detector is not None:
                result["instances"] = self.point_detector(density)
            results.append(result)
        return results
