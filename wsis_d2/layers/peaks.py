"""
Peak finding on class response maps: peak stimulation (ILC), peak response maps (PRM), CCGR bags.

Definition (shared by the compiled op and the reference): for maps M of shape (N, C, H, W) and
radius r, pixel (y, x) of map (n, c) is a *peak* iff M[n, c, y, x] is not NaN and is >= every value
in its (2r+1) x (2r+1) window, the window clipped at the image border (out-of-image positions never
win: the same as padding with -inf). Plateaus therefore give several peaks, and r = 0 makes every
non-NaN pixel a peak. A threshold keeps peaks with value >= t, where t is None (no threshold), a
float (absolute), or "median": the per-map median of M (the lower median of its non-NaN values, as
``torch.nanmedian``; PRM's peak filter). Peaks of a map are listed by value, descending; equal
values by ascending flat index y*W + x; maps are ordered n-major, then c.

NaN handling: a NaN pixel is never a peak and never beats a neighbour (it is ignored in windows).

Complexity: CPU kernel O(N*C*H*W*(2r+1)) (separable window maximum, one task per map) plus
O(P log P) to sort the P peaks; CUDA kernel O(N*C*H*W*(2r+1)^2) work, one thread per pixel, then
device compaction and stable radix sorts. The reference is max-pool + nonzero + two stable sorts.
"""

import numbers
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.checks import check_finite, check_integer_dtype, check_number, check_tensor
from ._ext import compiled_ops_available

Threshold = Optional[Union[float, str]]


class Peaks(NamedTuple):
    """
    mask: (N, C, H, W) bool, True at peaks that pass the threshold.
    indices: (P, 4) long, rows (n, c, y, x), sorted as described in the module docstring.
    values: (P,) peak values (no gradient: gather ``maps[n, c, y, x]`` when gradients must flow).
    counts: (N, C) long, number of peaks per map.
    """

    mask: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor


def _check(maps: torch.Tensor, radius: int) -> None:
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        raise ValueError(f"maps must be a (N, C, H, W) tensor, got {getattr(maps, 'shape', maps)}")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be floating point, got {maps.dtype}")
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or int(radius) != radius:
        raise TypeError(f"radius must be a non-negative integer, got {radius!r}")
    if radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius}")


