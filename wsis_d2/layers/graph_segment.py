"""
Graph-based image segmentation (Felzenszwalb & Huttenlocher, "Efficient Graph-Based Image
Segmentation", IJCV 2004), the over-segmentation that selective search starts from.

Graph: the 8-connected pixel grid. :func:`edge_weights` blurs each channel of a (K, H, W) image
(values in 0..255) with a separable Gaussian of std σ (radius ceil(4σ), reflect padding that
repeats the edge pixel, ``d c b a | a b c d``; σ = 0: no blur) and gives the weights (4, H, W),
the Euclidean colour distance between a pixel and its neighbour in direction d,

    d = 0: (y, x+1) right,  1: (y+1, x) down,  2: (y+1, x+1) down-right,  3: (y-1, x+1) up-right,

0 where the neighbour is outside the image (those entries are ignored). Edge id = (y*W + x)*4 + d.

Segmentation (the compiled op and the reference, identical labels): the edges are visited in
ascending (weight, id) order, a total order. Each component C keeps its size |C| and Int(C), the
weight of the last edge merged into it (0 for a single pixel); an edge of weight w between two
components merges them iff

    w <= min(Int(C1) + k/|C1|, Int(C2) + k/|C2|),    k = scale (larger: bigger regions),

with the thresholds in float64. Then a second pass over the edges, in the same order, merges any
two components of which at least one has fewer than ``min_size`` pixels. Labels 0..S-1 number the
components by their first pixel in raster order. With k = 0 and min_size <= 1, the segments are
the connected components of the zero-weight edges.

Compared with ``skimage.segmentation.felzenszwalb`` (same k on 0..255 images): ties are broken by
edge id (skimage's sort is not stable), the merge test is ``<=`` as in the paper (skimage: ``<``),
the blur radius is ceil(4σ) (scipy: round(4σ)) and labels are numbered by first appearance.

Complexity: blur and weights O(K*H*W*σ) in torch; the compiled op (CPU only, sequential) sorts
the E ~ 4*H*W edges with an LSD radix sort on the float bit patterns, O(E), then runs union-find
(union by size, path halving), nearly O(E). The reference is the same loop in Python (slow).
"""

import math
import numbers
from typing import List, Sequence
from functools import lru_cache

import numpy as np
import torch

from ._ext import compiled_ops_available

