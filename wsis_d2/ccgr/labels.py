"""
CCGR's steps from image-level labels to pseudo instance labels ("Center-context-gap Refinement
for Weakly Supervised Instance Segmentation", AAAI 2020), as functions of tensors:

1. **Round-1 cues** (:func:`class_map_cues`): peaks and pseudo semantic labels from the class maps
   M of an image-level classifier (the LC classification branch with peak stimulation, trained
   on image labels only). A peak of a present class c is a local maximum of M^c (radius r) of at
   least ``peak_threshold`` · max M^c. The pseudo semantic label of a pixel is the best present
   class c when its normalised score M̄^c = M^c / max M^c reaches ``fg_threshold``, background
   when every present class scores below ``bg_threshold``, and the ignore value in between. The
   paper takes round-1 labels from AffinityNet; here M̄ is either used per pixel ("pixels") or
   averaged over the regions of a graph-based segmentation of the image first ("regions"), so
   that labels follow image edges.
2. **Bags** (:func:`build_bags`, Eq. 4): every peak of a present class is a bag with that class's
   label; its instances are the K proposals that contain the peak and no other peak of its class,
   ranked by R(B) = B_S − γ · Σ_{p ∈ B}(1 − O_p) / |B|, B_S the proposal's objectness and O the
   current segmentation score of the class.
3. **Refinement** (:func:`refine_boxes` = :func:`wsis_d2.layers.refine_context_gap`, Eq. 2–3):
   the MIL branch's box B of a bag is moved by gradient steps on its four coordinates to minimise
   L = Φ(C) − Φ(B), the mean class score S_c in the context ring C (B scaled 1.5x about its
   centre, minus B) minus the mean inside B, both from integral images
   (:class:`wsis_d2.layers.IntegralImage`, built once per image). A box stops when a step would
   make it contain a second peak of its class (the paper's guard). By default
   (``MODEL.CCGR.REFINE_GROW_ONLY``; not in the paper) the descent is projected onto the boxes
   that contain the MIL box: the paper refines part boxes into whole objects, and unconstrained
   the mean-based gap also shrinks good boxes of objects that fill them only partly (triangles,
   stars, crescents lose their tips). By default (``MODEL.CCGR.REFINE_SEARCH``; not in the
   paper) a global search over those allowed boxes comes first and the descent polishes its
   box: on flat regions of S (plateaus, the rule for S averaged over image regions) ∂L/∂B = 0
   and the descent alone stays near the MIL box.
4. **Pseudo masks** (:func:`pseudo_instances`): S_c inside the refined box thresholded; duplicate
   boxes of one class removed by NMS; pixels claimed by several masks go to the best-scored one.
   Optionally (not in the paper) each mask is then re-labelled by GrabCut on the image colours
   (:func:`grabcut_masks`), the mask as probable foreground and the box's context ring as
   background, as box-supervised methods do ("Simple Does It", Khoreva et al., CVPR 2017).

The files of a round (cues, pseudo-label json) are read and written by
:mod:`wsis_d2.ccgr.files`.
"""

import logging
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from detectron2.layers import batched_nms
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou

from .. import layers as wsis_layers
from ..layers import IntegralImage, context_boxes, refine_context_gap

__all__ = [
    "class_map_cues",
    "merge_plateau_peaks",
    "build_bags",
    "bags_from_boxes",
    "semantic_labels_from_instances",
    "refine_boxes",
    "pseudo_instances",
    "grabcut_masks",
    "assign_pixels",
    "component_instances",
]

logger = logging.getLogger(__name__)

IGNORE = 255


# ------------------------------------------------------------------------------------------------
# 1. round-1 cues