def _thresholds(maps: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """(N, C) per-map thresholds t (a peak needs value >= t); -inf for none."""
    n, c = maps.shape[:2]
    if threshold is None:
        return maps.new_full((n, c), float("-inf"))
    if isinstance(threshold, str):
        if threshold != "median":
            raise ValueError(f"threshold must be None, a number or 'median', got {threshold!r}")
        if maps.shape[2] * maps.shape[3] == 0:
            return maps.new_full((n, c), float("inf"))
        # NaN pixels are never peaks and do not count towards the median either
        return maps.detach().flatten(2).nanmedian(dim=2).values
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be None, a number or 'median', got {threshold!r}")
    if threshold != threshold:
        raise ValueError("threshold is NaN")
    return maps.new_full((n, c), float(threshold))


def peak_mask_reference(maps: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Pure-PyTorch peak mask (max-pool with -inf padding). Same contract as the op."""
    _check(maps, radius)
    x = maps.detach()
    # NaNs must not win the max-pool: replace them by -inf for the window maximum only
    filled = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    padded = F.pad(filled, (radius,) * 4, value=float("-inf"))
    window_max = F.max_pool2d(padded, kernel_size=2 * radius + 1, stride=1)
    return (x >= window_max) & ~torch.isnan(x)


def find_peaks_reference(maps: torch.Tensor, radius: int = 1, threshold: Threshold = None) -> Peaks:
    """Pure-PyTorch ``find_peaks`` (max-pool + nonzero + stable sorts). Same contract."""
    mask = peak_mask_reference(maps, radius)
    x = maps.detach()
    n, c, h, w = x.shape
    mask = mask & (x >= _thresholds(x, threshold)[:, :, None, None])
    flat = mask.view(n * c, h * w)
    m_idx, p_idx = flat.nonzero(as_tuple=True)
    values = x.reshape(n * c, h * w)[m_idx, p_idx]
    order = torch.sort(values, descending=True, stable=True).indices
    order = order[torch.sort(m_idx[order], stable=True).indices]
    m_idx, p_idx, values = m_idx[order], p_idx[order], values[order]
    indices = torch.stack([m_idx // c, m_idx % c, p_idx // w, p_idx % w], dim=1)
    return Peaks(mask, indices, values, flat.sum(1).view(n, c))


def find_peaks(maps: torch.Tensor, radius: int = 1, threshold: Threshold = None) -> Peaks:
    """
    Local maxima of each map (see the module docstring for the exact definition). Runs the compiled
    op ``torch.ops.wsis_d2.find_peaks`` (CPU: O(N*C*H*W*(2r+1)) + O(P log P), one task per map),
    or the reference when the extension is missing.

    Args:
        maps: (N, C, H, W) float tensor (class response maps M).
        radius: window radius r; the window is (2r+1) x (2r+1).
        threshold: None, an absolute value, or "median" (per-map median, PRM).

    Returns:
        Peaks(mask (N, C, H, W) bool, indices (P, 4) long, values (P,), counts (N, C) long).
    """
    _check(maps, radius)
    if not compiled_ops_available(maps.device):
        return find_peaks_reference(maps, radius, threshold)
    x = maps.detach()
    thresholds = _thresholds(x, threshold)
    if x.dtype in (torch.float32, torch.float64):
        return Peaks(*torch.ops.wsis_d2.find_peaks(x, int(radius), thresholds))
    # the kernels take float32/float64; half-precision values convert exactly to float32
    mask, indices, values, counts = torch.ops.wsis_d2.find_peaks(
        x.float(), int(radius), thresholds.float()
    )
    return Peaks(mask, indices, values.to(x.dtype), counts)


def kth_peak_value(
    maps: torch.Tensor, k: torch.Tensor, radius: int = 1, threshold: Threshold = None
) -> torch.Tensor:
    """
    The k-th highest peak value of each map: h_c, the t_c-th peak of the hard spatial guidance
    (ILC, Sec. 3.2). Where a map has fewer than k peaks it is the lowest peak value (all peaks
    kept); where it has no peak it is +inf; k <= 0 gives +inf (no peak selected).

    Args:
        maps: (N, C, H, W).
        k: (N, C) integer tensor (or array), 1-based ranks; a float k is a TypeError (a rank
            such as 2.5 has no meaning, and truncating it would hide a caller's mistake).

    Returns:
        (N, C) tensor of values of ``maps``' dtype, no gradient.
    """
    _check(maps, radius)
    n, c = maps.shape[:2]
    if not isinstance(k, torch.Tensor):
        k = torch.as_tensor(np.asarray(k))
    check_integer_dtype("k", k, "kth_peak_value")
    if tuple(k.shape) != (n, c):
        raise ValueError(
            f"kth_peak_value: 'k' must have shape {(n, c)} (N, C of maps), got {tuple(k.shape)}"
        )
    k = k.to(maps.device).long()
    peaks = find_peaks(maps, radius, threshold)
    counts = peaks.counts.to(maps.device)
    starts = torch.cumsum(counts.flatten(), 0) - counts.flatten()
    rank = torch.minimum(k.flatten(), counts.flatten()) - 1
    out = maps.new_full((n * c,), float("inf"))
    valid = rank >= 0
    if valid.any():
        out[valid] = peaks.values.to(maps.device)[(starts + rank)[valid]].to(maps.dtype)
    return out.view(n, c)


def prominent_peaks(
    peak_map: torch.Tensor, yx: torch.Tensor, values: torch.Tensor, height: float
) -> torch.Tensor:
    """
    Which peaks of a map have a prominence (dynamic) of at least ``height``: those at the top of
    an h-dome, where M − R ≥ h for R the morphological reconstruction by dilation of M − h under
    M (``skimage.morphology.h_maxima``), one per dome (the highest; equal values: the first). A
    part of a large object often makes a local maximum of its own, joined to the object's main
    maximum by a shallow saddle, while two objects are separated by the dip of the map between
    them. The global maximum always tops a dome.

    Args:
        peak_map: (H, W) M (NaN: not allowed).
        yx: (P, 2) long (y, x) of the peaks (e.g. of :func:`find_peaks`). values: (P,) their M.
        height: h, in the units of M (> 0).

    Returns:
        (P,) bool: the peaks kept.
    """
    from scipy import ndimage
    from skimage.morphology import h_maxima

    where = "prominent_peaks"
    check_tensor("peak_map", peak_map, ndim=2, where=where)
    check_finite("peak_map", peak_map, where, allow_inf=True)
    check_tensor("yx", yx, (None, 2), where)
    check_integer_dtype("yx", yx, where)
    check_tensor("values", values, (yx.shape[0],), where)
    check_number("height", float(height) if isinstance(height, torch.Tensor) else height,
                 low=0.0, low_open=True, where=where)  # fmt: skip
    h_map, w_map = peak_map.shape
    if yx.numel() and (
        int(yx[:, 0].min()) < 0 or int(yx[:, 0].max()) >= h_map
        or int(yx[:, 1].min()) < 0 or int(yx[:, 1].max()) >= w_map
    ):  # fmt: skip
        raise ValueError(f"{where}: 'yx' must lie inside the (H, W) = {(h_map, w_map)} peak_map")
    keep = torch.zeros(yx.shape[0], dtype=torch.bool)
    if yx.shape[0] == 0:
        return keep
    m = peak_map.detach().double().cpu().numpy()
    domes, _ = ndimage.label(h_maxima(m, float(height)), structure=[[1, 1, 1]] * 3)
    pos = yx.long().cpu().numpy()
    val = values.detach().double().cpu().numpy()
    best = {}
    for i, (y, x) in enumerate(pos):
        d = int(domes[y, x])
        if d and (d not in best or val[i] > val[best[d]]):
            best[d] = i
    keep[list(best.values())] = True
    return keep.to(yx.device)
