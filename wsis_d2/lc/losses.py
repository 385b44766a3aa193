"""
Losses of LC / ILC (Cholakkal et al., "Object Counting and Instance Segmentation with Image-level
Supervision", CVPR 2019, Sec. 3).

Notation (per image): C classes; image-level labels l_c ∈ {0, 1}; counts t_c; the lower-count
threshold t̃ (5: counts 1..4 are known exactly, larger ones only as ">= t̃"). Class sets:

    S  = {c : 1 <= t_c < t̃}     present classes with an exact count
    S̃  = {c : t_c >= t̃}         present classes beyond the subitizing range
    S0 = {c : l_c = 0}          absent classes

M: class activation maps (classification branch), M̃: its peak map, D: density maps (logits of
the spatial loss and, summed, the count estimate t̂_c).

Where the official code (github.com/GuoleiSun/CountSeg) differs from the paper, ``mode="paper"``
follows the paper and ``mode="official"`` the code; each docstring says how. :class:`LCLoss` puts
the terms together into the loss dict of a batch (``MODEL.LC``'s weights, modes and schedule).
"""

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.utils.events import get_event_storage

from ..utils.checks import (
    check_binary,
    check_disjoint,
    check_finite,
    check_floating_dtype,
    check_nonnegative,
    check_number,
    check_tensor,
    value_checks,
)

__all__ = [
    "LCLoss",
    "lc_class_loss",
    "estimate_counts",
    "hard_spatial_guidance",
    "lc_spatial_loss",
    "lc_count_loss",
    "lc_ranking_loss",
]

_MODES = ("paper", "official")


def _check_mode(mode: str, field: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"{field} must be one of {_MODES}, got {mode!r}")


def _check_maps(name: str, maps: torch.Tensor, where: str) -> None:
    """(N, C, H, W) floating point."""
    check_tensor(name, maps, ndim=4, where=where)
    check_floating_dtype(name, maps, where)


def _check_per_class(name: str, value: torch.Tensor, like: torch.Tensor, where: str) -> None:
    """(N, C) with the N, C of ``like`` (first two dimensions)."""
    check_tensor(name, value, (like.shape[0], like.shape[1]), where)


def _check_valid(valid: Optional[torch.Tensor], maps: torch.Tensor, where: str) -> None:
    """None or an (N, 1, H, W) 0/1 mask matching ``maps`` (N, C, H, W)."""
    if valid is None:
        return
    n, _, h, w = maps.shape
    check_tensor("valid", valid, (n, 1, h, w), where)
    check_binary("valid", valid, where)


def lc_class_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """
    Image-classification loss (paper Sec. 3.1, the multi-label soft-margin loss of PRM):

        L_class = −1/C Σ_c [ l_c log σ(s_c) + (1 − l_c) log(1 − σ(s_c)) ],

    averaged over the images, with s_c the mean of the peak values of M^c.

    Args:
        scores: (N, C) class scores s_c (logits).
        labels: (N, C) 0/1 image-level labels l_c.

    Returns:
        scalar.
    """
    where = "lc_class_loss"
    check_tensor("scores", scores, ndim=2, where=where)
    check_tensor("labels", labels, tuple(scores.shape), where)
    check_binary("labels", labels, where)
    return F.multilabel_soft_margin_loss(scores, labels.to(scores.dtype))


def estimate_counts(
    density: torch.Tensor, valid: Optional[torch.Tensor] = None, mode: str = "paper"
) -> torch.Tensor:
    """
    Count estimate of each class from its density map.

    paper:    t̂_c = Σ_ij D^c_ij                (sum over the image's pixels)
    official: t̂_c = 1/(H·W) Σ_ij D^c_ij        (spatial mean, ``adaptive_avg_pool2d``)

    Args:
        density: (N, C, H, W) density maps D.
        valid: (N, 1, H, W) 0/1 mask of the pixels inside each image (not padding); None: all.
        mode: "paper" or "official".

    Returns:
        (N, C) t̂.
    """
    _check_mode(mode, "MODEL.LC.COUNT_MODE")
    # an integer density would sum to integer counts and cannot carry a gradient
    _check_maps("density", density, "estimate_counts")
    _check_valid(valid, density, "estimate_counts")
    if valid is None:
        valid = density.new_ones((density.shape[0], 1) + tuple(density.shape[2:]))
    valid = valid.to(density.dtype)
    total = (density * valid).sum(dim=(2, 3))
    if mode == "paper":
        return total
    return total / valid.sum(dim=(2, 3)).clamp_min(1.0)