def merge_plateau_peaks(
    yx: torch.Tensor, values: torch.Tensor, size: Tuple[int, int], radius: int = 1
) -> List[Tuple[int, int, float]]:
    """
    One peak per plateau. A local maximum ties with its equal neighbours, so a flat top gives a
    cluster of touching "peaks"; the class maps are upsampled bilinearly (align_corners False)
    before peak finding, which makes such flat tops at every map border (half a map cell wide:
    16 input pixels at stride 32), so a class whose maximum cell touches the border had a whole
    block of peaks, and no proposal held exactly one peak of the class (no bag for that object).
    Two distinct maxima never touch (a neighbour of a peak is not higher, so a touching peak is
    equal: the same plateau), so 8-connected peak pixels are merged into one peak: the member
    nearest to their centroid, with their (common) value.

    Args:
        yx: (P, 2) long pixel positions (y, x) of the local maxima of one map.
        values: (P,) their values.
        size: (H, W) of the map.
        radius: r of the local-maximum window; with r = 0 every pixel is a "peak", neighbours
            of different values touch, and nothing is merged.

    Returns:
        [(y, x, value)] one per plateau, ordered by value (descending), then position.
    """
    if yx.shape[0] == 0:
        return []
    if radius < 1:
        pos, val = yx.tolist(), values.tolist()
        return sorted(((y, x, v) for (y, x), v in zip(pos, val)), key=lambda t: (-t[2], t[0], t[1]))
    pos = yx.cpu().numpy().astype(np.int64)
    val = values.detach().cpu().numpy()
    mask = np.zeros(size, dtype=bool)
    mask[pos[:, 0], pos[:, 1]] = True
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    comp = labels[pos[:, 0], pos[:, 1]]
    out = []
    for k in np.unique(comp):
        members = np.nonzero(comp == k)[0]
        centre = pos[members].mean(axis=0)
        best = members[np.argmin(((pos[members] - centre) ** 2).sum(axis=1))]
        out.append((int(pos[best, 0]), int(pos[best, 1]), float(val[members].max())))
    out.sort(key=lambda t: (-t[2], t[0], t[1]))
    return out


