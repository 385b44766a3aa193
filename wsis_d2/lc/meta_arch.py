"""
LC / ILC: image-level (lower-count) supervised object counting and instance segmentation
(Cholakkal, Sun, Khan & Shao, "Object Counting and Instance Segmentation with Image-level
Supervision", CVPR 2019; official code github.com/GuoleiSun/CountSeg).

A ResNet backbone without global pooling feeds two branches (``LCHead``):
- the image-classification branch gives class maps M; their local maxima (``find_peaks``) form
  the peak map M̃ and the class score s_c is the mean of the peak values of M^c;
- the density branch gives density maps D with t̂_c = Σ D^c (or its mean, official code).
Training uses image-level labels and counts, exact for 1..t̃−1 and ">= t̃" beyond (ILC). The
spatial loss supervises D at the t_c highest peaks of M^c (hard spatial guidance).

At inference the classes with σ(s_c) > threshold are present with count round(t̂_c); for each of
them the round(t̂_c) highest peaks become instances, with masks from peak response maps
(:mod:`wsis_d2.lc.prm`) and density-aware scores (``MODEL.LC.PRM.EXTRA_PEAKS`` adds lower-scored
instances from the next peaks; the counts stay round(t̂_c)).

Components, each built by its own ``from_config``: the backbone, the head (``LC_HEAD_REGISTRY``),
the criterion (:class:`~wsis_d2.lc.losses.LCLoss`, the loss terms and their schedule) and the
instance decoder (:class:`~wsis_d2.lc.prm.PRMInstanceDecoder`, PRM masks and scores). The model
itself owns the forward, the peak finder, s_c and t̂_c, shared by training and inference.
"""

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList

from .. import layers as wsis_layers
from ..layers.batch_norm import fuse_frozen_batchnorm
from ..utils.checks import value_checks
from .heads import build_lc_head
from .losses import LCLoss, estimate_counts
from .prm import PRMInstanceDecoder

__all__ = ["ImageLevelCounter", "fit_lower_count_gain"]

logger = logging.getLogger(__name__)


def fit_lower_count_gain(
    pred_counts: torch.Tensor, counts: torch.Tensor, count_ge: torch.Tensor
) -> torch.Tensor:
    """
    Per-class gain α_c of the counts of a trained LC / ILC model, fitted on images with the
    training supervision (exact counts t_ic in S, lower bounds "t_ic >= t̃" in S̃):

        α_c = argmin_α  Σ_{i ∈ S_c} (α·t̂_ic − t_ic)²  +  Σ_{i ∈ S̃_c} max(0, t_ic − α·t̂_ic)²,

    over the images where class c is present (t_ic >= 1; at inference absent classes count 0
    whatever t̂). The second sum is the squared form of ILC's ranking hinge, so a lower bound only
    pulls α up while α·t̂ stays below it. The objective is convex and piecewise quadratic in α;
    it is minimised exactly: on each interval between the hinges' break points α = t/t̂ the
    minimiser of the quadratic is B/A, and the interval that contains its own B/A holds the
    minimum. Predicted counts below 0 are taken as 0.

    Not in the paper: the calibrated density α_c·D^c corrects a model whose per-object mass is
    off by a common factor on its own training images (e.g. a short schedule; see
    ``MODEL.LC.CALIBRATION``).

    Args:
        pred_counts: (N, C) uncalibrated t̂_ic.
        counts: (N, C) t_ic (t̃ where only a lower bound is known), >= 0.
        count_ge: (N, C) bool, True where t_ic is a lower bound.

    Returns:
        (C,) float64 α_c; 1 for a class without a present image of positive t̂.
    """
    p = torch.as_tensor(pred_counts, dtype=torch.float64).clamp_min(0.0)
    t = torch.as_tensor(counts, dtype=torch.float64)
    ge = torch.as_tensor(count_ge, dtype=torch.bool)
    if p.dim() != 2 or p.shape != t.shape or ge.shape != p.shape:
        raise ValueError(
            "count calibration needs pred (N, C), counts (N, C) and count_ge (N, C); got "
            f"{tuple(p.shape)}, {tuple(t.shape)} and {tuple(ge.shape)}"
        )
    gain = torch.ones(p.shape[1], dtype=torch.float64)
    for c in range(p.shape[1]):
        present = t[:, c] >= 1
        exact = present & ~ge[:, c]
        bound = present & ge[:, c] & (p[:, c] > 0)
        pe, te = p[exact, c], t[exact, c]
        pb, tb = p[bound, c], t[bound, c]
        a_exact, b_exact = float((pe * pe).sum()), float((pe * te).sum())
        if a_exact <= 0 and pb.numel() == 0:
            continue
        # break points α_j = t_j / t̂_j: hinge j is active for α < α_j
        breaks, order = torch.sort(tb / pb)
        pb2, pbt = (pb * pb)[order], (pb * tb)[order]
        # interval k = (breaks[k-1], breaks[k]]: hinges k.. active
        a_act = torch.cat([pb2.flip(0).cumsum(0).flip(0), pb2.new_zeros(1)])
        b_act = torch.cat([pbt.flip(0).cumsum(0).flip(0), pbt.new_zeros(1)])
        for k in range(breaks.numel() + 1):
            lo = float(breaks[k - 1]) if k > 0 else -math.inf
            hi = float(breaks[k]) if k < breaks.numel() else math.inf
            a, b = a_exact + float(a_act[k]), b_exact + float(b_act[k])
            if a <= 0:  # no exact image and every hinge met: the smallest α meeting them all
                gain[c] = lo
                break
            if b / a <= hi:
                gain[c] = max(b / a, lo)
                break
    return gain