def hard_spatial_guidance(
    class_maps: torch.Tensor,
    peak_mask: torch.Tensor,
    kth_values: torch.Tensor,
    select: torch.Tensor,
) -> torch.Tensor:
    """
    Pseudo ground truth of the spatial loss (paper Sec. 3.2):

        B^c = u(M̃^c − h_c)   for c ∈ S,   B^c = 0 otherwise,

    with u the unit step, M̃^c the peak map of M^c and h_c its t_c-th highest peak value, so that
    B^c marks the locations of the t_c highest peaks. Since M̃^c is zero outside the peaks, the
    step is taken on the peak pixels only (a non-peak pixel is never marked, also when h_c < 0).
    Computed without gradient.

    Args:
        class_maps: (N, C, H, W) M.
        peak_mask: (N, C, H, W) bool, True at the peaks of M (``find_peaks(...).mask``).
        kth_values: (N, C) h_c (``kth_peak_value`` with k = t_c; +inf where there is no peak).
        select: (N, C) bool, the classes S that receive guidance.

    Returns:
        (N, C, H, W) float 0/1 B.
    """
    where = "hard_spatial_guidance"
    _check_maps("class_maps", class_maps, where)
    check_tensor("peak_mask", peak_mask, tuple(class_maps.shape), where)
    check_binary("peak_mask", peak_mask, where)
    _check_per_class("kth_values", kth_values, class_maps, where)
    # +inf is the documented "no peak"; NaN would silently select nothing
    check_finite("kth_values", kth_values, where, allow_inf=True)
    _check_per_class("select", select, class_maps, where)
    check_binary("select", select, where)
    with torch.no_grad():
        above = class_maps.detach() >= kth_values[:, :, None, None]
        guidance = peak_mask & above & select[:, :, None, None]
    return guidance.to(class_maps.dtype)


