"""
Peak response maps (PRM; Zhou et al., "Weakly Supervised Instance Segmentation using Class Peak
Response", CVPR 2018), as used by LC / ILC (Cholakkal et al., CVPR 2019) to turn class peaks into
instance masks.

The response of a peak p = (n, c, y, x) of the class maps M is the gradient of its value with
respect to the input image, ∂M^c_yx / ∂I. All peaks of an image go through ONE batched
vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. vmap over the
grad_outputs). With exact PRMs (one vector e_p per peak) this costs about one backward pass per
peak on a CPU. Since a vector-Jacobian product is linear in the vector, peaks far enough apart
can share one vector (:func:`group_peaks`): the group's map is the sum of its members'
gradients, exact wherever their responses do not overlap, and a seeded watershed shares it among
the members (:func:`split_group_maps`). ``MODEL.LC.PRM.GROUP_DISTANCE`` chooses between the two.

This is the plain gradient; the official PRM code instead patches every conv's backward with a
non-negative "peak backpropagation" rule, which gives smoother maps. Here the gradient magnitude
Σ_rgb |∂M/∂I| is smoothed with a Gaussian instead (:func:`gradient_to_prm`).

:class:`PRMInstanceDecoder` puts these pieces together into LC's instances (``MODEL.LC.PRM``).
"""

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import watershed
from torch import nn

from detectron2.config import configurable
from detectron2.structures import BitMasks, Boxes, Instances

from ..layers import graph_segment, prominent_peaks
from ..utils.checks import check_number

__all__ = [
    "PRMInstanceDecoder",
    "batched_peak_gradients",
    "group_peaks",
    "split_group_maps",
    "gradient_to_prm",
    "prm_instance_masks",
    "segment_image",
    "segment_instance_masks",
    "score_box_proposals",
]


def batched_peak_gradients(
    peak_values: torch.Tensor,
    inputs: torch.Tensor,
    combine: Optional[torch.Tensor] = None,
    max_batch: int = 0,
    retain_graph: bool = False,
) -> torch.Tensor:
    """
    Vector-Jacobian products of the peak values with respect to ``inputs``, all in one batched
    backward pass (vmap over the grad_outputs; chunks of ``max_batch`` vectors when > 0, to bound
    memory). Row g of ``combine`` is the g-th grad_output, so the result is
    Σ_p combine[g, p] · ∂ peak_values[p] / ∂ inputs; the identity (default) gives one gradient per
    peak.

    Args:
        peak_values: (P,) values M^c_yx gathered from the class maps; their graph must reach
            ``inputs``.
        inputs: the tensor (e.g. the normalised image (1, 3, H, W)) that requires grad.
        combine: (G, P) weights, or None for the (P, P) identity.
        max_batch: largest number of vectors per backward pass; 0: all at once.
        retain_graph: keep the graph after the last pass.

    Returns:
        (G, *inputs.shape).
    """
    num = peak_values.numel()
    if combine is None:
        combine = torch.eye(num, dtype=peak_values.dtype, device=peak_values.device)
    if combine.dim() != 2 or combine.shape[1] != num:
        raise ValueError(f"combine must be (G, {num}), got {tuple(combine.shape)}")
    rows = combine.shape[0]
    if num == 0 or rows == 0:
        return inputs.new_zeros((rows,) + tuple(inputs.shape))
    step = rows if max_batch <= 0 else int(max_batch)
    chunks = []
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        retain = retain_graph or stop < rows
        if stop - start == 1:
            # a single vector: the plain backward (the vmapped one takes slower kernels on CPU)
            (grads,) = torch.autograd.grad(
                peak_values,
                inputs,
                grad_outputs=combine[start].to(peak_values.dtype),
                retain_graph=retain,
            )
            chunks.append(grads[None])
            continue
        (grads,) = torch.autograd.grad(
            peak_values,
            inputs,
            grad_outputs=combine[start:stop].to(peak_values.dtype),
            retain_graph=retain,
            is_grads_batched=True,
        )
        chunks.append(grads)
    return torch.cat(chunks, dim=0)


