"""
The compiled core of the selective-search proposal generator (:mod:`wsis_d2.data.proposals`):

* :func:`hierarchical_grouping` — the greedy hierarchical grouping of selective search (Uijlings,
  van de Sande, Gevers & Smeulders, IJCV 2013) over over-segmentations (e.g. from
  :func:`wsis_d2.layers.graph_segment`), one run per strategy. Regions are described by 75-bin
  colour histograms (25 bins per channel), 240-bin texture histograms (8 gradient orientations x
  10 magnitude bins per channel), their size and their box; neighbours (4-connected) are merged
  most-similar first with

      s(r_i, r_j) = a_c·s_colour + a_t·s_texture + a_s·s_size + a_f·s_fill,
      s_colour = Σ_k min(c_i^k, c_j^k),   s_texture likewise (L1-normalised histograms),
      s_size = 1 − (|r_i| + |r_j|) / |im|,   s_fill = 1 − (|BB_ij| − |r_i| − |r_j|) / |im|,

  the merged histograms being the size-weighted means. Ties go to the smaller pair of region ids,
  so the result is deterministic. Every initial and every merged region gives one box.
* :func:`box_straddling` — the superpixel-straddling objectness of boxes (Alexe, Deselaers &
  Ferrari, TPAMI 2012): SS(b) = 1 − Σ_s min(|s \\ b|, |s ∩ b|) / |b| over the segments s of an
  over-segmentation; 1 for a box that no segment crosses, lower the more segments it cuts.

Both run on the CPU (the compiled op parallelises over strategies / boxes); the pure-Python
references beside them give the same results and are used, with a logged warning, when the
extension is missing.
"""

import heapq
import logging
from typing import Tuple

import numpy as np
import torch

from ..utils.checks import check_tensor
from ._ext import compiled_ops_available

__all__ = [
    "hierarchical_grouping",
    "hierarchical_grouping_reference",
    "box_straddling",
    "box_straddling_reference",
    "COLOUR_BINS",
    "TEXTURE_BINS",
]

logger = logging.getLogger(__name__)

COLOUR_BINS = 25
TEXTURE_BINS = 80  # 8 orientations x 10 magnitude bins


def _check_grouping_inputs(labels, colour_bins, texture_bins, weights):
    if labels.dim() != 3 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be (S, H, W) int64, got {tuple(labels.shape)} {labels.dtype}")
    for name, bins, limit in (
        ("colour_bins", colour_bins, COLOUR_BINS),
        ("texture_bins", texture_bins, TEXTURE_BINS),
    ):
        if bins.dtype != torch.uint8 or tuple(bins.shape) != (
            labels.shape[0],
            3,
            labels.shape[1],
            labels.shape[2],
        ):
            raise ValueError(
                f"{name} must be (S, 3, H, W) uint8 with labels {tuple(labels.shape)}, got "
                f"{tuple(bins.shape)} {bins.dtype}"
            )
        if bins.numel() and int(bins.max()) >= limit:
            raise ValueError(f"{name} must be < {limit}")
    if weights.dtype != torch.float64 or tuple(weights.shape) != (labels.shape[0], 4):
        raise ValueError(
            f"weights must be (S, 4) float64, got {tuple(weights.shape)} {weights.dtype}"
        )
    if bool((weights < 0).any()):
        raise ValueError("weights must be >= 0")