def lc_spatial_loss(
    density: torch.Tensor,
    guidance: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    mode: str = "paper",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Spatial loss L_spatial = L_sp+ + L_sp− (paper Sec. 3.2, Eq. 2 and 3), per image:

        L_sp+ = − Σ_{c ∈ S}  1/|S|  · Σ_ij B^c_ij log σ(D^c_ij) / Σ_ij B^c_ij
        L_sp− = − Σ_{c ∈ S0} 1/|S0| · Σ_ij log(1 − σ(D^c_ij)) / (H·W)

    paper:    the per-image terms above (masked BCE over B^c, zero where S or S0 is empty),
              averaged over the N images of the batch.
    official: ``BCEWithLogitsLoss`` pooled over the batch: L_sp+ is the mean of −log σ(D) over
              all guidance peaks (B = 1) of all images and classes, L_sp− the mean of
              −log(1 − σ(D)) over all pixels of all absent-class maps.

    Args:
        density: (N, C, H, W) D (logits).
        guidance: (N, C, H, W) 0/1 B (zero outside S).
        positive: (N, C) bool, S.
        negative: (N, C) bool, S0.
        valid: (N, 1, H, W) 0/1 mask of pixels inside each image; None: all pixels.
        mode: "paper" or "official".

    Returns:
        (L_sp+, L_sp−) scalars.
    """
    _check_mode(mode, "MODEL.LC.SPATIAL_MODE")
    where = "lc_spatial_loss"
    _check_maps("density", density, where)
    check_tensor("guidance", guidance, tuple(density.shape), where)
    check_binary("guidance", guidance, where)
    _check_per_class("positive", positive, density, where)
    _check_per_class("negative", negative, density, where)
    check_binary("positive", positive, where)
    check_binary("negative", negative, where)
    check_disjoint("positive", positive, "negative", negative, where)
    _check_valid(valid, density, where)
    positive, negative = positive.bool(), negative.bool()
    n = density.shape[0]
    if valid is None:
        valid = density.new_ones((n, 1) + tuple(density.shape[2:]))
    valid = valid.to(density.dtype)
    guidance = guidance.to(density.dtype) * valid * positive[:, :, None, None].to(density.dtype)
    neg_w = valid * negative[:, :, None, None].to(density.dtype)  # (N, C, H, W)
    pos_terms = -(guidance * F.logsigmoid(density)).sum(dim=(2, 3))  # (N, C)
    # log(1 − σ(x)) = logσ(−x)
    neg_terms = -(neg_w * F.logsigmoid(-density)).sum(dim=(2, 3))  # (N, C)
    if mode == "official":
        loss_pos = pos_terms.sum() / guidance.sum().clamp_min(1.0)
        loss_neg = neg_terms.sum() / neg_w.sum().clamp_min(1.0)
        return loss_pos, loss_neg
    num_b = guidance.sum(dim=(2, 3))  # (N, C)
    has_b = positive & (num_b > 0)
    per_class_pos = torch.where(
        has_b, pos_terms / num_b.clamp_min(1.0), torch.zeros_like(pos_terms)
    )
    num_s = has_b.sum(dim=1).to(density.dtype)  # (N,)
    loss_pos = (per_class_pos.sum(dim=1) / num_s.clamp_min(1.0)).sum() / n
    area = valid.sum(dim=(1, 2, 3))  # (N,)
    per_class_neg = neg_terms / area.clamp_min(1.0)[:, None]
    num_s0 = negative.sum(dim=1).to(density.dtype)
    loss_neg = (per_class_neg.sum(dim=1) / num_s0.clamp_min(1.0)).sum() / n
    return loss_pos, loss_neg


def lc_count_loss(
    counts_hat: torch.Tensor,
    counts: torch.Tensor,
    select: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    Count (global) loss of the exactly known counts (paper Sec. 3.2, Eq. 4, first term):

        L_count = Σ_{c ∈ S ∪ S0} 1/|S ∪ S0| · (t̂_c − t_c)²,

    per image (zero where the set is empty), averaged over the N images. Which classes enter is
    the caller's choice (``select``): S ∪ S0 as in the paper and the official second stage, or S
    alone as in the official first stage (``MODEL.LC.COUNT_ABSENT``).

    Args:
        counts_hat: (N, C) t̂.
        counts: (N, C) t (0 for absent classes).
        select: (N, C) bool, the classes that enter.
        weights: optional (N,) weight of each image's term (mosaics of g² images: 1/g², since
            their count error is the sum of g² tile errors: a mosaic then weighs as much as one
            image whose tile errors are independent); None: all 1.

    Returns:
        scalar.
    """
    where = "lc_count_loss"
    check_tensor("counts_hat", counts_hat, ndim=2, where=where)
    check_tensor("counts", counts, tuple(counts_hat.shape), where)
    check_nonnegative("counts", counts, where)
    check_finite("counts", counts, where)
    check_tensor("select", select, tuple(counts_hat.shape), where)
    check_binary("select", select, where)
    if weights is not None:
        check_tensor("weights", weights, (counts_hat.shape[0],), where)
        check_nonnegative("weights", weights, where)
        check_finite("weights", weights, where)
    select = select.bool()
    sq = (counts_hat - counts.to(counts_hat.dtype)) ** 2
    sq = torch.where(select, sq, torch.zeros_like(sq))
    num = select.sum(dim=1).to(counts_hat.dtype)
    per_image = sq.sum(dim=1) / num.clamp_min(1.0)
    if weights is not None:
        per_image = per_image * weights.to(per_image.dtype)
    return per_image.sum() / counts_hat.shape[0]


def lc_ranking_loss(
    counts_hat: torch.Tensor, lower_count: Union[float, torch.Tensor], select: torch.Tensor
) -> torch.Tensor:
    """
    Ranking loss of the counts beyond the subitizing range (paper Sec. 3.2, Eq. 4, second term,
    without its weight λ):

        L_rank = Σ_{c ∈ S̃} 1/|S̃| · max(0, t̃ − t̂_c),

    per image (zero where S̃ is empty), averaged over the N images; a hinge with zero margin
    (the official ``MarginRankingLoss(margin=0)``). A per-class bound may replace t̃ where a
    larger lower bound is known (mosaics: the sum of the tiles' bounds).

    Args:
        counts_hat: (N, C) t̂.
        lower_count: t̃, a number or an (N, C) tensor of lower bounds.
        select: (N, C) bool, S̃.

    Returns:
        scalar.
    """
    where = "lc_ranking_loss"
    check_tensor("counts_hat", counts_hat, ndim=2, where=where)
    check_tensor("select", select, tuple(counts_hat.shape), where)
    check_binary("select", select, where)
    select = select.bool()
    if isinstance(lower_count, torch.Tensor):
        check_tensor("lower_count", lower_count, tuple(counts_hat.shape), where)
        bound = lower_count.to(counts_hat.dtype)
    else:
        check_number("lower_count", lower_count, low=0.0, where=where)
        bound = torch.full_like(counts_hat, float(lower_count))
    check_nonnegative("lower_count", bound, where)
    check_finite("lower_count", bound, where)
    hinge = F.relu(bound - counts_hat)
    hinge = torch.where(select, hinge, torch.zeros_like(hinge))
    num = select.sum(dim=1).to(counts_hat.dtype)
    return (hinge.sum(dim=1) / num.clamp_min(1.0)).sum() / counts_hat.shape[0]


def _flag_field(inp: Dict, key: str, like: torch.Tensor) -> torch.Tensor:
    """The flattened bool field ``key`` of a training input; all False (shape of ``like``) where
    the input has none."""
    value = inp.get(key)
    if value is None:
        return torch.zeros_like(like, dtype=torch.bool)
    return torch.as_tensor(value).reshape(-1).to(torch.bool)


class LCLoss(nn.Module):
    """
    The losses of one LC / ILC batch (paper Sec. 3.2, Eq. 1):

        L = L_class + L_spatial + L_global,    L_global = L_count + λ · L_rank,

    each term weighted by its ``*_loss_weight`` (λ = ``rank_loss_weight``), from the model's
    outputs (class maps M, peak map M̃, class scores s, density maps D and counts t̂) and the
    inputs' image-level targets: "labels" (C,) l_c, "counts" (C,) t_c, "count_ge" (C,) bool
    (t_c only a lower bound), optional "count_exact" (C,) bool (a count >= t̃ that is exact) and
    "mosaic_tiles" (int, the count MSE of a mosaic divided by it). The class sets per image:

        S  = {c : l_c = 1, 1 <= t_c, and t_c < t̃ or marked exact}
        S̃  = {c : l_c = 1, t_c >= t̃ (not marked exact) or only a lower bound}
        S0 = {c : l_c = 0}

    Schedule: before ``density_start_iter`` only L_class trains (the density terms are
    connected zeros); before ``spatial_start_iter`` (official stage 1) L_spatial is zero and
    L_count runs over S alone. With ``image_labels_only`` the loss is L_class from "labels"
    alone (counts are never read). Training diagnostics go to the event storage ("lc/...").

    No parameters or buffers (a model's checkpoint does not depend on it).
    """

    @configurable
    def __init__(
        self,
        *,
        lower_count: int = 5,
        cls_loss_weight: float = 1.0,
        spatial_loss_weight: float = 1.0,
        count_loss_weight: float = 1.0,
        rank_loss_weight: float = 0.1,
        spatial_mode: str = "paper",
        count_absent: bool = True,
        spatial_start_iter: int = 0,
        density_start_iter: int = 0,
        image_labels_only: bool = False,
    ):
        """
        Args:
            lower_count: t̃.
            cls_loss_weight, spatial_loss_weight, count_loss_weight: loss weights.
            rank_loss_weight: λ.
            spatial_mode: "paper" or "official" normalisation of L_spatial
                (:func:`lc_spatial_loss`).
            count_absent: count MSE over S ∪ S0 (True) or S only.
            spatial_start_iter: first iteration of stage 2 (official two-stage schedule).
            density_start_iter: iterations before it train L_class alone (the density branch's
                losses are connected zeros), so that the classification branch starts learning
                before the count MSE's gradients reach the shared backbone.
            image_labels_only: L_class alone, from "labels" (``MODEL.LC.IMAGE_LABELS_ONLY``).
        """
        super().__init__()
        self.lower_count = int(lower_count)
        if self.lower_count < 2:
            raise ValueError(f"MODEL.LC.LOWER_COUNT (t̃) must be >= 2, got {lower_count}")
        self.cls_loss_weight = float(cls_loss_weight)
        self.spatial_loss_weight = float(spatial_loss_weight)
        self.count_loss_weight = float(count_loss_weight)
        self.rank_loss_weight = float(rank_loss_weight)
        if spatial_mode not in _MODES:
            raise ValueError(
                f"MODEL.LC.SPATIAL_MODE must be 'paper' or 'official', got {spatial_mode!r}"
            )
        self.spatial_mode = spatial_mode
        self.count_absent = bool(count_absent)
        self.spatial_start_iter = int(spatial_start_iter)
        self.density_start_iter = int(density_start_iter)
        self.image_labels_only = bool(image_labels_only)

    @classmethod
    def from_config(cls, cfg):
        lc = cfg.MODEL.LC
        return {
            "lower_count": lc.LOWER_COUNT,
            "cls_loss_weight": lc.CLS_LOSS_WEIGHT,
            "spatial_loss_weight": lc.SPATIAL_LOSS_WEIGHT,
            "count_loss_weight": lc.COUNT_LOSS_WEIGHT,
            "rank_loss_weight": lc.RANK_LOSS_WEIGHT,
            "spatial_mode": lc.SPATIAL_MODE,
            "count_absent": lc.COUNT_ABSENT,
            "spatial_start_iter": lc.SPATIAL_START_ITER,
            "density_start_iter": lc.DENSITY_START_ITER,
            "image_labels_only": lc.IMAGE_LABELS_ONLY,
        }

    def extra_repr(self) -> str:
        return (
            f"lower_count={self.lower_count}, spatial_mode={self.spatial_mode!r}, "
            f"image_labels_only={self.image_labels_only}"
        )

    @staticmethod
    def targets(batched_inputs: List[Dict], num_classes: int, device):
        """
        The image-level targets of a batch.

        Returns:
            labels (N, C) float l, counts (N, C) int64 t, count_ge (N, C) bool, count_exact
            (N, C) bool (never where count_ge) and tiles (N,) float, the mosaics' tile counts.
        """
        labels, counts, count_ge, count_exact, tiles = [], [], [], [], []
        for i, inp in enumerate(batched_inputs):
            where = inp.get("file_name", f"input {i}")
            if "labels" not in inp and "counts" not in inp:
                raise ValueError(f"Training input {where} has neither 'labels' nor 'counts'")
            cnt = inp.get("counts")
            if cnt is None:
                cnt = torch.zeros(num_classes, dtype=torch.long)
            cnt = torch.as_tensor(cnt).reshape(-1).to(torch.long)
            lab = inp.get("labels")
            lab = (cnt > 0).float() if lab is None else torch.as_tensor(lab).reshape(-1).float()
            ge = _flag_field(inp, "count_ge", cnt)
            ex = _flag_field(inp, "count_exact", cnt)
            fields = (("labels", lab), ("counts", cnt), ("count_ge", ge), ("count_exact", ex))
            for field, t in fields:
                if t.numel() != num_classes:
                    raise ValueError(
                        f"Training input {where}: field '{field}' has {t.numel()} entries, "
                        f"MODEL.LC.NUM_CLASSES is {num_classes}"
                    )
            labels.append(lab)
            counts.append(cnt)
            count_ge.append(ge)
            count_exact.append(ex & ~ge)
            num_tiles = int(inp.get("mosaic_tiles", 1))
            if num_tiles < 1:
                raise ValueError(f"Training input {where}: 'mosaic_tiles' must be >= 1")
            tiles.append(torch.tensor(float(num_tiles)))
        fields = (labels, counts, count_ge, count_exact, tiles)
        return tuple(torch.stack(t).to(device) for t in fields)

    @staticmethod
    def image_labels(batched_inputs: List[Dict], num_classes: int, device) -> torch.Tensor:
        """(N, C) float l from the inputs' "labels" alone (``image_labels_only``)."""
        labels = []
        for i, inp in enumerate(batched_inputs):
            if "labels" not in inp:
                raise ValueError(
                    f"Training input {inp.get('file_name', i)} has no 'labels' "
                    "(MODEL.LC.IMAGE_LABELS_ONLY)"
                )
            lab = torch.as_tensor(inp["labels"]).reshape(-1).float()
            if lab.numel() != num_classes:
                raise ValueError(
                    f"Training input {inp.get('file_name', i)}: 'labels' has {lab.numel()} "
                    f"entries, MODEL.LC.NUM_CLASSES is {num_classes}"
                )
            labels.append(lab)
        return torch.stack(labels).to(device)

    def forward(
        self,
        batched_inputs: List[Dict],
        class_maps: torch.Tensor,
        density_maps: torch.Tensor,
        peak_mask: torch.Tensor,
        scores: torch.Tensor,
        counts_hat: torch.Tensor,
        valid: torch.Tensor,
        kth_peak_values: Callable[[torch.Tensor], torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            batched_inputs: the N training inputs (targets, see the class docstring).
            class_maps: (N, C, h, w) M.
            density_maps: (N, C, h, w) D.
            peak_mask: (N, C, h, w) bool M̃, the peaks of M inside each image.
            scores: (N, C) class scores s (mean peak values of M^c).
            counts_hat: (N, C) t̂ (``estimate_counts``).
            valid: (N, 1, h, w) 0/1 map cells inside each image.
            kth_peak_values: k (N, C) int64 -> (N, C) h_c, the k-th highest peak value of each
                map inside its image (the model's peak finder; ``kth_peak_value``).

        Returns:
            {"loss_cls"} with ``image_labels_only``, else {"loss_cls", "loss_sp_pos",
            "loss_sp_neg", "loss_count", "loss_rank"}: weighted scalars.
        """
        num_classes = class_maps.shape[1]
        storage = get_event_storage()
        if self.image_labels_only:
            labels = self.image_labels(batched_inputs, num_classes, class_maps.device)
            with torch.no_grad():
                pred = torch.sigmoid(scores) > 0.5
                storage.put_scalar("lc/cls_accuracy", (pred == (labels > 0.5)).float().mean())
            return {"loss_cls": self.cls_loss_weight * lc_class_loss(scores, labels)}
        labels, counts, count_ge, count_exact, tiles = self.targets(
            batched_inputs, num_classes, class_maps.device
        )
        present = labels > 0.5
        t_tilde = self.lower_count
        # S̃: counts >= t̃, unless marked exact (mosaics of exactly counted tiles, uncensored
        # counts); its hinge bound is t̃, or the count where that is a larger lower bound
        beyond = present & (count_ge | ((counts >= t_tilde) & ~count_exact))
        exact = present & ~beyond & (counts >= 1)  # S
        bound = torch.where(count_ge, counts.clamp_min(t_tilde), torch.full_like(counts, t_tilde))
        absent = ~present  # S0
        stage1 = storage.iter < self.spatial_start_iter
        # 0.0 before DENSITY_START_ITER: the density losses stay in the graph, as zeros
        density_on = 0.0 if storage.iter < self.density_start_iter else 1.0

        loss_cls = lc_class_loss(scores, labels)
        if stage1:
            zero = density_maps.sum() * 0.0
            loss_sp_pos, loss_sp_neg = zero, zero
            guidance = torch.zeros_like(density_maps)
        else:
            kth = kth_peak_values(counts.clamp_min(1))  # h_c of t_c (below t̃ unless exact)
            guidance = hard_spatial_guidance(class_maps, peak_mask, kth, exact)
            # valid and the guidance are 0/1 maps built here, S and S0 disjoint by construction:
            # their per-pixel value checks would add ~1.5 ms a step (N=8, C=20, 56x56, CPU)
            with value_checks(False):
                loss_sp_pos, loss_sp_neg = lc_spatial_loss(
                    density_maps, guidance, exact, absent, valid, self.spatial_mode
                )
        count_select = exact | absent if (self.count_absent and not stage1) else exact
        loss_count = lc_count_loss(counts_hat, counts, count_select, weights=1.0 / tiles)
        loss_rank = lc_ranking_loss(counts_hat, bound, beyond)

        with torch.no_grad():
            num_peaks = int(peak_mask.sum())
            storage.put_scalar("lc/stage", 1.0 if stage1 else 2.0)
            storage.put_scalar("lc/num_peaks_per_map", num_peaks / max(1, labels.numel()))
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