def group_peaks(points: torch.Tensor, min_distance: float) -> torch.Tensor:
    """
    Greedy packing of peaks into groups whose members are at least ``min_distance`` apart, in the
    given order (e.g. by decreasing score): each peak joins the first group where it keeps that
    distance to every member (and a different location), else opens a new group. The peaks of
    one group share one backward vector in :func:`batched_peak_gradients`; since a
    vector-Jacobian product is linear in the vector, the group's map is the sum of its members'
    gradients, exact wherever their responses do not overlap. ``min_distance`` = inf gives one
    group per peak (exact PRMs), 0 one group (peaks at distinct locations).

    Args:
        points: (P, 2) x, y.
        min_distance: pixels.

    Returns:
        (P,) int64 group index in 0..G-1.
    """
    num = points.shape[0]
    groups = torch.zeros(num, dtype=torch.long)
    if num == 0:
        return groups.to(points.device)
    dist = torch.cdist(points.double(), points.double()).cpu()
    members: List[List[int]] = []
    for i in range(num):
        for g, mem in enumerate(members):
            d = dist[i, mem]
            if bool(((d >= min_distance) & (d > 0)).all()):
                mem.append(i)
                groups[i] = g
                break
        else:
            groups[i] = len(members)
            members.append([i])
    return groups.to(points.device)