def class_map_cues(
    class_maps: torch.Tensor,
    labels: torch.Tensor,
    image: Optional[torch.Tensor],
    out_size: Tuple[int, int],
    *,
    peak_radius: int = 1,
    peak_threshold: float = 0.5,
    peak_prominence: float = 0.0,
    mode: str = "regions",
    fg_threshold: float = 0.4,
    bg_threshold: float = 0.15,
    segment_scale: float = 300.0,
    segment_sigma: float = 0.8,
    segment_min_size: int = 20,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Peaks and pseudo semantic labels of one image from its class maps (see the module docstring).

    Args:
        class_maps: (C, H, W) class maps M, already upsampled to the network input of the image
            (H x W pixels, unpadded).
        labels: (C,) image-level labels (1: present).
        image: (3, H, W) the network input (0..255), needed by ``mode`` "regions".
        out_size: (height, width) of the original image; peaks and labels are given there.
        peak_radius: r of the local-maximum window (2r+1).
        peak_threshold: a peak needs M^c >= this · max M^c. Touching peaks (a plateau) count
            once (:func:`merge_plateau_peaks`).
        peak_prominence: a peak also needs a prominence (dynamic) of at least this ·
            (max M^c − min M^c):
            every path from it to a higher peak must descend that far below it; of the peaks
            that do not, only the highest of each h-maximum region stays
            (:func:`wsis_d2.layers.prominent_peaks`). 0: off (the paper).
        mode: "regions" or "pixels".
        fg_threshold, bg_threshold: thresholds on M̄^c = M^c / max M^c (see the module docstring).
        segment_*: graph-based segmentation of "regions" (k, σ, minimum size in input pixels).

    Returns:
        peaks: (P, 4) float32 rows (class, x, y, value), x, y continuous pixel coordinates of the
            original image (pixel centres), sorted by class, then value descending;
        sem_seg: (out_h, out_w) uint8: class 0..C-1, C for background, 255 ignored.
    """
    if mode not in ("regions", "pixels"):
        raise ValueError(f"MODEL.CCGR.CUE_MODE must be 'regions' or 'pixels', got {mode!r}")
    if not 0.0 <= bg_threshold <= fg_threshold:
        raise ValueError(
            f"MODEL.CCGR.BG_THRESHOLD ({bg_threshold}) must be in [0, FG_THRESHOLD "
            f"({fg_threshold})]"
        )
    num_classes, h, w = class_maps.shape
    out_h, out_w = int(out_size[0]), int(out_size[1])
    maps = class_maps.detach().float()
    present = torch.nonzero(torch.as_tensor(labels).reshape(-1) > 0.5).flatten().tolist()
    peaks = []
    sx, sy = out_w / w, out_h / h
    for c in present:
        m = maps[c]
        top = float(m.max())
        found = wsis_layers.find_peaks(m[None, None], radius=peak_radius, threshold=None)
        idx, val = found.indices, found.values
        keep = val >= peak_threshold * top if top > 0 else val >= top
        merged = merge_plateau_peaks(idx[keep][:, 2:], val[keep], (h, w), peak_radius)
        if peak_prominence > 0 and merged:
            kept = wsis_layers.prominent_peaks(
                m,
                torch.tensor([(y, x) for y, x, _ in merged], dtype=torch.long),
                torch.tensor([v for _, _, v in merged], dtype=torch.float64),
                peak_prominence * (top - float(m.min())),
            )
            # the map's maximum tops a dome unless the threshold dropped it: then keep the best
            merged = [p for p, k in zip(merged, kept.tolist()) if k] or merged[:1]
        for y, x, v in merged:
            peaks.append([c, (x + 0.5) * sx, (y + 0.5) * sy, v])
    peaks_t = torch.tensor(peaks, dtype=torch.float32).reshape(-1, 4)

    background = num_classes
    sem = torch.full((h, w), IGNORE, dtype=torch.uint8)
    if present:
        norm = torch.stack([maps[c].clamp_min(0) / maps[c].max().clamp_min(1e-12) for c in present])
        if mode == "regions":
            if image is None:
                raise ValueError("class_map_cues: mode 'regions' needs the image")
            regions = wsis_layers.graph_segment(
                image.detach().float().clamp(0, 255).cpu(),
                segment_scale,
                segment_sigma,
                segment_min_size,
            ).to(norm.device)
            num = int(regions.max()) + 1
            flat = regions.reshape(-1)
            area = torch.bincount(flat, minlength=num).clamp_min(1).to(norm.dtype)
            means = torch.stack(
                [torch.bincount(flat, weights=n.reshape(-1), minlength=num) / area for n in norm]
            )
            norm = means[:, flat].reshape(norm.shape)
        best, which = norm.max(dim=0)
        cls = torch.tensor(present, dtype=torch.long, device=which.device)[which]
        sem[best >= fg_threshold] = cls[best >= fg_threshold].to(torch.uint8).cpu()
        sem[best < bg_threshold] = background
    else:
        sem[:] = background  # an image without objects is all background
    sem = F.interpolate(sem[None, None].float(), size=(out_h, out_w), mode="nearest")[0, 0]
    return peaks_t, sem.to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# 2. bags


def build_bags(
    proposal_boxes: torch.Tensor,
    proposal_scores: torch.Tensor,
    peaks: torch.Tensor,
    seg_scores: torch.Tensor,
    bag_size: int = 10,
    seg_weight: float = 0.1,
    integral: Optional[IntegralImage] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    CCGR's bags of one image (Eq. 4).

    Args:
        proposal_boxes: (R, 4) XYXY boxes.
        proposal_scores: (R,) objectness B_S in [0, 1].
        peaks: (P, >=3) rows (class, x, y, ...) in the boxes' coordinates.
        seg_scores: (C, H, W) current segmentation score O of each class in [0, 1] (ignored when
            ``integral`` is given).
        bag_size: K, instances per bag.
        seg_weight: γ of Eq. 4.
        integral: optional prebuilt ``IntegralImage(seg_scores[None])``.

    Returns:
        bags: (B, K) long proposal rows, best first, −1 padding;
        bag_labels: (B,) long classes;
        bag_peaks: (B,) long rows of ``peaks``.
        A peak without a proposal that contains it and no other peak of its class gives no bag.
    """
    device = proposal_boxes.device
    empty = (
        torch.full((0, bag_size), -1, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
    )
    if peaks.shape[0] == 0 or proposal_boxes.shape[0] == 0:
        return empty
    classes = peaks[:, 0].long()
    px, py = peaks[:, 1], peaks[:, 2]
    b = proposal_boxes
    contains = (
        (b[:, 0:1] <= px[None]) & (px[None] <= b[:, 2:3]) & (b[:, 1:2] <= py[None]) & (py[None] <= b[:, 3:4])
    )  # (R, P)
    same = classes[:, None] == classes[None, :]  # (P, P)
    # number of peaks of each peak's class inside each proposal (a float product: CUDA has no
    # integer matmul; sums of 0/1 products are exact integers far beyond any peak count)
    same_count = contains.to(torch.float32) @ same.to(torch.float32)  # (R, P)
    candidate = contains & (same_count < 1.5)
    uniq = torch.unique(classes)
    if integral is None:
        integral = IntegralImage(seg_scores.detach()[None])
    r = b.shape[0]
    rows = torch.cat([torch.zeros(r, 1, device=device, dtype=b.dtype), b], dim=1)
    # mean O_c of every proposal for every class with a peak
    seg_mean = torch.zeros(r, int(integral.shape[1]), device=device, dtype=torch.float32)
    for c in uniq.tolist():
        seg_mean[:, c] = integral.box_mean(rows, torch.full((r,), c, device=device)).float()
    ranking = proposal_scores.float()[:, None] - seg_weight * (1.0 - seg_mean[:, classes])  # (R, P)
    ranking = ranking.masked_fill(~candidate, float("-inf"))
    k = min(bag_size, r)
    top, order = torch.topk(ranking.t(), k, dim=1, largest=True, sorted=True)  # (P, k)
    order = order.masked_fill(~torch.isfinite(top), -1)
    if k < bag_size:
        order = F.pad(order, (0, bag_size - k), value=-1)
    has = order[:, 0] >= 0
    peak_rows = torch.nonzero(has).flatten()
    return order[has], classes[has], peak_rows


def bags_from_boxes(
    proposal_boxes: torch.Tensor,
    seed_boxes: torch.Tensor,
    seed_classes: torch.Tensor,
    bag_size: int = 10,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The bags of a later round (k >= 2): every box predicted by the IS branch (above its score
    threshold) is a bag with the box's class as label; its instances are the K proposals with the
    highest IoU with the box (ties: the lower proposal row first).

    Args:
        proposal_boxes: (R, 4) XYXY proposals.
        seed_boxes: (B, 4) XYXY boxes of the IS branch, same coordinates; seed_classes (B,) long.
        bag_size: K.

    Returns:
        bags: (B', K) long proposal rows, best first, −1 padding (fewer than K proposals, or
        proposals that do not overlap the box at all);
        bag_labels: (B',) long; bag_seeds: (B',) long rows of ``seed_boxes``. A box that overlaps
        no proposal gives no bag.
    """
    device = proposal_boxes.device
    if seed_boxes.shape[0] == 0 or proposal_boxes.shape[0] == 0:
        return (
            torch.full((0, bag_size), -1, dtype=torch.long, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )
    iou = pairwise_iou(Boxes(seed_boxes.float()), Boxes(proposal_boxes.float()))  # (B, R)
    k = min(bag_size, proposal_boxes.shape[0])
    # stable order: sort rows by IoU descending, proposal index ascending among equals
    order = torch.sort(iou, dim=1, descending=True, stable=True).indices[:, :k]
    top = torch.gather(iou, 1, order)
    order = order.masked_fill(top <= 0, -1)
    if k < bag_size:
        order = F.pad(order, (0, bag_size - k), value=-1)
    has = order[:, 0] >= 0
    rows = torch.nonzero(has).flatten()
    return order[has], seed_classes.long()[has], rows


def semantic_labels_from_instances(
    masks: torch.Tensor, classes: torch.Tensor, num_classes: int, ignore_overlaps: bool = True
) -> torch.Tensor:
    """
    The pseudo semantic labels of a later round: the union of the IS branch's masks of each
    class, background elsewhere.

    Args:
        masks: (N, H, W) bool instance masks; classes: (N,) long.
        num_classes: C.
        ignore_overlaps: a pixel in masks of two different classes gets the ignore value 255
            (False: the class of the later mask, i.e. pass masks sorted by score ascending).

    Returns:
        (H, W) uint8 in the cue convention: class 0..C-1, C background, 255 ignored.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W), got {tuple(masks.shape)}")
    height, width = masks.shape[-2:]
    labels = torch.full((height, width), num_classes, dtype=torch.uint8, device=masks.device)
    if masks.shape[0] == 0:
        return labels
    classes = classes.long()
    if bool(((classes < 0) | (classes >= num_classes)).any()):
        raise ValueError(f"classes must be in [0, {num_classes - 1}], got {classes.tolist()}")
    per_class = torch.zeros(num_classes, height, width, dtype=torch.bool, device=masks.device)
    for m, c in zip(masks.bool(), classes.tolist()):
        per_class[c] |= m
        labels[m] = c
    if ignore_overlaps:
        labels[per_class.sum(dim=0) > 1] = IGNORE
    return labels


# ------------------------------------------------------------------------------------------------
# 3. refinement: wsis_d2.layers.refine_context_gap (compiled op, all steps inside; pure-PyTorch
# reference beside it), re-exported here as refine_boxes

refine_boxes = refine_context_gap


# ------------------------------------------------------------------------------------------------
# 4. pseudo masks


def region_mean_scores(score_maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """
    Class scores averaged over image regions: S̄_c(p) = mean of S_c over the region of pixel p.

    Args:
        score_maps: (C, H, W) scores S.
        regions: (H, W) int64 region labels 0..R−1 (e.g. :func:`wsis_d2.layers.graph_segment`
            of the image, resized to H x W by nearest neighbour).

    Returns:
        (C, H, W) S̄, same dtype and device as ``score_maps``.
    """
    if regions.shape != score_maps.shape[1:]:
        raise ValueError(
            f"region_mean_scores: regions {tuple(regions.shape)} and score maps "
            f"{tuple(score_maps.shape)} differ in size"
        )
    flat = regions.reshape(-1).to(score_maps.device, torch.long)
    num = int(flat.max()) + 1 if flat.numel() else 0
    area = torch.bincount(flat, minlength=num).clamp_min(1).to(score_maps.dtype)
    sums = torch.zeros(score_maps.shape[0], num, dtype=score_maps.dtype, device=score_maps.device)
    sums.index_add_(1, flat, score_maps.reshape(score_maps.shape[0], -1))
    return (sums / area)[:, flat].reshape(score_maps.shape)


def pseudo_instances(
    score_maps: torch.Tensor,
    boxes: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor,
    *,
    mask_threshold: float = 0.5,
    nms_threshold: float = 0.5,
) -> Instances:
    """
    Pseudo instances of one image: for each box of class c the pixels (centres) inside the box
    whose score S_c >= ``mask_threshold`` (where none reaches it: those >= half the box's best
    score). Boxes of one class overlapping a better-scored one at IoU > ``nms_threshold`` are
    dropped first; a pixel claimed by several masks goes to the best-scored instance, and
    instances left without pixels are dropped. The boxes stay the given (refined) boxes.

    Args:
        score_maps: (C, H, W) class scores S in [0, 1] at the output resolution.
        boxes: (K, 4) XYXY boxes in that resolution; classes (K,) long; scores (K,).

    Returns:
        Instances((H, W)) with pred_boxes, pred_masks (bool), pred_classes, scores, sorted by
        score descending.
    """
    _, height, width = score_maps.shape
    device = score_maps.device
    out = Instances((height, width))
    if boxes.shape[0] == 0:
        out.pred_boxes = Boxes(torch.zeros(0, 4, device=device))
        out.pred_masks = torch.zeros(0, height, width, dtype=torch.bool, device=device)
        out.pred_classes = torch.zeros(0, dtype=torch.long, device=device)
        out.scores = torch.zeros(0, device=device)
        return out
    boxes = boxes.float()
    if nms_threshold < 1.0:
        keep = batched_nms(boxes, scores.float(), classes, nms_threshold)
    else:
        keep = torch.argsort(scores, descending=True, stable=True)
    boxes, classes, scores = boxes[keep], classes[keep], scores[keep]
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32)[None, :] + 0.5
    masks = []
    for (x1, y1, x2, y2), c in zip(boxes.tolist(), classes.tolist()):
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        s = score_maps[c]
        m = inside & (s >= mask_threshold)
        if not bool(m.any()) and bool(inside.any()):
            best = float(s[inside].max())
            m = inside & (s >= 0.5 * best) if best > 0 else inside
        masks.append(m)
    out.pred_masks = torch.stack(masks)
    out.pred_boxes = Boxes(boxes)
    out.pred_classes = classes
    out.scores = scores.float()
    return assign_pixels(out)


def assign_pixels(instances: Instances) -> Instances:
    """
    Pixel ownership of pseudo instances sorted by score descending: a pixel claimed by several
    masks stays with the first (best-scored) one; instances left without pixels are dropped.
    """
    masks = instances.pred_masks.bool()
    claimed = torch.cumsum(masks.to(torch.int32), dim=0)
    instances.pred_masks = masks & (claimed == 1)
    return instances[instances.pred_masks.flatten(1).any(dim=1)]


def grabcut_masks(
    image: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    *,
    iterations: int = 3,
    context_scale: float = 1.5,
    min_pixels: int = 4,
) -> torch.Tensor:
    """
    Pseudo masks re-labelled by GrabCut (Rother et al., SIGGRAPH 2004; OpenCV's ``grabCut``)
    on the image colours, one box at a time, inside the box scaled by ``context_scale`` about its
    centre (the context C of Eq. 2 with the box B):

    - pixels of C (the ring) are background for sure; pixels of B in the mask are probably
      foreground, the others of B probably background;
    - GrabCut fits a 5-component colour GMM to each side and re-labels the pixels of B by a graph
      cut, ``iterations`` times; the new mask is what it calls (probably) foreground.

    Score maps are smooth at the stride of the SS branch; the colours of the image are not, so
    thin parts, corners and holes (a ring's inside) come back. Not in the paper: it is what
    box-supervised methods do to boxes ("Simple Does It", Khoreva et al., CVPR 2017, "GrabCut+"),
    here started from the score mask instead of the whole box. A mask stays as it was when GrabCut
    cannot run (fewer than ``min_pixels`` pixels on a side, a box outside the image) or leaves
    fewer than ``min_pixels`` pixels. Runs on the CPU (OpenCV), once per image of a round;
    deterministic (OpenCV's RNG is seeded with the box index before each box).

    Args:
        image: (3, H, W) image at the masks' resolution, any channel order, values in [0, 255].
        boxes: (K, 4) XYXY boxes in pixels of that resolution.
        masks: (K, H, W) bool masks.

    Returns:
        (K, H, W) bool masks, on ``masks``' device. Pixels claimed by two masks are not resolved
        here (:func:`assign_pixels`).
    """
    import cv2

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"grabcut_masks: image must be (3, H, W), got {tuple(image.shape)}")
    if masks.dim() != 3 or masks.shape[1:] != image.shape[1:] or boxes.shape != (masks.shape[0], 4):
        raise ValueError(
            f"grabcut_masks: boxes {tuple(boxes.shape)} and masks {tuple(masks.shape)} do not "
            f"match the image {tuple(image.shape)}: expected (K, 4) and (K, H, W)"
        )
    if iterations < 1:
        raise ValueError(f"grabcut_masks: iterations must be >= 1, got {iterations}")
    height, width = image.shape[1:]
    img = np.ascontiguousarray(
        image.detach().float().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    )
    out = masks.detach().bool().cpu().numpy().copy()
    # (K, 4) boxes and their context boxes C, in float64
    b = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1).detach().cpu().double()
    pairs = zip(b[:, 1:].tolist(), context_boxes(b, context_scale)[:, 1:].tolist())
    for k, ((x1, y1, x2, y2), (c1, d1, c2, d2)) in enumerate(pairs):
        X1, Y1 = max(0, int(np.floor(c1))), max(0, int(np.floor(d1)))
        X2, Y2 = min(width, int(np.ceil(c2))), min(height, int(np.ceil(d2)))
        if X2 - X1 < 2 or Y2 - Y1 < 2:
            continue
        ys = np.arange(Y1, Y2, dtype=np.float64)[:, None] + 0.5
        xs = np.arange(X1, X2, dtype=np.float64)[None, :] + 0.5
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        fg = inside & out[k, Y1:Y2, X1:X2]
        if min(fg.sum(), (~inside).sum()) < min_pixels:
            continue
        labels = np.full(inside.shape, cv2.GC_BGD, dtype=np.uint8)
        labels[inside] = cv2.GC_PR_BGD
        labels[fg] = cv2.GC_PR_FGD
        bgd_model, fgd_model = np.zeros((1, 65)), np.zeros((1, 65))
        # GrabCut's GMMs start from k-means on OpenCV's global RNG: seeded per box, so that the
        # masks of an image do not depend on what ran before (resumed rounds write the same)
        cv2.setRNGSeed(k)
        try:
            cv2.grabCut(
                img[Y1:Y2, X1:X2], labels, None, bgd_model, fgd_model, int(iterations),
                cv2.GC_INIT_WITH_MASK,
            )
        except cv2.error as e:  # e.g. a colour GMM that cannot be fitted: keep the mask
            logger.debug(f"grabcut_masks: box {k} kept its mask ({e})")
            continue
        new = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        if new.sum() >= min_pixels:
            out[k] = False
            out[k, Y1:Y2, X1:X2] = new
    return torch.from_numpy(out).to(masks.device)