def _peak_threshold(kind: str, value: float):
    """``find_peaks``' threshold argument from the config's PEAK_FILTER / PEAK_FILTER_VALUE."""
    if kind == "median":
        return "median"
    if kind == "value":
        return float(value)
    if kind == "none":
        return None
    raise ValueError(f"MODEL.LC.PEAK_FILTER must be 'median', 'value' or 'none', got {kind!r}")


@META_ARCH_REGISTRY.register()
class ImageLevelCounter(nn.Module):
    """
    LC / ILC meta-architecture (see the module docstring): backbone + head give M and D; the
    model finds the peaks M̃, s and t̂; ``criterion`` turns them into the losses, ``decoder`` the
    retained peaks into instances.

    Input per image (detectron2 list of dicts, ``LCDatasetMapper``): "image" (3, H, W) uint8 or
    float in ``cfg.INPUT.FORMAT``; "height", "width" of the output; for training "labels" (C,)
    0/1, "counts" (C,) int (exact where known), "count_ge" (C,) bool (True where the count is
    only a lower bound, counts[c] >= t̃) and optional "count_exact" (C,) bool (True where a count
    >= t̃ is exact, e.g. of a mosaic of exactly counted tiles; without it such counts are ranked
    against t̃ as in ILC) and "mosaic_tiles" (int, the number of images of a mosaic, whose count
    MSE is divided by it; default 1); optional "proposals" (Instances with
    proposal_boxes in input coordinates) at inference.

    Output per image at inference: {"instances": Instances(pred_boxes, pred_masks, scores,
    pred_classes) at (height, width), "counts": (C,) float, "density": (C, h, w) the density maps
    D^c over the image (map resolution; Σ D^c = t̂_c with COUNT_MODE "paper"), "peaks": (P, 3)
    rows (class, y, x) of the retained peaks (counts[c] per class) in output pixels}. Inference
    reads the density as α_c·D^c, with the count calibration α (buffer ``count_gain``, 1 unless
    fitted after training: ``MODEL.LC.CALIBRATION``, :func:`fit_lower_count_gain`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        criterion: Optional[LCLoss] = None,
        decoder: Optional[PRMInstanceDecoder] = None,
        in_feature: str,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        peak_radius: int = 1,
        peak_threshold: Union[str, float, None] = "median",
        count_mode: str = "paper",
        class_threshold: float = 0.5,
        channels_last: bool = False,
    ):
        """
        Args:
            backbone: a detectron2 backbone producing ``in_feature``.
            head: maps the feature to (class maps M, density maps D), exposes ``out_stride``.
            criterion: the training losses (:class:`LCLoss`, its defaults when None).
            decoder: instances from the retained peaks at inference (:class:`PRMInstanceDecoder`,
                its defaults when None).
            in_feature: backbone output fed to the head.
            num_classes: C.
            pixel_mean, pixel_std: input normalisation.
            peak_radius: r of the peak finder.
            peak_threshold: ``find_peaks`` threshold ("median", a float or None).
            count_mode: "paper" (t̂ = Σ D) or "official" (t̂ = mean D), in training and inference.
            class_threshold: presence threshold on σ(s_c) at inference.
            channels_last: keep weights and inputs in channels-last (NHWC) memory format
                (``MODEL.CHANNELS_LAST``).
        """
        super().__init__()
        # frozen BN layers of any backbone as one op when the input needs a gradient (PRMs)
        self.backbone = fuse_frozen_batchnorm(backbone)
        self.head = head
        # no parameters or buffers: the state_dict keys are the backbone's, the head's and ours
        self.criterion = LCLoss() if criterion is None else criterion
        self.decoder = PRMInstanceDecoder() if decoder is None else decoder
        self.in_feature = in_feature
        out_shape = backbone.output_shape()
        if in_feature not in out_shape:
            raise ValueError(
                f"MODEL.LC.IN_FEATURE={in_feature!r} is not a backbone output: "
                f"{sorted(out_shape)} (set MODEL.RESNETS.OUT_FEATURES)"
            )
        self.feature_stride = int(out_shape[in_feature].stride or 1)
        self.num_classes = int(num_classes)
        self.peak_radius = int(peak_radius)
        self.peak_threshold = peak_threshold
        if count_mode not in ("paper", "official"):
            raise ValueError(
                f"MODEL.LC.COUNT_MODE must be 'paper' or 'official', got {count_mode!r}"
            )
        self.count_mode = count_mode
        self.class_threshold = float(class_threshold)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if self.pixel_mean.shape != self.pixel_std.shape:
            raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length")
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        # count calibration α_c (MODEL.LC.CALIBRATION): inference uses D' = α_c·D^c; saved in
        # checkpoints, identity until set_count_gain (checkpoints from before it load as 1)
        self.register_buffer("count_gain", torch.ones(self.num_classes))
        self._register_load_state_dict_pre_hook(self._fill_missing_count_gain)

    def _fill_missing_count_gain(self, state_dict, prefix, *args):
        """Checkpoints written before the count calibration existed load with α = 1."""
        state_dict.setdefault(prefix + "count_gain", torch.ones_like(self.count_gain))

    def set_count_gain(self, gain) -> None:
        """
        Set the count calibration α (float or (C,)) of inference (``fit_lower_count_gain``).
        """
        gain = torch.as_tensor(gain, dtype=self.count_gain.dtype).to(self.count_gain.device)
        gain = gain.expand_as(self.count_gain)
        if not bool(torch.isfinite(gain).all()) or bool((gain <= 0).any()):
            raise ValueError(f"count calibration gains must be finite and > 0, got {gain.tolist()}")
        self.count_gain.copy_(gain)

    @torch.no_grad()
    def raw_counts(self, inp: Dict, with_area: bool = False):
        """
        Uncalibrated t̂ (C,) of one model input (the density branch alone: no peaks, no PRMs), as
        :meth:`inference_single` computes it before α is applied. ``with_area``: also the count
        of a density of 1 everywhere (the valid map cells, or 1 for the official spatial mean),
        to which a model with a constant output gives proportional counts.
        """
        images = self.preprocess_image([inp])
        _, density_maps = self.predict_maps(images.tensor)
        map_size = self.map_sizes(
            images.image_sizes, images.tensor.shape[-2:], density_maps.shape[-2:]
        )
        valid = self.valid_mask(map_size, density_maps.shape[-2:], density_maps.device)
        counts = estimate_counts(density_maps, valid, self.count_mode)[0]
        if not with_area:
            return counts
        unit = torch.ones_like(density_maps[:, :1])
        return counts, float(estimate_counts(unit, valid, self.count_mode)[0, 0])

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        lc = cfg.MODEL.LC
        if lc.IN_FEATURE not in backbone.output_shape():
            raise ValueError(
                f"MODEL.LC.IN_FEATURE={lc.IN_FEATURE!r} is not a backbone output: "
                f"{sorted(backbone.output_shape())} (set MODEL.RESNETS.OUT_FEATURES)"
            )
        return {
            "backbone": backbone,
            "head": build_lc_head(cfg, backbone.output_shape()[lc.IN_FEATURE]),
            "criterion": LCLoss(cfg),
            "decoder": PRMInstanceDecoder(cfg),
            "in_feature": lc.IN_FEATURE,
            "num_classes": lc.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "peak_radius": lc.PEAK_RADIUS,
            "peak_threshold": _peak_threshold(lc.PEAK_FILTER, lc.PEAK_FILTER_VALUE),
            "count_mode": lc.COUNT_MODE,
            "class_threshold": lc.CLASS_THRESHOLD,
            "channels_last": cfg.MODEL.CHANNELS_LAST,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ---------------------------------------------------------------------------------------
    # shared pieces

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad the images to a multiple of the feature stride."""
        images = [
            (x["image"].to(self.device).to(torch.float32) - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        divisor = max(int(self.backbone.size_divisibility), self.feature_stride)
        return ImageList.from_tensors(images, divisor)

    def predict_maps(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        (N, 3, H, W) normalised batch -> class maps M and density maps D (N, C, h, w), contiguous
        float32 (also under autocast and channels-last: the peak op and the losses read them).
        """
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        class_maps, density_maps = self.head(self.backbone(tensor)[self.in_feature])
        return class_maps.float().contiguous(), density_maps.float().contiguous()

    @staticmethod
    def map_sizes(image_sizes, input_shape, map_shape) -> List[Tuple[int, int]]:
        """Number of map rows/columns covering each (unpadded) image."""
        sy = input_shape[0] / map_shape[0]
        sx = input_shape[1] / map_shape[1]
        out = []
        for h, w in image_sizes:
            rows = min(int(map_shape[0]), max(1, int(math.ceil(float(h) / sy - 1e-6))))
            cols = min(int(map_shape[1]), max(1, int(math.ceil(float(w) / sx - 1e-6))))
            out.append((rows, cols))
        return out

    @staticmethod
    def valid_mask(map_sizes, map_shape, device) -> torch.Tensor:
        """(N, 1, h, w) float mask of the map cells inside each image."""
        valid = torch.zeros((len(map_sizes), 1) + tuple(map_shape), device=device)
        for i, (h, w) in enumerate(map_sizes):
            valid[i, :, :h, :w] = 1.0
        return valid

    def find_peaks(self, class_maps: torch.Tensor, map_sizes) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Local maxima of each image's class maps inside the image (``wsis_d2.layers.find_peaks``).

        Returns:
            peak_mask: (N, C, h, w) bool.
            indices: (P, 4) rows (n, c, y, x), sorted by (n, c) then value descending.
        """
        mask = torch.zeros(class_maps.shape, dtype=torch.bool, device=class_maps.device)
        indices = []
        maps = class_maps.detach()
        for i, (h, w) in enumerate(map_sizes):
            peaks = wsis_layers.find_peaks(
                maps[i : i + 1, :, :h, :w], radius=self.peak_radius, threshold=self.peak_threshold
            )
            mask[i, :, :h, :w] = peaks.mask[0]
            idx = peaks.indices.clone()
            idx[:, 0] = i
            indices.append(idx)
        return mask, torch.cat(indices, dim=0)

    def class_scores(self, class_maps: torch.Tensor, indices: torch.Tensor, map_sizes):
        """
        s_c = mean of the peak values of M^c, gathered from M so that gradients flow to the
        peaks; a map without peaks (not possible with the median filter) uses its maximum.

        Returns:
            (N, C) s.
        """
        n, c = class_maps.shape[:2]
        flat = indices[:, 0] * c + indices[:, 1]
        values = class_maps[indices[:, 0], indices[:, 1], indices[:, 2], indices[:, 3]]
        sums = class_maps.new_zeros(n * c).index_add(0, flat, values)
        nums = torch.bincount(flat, minlength=n * c).to(class_maps.dtype)
        scores = (sums / nums.clamp_min(1.0)).view(n, c)
        if bool((nums == 0).any()):
            maxima = torch.stack(
                [
                    class_maps[i, :, :h, :w].flatten(1).amax(dim=1)
                    for i, (h, w) in enumerate(map_sizes)
                ]
            )
            scores = torch.where((nums == 0).view(n, c), maxima, scores)
        return scores

    def kth_peak_values(self, class_maps: torch.Tensor, k: torch.Tensor, map_sizes):
        """
        h_c, the k-th highest peak value of each class map inside its image
        (``wsis_d2.layers.kth_peak_value``, the peak finder of :meth:`find_peaks`).

        Args:
            class_maps: (N, C, h, w) M.
            k: (N, C) int64 ranks (1-based).

        Returns:
            (N, C), +inf where a map has no peak.
        """
        kth = torch.full(tuple(k.shape), float("inf"), device=class_maps.device)
        for i, (h, w) in enumerate(map_sizes):
            kth[i] = wsis_layers.kth_peak_value(
                class_maps[i : i + 1, :, :h, :w].detach(),
                k[i : i + 1],
                radius=self.peak_radius,
                threshold=self.peak_threshold,
            )[0]
        return kth

    # ---------------------------------------------------------------------------------------
    # training

    def losses(
        self, class_maps, density_maps, batched_inputs, map_sizes
    ) -> Dict[str, torch.Tensor]:
        """
        All LC / ILC losses of one batch: the model's peaks M̃, scores s and counts t̂ of the
        maps, the loss terms from them (``self.criterion``, :class:`LCLoss`).
        """
        valid = self.valid_mask(map_sizes, class_maps.shape[-2:], class_maps.device)
        peak_mask, indices = self.find_peaks(class_maps, map_sizes)
        scores = self.class_scores(class_maps, indices, map_sizes)
        # valid is a 0/1 map built here: its per-pixel value checks would cost time every step
        with value_checks(False):
            counts_hat = estimate_counts(density_maps, valid, self.count_mode)
        return self.criterion(
            batched_inputs,
            class_maps,
            density_maps,
            peak_mask,
            scores,
            counts_hat,
            valid,
            lambda k: self.kth_peak_values(class_maps, k, map_sizes),
        )

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts (see the class docstring).

        Returns:
            training: dict of scalar losses ("loss_cls", "loss_sp_pos", "loss_sp_neg",
            "loss_count", "loss_rank"). Inference: one dict per image with "instances",
            "counts", "density" and "peaks".
        """
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        class_maps, density_maps = self.predict_maps(images.tensor)
        map_sizes = self.map_sizes(
            images.image_sizes, images.tensor.shape[-2:], class_maps.shape[-2:]
        )
        return self.losses(class_maps, density_maps, batched_inputs, map_sizes)

    # ---------------------------------------------------------------------------------------
    # inference

    def inference(
        self, batched_inputs: List[Dict], decoder: Optional[PRMInstanceDecoder] = None
    ) -> List[Dict]:
        """Per-image inference (each image gets its own forward, so PRMs stay per image)."""
        return [self.inference_single(inp, decoder=decoder) for inp in batched_inputs]

    def inference_single(
        self,
        inp: Dict,
        counts: Optional[torch.Tensor] = None,
        decoder: Optional[PRMInstanceDecoder] = None,
    ) -> Dict:
        """
        Inference on one image (see the class docstring for ``inp`` and the output).

        Args:
            inp: one model input dict.
            counts: optional (C,) counts that replace the predicted ones (for example ground truth,
                to evaluate the instance masks with oracle counts, or to time the PRMs of a given
                number of peaks); classes with a count > 0 are then the counted ones (the extra
                peaks of ``MODEL.LC.PRM.EXTRA_PEAKS`` still go to the classes with σ(s_c) above
                the threshold).
            decoder: the instance decoder to use instead of ``self.decoder``, e.g. a variant
                built from another config (``PRMInstanceDecoder(cfg)``) on the same weights.
        """
        decoder = self.decoder if decoder is None else decoder
        images = self.preprocess_image([inp])
        x = images.tensor
        in_h, in_w = images.image_sizes[0]
        out_h, out_w = int(inp.get("height", in_h)), int(inp.get("width", in_w))
        with torch.enable_grad():
            x = x.detach().requires_grad_(decoder.enabled)
            class_maps, density_maps = self.predict_maps(x)
            density_maps = density_maps * self.count_gain[None, :, None, None]
            map_size = self.map_sizes([(in_h, in_w)], x.shape[-2:], class_maps.shape[-2:])
            mh, mw = map_size[0]
            valid = self.valid_mask(map_size, class_maps.shape[-2:], class_maps.device)
            _, indices = self.find_peaks(class_maps, map_size)
            scores = self.class_scores(class_maps, indices, map_size)[0].detach()
            counts_hat = estimate_counts(density_maps, valid, self.count_mode)[0].detach()
        probs = torch.sigmoid(scores)
        present = probs > self.class_threshold
        if counts is None:
            counts = torch.where(
                present, counts_hat.round().clamp_min(0.0), torch.zeros_like(counts_hat)
            )
        else:
            counts = torch.as_tensor(counts, dtype=counts_hat.dtype, device=self.device)
            if counts.shape != counts_hat.shape or bool((counts < 0).any()):
                raise ValueError(
                    f"inference counts must be {tuple(counts_hat.shape)} non-negative "
                    f"numbers, got {counts.tolist()}"
                )
        keep, counted = decoder.instance_peaks(class_maps, indices, counts, present, (mh, mw))
        stride_y = x.shape[-2] / class_maps.shape[-2]
        stride_x = x.shape[-1] / class_maps.shape[-1]
        points = torch.stack(
            [(keep[:, 3].float() + 0.5) * stride_x, (keep[:, 2].float() + 0.5) * stride_y], dim=1
        )
        # for display (tools/demo.py): the density maps over the image and the counted peaks in
        # output pixels (a border cell's centre can lie past the image: clamped to it)
        peaks_out = torch.stack(
            [
                keep[counted, 1].to(points.dtype),
                (points[counted, 1] * (out_h / in_h)).clamp(0, out_h),
                (points[counted, 0] * (out_w / in_w)).clamp(0, out_w),
            ],
            dim=1,
        )
        density = density_maps[0, :, :mh, :mw].detach()
        result = {"counts": counts, "density": density.float(), "peaks": peaks_out}
        if not decoder.enabled:
            return result
        if self.count_mode == "official":
            density = density / float(mh * mw)  # D̄: Σ D̄^c = t̂_c, the mean of D^c
        result["instances"] = decoder(
            x,
            class_maps,
            keep,
            points,
            inp["image"],
            density,
            probs,
            (out_h, out_w),
            inp.get("proposals"),
            counted=counted,
        )
        return result