def split_group_maps(
    maps: torch.Tensor, points: torch.Tensor, groups: torch.Tensor, stride: int = 2
) -> torch.Tensor:
    """
    Share each group's response map among its members: a seeded watershed of the map (markers at
    the members' points, flooding from the highest response) gives every pixel to one member,
    whose map is the group map on its own basin and zero elsewhere. Single-member groups keep
    the whole map.

    The watershed runs on the map average-pooled by ``stride`` (each basin label then covers a
    ``stride`` x ``stride`` block): the maps come from a network of stride >= 8 and are smoothed,
    so basin borders move by at most ``stride - 1`` pixels, for ~stride² less work. A group whose
    members share a pooled cell is split at full resolution.

    Args:
        maps: (G, H, W) non-negative group maps.
        points: (P, 2) x, y in pixel coordinates of ``maps``.
        groups: (P,) group of each peak.
        stride: pooling of the watershed (1: full resolution).

    Returns:
        (P, H, W); every pixel of a group map belongs to exactly one member.
    """
    if stride < 1:
        raise ValueError(f"split_group_maps: stride must be >= 1, got {stride}")
    num = points.shape[0]
    height, width = maps.shape[-2:]
    out = maps.new_zeros((num, height, width))
    if num == 0:
        return out
    px = points[:, 0].floor().long().clamp(0, width - 1)
    py = points[:, 1].floor().long().clamp(0, height - 1)
    groups = groups.to(torch.long)
    sizes = torch.bincount(groups, minlength=maps.shape[0])
    single = sizes[groups] == 1
    if bool(single.any()):
        out[single] = maps[groups[single]]
    for g in torch.nonzero(sizes > 1).flatten().tolist():
        mem = torch.nonzero(groups == g).flatten()
        s = stride
        cells = (py[mem] // s) * ((width + s - 1) // s) + px[mem] // s
        if s > 1 and torch.unique(cells).numel() < mem.numel():
            s = 1  # two members in one pooled cell
        field = maps[g].detach().float()
        if s > 1:
            pad = (0, (-width) % s, 0, (-height) % s)
            field = F.avg_pool2d(F.pad(field[None, None], pad, mode="replicate"), s)[0, 0]
        markers = np.zeros(tuple(field.shape), dtype=np.int32)
        markers[(py[mem] // s).tolist(), (px[mem] // s).tolist()] = np.arange(1, mem.numel() + 1)
        basins = torch.from_numpy(watershed(-field.cpu().numpy(), markers)).to(maps.device)
        if s > 1:
            basins = basins.repeat_interleave(s, 0).repeat_interleave(s, 1)[:height, :width]
        ids = torch.arange(1, mem.numel() + 1, device=maps.device)
        out[mem] = torch.where(basins[None] == ids[:, None, None], maps[g][None], out.new_zeros(()))
    return out


def _gaussian_kernel1d(sigma: float, dtype, device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-(x**2) / (2.0 * sigma * sigma))
    return k / k.sum()


def gradient_to_prm(gradients: torch.Tensor, smooth_sigma: float = 0.0) -> torch.Tensor:
    """
    Peak response map from input gradients:

        R_p = G_σ * Σ_k |∂M_p / ∂I_k|,      then R_p ← R_p / max R_p,

    with k the input channels and G_σ a Gaussian (σ in input pixels; 0: no smoothing). Maps
    that are zero everywhere stay zero.

    Args:
        gradients: (P, K, H, W).
        smooth_sigma: σ.

    Returns:
        (P, H, W) in [0, 1].
    """
    prm = gradients.abs().sum(dim=1, keepdim=True)  # (P, 1, H, W)
    if smooth_sigma > 0 and prm.shape[0] > 0:
        k = _gaussian_kernel1d(float(smooth_sigma), prm.dtype, prm.device)
        r = k.numel() // 2
        prm = F.conv2d(F.pad(prm, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        prm = F.conv2d(F.pad(prm, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    prm = prm[:, 0]
    peak = prm.flatten(1).amax(dim=1).clamp_min(1e-20)
    return prm / peak[:, None, None]


def prm_instance_masks(
    prms: torch.Tensor,
    points: torch.Tensor,
    threshold: float,
    out_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """
    One binary mask per peak response map: resize R_p to ``out_size`` (bilinear), keep the pixels
    with R_p >= threshold · max R_p, and of those the 8-connected component that contains the peak
    point (or, when the point falls outside all of them, the component with the largest response
    mass), so that a response spilling onto a neighbouring object stays with its own peak.

    Args:
        prms: (P, H, W) non-negative maps.
        points: (P, 2) peak locations (x, y) in the pixel coordinates of ``prms``.
        threshold: fraction of the map's maximum, in (0, 1].
        out_size: (h, w) of the masks; None: (H, W).

    Returns:
        (P, h, w) bool.
    """
    num, height, width = prms.shape
    out_h, out_w = (height, width) if out_size is None else (int(out_size[0]), int(out_size[1]))
    if num == 0:
        return torch.zeros((0, out_h, out_w), dtype=torch.bool, device=prms.device)
    maps = prms
    if (out_h, out_w) != (height, width):
        maps = F.interpolate(
            prms[:, None], size=(out_h, out_w), mode="bilinear", align_corners=False
        )
        maps = maps[:, 0]
    maps = maps / maps.flatten(1).amax(dim=1).clamp_min(1e-20)[:, None, None]
    sx, sy = out_w / width, out_h / height
    px = (points[:, 0] * sx).floor().long().clamp(0, out_w - 1).tolist()
    py = (points[:, 1] * sy).floor().long().clamp(0, out_h - 1).tolist()
    fg = (maps >= threshold) & (maps > 0)
    out = _peak_components(fg.cpu().numpy(), maps.detach().cpu().numpy(), px, py)
    return torch.from_numpy(out).to(prms.device)


def _peak_components(fg: np.ndarray, weights: np.ndarray, px: List[int], py: List[int]):
    """
    Per map i, the 8-connected component of ``fg[i]`` that holds pixel (py[i], px[i]); when that
    pixel is background, the component with the largest sum of ``weights[i]``.

    Args:
        fg: (P, H, W) bool.
        weights: (P, H, W) float.
        px, py: P pixel coordinates each.

    Returns:
        (P, H, W) bool.
    """
    out = np.zeros(fg.shape, dtype=bool)
    structure = np.ones((3, 3), dtype=bool)
    for i in range(fg.shape[0]):
        # label inside the bounding box of the foreground only (masks are object-sized)
        rows = np.flatnonzero(fg[i].any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(fg[i].any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        labels, count = ndimage.label(fg[i, y0:y1, x0:x1], structure=structure)
        inside = y0 <= py[i] < y1 and x0 <= px[i] < x1
        keep = labels[py[i] - y0, px[i] - x0] if inside else 0
        if keep == 0:
            mass = ndimage.sum_labels(
                weights[i, y0:y1, x0:x1], labels, index=np.arange(1, count + 1)
            )
            keep = int(np.argmax(mass)) + 1
        out[i, y0:y1, x0:x1] = labels == keep
    return out


def segment_image(
    image: torch.Tensor, scale: float = 1000.0, sigma: float = 0.8, min_size: int = 10
) -> torch.Tensor:
    """
    Class-agnostic over-segmentation of an image by Felzenszwalb & Huttenlocher's graph-based
    method (IJCV 2004; the regions selective search starts from): pixels are merged while the
    colour difference across a boundary is below each region's internal variation + k/|region|,
    k = ``scale`` (larger: bigger regions), after a Gaussian blur of ``sigma``; regions smaller
    than ``min_size`` pixels are merged into a neighbour. Colour order (RGB/BGR) does not matter.
    Runs :func:`wsis_d2.layers.graph_segment` (compiled CPU op, ~2 ms for 160x240 pixels).

    Args:
        image: (K, H, W) image with values in 0..255 (K = 1 or 3 channels); values outside are
            clipped.

    Returns:
        (H, W) int64 region labels 0..S-1 (numbered in raster order), on the image's device.
    """
    if image.dim() != 3:
        raise ValueError(f"segment_image expects a (K, H, W) image, got {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = image.detach().float().clamp(0, 255)
    return graph_segment(image, float(scale), float(sigma), int(min_size))


def segment_instance_masks(
    prms: torch.Tensor,
    points: torch.Tensor,
    segments: torch.Tensor,
    threshold: float,
    out_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """
    Instance masks snapped to image regions: PRM retrieval with class-agnostic region proposals
    (PRM and ILC score MCG proposals with the peak response; here the proposals are unions of
    the regions of :func:`segment_image`, which needs no trained model). For peak p and region s,

        m_p(s) = mean_{x ∈ s} R_p(x),    m_p ← m_p / max_s m_p(s),

    the mask is the union of the regions with m_p(s) >= ``threshold``, and of it the 8-connected
    component that holds the peak (or, when the peak lies outside, the one with the largest
    response mass). Mask borders follow image edges instead of the blurred, stride-limited PRM.

    Args:
        prms: (P, H, W) non-negative maps.
        points: (P, 2) peak locations (x, y) in the pixel coordinates of ``prms``.
        segments: (H, W) int64 region labels 0..S-1 of the same pixels.
        threshold: fraction τ of the best region's mean response, in (0, 1].
        out_size: (h, w) of the masks (nearest-neighbour resize); None: (H, W).

    Returns:
        (P, h, w) bool.
    """
    num, height, width = prms.shape
    if tuple(segments.shape) != (height, width):
        raise ValueError(f"segments {tuple(segments.shape)} must match the maps {(height, width)}")
    out_h, out_w = (height, width) if out_size is None else (int(out_size[0]), int(out_size[1]))
    if num == 0:
        return torch.zeros((0, out_h, out_w), dtype=torch.bool, device=prms.device)
    labels = segments.to(prms.device).flatten()
    num_seg = int(labels.max()) + 1
    maps = prms.detach().flatten(1).float()
    area = torch.bincount(labels, minlength=num_seg).clamp_min(1).to(maps.dtype)
    sums = maps.new_zeros((num, num_seg)).index_add_(1, labels, maps)
    means = sums / area
    means = means / means.amax(dim=1, keepdim=True).clamp_min(1e-20)
    fg = ((means >= threshold) & (means > 0))[:, labels].view(num, height, width)
    px = points[:, 0].floor().long().clamp(0, width - 1).tolist()
    py = points[:, 1].floor().long().clamp(0, height - 1).tolist()
    out = _peak_components(fg.cpu().numpy(), maps.view(num, height, width).cpu().numpy(), px, py)
    masks = torch.from_numpy(out).to(prms.device)
    if (out_h, out_w) != (height, width):
        masks = F.interpolate(masks[:, None].float(), size=(out_h, out_w), mode="nearest")
        masks = masks[:, 0] > 0.5
    return masks


def _box_sums(integral: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Sums of (P, H, W) maps over integer boxes, from their (P, H+1, W+1) integral images."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return (
        integral[:, y2, x2] - integral[:, y1, x2] - integral[:, y2, x1] + integral[:, y1, x1]
    )  # (P, K)


def score_box_proposals(
    prms: torch.Tensor,
    background: torch.Tensor,
    boxes: torch.Tensor,
    balance: float = 1.0,
    penalty: float = 1.0,
    contour_width: int = 5,
    size_limits: Tuple[float, float] = (2e-5, 0.85),
) -> torch.Tensor:
    """
    Instance retrieval of PRM (Zhou et al. 2018, Eq. 5) with box proposals: the score of
    proposal b for peak p is

        Q(p, b) = α · Σ_{b} R̄_p + Σ_{∂b} R̄_p − β · Σ_{b} Bg_p / (H·W),

    with R̄_p = R_p / Σ R_p the normalised peak response, ∂b the band of width
    ``contour_width`` around the box border (the contour term), Bg_p the 0/1 background of the
    peak's class (class map below a fraction of its mean), α = ``balance`` and β = ``penalty``
    (the background term is divided by the image area H·W here so that β does not depend on the
    image size; PRM's code sums pixels).
    Proposals whose area lies outside ``size_limits`` (fractions of the image area) get −inf.

    Args:
        prms: (P, H, W) peak response maps.
        background: (P, H, W) 0/1 background of each peak's class.
        boxes: (K, 4) x1, y1, x2, y2 in the pixel coordinates of ``prms``.

    Returns:
        (P, K) scores.
    """
    num, height, width = prms.shape
    if boxes.numel() == 0 or num == 0:
        return prms.new_zeros((num, boxes.shape[0]))
    norm = prms / prms.flatten(1).sum(dim=1).clamp_min(1e-20)[:, None, None]

    def integral(x):
        return F.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))

    ir = integral(norm.double())
    ib = integral(background.double())
    b = boxes.round().long()
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    half = contour_width // 2
    outer = b + torch.tensor([-half, -half, half, half], device=b.device)
    inner = b + torch.tensor([half, half, -half, -half], device=b.device)
    outer[:, 0::2] = outer[:, 0::2].clamp(0, width)
    outer[:, 1::2] = outer[:, 1::2].clamp(0, height)
    inner[:, 0::2] = inner[:, 0::2].clamp(0, width)
    inner[:, 1::2] = inner[:, 1::2].clamp(0, height)
    inner[:, 2] = torch.maximum(inner[:, 2], inner[:, 0])
    inner[:, 3] = torch.maximum(inner[:, 3], inner[:, 1])
    inside = _box_sums(ir, b)
    contour = _box_sums(ir, outer) - _box_sums(ir, inner)
    bg = _box_sums(ib, b)
    score = balance * inside + contour - penalty * bg / float(height * width)
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).to(score.dtype) / float(height * width)
    ok = (area >= size_limits[0]) & (area < size_limits[1])
    score = torch.where(ok[None, :], score, torch.full_like(score, float("-inf")))
    return score.to(prms.dtype)


def _rank_in_class(cls: torch.Tensor) -> torch.Tensor:
    """(P,) position of each row among the rows of its class, for (P,) class ids sorted
    ascending (rows of one class contiguous, in their order)."""
    return torch.arange(cls.numel(), device=cls.device) - torch.searchsorted(cls, cls)


class PRMInstanceDecoder(nn.Module):
    """
    LC / ILC's instances from the retained peaks of one image (paper Sec. 3.3; the PRM of Zhou et
    al.): each retained peak p of class c gets the mask of its peak response map R_p
    (thresholded, or snapped to image regions: ``mask_mode``), optionally retrieved with box
    proposals (:func:`score_box_proposals`), and the density-aware score

        score_p = σ(s_c) · σ(M^c_p) · exp(−β · |1 − ν_p|),    ν_p = Σ_{mask_p} D̄^c,

    with D̄^c the density whose sum over the image is t̂_c and β = ``density_weight``.

    The decoder also chooses which peaks are retained (:meth:`retained_peaks`: the first
    round(t̂_c) of each present class, the prominent ones first with ``peak_prominence``). It has
    no parameters or buffers: a variant built from another config (e.g. a benchmark's other mask
    settings) runs on the same trained model (``ImageLevelCounter.inference_single(...,
    decoder=...)``), and checkpoints are the model's alone.
    """

    @configurable
    def __init__(
        self,
        *,
        enabled: bool = True,
        smooth_sigma: float = 2.0,
        mask_threshold: float = 0.3,
        mask_mode: str = "threshold",
        segment_scale: float = 1000.0,
        segment_sigma: float = 0.8,
        segment_min_size: int = 10,
        max_batch: int = 32,
        group_distance: float = -1.0,
        peak_prominence: float = 0.0,
        density_weight: float = 1.0,
        extra_peaks: int = 0,
        extra_score_factor: float = 0.1,
        proposal_balance: float = 1.0,
        proposal_bg_penalty: float = 1.0,
        proposal_bg_threshold: float = 1.0,
        proposal_contour_width: int = 5,
    ):
        """
        Args:
            enabled: compute instances (False: the retained peaks alone, counts only).
            smooth_sigma: σ of :func:`gradient_to_prm` (input pixels).
            mask_threshold: τ, fraction of the maximum response (or of the best region's mean)
                kept in a mask, in (0, 1].
            mask_mode: "threshold" (PRM thresholded, :func:`prm_instance_masks`) or "segments"
                (region means of the PRM thresholded, :func:`segment_instance_masks`).
            segment_scale, segment_sigma, segment_min_size: the graph-based segmentation of
                "segments" (:func:`segment_image`).
            max_batch: largest number of backward vectors per pass (:func:`batched_peak_gradients`).
            group_distance: peaks at least this far apart (input pixels) share a backward
                vector (:func:`group_peaks`, :func:`split_group_maps`); < 0: one vector per peak
                (exact PRMs).
            peak_prominence: the instances of a class are its prominent peaks first
                (:func:`wsis_d2.layers.prominent_peaks`, h = this · the map's range), then the
                others, each by value; 0: by value alone (the paper).
            density_weight: β of the density-aware instance score.
            extra_peaks: further peaks per present class beyond the counted round(t̂_c)
                (:meth:`retained_peaks`) that also become instances (not in the paper).
            extra_score_factor: their scores are the density-aware score times this, in
                (0, 1], so that they rank after the counted instances of similar score.
            proposal_balance, proposal_bg_penalty, proposal_contour_width: α, β and the contour
                band of the proposal score Q (:func:`score_box_proposals`).
            proposal_bg_threshold: the background of class c for Q: pixels where M^c is below this
                fraction of its mean.
        """
        super().__init__()
        self.enabled = bool(enabled)
        self.peak_prominence = float(peak_prominence)
        if not 0.0 <= self.peak_prominence < 1.0:
            raise ValueError(
                f"MODEL.LC.PRM.PEAK_PROMINENCE must be in [0, 1), got {peak_prominence}"
            )
        self.smooth_sigma = float(smooth_sigma)
        self.mask_threshold = float(mask_threshold)
        if not 0.0 < self.mask_threshold <= 1.0:
            raise ValueError(f"MODEL.LC.PRM.MASK_THRESHOLD must be in (0, 1], got {mask_threshold}")
        if mask_mode not in ("threshold", "segments"):
            raise ValueError(
                f"MODEL.LC.PRM.MASK_MODE must be 'threshold' or 'segments', got {mask_mode!r}"
            )
        self.mask_mode = mask_mode
        self.segment_scale = float(segment_scale)
        self.segment_sigma = float(segment_sigma)
        self.segment_min_size = int(segment_min_size)
        if self.segment_scale <= 0 or self.segment_sigma < 0 or self.segment_min_size < 1:
            raise ValueError(
                "MODEL.SEGMENTS.SCALE must be > 0, SIGMA >= 0 and MIN_SIZE "
                f">= 1, got {segment_scale}, {segment_sigma}, {segment_min_size}"
            )
        self.max_batch = int(max_batch)
        self.group_distance = float(group_distance)
        self.density_weight = float(density_weight)
        check_number("MODEL.LC.PRM.EXTRA_PEAKS", extra_peaks, 0, integer=True)
        check_number("MODEL.LC.PRM.EXTRA_SCORE_FACTOR", extra_score_factor, 0.0, 1.0, low_open=True)
        self.extra_peaks = int(extra_peaks)
        self.extra_score_factor = float(extra_score_factor)
        self.proposal_balance = float(proposal_balance)
        self.proposal_bg_penalty = float(proposal_bg_penalty)
        self.proposal_bg_threshold = float(proposal_bg_threshold)
        self.proposal_contour_width = int(proposal_contour_width)

    @classmethod
    def from_config(cls, cfg):
        prm = cfg.MODEL.LC.PRM
        return {
            "enabled": prm.ENABLED,
            "smooth_sigma": prm.SMOOTH_SIGMA,
            "mask_threshold": prm.MASK_THRESHOLD,
            "mask_mode": prm.MASK_MODE,
            "segment_scale": cfg.MODEL.SEGMENTS.SCALE,
            "segment_sigma": cfg.MODEL.SEGMENTS.SIGMA,
            "segment_min_size": cfg.MODEL.SEGMENTS.MIN_SIZE,
            "max_batch": prm.MAX_BATCH,
            "group_distance": prm.GROUP_DISTANCE,
            "peak_prominence": prm.PEAK_PROMINENCE,
            "density_weight": prm.DENSITY_WEIGHT,
            "extra_peaks": prm.EXTRA_PEAKS,
            "extra_score_factor": prm.EXTRA_SCORE_FACTOR,
            "proposal_balance": prm.PROPOSAL_BALANCE,
            "proposal_bg_penalty": prm.PROPOSAL_BG_PENALTY,
            "proposal_bg_threshold": prm.PROPOSAL_BG_THRESHOLD,
            "proposal_contour_width": prm.PROPOSAL_CONTOUR_WIDTH,
        }

    def extra_repr(self) -> str:
        return (
            f"enabled={self.enabled}, mask_mode={self.mask_mode!r}, "
            f"mask_threshold={self.mask_threshold}, group_distance={self.group_distance}"
        )

    def retained_peaks(
        self,
        class_maps: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor,
        map_size: Tuple[int, int],
    ) -> torch.Tensor:
        """
        The first ``counts[c]`` peaks of each class map of one image, by value (with
        ``peak_prominence``: the prominent ones first).

        Args:
            class_maps: (1, C, h, w) M.
            indices: (P, 4) rows n, c, y, x of its peaks (``find_peaks``).
            counts: (C,) number of peaks kept per class.
            map_size: (rows, cols) of the map cells inside the image.

        Returns:
            (P', 4) rows n, c, y, x, by class.
        """
        if indices.shape[0] == 0:
            return indices
        values = class_maps.detach()[indices[:, 0], indices[:, 1], indices[:, 2], indices[:, 3]]
        order = torch.argsort(values, descending=True, stable=True)
        if self.peak_prominence > 0:
            prominent = torch.zeros_like(values, dtype=torch.bool)
            mh, mw = map_size
            for c in torch.unique(indices[:, 1]).tolist():
                if float(counts[c]) < 1:
                    continue
                rows = torch.nonzero(indices[:, 1] == c).flatten()
                m = class_maps.detach()[0, c, :mh, :mw].float()
                height = self.peak_prominence * float(m.max() - m.min())
                if height > 0:
                    prominent[rows] = prominent_peaks(
                        m, indices[rows, 2:], values[rows], height
                    ).to(prominent.device)
            order = order[torch.argsort((~prominent[order]).to(torch.int8), stable=True)]
        order = order[torch.argsort(indices[order, 1], stable=True)]  # by class, then as above
        idx = indices[order]
        cls = idx[:, 1].contiguous()
        return idx[_rank_in_class(cls) < counts.to(torch.long)[cls]]

    def instance_peaks(
        self,
        class_maps: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor,
        present: torch.Tensor,
        map_size: Tuple[int, int],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        The peaks that become instances: the counted ones (:meth:`retained_peaks` with
        ``counts``) and, with ``extra_peaks``, the next ``extra_peaks`` of each present class.

        Args:
            class_maps, indices, map_size: as in :meth:`retained_peaks`.
            counts: (C,) counted peaks per class.
            present: (C,) bool, the classes that get extra peaks.

        Returns:
            keep (P', 4) rows n, c, y, x, by class; counted (P',) bool, False for the extras
            (each class's counted peaks come first).
        """
        total = counts + self.extra_peaks * present.to(counts.dtype)
        keep = self.retained_peaks(class_maps, indices, total, map_size)
        cls = keep[:, 1].contiguous()
        return keep, _rank_in_class(cls) < counts.to(torch.long)[cls]

    def group(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Backward-vector group of each peak (:func:`group_peaks`, strongest peaks first)."""
        if self.group_distance < 0:
            return torch.arange(points.shape[0], device=points.device)
        order = torch.argsort(values, descending=True, stable=True)
        groups = torch.empty_like(order)
        groups[order] = group_peaks(points[order], self.group_distance)
        return groups

    def forward(
        self,
        inputs: torch.Tensor,
        class_maps: torch.Tensor,
        peaks: torch.Tensor,
        points: torch.Tensor,
        image: torch.Tensor,
        density: torch.Tensor,
        class_probs: torch.Tensor,
        out_size: Tuple[int, int],
        proposals: Optional[Instances] = None,
        counted: Optional[torch.Tensor] = None,
    ) -> Instances:
        """
        Instances of one image from its retained peaks. The PRMs are the gradients of the peak
        values with respect to ``inputs``, so ``class_maps`` must come from ``inputs`` with
        autograd on (its graph is consumed here).

        Args:
            inputs: (1, 3, H', W') the normalised, padded network input, requiring grad.
            class_maps: (1, C, h', w') M computed from ``inputs``.
            peaks: (P, 4) retained peaks, rows n, c, y, x (:meth:`retained_peaks`).
            points: (P, 2) x, y of the peaks in input pixels (map cell centres).
            image: (3, H, W) the image of the model input ("image"; H x W is the unpadded
                network input, the pixels of the PRMs and of the segmentation).
            density: (C, h, w) D̄ over the map cells inside the image, Σ D̄^c = t̂_c.
            class_probs: (C,) σ(s_c).
            out_size: (height, width) of the output.
            proposals: optional Instances with proposal_boxes in input pixels (PRM retrieval).
            counted: optional (P,) bool from :meth:`instance_peaks`; the others are extra peaks,
                scored × ``extra_score_factor``. None: all counted.

        Returns:
            Instances(pred_boxes, pred_masks (K, height, width) bool, scores, pred_classes,
            counted (K,) bool) at ``out_size``, K <= P: a peak whose value does not depend on
            the image (e.g. all ReLUs before it inactive) has a zero response and no mask, so
            gives no instance.
        """
        in_h, in_w = image.shape[-2:]
        out_h, out_w = out_size
        mh, mw = density.shape[-2:]
        with torch.enable_grad():
            values = class_maps[0, peaks[:, 1], peaks[:, 2], peaks[:, 3]]
            groups = self.group(points, values.detach())
            num_groups = int(groups.max()) + 1 if groups.numel() else 0
            combine = groups[None, :] == torch.arange(num_groups, device=groups.device)[:, None]
            grads = batched_peak_gradients(values, inputs, combine, max_batch=self.max_batch)
        class_maps = class_maps.detach()
        group_prms = gradient_to_prm(grads[:, 0, :, :in_h, :in_w], self.smooth_sigma)
        prms = split_group_maps(group_prms, points, groups)  # (P, in_h, in_w)
        if self.mask_mode == "segments":
            # regions of the network input itself (in_h x in_w), the pixels of the PRMs
            segments = segment_image(
                image, self.segment_scale, self.segment_sigma, self.segment_min_size
            )
            masks = segment_instance_masks(
                prms, points, segments, self.mask_threshold, (out_h, out_w)
            )
        else:
            masks = prm_instance_masks(prms, points, self.mask_threshold, (out_h, out_w))
        classes = peaks[:, 1]
        boxes = BitMasks(masks).get_bounding_boxes()
        if proposals is not None and len(proposals) > 0 and peaks.shape[0] > 0:
            masks, boxes = self.retrieve_proposals(
                prms,
                class_maps[0, :, :mh, :mw],
                classes,
                proposals,
                masks,
                (in_h, in_w),
                (out_h, out_w),
            )
        # density inside each mask, on the map grid: ν_p = Σ_cells D̄^c · (fraction of cell in mask)
        if masks.shape[0] > 0:
            frac = F.interpolate(masks[:, None].float(), size=(mh, mw), mode="area")[:, 0]
            nu = (frac * density[classes]).sum(dim=(1, 2))
        else:
            nu = density.new_zeros(0)
        peak_vals = class_maps[0, classes, peaks[:, 2], peaks[:, 3]]
        scores = (
            class_probs[classes]
            * torch.sigmoid(peak_vals)
            * torch.exp(-self.density_weight * (1.0 - nu).abs())
        )
        if counted is not None:
            scores = torch.where(counted, scores, scores * self.extra_score_factor)
        instances = Instances((out_h, out_w))
        instances.pred_boxes = boxes
        instances.pred_masks = masks
        instances.scores = scores
        instances.pred_classes = classes
        # False for the extra peaks: what a display of the counted objects draws
        if counted is None:
            counted = torch.ones_like(classes, dtype=torch.bool)
        instances.counted = counted
        return instances[masks.flatten(1).any(dim=1)]

    def retrieve_proposals(
        self,
        prms: torch.Tensor,
        class_maps: torch.Tensor,
        classes: torch.Tensor,
        proposals: Instances,
        masks: torch.Tensor,
        in_size: Tuple[int, int],
        out_size: Tuple[int, int],
    ) -> Tuple[torch.Tensor, Boxes]:
        """
        PRM instance retrieval with box proposals (:func:`score_box_proposals`): each peak takes
        the proposal of highest score Q; its mask becomes the PRM mask inside that box (the whole
        box where they do not overlap). Peaks without a valid proposal keep their PRM mask.

        Args:
            prms: (P, H, W) peak response maps over the input pixels (H, W) = ``in_size``.
            class_maps: (C, h, w) M over the map cells inside the image.
            classes: (P,) class of each peak.
            proposals: Instances with proposal_boxes (K, 4) in input pixels.
            masks: (P, height, width) bool PRM masks at ``out_size``.

        Returns:
            (P, height, width) bool masks and their Boxes at ``out_size``.
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