__all__ = ["edge_weights", "graph_segment", "graph_segment_scales", "graph_segment_reference"]


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a (K, H, W) tensor, got {getattr(image, 'shape', image)}")
    k, h, w = image.shape
    if k not in (1, 3):
        raise ValueError(f"image must have K = 1 or 3 channels, got shape {tuple(image.shape)}")
    if h < 1 or w < 1:
        raise ValueError(f"image must be at least 1x1, got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"image must be uint8 or floating point, got {image.dtype}")
    if image.is_floating_point():
        lo, hi = torch.aminmax(image.detach())
        # NaN fails both comparisons
        if not (lo.item() >= 0 and hi.item() <= 255):
            raise ValueError(f"image values must be in [0, 255], got [{lo.item()}, {hi.item()}]")


def _check_number(name: str, value, integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


@lru_cache(maxsize=16)
def _gaussian_kernel(sigma: float) -> tuple:
    radius = math.ceil(4 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return tuple((g / g.sum()).tolist())


def _reflect_pad(x: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """Pads ``dim`` by ``radius`` on both sides, mirrored with the edge repeated (d c b a | a b)."""
    n = x.shape[dim]
    if radius <= n:  # one reflection: two flipped slices (much faster than index_select)
        left = x.narrow(dim, 0, radius).flip(dim)
        right = x.narrow(dim, n - radius, radius).flip(dim)
        return torch.cat([left, x, right], dim)
    # a radius beyond the image reflects again at the far edge: period 2n
    i = torch.arange(-radius, n + radius, device=x.device) % (2 * n)
    return x.index_select(dim, torch.where(i < n, i, 2 * n - 1 - i))


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each channel of a (K, H, W) float32 image."""
    kernel = _gaussian_kernel(sigma)
    radius = (len(kernel) - 1) // 2
    x = image
    # one axis at a time: shifted copies of the padded image, weighted (faster than conv2d here)
    for dim in (2, 1):
        n = x.shape[dim]
        padded = _reflect_pad(x, dim, radius)
        x = padded.narrow(dim, 0, n) * kernel[0]
        for i in range(1, len(kernel)):
            x.add_(padded.narrow(dim, i, n), alpha=kernel[i])
    return x


def edge_weights(image: torch.Tensor, sigma: float = 0.8) -> torch.Tensor:
    """
    Edge weights of the 8-connected grid graph of an image (see the module docstring).

    Args:
        image: (K, H, W) uint8 or float with values in 0..255, K = 1 or 3 (any channel order).
        sigma: std of the Gaussian blur applied to each channel first (0: none).

    Returns:
        (4, H, W) float32 on the image's device: weights[d, y, x] is the colour distance from
        pixel (y, x) to its neighbour in direction d (right, down, down-right, up-right), 0 where
        the neighbour is outside the image.
    """
    _check_image(image)
    _check_number("sigma", sigma)
    return _edge_weights(image.detach(), float(sigma))


def _edge_weights(image: torch.Tensor, sigma: float) -> torch.Tensor:
    x = image.float()
    if sigma > 0:
        x = _blur(x, float(sigma))
    k, h, w = x.shape
    out = x.new_empty((4, h, w))
    # entries without a neighbour: 0
    out[0, :, -1] = 0
    out[1:3, -1, :] = 0
    out[2:4, :, -1] = 0
    out[3, 0, :] = 0
    pairs = (
        (out[0, :, :-1], x[:, :, 1:], x[:, :, :-1]),  # right
        (out[1, :-1, :], x[:, 1:, :], x[:, :-1, :]),  # down
        (out[2, :-1, :-1], x[:, 1:, 1:], x[:, :-1, :-1]),  # down-right
        (out[3, 1:, :-1], x[:, :-1, 1:], x[:, 1:, :-1]),  # up-right
    )
    # explicit sums of squares, then one sqrt (torch.linalg.vector_norm over dim 0 is ~10x
    # slower on CPU); the channels add in a fixed order whatever the input's strides
    for dst, neighbour, pixel in pairs:
        squares = (neighbour - pixel).square_()
        if k == 1:
            dst.copy_(squares[0])
        else:
            torch.add(squares[0], squares[1], out=dst)
            dst.add_(squares[2])
    return out.sqrt_()


def _valid_edges(h: int, w: int) -> np.ndarray:
    """(H, W, 4) bool: whether the neighbour of (y, x) in direction d is inside the image."""
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    right, down, up = x + 1 < w, y + 1 < h, y > 0
    return np.stack(np.broadcast_arrays(right, down, down & right, up & right), axis=-1)


def graph_segment_reference(
    weights: torch.Tensor, scale: float = 1000.0, min_size: int = 10
) -> torch.Tensor:
    """
    Pure-Python ``torch.ops.wsis_d2.graph_segment``: the same edge order and merge rules, so the
    same labels (see the module docstring). Slow (a Python loop over the edges).

    Args:
        weights: (4, H, W) float32 edge weights (:func:`edge_weights`), finite and >= 0 where the
            neighbour is inside the image.
        scale: k >= 0.
        min_size: minimum segment size (pixels) of the second pass.

    Returns:
        (H, W) int64 labels 0..S-1 on weights' device.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3 or weights.shape[0] != 4:
        raise ValueError(
            f"weights must be a (4, H, W) tensor, got {getattr(weights, 'shape', weights)}"
        )
    if weights.dtype != torch.float32:
        raise ValueError(f"weights must be float32, got {weights.dtype}")
    _, h, w = weights.shape
    if h < 1 or w < 1:
        raise ValueError(
            f"weights must describe an image of at least 1x1, got {tuple(weights.shape)}"
        )
    _check_number("scale", scale)
    _check_number("min_size", min_size, integer=True)
    scale, min_size = float(scale), int(min_size)

    # (y, x, d) raster order is edge id order; + 0 turns -0 into +0
    flat = weights.detach().cpu().numpy().transpose(1, 2, 0).reshape(-1)
    ids = np.flatnonzero(_valid_edges(h, w).reshape(-1))
    values = flat[ids] + np.float32(0)
    bad = ~(np.isfinite(values) & (values >= 0))
    if bad.any():
        i = int(ids[np.argmax(bad)])
        d, y, x = i % 4, i // 4 // w, i // 4 % w
        raise ValueError(f"weights must be finite and >= 0, got {flat[i]} at ({d}, {y}, {x})")
    order = np.argsort(values, kind="stable")
    ids, values = ids[order].tolist(), values[order].tolist()
    offset = (1, w, w + 1, 1 - w)

    n = h * w
    parent = list(range(n))
    size = [1] * n
    threshold = [scale] * n  # Int(C) + k/|C| of each root

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def unite(a, b):
        if size[a] < size[b]:
            a, b = b, a
        parent[b] = a
        size[a] += size[b]
        return a

    for i, wt in zip(ids, values):
        p = i >> 2
        a, b = find(p), find(p + offset[i & 3])
        if a != b and wt <= min(threshold[a], threshold[b]):
            r = unite(a, b)
            threshold[r] = wt + scale / size[r]
    for i in ids:
        p = i >> 2
        a, b = find(p), find(p + offset[i & 3])
        if a != b and (size[a] < min_size or size[b] < min_size):
            unite(a, b)

    roots = np.array([find(p) for p in range(n)])
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return torch.from_numpy(rank[inverse].reshape(h, w)).to(weights.device)


def graph_segment(
    image: torch.Tensor, scale: float = 1000.0, sigma: float = 0.8, min_size: int = 10
) -> torch.Tensor:
    """
    Felzenszwalb-Huttenlocher segmentation of an image (see the module docstring): blur and edge
    weights in torch, then the compiled op ``torch.ops.wsis_d2.graph_segment`` (about 2 ms for
    160x240 pixels), or :func:`graph_segment_reference` when the extension is missing. The op is
    CPU only: a CUDA image is segmented on the CPU and the labels are returned on its device.

    Args:
        image: (K, H, W) uint8 or float with values in 0..255, K = 1 or 3 (any channel order).
        scale: k >= 0; larger k gives larger segments.
        sigma: std of the Gaussian blur before computing the weights (0: none).
        min_size: segments smaller than this (pixels) are merged into a neighbour.

    Returns:
        (H, W) int64 labels 0..S-1, numbered by first appearance in raster order.
    """
    return graph_segment_scales(image, [scale], sigma, [min_size])[0]


def graph_segment_scales(
    image: torch.Tensor, scales: Sequence[float], sigma: float = 0.8, min_sizes: Sequence[int] = ()
) -> List[torch.Tensor]:
    """
    :func:`graph_segment` of one image at several scales k (selective search's diversification),
    the blur and edge weights computed once.

    Args:
        image: as for :func:`graph_segment`.
        scales: the k of each segmentation.
        sigma: as for :func:`graph_segment`.
        min_sizes: minimum segment size of each scale (same length as ``scales``).

    Returns:
        one (H, W) int64 label map per scale.
    """
    _check_image(image)
    if len(min_sizes) != len(scales):
        raise ValueError(
            f"graph_segment_scales: 'min_sizes' must have one entry per scale ({len(scales)}), "
            f"got {len(min_sizes)}"
        )
    for scale, min_size in zip(scales, min_sizes):
        _check_number("scale", scale)
        _check_number("min_size", min_size, integer=True)
    _check_number("sigma", sigma)
    weights = _edge_weights(image.detach().cpu(), float(sigma))
    out = []
    for scale, min_size in zip(scales, min_sizes):
        if compiled_ops_available():
            labels = torch.ops.wsis_d2.graph_segment(weights, float(scale), int(min_size))
        else:
            labels = graph_segment_reference(weights, scale, min_size)
        out.append(labels.to(image.device))
    return out
