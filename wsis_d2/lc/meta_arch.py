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
(:mod:`wsis_d2.lc.prm`) and density-aware scores.
"""

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from .. import layers as wsis_layers
from ..layers.batch_norm import fuse_frozen_batchnorm
from ..utils.checks import value_checks
from .heads import build_lc_head
from .losses import (
    estimate_counts,
    hard_spatial_guidance,
    lc_class_loss,
    lc_count_loss,
    lc_ranking_loss,
    lc_spatial_loss,
)
from .prm import (
    batched_peak_gradients,
    gradient_to_prm,
    group_peaks,
    prm_instance_masks,
    score_box_proposals,
    segment_image,
    segment_instance_masks,
    split_group_maps,
)

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
    LC / ILC meta-architecture (see the module docstring).

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
        in_feature: str,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        peak_radius: int = 1,
        peak_threshold="median",
        lower_count: int = 5,
        cls_loss_weight: float = 1.0,
        spatial_loss_weight: float = 1.0,
        count_loss_weight: float = 1.0,
        rank_loss_weight: float = 0.1,
        count_mode: str = "paper",
        spatial_mode: str = "paper",
        count_absent: bool = True,
        spatial_start_iter: int = 0,
        density_start_iter: int = 0,
        class_threshold: float = 0.5,
        prm_enabled: bool = True,
        prm_smooth_sigma: float = 2.0,
        prm_mask_threshold: float = 0.3,
        prm_mask_mode: str = "threshold",
        prm_segment_scale: float = 1000.0,
        prm_segment_sigma: float = 0.8,
        prm_segment_min_size: int = 10,
        prm_max_batch: int = 32,
        prm_group_distance: float = -1.0,
        prm_peak_prominence: float = 0.0,
        density_weight: float = 1.0,
        proposal_balance: float = 1.0,
        proposal_bg_penalty: float = 1.0,
        proposal_bg_threshold: float = 1.0,
        proposal_contour_width: int = 5,
        channels_last: bool = False,
        image_labels_only: bool = False,
    ):
        """
        Args:
            backbone: a detectron2 backbone producing ``in_feature``.
            head: maps the feature to (class maps M, density maps D), exposes ``out_stride``.
            in_feature: backbone output fed to the head.
            num_classes: C.
            pixel_mean, pixel_std: input normalisation.
            peak_radius: r of the peak finder.
            peak_threshold: ``find_peaks`` threshold ("median", a float or None).
            lower_count: t̃.
            cls_loss_weight, spatial_loss_weight, count_loss_weight: loss weights.
            rank_loss_weight: λ.
            count_mode: "paper" (t̂ = Σ D) or "official" (t̂ = mean D).
            spatial_mode: "paper" or "official" normalisation of L_spatial.
            count_absent: count MSE over S ∪ S0 (True) or S only.
            spatial_start_iter: first iteration of stage 2 (official two-stage schedule).
            density_start_iter: iterations before it train L_class alone (the density branch's
                losses are connected zeros), so that the classification branch starts learning
                before the count MSE's gradients reach the shared backbone.
            class_threshold: presence threshold on σ(s_c) at inference.
            prm_enabled: compute instances at inference.
            prm_smooth_sigma, prm_mask_threshold, prm_max_batch: see ``add_lc_config``.
            prm_mask_mode: "threshold" (PRM thresholded) or "segments" (region means of the PRM
                thresholded, :func:`segment_instance_masks`).
            prm_segment_scale, prm_segment_sigma, prm_segment_min_size: the graph-based
                segmentation of "segments" (:func:`segment_image`).
            prm_group_distance: peaks at least this far apart (input pixels) share a backward
                vector; < 0: one vector per peak (exact PRMs).
            prm_peak_prominence: the instances of a class are its prominent peaks first
                (:func:`wsis_d2.layers.prominent_peaks`, h = this · the map's range), then the
                others, each by value; 0: by value alone (the paper).
            density_weight: β of the density-aware instance score.
            proposal_*: PRM instance retrieval with box proposals.
            channels_last: keep weights and inputs in channels-last (NHWC) memory format
                (``MODEL.CHANNELS_LAST``).
            image_labels_only: train with the classification loss alone, from "labels" (the
                counts of the inputs are never read; ``MODEL.LC.IMAGE_LABELS_ONLY``).
        """
        super().__init__()
        # frozen BN layers of any backbone as one op when the input needs a gradient (PRMs)
        self.backbone = fuse_frozen_batchnorm(backbone)
        self.head = head
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
        self.lower_count = int(lower_count)
        if self.lower_count < 2:
            raise ValueError(f"MODEL.LC.LOWER_COUNT (t̃) must be >= 2, got {lower_count}")
        self.cls_loss_weight = float(cls_loss_weight)
        self.spatial_loss_weight = float(spatial_loss_weight)
        self.count_loss_weight = float(count_loss_weight)
        self.rank_loss_weight = float(rank_loss_weight)
        for field, mode in (("COUNT_MODE", count_mode), ("SPATIAL_MODE", spatial_mode)):
            if mode not in ("paper", "official"):
                raise ValueError(f"MODEL.LC.{field} must be 'paper' or 'official', got {mode!r}")
        self.count_mode = count_mode
        self.spatial_mode = spatial_mode
        self.count_absent = bool(count_absent)
        self.spatial_start_iter = int(spatial_start_iter)
        self.density_start_iter = int(density_start_iter)
        self.class_threshold = float(class_threshold)
        self.prm_enabled = bool(prm_enabled)
        self.prm_peak_prominence = float(prm_peak_prominence)
        if not 0.0 <= self.prm_peak_prominence < 1.0:
            raise ValueError(
                f"MODEL.LC.PRM.PEAK_PROMINENCE must be in [0, 1), got {prm_peak_prominence}"
            )
        self.prm_smooth_sigma = float(prm_smooth_sigma)
        self.prm_mask_threshold = float(prm_mask_threshold)
        if not 0.0 < self.prm_mask_threshold <= 1.0:
            raise ValueError(
                f"MODEL.LC.PRM.MASK_THRESHOLD must be in (0, 1], got {prm_mask_threshold}"
            )
        if prm_mask_mode not in ("threshold", "segments"):
            raise ValueError(
                f"MODEL.LC.PRM.MASK_MODE must be 'threshold' or 'segments', got {prm_mask_mode!r}"
            )
        self.prm_mask_mode = prm_mask_mode
        self.prm_segment_scale = float(prm_segment_scale)
        self.prm_segment_sigma = float(prm_segment_sigma)
        self.prm_segment_min_size = int(prm_segment_min_size)
        if (
            self.prm_segment_scale <= 0
            or self.prm_segment_sigma < 0
            or self.prm_segment_min_size < 1
        ):
            raise ValueError(
                "MODEL.SEGMENTS.SCALE must be > 0, SIGMA >= 0 and MIN_SIZE "
                f">= 1, got {prm_segment_scale}, {prm_segment_sigma}, {prm_segment_min_size}"
            )
        self.prm_max_batch = int(prm_max_batch)
        self.prm_group_distance = float(prm_group_distance)
        self.density_weight = float(density_weight)
        self.proposal_balance = float(proposal_balance)
        self.proposal_bg_penalty = float(proposal_bg_penalty)
        self.proposal_bg_threshold = float(proposal_bg_threshold)
        self.proposal_contour_width = int(proposal_contour_width)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if self.pixel_mean.shape != self.pixel_std.shape:
            raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length")
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.image_labels_only = bool(image_labels_only)
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
        head = build_lc_head(cfg, backbone.output_shape()[lc.IN_FEATURE])
        prm = lc.PRM
        return {
            "backbone": backbone,
            "head": head,
            "in_feature": lc.IN_FEATURE,
            "num_classes": lc.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "peak_radius": lc.PEAK_RADIUS,
            "peak_threshold": _peak_threshold(lc.PEAK_FILTER, lc.PEAK_FILTER_VALUE),
            "lower_count": lc.LOWER_COUNT,
            "cls_loss_weight": lc.CLS_LOSS_WEIGHT,
            "spatial_loss_weight": lc.SPATIAL_LOSS_WEIGHT,
            "count_loss_weight": lc.COUNT_LOSS_WEIGHT,
            "rank_loss_weight": lc.RANK_LOSS_WEIGHT,
            "count_mode": lc.COUNT_MODE,
            "spatial_mode": lc.SPATIAL_MODE,
            "count_absent": lc.COUNT_ABSENT,
            "spatial_start_iter": lc.SPATIAL_START_ITER,
            "density_start_iter": lc.DENSITY_START_ITER,
            "class_threshold": lc.CLASS_THRESHOLD,
            "prm_enabled": prm.ENABLED,
            "prm_peak_prominence": prm.PEAK_PROMINENCE,
            "prm_smooth_sigma": prm.SMOOTH_SIGMA,
            "prm_mask_threshold": prm.MASK_THRESHOLD,
            "prm_mask_mode": prm.MASK_MODE,
            "prm_segment_scale": cfg.MODEL.SEGMENTS.SCALE,
            "prm_segment_sigma": cfg.MODEL.SEGMENTS.SIGMA,
            "prm_segment_min_size": cfg.MODEL.SEGMENTS.MIN_SIZE,
            "prm_max_batch": prm.MAX_BATCH,
            "prm_group_distance": prm.GROUP_DISTANCE,
            "density_weight": prm.DENSITY_WEIGHT,
            "proposal_balance": prm.PROPOSAL_BALANCE,
            "proposal_bg_penalty": prm.PROPOSAL_BG_PENALTY,
            "proposal_bg_threshold": prm.PROPOSAL_BG_THRESHOLD,
            "proposal_contour_width": prm.PROPOSAL_CONTOUR_WIDTH,
            "channels_last": cfg.MODEL.CHANNELS_LAST,
            "image_labels_only": lc.IMAGE_LABELS_ONLY,
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

    # ---------------------------------------------------------------------------------------
    # training

    @staticmethod
    def _flag_field(inp: Dict, key: str, like: torch.Tensor) -> torch.Tensor:
        """The flattened bool field ``key`` of a training input; all False (shape of ``like``)
        where the input has none."""
        value = inp.get(key)
        if value is None:
            return torch.zeros_like(like, dtype=torch.bool)
        return torch.as_tensor(value).reshape(-1).to(torch.bool)

    def _targets(self, batched_inputs: List[Dict]):
        labels, counts, count_ge, count_exact, tiles = [], [], [], [], []
        for i, inp in enumerate(batched_inputs):
            where = inp.get("file_name", f"input {i}")
            if "labels" not in inp and "counts" not in inp:
                raise ValueError(f"Training input {where} has neither 'labels' nor 'counts'")
            cnt = inp.get("counts")
            if cnt is None:
                cnt = torch.zeros(self.num_classes, dtype=torch.long)
            cnt = torch.as_tensor(cnt).reshape(-1).to(torch.long)
            lab = inp.get("labels")
            lab = (cnt > 0).float() if lab is None else torch.as_tensor(lab).reshape(-1).float()
            ge = self._flag_field(inp, "count_ge", cnt)
            ex = self._flag_field(inp, "count_exact", cnt)
            fields = (("labels", lab), ("counts", cnt), ("count_ge", ge), ("count_exact", ex))
            for field, t in fields:
                if t.numel() != self.num_classes:
                    raise ValueError(
                        f"Training input {where}: field '{field}' has {t.numel()} entries, "
                        f"MODEL.LC.NUM_CLASSES is {self.num_classes}"
                    )
            labels.append(lab)
            counts.append(cnt)
            count_ge.append(ge)
            count_exact.append(ex & ~ge)
            num_tiles = int(inp.get("mosaic_tiles", 1))
            if num_tiles < 1:
                raise ValueError(f"Training input {where}: 'mosaic_tiles' must be >= 1")
            tiles.append(torch.tensor(float(num_tiles)))
        dev = self.device
        fields = (labels, counts, count_ge, count_exact, tiles)
        return tuple(torch.stack(t).to(dev) for t in fields)

    def _classification_only_loss(self, class_maps, batched_inputs, map_sizes):
        """L_class from the inputs' "labels" alone (``image_labels_only``)."""
        labels = []
        for i, inp in enumerate(batched_inputs):
            if "labels" not in inp:
                raise ValueError(
                    f"Training input {inp.get('file_name', i)} has no 'labels' "
                    "(MODEL.LC.IMAGE_LABELS_ONLY)"
                )
            lab = torch.as_tensor(inp["labels"]).reshape(-1).float()
            if lab.numel() != self.num_classes:
                raise ValueError(
                    f"Training input {inp.get('file_name', i)}: 'labels' has {lab.numel()} "
                    f"entries, MODEL.LC.NUM_CLASSES is {self.num_classes}"
                )
            labels.append(lab)
        labels = torch.stack(labels).to(self.device)
        _, indices = self.find_peaks(class_maps, map_sizes)
        scores = self.class_scores(class_maps, indices, map_sizes)
        with torch.no_grad():
            pred = torch.sigmoid(scores) > 0.5
            get_event_storage().put_scalar(
                "lc/cls_accuracy", (pred == (labels > 0.5)).float().mean()
            )
        return {"loss_cls": self.cls_loss_weight * lc_class_loss(scores, labels)}

    def losses(
        self, class_maps, density_maps, batched_inputs, map_sizes
    ) -> Dict[str, torch.Tensor]:
        """All LC / ILC losses of one batch (see :mod:`wsis_d2.lc.losses`)."""
        if self.image_labels_only:
            return self._classification_only_loss(class_maps, batched_inputs, map_sizes)
        labels, counts, count_ge, count_exact, tiles = self._targets(batched_inputs)
        valid = self.valid_mask(map_sizes, class_maps.shape[-2:], class_maps.device)
        peak_mask, indices = self.find_peaks(class_maps, map_sizes)
        scores = self.class_scores(class_maps, indices, map_sizes)
        present = labels > 0.5
        t_tilde = self.lower_count
        # S̃: counts >= t̃, unless marked exact (mosaics of exactly counted tiles, uncensored
        # counts); its hinge bound is t̃, or the count where that is a larger lower bound
        beyond = present & (count_ge | ((counts >= t_tilde) & ~count_exact))
        exact = present & ~beyond & (counts >= 1)  # S
        bound = torch.where(count_ge, counts.clamp_min(t_tilde), torch.full_like(counts, t_tilde))
        absent = ~present  # S0
        storage = get_event_storage()
        stage1 = storage.iter < self.spatial_start_iter
        # 0.0 before DENSITY_START_ITER: the density losses stay in the graph, as zeros
        density_on = 0.0 if storage.iter < self.density_start_iter else 1.0
        # valid and the guidance are 0/1 maps built here, S and S0 disjoint by construction:
        # their per-pixel value checks would add ~1.5 ms a step (N=8, C=20, 56x56, CPU)
        with value_checks(False):
            counts_hat = estimate_counts(density_maps, valid, self.count_mode)

        loss_cls = lc_class_loss(scores, labels)
        if stage1:
            zero = density_maps.sum() * 0.0
            loss_sp_pos, loss_sp_neg = zero, zero
            guidance = torch.zeros_like(density_maps)
        else:
            kth = torch.full(labels.shape, float("inf"), device=class_maps.device)
            k = counts.clamp_min(1)  # t_c of S (below t̃ unless exact)
            for i, (h, w) in enumerate(map_sizes):
                kth[i] = wsis_layers.kth_peak_value(
                    class_maps[i : i + 1, :, :h, :w].detach(),
                    k[i : i + 1],
                    radius=self.peak_radius,
                    threshold=self.peak_threshold,
                )[0]
            guidance = hard_spatial_guidance(class_maps, peak_mask, kth, exact)
            with value_checks(False):
                loss_sp_pos, loss_sp_neg = lc_spatial_loss(
                    density_maps, guidance, exact, absent, valid, self.spatial_mode
                )
        count_select = exact | absent if (self.count_absent and not stage1) else exact
        loss_count = lc_count_loss(counts_hat, counts, count_select, weights=1.0 / tiles)
        loss_rank = lc_ranking_loss(counts_hat, bound, beyond)

        with torch.no_grad():
            storage.put_scalar("lc/stage", 1.0 if stage1 else 2.0)
            storage.put_scalar("lc/num_peaks_per_map", indices.shape[0] / max(1, labels.numel()))
            storage.put_scalar(
                "lc/guidance_per_class", float(guidance.sum()) / max(1, int(exact.sum()))
            )
            pred = torch.sigmoid(scores) > 0.5
            storage.put_scalar("lc/cls_accuracy", (pred == present).float().mean())
            if bool(exact.any()):
                err = (counts_hat - counts.to(counts_hat.dtype))[exact].abs().mean()
                storage.put_scalar("lc/count_mae_S", err)
            if bool(absent.any()):
                storage.put_scalar("lc/count_mean_S0", counts_hat[absent].mean())
            if bool(beyond.any()):
                storage.put_scalar("lc/count_mean_S_tilde", counts_hat[beyond].mean())
        return {
            "loss_cls": self.cls_loss_weight * loss_cls,
            "loss_sp_pos": self.spatial_loss_weight * loss_sp_pos * density_on,
            "loss_sp_neg": self.spatial_loss_weight * loss_sp_neg * density_on,
            "loss_count": self.count_loss_weight * loss_count * density_on,
            "loss_rank": self.rank_loss_weight * loss_rank * density_on,
        }

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

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        """Per-image inference (each image gets its own forward, so PRMs stay per image)."""
        return [self.inference_single(inp) for inp in batched_inputs]

    def inference_single(self, inp: Dict, counts: Optional[torch.Tensor] = None) -> Dict:
        """
        Inference on one image (see the class docstring for ``inp`` and the output).

        Args:
            inp: one model input dict.
            counts: optional (C,) counts that replace the predicted ones (for example ground truth,
                to evaluate the instance masks with oracle counts, or to time the PRMs of a given
                number of peaks); classes with a count > 0 are then the present ones.
        """
        images = self.preprocess_image([inp])
        x = images.tensor
        in_h, in_w = images.image_sizes[0]
        out_h, out_w = int(inp.get("height", in_h)), int(inp.get("width", in_w))
        with torch.enable_grad():
            x = x.detach().requires_grad_(self.prm_enabled)
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
            keep = self._retained_peaks(class_maps, indices, counts, (mh, mw))
            stride_y = x.shape[-2] / class_maps.shape[-2]
            stride_x = x.shape[-1] / class_maps.shape[-1]
            points = torch.stack(
                [(keep[:, 3].float() + 0.5) * stride_x, (keep[:, 2].float() + 0.5) * stride_y],
                dim=1,
            )
            # for display (tools/demo.py): the density maps over the image and the retained peaks
            # in output pixels (a border cell's centre can lie past the image: clamped to it)
            peaks_out = torch.stack(
                [
                    keep[:, 1].to(points.dtype),
                    (points[:, 1] * (out_h / in_h)).clamp(0, out_h),
                    (points[:, 0] * (out_w / in_w)).clamp(0, out_w),
                ],
                dim=1,
            )
            result = {
                "counts": counts,
                "density": density_maps[0, :, :mh, :mw].detach().float(),
                "peaks": peaks_out.detach(),
            }
            if not self.prm_enabled:
                return result
            values = class_maps[0, keep[:, 1], keep[:, 2], keep[:, 3]]
            groups = self._group(points, values.detach())
            num_groups = int(groups.max()) + 1 if groups.numel() else 0
            combine = groups[None, :] == torch.arange(num_groups, device=groups.device)[:, None]
            grads = batched_peak_gradients(values, x, combine, max_batch=self.prm_max_batch)
        class_maps = class_maps.detach()
        density_maps = density_maps.detach()
        group_prms = gradient_to_prm(grads[:, 0, :, :in_h, :in_w], self.prm_smooth_sigma)
        prms = split_group_maps(group_prms, points, groups)  # (P, in_h, in_w)
        if self.prm_mask_mode == "segments":
            # regions of the network input itself (in_h x in_w), the pixels of the PRMs
            segments = segment_image(
                inp["image"],
                self.prm_segment_scale,
                self.prm_segment_sigma,
                self.prm_segment_min_size,
            )
            masks = segment_instance_masks(
                prms, points, segments, self.prm_mask_threshold, (out_h, out_w)
            )
        else:
            masks = prm_instance_masks(prms, points, self.prm_mask_threshold, (out_h, out_w))
        classes = keep[:, 1]
        boxes = BitMasks(masks).get_bounding_boxes()
        proposals = inp.get("proposals")
        if proposals is not None and len(proposals) > 0 and keep.shape[0] > 0:
            masks, boxes = self._retrieve_proposals(
                prms,
                class_maps[0, :, :mh, :mw],
                classes,
                proposals,
                masks,
                (in_h, in_w),
                (out_h, out_w),
            )
        # density inside each mask, on the map grid: ν_i = Σ_cells D̄^c · (fraction of cell in mask)
        dens = density_maps[0, :, :mh, :mw]
        if self.count_mode == "official":
            dens = dens / float(mh * mw)
        if masks.shape[0] > 0:
            frac = F.interpolate(masks[:, None].float(), size=(mh, mw), mode="area")[:, 0]
            nu = (frac * dens[classes]).sum(dim=(1, 2))
        else:
            nu = dens.new_zeros(0)
        peak_vals = class_maps[0, classes, keep[:, 2], keep[:, 3]]
        inst_scores = (
            probs[classes]
            * torch.sigmoid(peak_vals)
            * torch.exp(-self.density_weight * (1.0 - nu).abs())
        )
        instances = Instances((out_h, out_w))
        instances.pred_boxes = boxes
        instances.pred_masks = masks
        instances.scores = inst_scores
        instances.pred_classes = classes
        # a peak whose value does not depend on the image (e.g. all ReLUs before it inactive) has
        # a zero response and no mask: it is counted but gives no instance
        result["instances"] = instances[masks.flatten(1).any(dim=1)]
        return result

    def _group(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Backward-vector group of each peak (:func:`group_peaks`, strongest peaks first)."""
        if self.prm_group_distance < 0:
            return torch.arange(points.shape[0], device=points.device)
        order = torch.argsort(values, descending=True, stable=True)
        groups = torch.empty_like(order)
        groups[order] = group_peaks(points[order], self.prm_group_distance)
        return groups

    def _retained_peaks(
        self, class_maps: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, map_size
    ):
        """
        The first ``counts[c]`` peaks of each class map of one image, by value (with
        ``prm_peak_prominence``: the prominent ones first): (P, 4) rows n, c, y, x.
        """
        if indices.shape[0] == 0:
            return indices
        values = class_maps.detach()[indices[:, 0], indices[:, 1], indices[:, 2], indices[:, 3]]
        order = torch.argsort(values, descending=True, stable=True)
        if self.prm_peak_prominence > 0:
            prominent = torch.zeros_like(values, dtype=torch.bool)
            mh, mw = map_size
            for c in torch.unique(indices[:, 1]).tolist():
                if float(counts[c]) < 1:
                    continue
                rows = torch.nonzero(indices[:, 1] == c).flatten()
                m = class_maps.detach()[0, c, :mh, :mw].float()
                height = self.prm_peak_prominence * float(m.max() - m.min())
                if height > 0:
                    prominent[rows] = wsis_layers.prominent_peaks(
                        m, indices[rows, 2:], values[rows], height
                    ).to(prominent.device)
            order = order[torch.argsort((~prominent[order]).to(torch.int8), stable=True)]
        order = order[torch.argsort(indices[order, 1], stable=True)]  # by class, then as above
        idx = indices[order]
        cls = idx[:, 1].contiguous()
        start = torch.searchsorted(cls, cls, right=False)
        rank = torch.arange(cls.numel(), device=cls.device) - start
        return idx[rank < counts.to(torch.long)[cls]]

    def _retrieve_proposals(self, prms, class_maps, classes, proposals, masks, in_size, out_size):
        """
        PRM instance retrieval with box proposals (:func:`score_box_proposals`): each peak takes
        the proposal of highest score Q; its mask becomes the PRM mask inside that box (the whole
        box where they do not overlap). Peaks without a valid proposal keep their PRM mask.
        """
        in_h, in_w = in_size
        out_h, out_w = out_size
        boxes_in = proposals.proposal_boxes.tensor.to(prms.device)
        up = F.interpolate(
            class_maps[None], size=(in_h, in_w), mode="bilinear", align_corners=False
        )[0]
        mean = up.flatten(1).mean(dim=1)
        background = (up < self.proposal_bg_threshold * mean[:, None, None]).to(prms.dtype)
        q = score_box_proposals(
            prms,
            background[classes],
            boxes_in,
            balance=self.proposal_balance,
            penalty=self.proposal_bg_penalty,
            contour_width=self.proposal_contour_width,
        )
        best_q, best = q.max(dim=1)
        scale = torch.tensor(
            [out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h], device=prms.device
        )
        chosen = boxes_in[best] * scale
        new_masks = masks.clone()
        ys = torch.arange(out_h, device=prms.device)[:, None] + 0.5
        xs = torch.arange(out_w, device=prms.device)[None, :] + 0.5
        boxes = BitMasks(masks).get_bounding_boxes().tensor.clone()
        for i in range(prms.shape[0]):
            if not torch.isfinite(best_q[i]):
                continue
            x1, y1, x2, y2 = chosen[i].tolist()
            inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
            m = masks[i] & inside
            new_masks[i] = m if bool(m.any()) else inside
            boxes[i] = chosen[i]
        return new_masks, Boxes(boxes)