def hierarchical_grouping(
    labels: torch.Tensor,
    colour_bins: torch.Tensor,
    texture_bins: torch.Tensor,
    weights: torch.Tensor,
    *,
    use_reference: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Selective search's hierarchical grouping, one independent run per strategy.

    Args:
        labels: (S, H, W) int64, over-segmentation of strategy s, labels 0..R_s-1 all used.
        colour_bins: (S, 3, H, W) uint8 colour bin of each pixel and channel, < 25.
        texture_bins: (S, 3, H, W) uint8 texture bin (orientation * 10 + magnitude), < 80.
        weights: (S, 4) float64 (a_colour, a_texture, a_size, a_fill) >= 0.

    Returns:
        boxes: (B, 4) int64 x1, y1, x2, y2 (x2, y2 exclusive: continuous pixel coordinates);
        info: (B, 3) int64 (strategy, region id, hierarchy level): the R_s initial regions of
        each strategy (level 0), then its merged regions in merge order.
    """
    for name, value in (("labels", labels), ("colour_bins", colour_bins),
                        ("texture_bins", texture_bins), ("weights", weights)):  # fmt: skip
        check_tensor(name, value, where="hierarchical_grouping")
    labels = labels.cpu()
    colour_bins = colour_bins.cpu()
    texture_bins = texture_bins.cpu()
    weights = weights.cpu()
    if not use_reference and compiled_ops_available(torch.device("cpu")):
        return torch.ops.wsis_d2.selective_search(labels, colour_bins, texture_bins, weights)
    _check_grouping_inputs(labels, colour_bins, texture_bins, weights)
    return hierarchical_grouping_reference(labels, colour_bins, texture_bins, weights)


def _region_features(lab, cbin, tbin):
    """Per-region size, box and L1-normalised histograms of one (H, W) segmentation."""
    h, w = lab.shape
    num = int(lab.max()) + 1
    flat = lab.reshape(-1)
    sizes = np.bincount(flat, minlength=num).astype(np.int64)
    if (sizes == 0).any():
        raise ValueError(f"label {int(np.nonzero(sizes == 0)[0][0])} of 0..{num - 1} is unused")
    ys, xs = np.mgrid[0:h, 0:w]
    x1 = np.full(num, w, np.int64)
    y1 = np.full(num, h, np.int64)
    x2 = np.zeros(num, np.int64)
    y2 = np.zeros(num, np.int64)
    np.minimum.at(x1, flat, xs.reshape(-1))
    np.minimum.at(y1, flat, ys.reshape(-1))
    np.maximum.at(x2, flat, xs.reshape(-1) + 1)
    np.maximum.at(y2, flat, ys.reshape(-1) + 1)
    colour = np.zeros((num, 3 * COLOUR_BINS), np.float32)
    texture = np.zeros((num, 3 * TEXTURE_BINS), np.float32)
    for c in range(3):
        np.add.at(colour, (flat, c * COLOUR_BINS + cbin[c].reshape(-1).astype(np.int64)), 1.0)
        np.add.at(texture, (flat, c * TEXTURE_BINS + tbin[c].reshape(-1).astype(np.int64)), 1.0)
    inv = (1.0 / (sizes * 3)).astype(np.float32)[:, None]
    colour *= inv
    texture *= inv
    neighbours = [set() for _ in range(num)]
    for a, b in ((lab[:, :-1], lab[:, 1:]), (lab[:-1, :], lab[1:, :])):
        diff = a != b
        for i, j in zip(a[diff].tolist(), b[diff].tolist()):
            neighbours[i].add(j)
            neighbours[j].add(i)
    return sizes, np.stack([x1, y1, x2, y2], 1), colour, texture, neighbours


def hierarchical_grouping_reference(labels, colour_bins, texture_bins, weights):
    """Pure-Python :func:`hierarchical_grouping` (same arguments, same results)."""
    all_boxes, all_info = [], []
    for s in range(labels.shape[0]):
        lab = labels[s].numpy()
        size, box, colour, texture, nbrs = _region_features(
            lab, colour_bins[s].numpy(), texture_bins[s].numpy()
        )
        size, box, colour, texture = list(size), list(box), list(colour), list(texture)
        level = [0] * len(size)
        im_size = float(lab.size)
        wc, wt, ws, wf = weights[s].tolist()

        def intersection(a, b):
            # summed in order in float32, as the compiled op does
            return float(np.minimum(a, b).cumsum(dtype=np.float32)[-1])

        def sim(i, j):
            v = 0.0
            if wc:
                v += wc * intersection(colour[i], colour[j])
            if wt:
                v += wt * intersection(texture[i], texture[j])
            if ws:
                v += ws * (1.0 - (size[i] + size[j]) / im_size)
            if wf:
                bb = (max(box[i][2], box[j][2]) - min(box[i][0], box[j][0])) * (
                    max(box[i][3], box[j][3]) - min(box[i][1], box[j][1])
                )
                v += wf * (1.0 - (bb - size[i] - size[j]) / im_size)
            return v

        # heapq is a min-heap: (-sim, i, j) pops the largest sim, then the smallest ids
        heap = [(-sim(i, j), i, j) for i in range(len(size)) for j in sorted(nbrs[i]) if j > i]
        heapq.heapify(heap)
        alive = [True] * len(size)
        while heap:
            _, i, j = heapq.heappop(heap)
            if not (alive[i] and alive[j]):
                continue
            alive[i] = alive[j] = False
            k = len(size)
            n = size[i] + size[j]
            fa = np.float32(size[i] / n)
            fb = np.float32(1.0) - fa
            size.append(n)
            box.append(
                np.array(
                    [
                        min(box[i][0], box[j][0]),
                        min(box[i][1], box[j][1]),
                        max(box[i][2], box[j][2]),
                        max(box[i][3], box[j][3]),
                    ]
                )
            )
            colour.append(fa * colour[i] + fb * colour[j])
            texture.append(fa * texture[i] + fb * texture[j])
            level.append(1 + max(level[i], level[j]))
            merged = sorted(q for q in nbrs[i] | nbrs[j] if alive[q])
            nbrs.append(set(merged))
            alive.append(True)
            for q in merged:
                nbrs[q].add(k)
                heapq.heappush(heap, (-sim(q, k), q, k))
        n = len(size)
        all_boxes.append(torch.as_tensor(np.stack(box), dtype=torch.int64))
        all_info.append(
            torch.stack(
                [
                    torch.full((n,), s, dtype=torch.int64),
                    torch.arange(n, dtype=torch.int64),
                    torch.as_tensor(level, dtype=torch.int64),
                ],
                dim=1,
            )
        )
    if not all_boxes:
        return torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64)
    return torch.cat(all_boxes), torch.cat(all_info)


def box_straddling(
    labels: torch.Tensor, boxes: torch.Tensor, *, use_reference: bool = False
) -> torch.Tensor:
    """
    Superpixel straddling SS(b) = 1 − Σ_s min(|s \\ b|, |s ∩ b|) / |b| of integer boxes.

    Args:
        labels: (H, W) int64 segment labels 0..R-1.
        boxes: (B, 4) int64 x1, y1, x2, y2 (x2, y2 exclusive), clipped to the image.

    Returns:
        (B,) float32 in [0, 1] (1: no segment crosses the box edge); 0 for an empty box.
    """
    check_tensor("labels", labels, ndim=2, where="box_straddling")
    check_tensor("boxes", boxes, (None, 4), where="box_straddling")
    labels = labels.cpu()
    boxes = boxes.cpu()
    if not use_reference and compiled_ops_available(torch.device("cpu")):
        return torch.ops.wsis_d2.box_straddling(labels, boxes)
    if labels.dim() != 2 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be (H, W) int64, got {tuple(labels.shape)} {labels.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.dtype != torch.int64:
        raise ValueError(f"boxes must be (B, 4) int64, got {tuple(boxes.shape)} {boxes.dtype}")
    return box_straddling_reference(labels, boxes)


def box_straddling_reference(labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch :func:`box_straddling` (same arguments, same results)."""
    h, w = labels.shape
    out = torch.zeros(boxes.shape[0], dtype=torch.float32)
    if boxes.shape[0] == 0 or labels.numel() == 0:
        return out
    num = int(labels.max()) + 1
    sizes = torch.bincount(labels.reshape(-1), minlength=num)
    for b, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
        y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
        if x2 <= x1 or y2 <= y1:
            continue
        inside = torch.bincount(labels[y1:y2, x1:x2].reshape(-1), minlength=num)
        straddle = torch.minimum(inside, sizes - inside)[inside > 0].sum()
        out[b] = float(1.0 - float(straddle) / float((x2 - x1) * (y2 - y1)))
    return out