def component_instances(
    score_maps: torch.Tensor, labels: torch.Tensor, min_area: int = 4
) -> Instances:
    """
    The ablation's variant without MIL: every connected component (8-connected) of the pixels
    whose best class is a present class c (argmax over the C object classes and background of
    ``score_maps``) is an instance of c, scored by its mean S_c.

    Args:
        score_maps: (C + 1, H, W) class and background scores.
        labels: (C,) image-level labels.
        min_area: components smaller than this (pixels) are dropped.
    """
    import cv2

    num_classes = score_maps.shape[0] - 1
    height, width = score_maps.shape[1:]
    arg = score_maps.argmax(dim=0).cpu().numpy()
    masks, classes, scores = [], [], []
    for c in torch.nonzero(torch.as_tensor(labels).reshape(-1)[:num_classes] > 0.5).flatten().tolist():
        n, comp = cv2.connectedComponents((arg == c).astype(np.uint8), connectivity=8)
        for i in range(1, n):
            m = comp == i
            if m.sum() < min_area:
                continue
            mt = torch.from_numpy(m).to(score_maps.device)
            masks.append(mt)
            classes.append(c)
            scores.append(float(score_maps[c][mt].mean()))
    out = Instances((height, width))
    if masks:
        mask_t = torch.stack(masks)
        order = torch.argsort(torch.tensor(scores), descending=True, stable=True)
        out.pred_masks = mask_t[order]
        out.pred_boxes = BitMasks(out.pred_masks).get_bounding_boxes()
        out.pred_classes = torch.tensor(classes, dtype=torch.long)[order]
        out.scores = torch.tensor(scores, dtype=torch.float32)[order]
    else:
        out.pred_masks = torch.zeros(0, height, width, dtype=torch.bool)
        out.pred_boxes = Boxes(torch.zeros(0, 4))
        out.pred_classes = torch.zeros(0, dtype=torch.long)
        out.scores = torch.zeros(0)
    return out
