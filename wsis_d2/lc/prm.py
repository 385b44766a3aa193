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
"""

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import watershed

from ..layers import graph_segment

__all__ = [
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
