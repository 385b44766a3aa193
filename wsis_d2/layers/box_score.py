"""
Integral-image box scoring for CCGR (center-context-gap refinement).

Coordinates are continuous pixel coordinates: pixel (y, x) covers [x, x+1) x [y, y+1), an image of
width W spans [0, W]. A score map is piecewise constant on pixels, so its integral over an
axis-aligned box is exact from the integral image S (S[y, x] = sum of M[:y, :x], float64)
interpolated bilinearly at the four corners; it is differentiable with respect to the map and the
box corners (d sum / d x2 is the integral of M along the box's right edge, etc.). At integer
coordinates, where the integral has a kink, the op uses the one-sided derivative from the
right/below (from the left/above at x = W / y = H).

Boxes are (K, 5) rows (n, x1, y1, x2, y2): image index n, then corners with x1 <= x2, y1 <= y2.
They are clipped to the image before scoring; the mean is over the clipped part, and a coordinate
at or beyond the image bounds gets zero gradient (on every path and torch release). A box with
zero area after clipping (zero size, or fully outside) has mean 0 and zero gradient. ValueError
for: NaN in boxes, x2 < x1 or y2 < y1 (malformed, not treated as empty), image index / class out
of range, NaN or inf in a map that some box scores.

The context ring of a box B is C \\ B, where C is B scaled by ``context_scale`` (1.5 in CCGR) about
its centre; both are clipped to the image, and the ring mean is (S(C) - S(B)) / (|C| - |B|), 0 for
an empty ring. CCGR's gap is Phi(C) - Phi(B) = context_mean - inside_mean.

Complexity: one-shot scoring (``box_sum`` / ``box_mean`` / ``box_context_gap``) reads every scored
map once, O(H*W), plus O(W) per box: the CPU kernel (one task per map) sweeps the map keeping column
sums and forms only the rows of S that the box corners read (at most 8 per box), so S is never
stored; the CUDA path builds S with device scans, then one thread per box. The backward pass builds
S and runs the adjoint scan, O(H*W) per scored map, plus O(1) per box. ``IntegralImage`` stores S
and scores boxes at O(1) each (forward and backward). The per-box reference costs O(box area) per
box plus Python overhead.
"""

from typing import Tuple

import torch

from ..utils.checks import check_number, check_tensor
from ._ext import compiled_ops_available


def _check_shapes(maps: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor) -> None:
    if maps.dim() != 4 or not maps.is_floating_point():
        raise ValueError(f"maps must be a floating (N, C, H, W) tensor, got {tuple(maps.shape)}")
    if maps.shape[2] == 0 or maps.shape[3] == 0:
        raise ValueError(f"maps have zero size {tuple(maps.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) rows (n, x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if classes.dim() != 1 or classes.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"classes must be (K,) with K={boxes.shape[0]}, got {tuple(classes.shape)}"
        )


def _validate(maps: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor) -> None:
    """Shapes, NaN / order of the box corners, index ranges. Maps are checked by the callers."""
    _check_shapes(maps, boxes, classes)
    if len(boxes) == 0:
        return
    b = boxes.detach()
    n = b[:, 0]
    has_nan = torch.isnan(b).any()
    flipped = (b[:, 3] < b[:, 1]) | (b[:, 4] < b[:, 2])
    bad_image = (n != n.round()) | (n < 0) | (n >= maps.shape[0])
    bad_class = (classes < 0) | (classes >= maps.shape[1])
    # one host sync on the common, valid path; the details only on failure
    if not bool(has_nan | flipped.any() | bad_image.any() | bad_class.any()):
        return
    if has_nan:
        raise ValueError("boxes contain NaN")
    if flipped.any():
        bad = int(torch.nonzero(flipped)[0])
        raise ValueError(f"boxes[{bad}] has x2 < x1 or y2 < y1: {b[bad].tolist()}")
    if bad_image.any():
        raise ValueError(f"boxes[:, 0] (image indices) must be integers in [0, {maps.shape[0]})")
    raise ValueError(f"classes must be in [0, {maps.shape[1]})")


def _check_scored_maps_finite(maps: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor):
    """ValueError if a map that some box scores has NaN or inf (the compiled op checks itself)."""
    finite = torch.isfinite(maps.detach()).flatten(2).all(2)  # (N, C)
    ok = finite[boxes[:, 0].detach().long(), classes]
    if not bool(ok.all()):
        k = int(torch.nonzero(~ok)[0])
        raise ValueError(
            f"maps[{int(boxes[k, 0])}, {int(classes[k])}] (scored by boxes[{k}]) "
            "contains NaN or inf"
        )


def _clip_coord(v: torch.Tensor, bound: int) -> torch.Tensor:
    """
    ``v`` clamped into [0, bound] with the op's gradient: 1 strictly inside, 0 at and beyond the
    bounds. Written out rather than ``torch.clamp``, whose gradient at the bound itself differs
    between releases (0 in torch 2.14, 1 in 2.11: measured on both).
    """
    inside = (v > 0) & (v < bound)
    return torch.where(inside, v, v.detach().clamp(0, bound))


def _clip(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x1 = _clip_coord(boxes[:, 1], width)
    y1 = _clip_coord(boxes[:, 2], height)
    x2 = _clip_coord(boxes[:, 3], width)
    y2 = _clip_coord(boxes[:, 4], height)
    return torch.stack([boxes[:, 0], x1, y1, x2, y2], dim=1)


def _areas(clipped: torch.Tensor) -> torch.Tensor:
    return (clipped[:, 3] - clipped[:, 1]) * (clipped[:, 4] - clipped[:, 2])


class _BoxSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps, boxes, classes):
        ctx.save_for_backward(maps, boxes, classes)
        return torch.ops.wsis_d2.box_sum_forward(maps, boxes, classes)

    @staticmethod
    def backward(ctx, grad):
        maps, boxes, classes = ctx.saved_tensors
        grad_maps, grad_boxes = torch.ops.wsis_d2.box_sum_backward(
            grad.contiguous(), maps, boxes, classes
        )
        return grad_maps, grad_boxes, None


def box_sum_reference(
    maps: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """
    Pure-PyTorch per-box summation over clipped, valid boxes (independent of integral images):
    each pixel is weighted by its overlap with the box, ox_i * oy_j, and only the pixels the box
    touches are visited. Differentiable by autograd (w.r.t. maps and the box corners), with the
    op's one-sided derivative (from the right / below) at integer coordinates.

    Args:
        maps: (N, C, H, W) score maps.
        boxes: (K, 5) rows (n, x1, y1, x2, y2) already clipped to [0, W] x [0, H], x1 <= x2,
            y1 <= y2.
        classes: (K,) long.

    Returns:
        (K,) integrals of maps[n_k, classes[k]] over box k.
    """
    out = []
    for k in range(boxes.shape[0]):
        n, x1, y1, x2, y2 = boxes[k]
        h, w = maps.shape[2], maps.shape[3]
        # at least one pixel per axis, so a zero-width box still has its edge derivative
        # pixels floor(x1) .. floor(x2) (at least one, at most the image's): at an integer x2 the
        # pixel right of it has zero overlap but carries the derivative from the right
        i0 = min(int(x1.detach().floor()), w - 1)
        j0 = min(int(y1.detach().floor()), h - 1)
        i1 = max(min(int(x2.detach().floor()) + 1, w), i0 + 1)
        j1 = max(min(int(y2.detach().floor()) + 1, h), j0 + 1)
        xs = torch.arange(i0, i1, dtype=maps.dtype, device=maps.device)
        ys = torch.arange(j0, j1, dtype=maps.dtype, device=maps.device)
        # every overlap here is >= 0: no clamp, so edges keep gradients. min / max as ``where``
        # with the tie on the side of the derivative from the right / below, as the op takes it
        # at integer coordinates (torch.minimum / maximum would split a tie 0.5 / 0.5)
        ox = torch.where(x2 < xs + 1, x2, xs + 1) - torch.where(x1 >= xs, x1, xs)
        oy = torch.where(y2 < ys + 1, y2, ys + 1) - torch.where(y1 >= ys, y1, ys)
        patch = maps[int(n), int(classes[k]), j0:j1, i0:i1]
        out.append(oy @ patch @ ox)
    if not out:
        return maps.new_zeros(0)
    return torch.stack(out)


def box_sum(
    maps: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, *, use_reference: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Integral and area of each box, clipped to the image. Compiled op: O(H*W) per scored map plus
    O(W) per box (forward, CPU), see the module docstring; reference: O(box area) per box.

    Args:
        maps: (N, C, H, W) score maps.
        boxes: (K, 5) rows (n, x1, y1, x2, y2), continuous pixel coordinates.
        classes: (K,) long, the channel scored for each box.

    Returns:
        sums (K,), areas (K,) of the clipped boxes; differentiable w.r.t. maps and boxes.
    """
    classes = torch.as_tensor(classes, device=maps.device).long()
    boxes = boxes.to(maps.dtype)
    if (
        not use_reference
        and maps.device.type == "cpu"
        and maps.dtype in (torch.float32, torch.float64)
        and compiled_ops_available(maps.device)
    ):
        # the CPU kernel validates the unclipped boxes (the messages of _validate; a flipped box
        # can look valid once clipped) and clamps them itself (zero gradient at and beyond the bounds)
        _check_shapes(maps, boxes, classes)
        args = (maps.contiguous(), boxes.contiguous(), classes.contiguous())
        needs_grad = torch.is_grad_enabled() and (maps.requires_grad or boxes.requires_grad)
        total = _BoxSum.apply(*args) if needs_grad else torch.ops.wsis_d2.box_sum_forward(*args)
        return total, _areas(_clip(boxes, maps.shape[2], maps.shape[3]))
    _validate(maps, boxes, classes)
    clipped = _clip(boxes, maps.shape[2], maps.shape[3])
    areas = _areas(clipped)
    if use_reference or not compiled_ops_available(maps.device):
        _check_scored_maps_finite(maps, boxes, classes)
        return box_sum_reference(maps, clipped, classes), areas
    if maps.dtype not in (torch.float32, torch.float64):
        # the kernels take float32/float64 (they accumulate in float64 anyway)
        total = _BoxSum.apply(maps.float().contiguous(), clipped.float(), classes.contiguous())
        return total.to(maps.dtype), areas
    return _BoxSum.apply(maps.contiguous(), clipped.contiguous(), classes.contiguous()), areas


def _safe_mean(total: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    positive = area > 0
    denom = torch.where(positive, area, torch.ones_like(area))
    return torch.where(positive, total / denom, torch.zeros_like(total))


def box_mean(
    maps: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, *, use_reference: bool = False
) -> torch.Tensor:
    """
    Mean score Phi(B) of each box (clipped to the image; 0 for an empty box).

    Args:
        maps: (N, C, H, W); boxes: (K, 5) rows (n, x1, y1, x2, y2); classes: (K,) long.

    Returns:
        (K,) means, differentiable w.r.t. maps and boxes.
    """
    total, area = box_sum(maps, boxes, classes, use_reference=use_reference)
    return _safe_mean(total, area)


def context_boxes(boxes: torch.Tensor, context_scale: float = 1.5) -> torch.Tensor:
    """(K, 5) boxes scaled by ``context_scale`` (>= 1) about their centres (not clipped)."""
    check_tensor("boxes", boxes, (None, 5), where="context_boxes")
    check_number("context_scale", context_scale, low=1.0, where="context_boxes")
    cx = (boxes[:, 1] + boxes[:, 3]) / 2
    cy = (boxes[:, 2] + boxes[:, 4]) / 2
    hw = (boxes[:, 3] - boxes[:, 1]) * (context_scale / 2)
    hh = (boxes[:, 4] - boxes[:, 2]) * (context_scale / 2)
    return torch.stack([boxes[:, 0], cx - hw, cy - hh, cx + hw, cy + hh], dim=1)


def box_context_gap(
    maps: torch.Tensor,
    boxes: torch.Tensor,
    classes: torch.Tensor,
    context_scale: float = 1.5,
    *,
    use_reference: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Mean score inside each box, Phi(B), and in its context ring, Phi(C) with C = scaled box minus B
    (CCGR); one batched call, both clipped to the image.

    Args:
        maps: (N, C, H, W); boxes: (K, 5) rows (n, x1, y1, x2, y2); classes: (K,) long.
        context_scale: side ratio of the context box to the box (1.5 in CCGR); must be >= 1.

    Returns:
        inside_mean (K,), context_mean (K,); the gap is context_mean - inside_mean.
    """
    if context_scale < 1:
        raise ValueError(f"context_scale must be >= 1, got {context_scale}")
    boxes = boxes.to(maps.dtype)
    both = torch.cat([boxes, context_boxes(boxes, context_scale)], dim=0)
    classes = torch.as_tensor(classes, device=maps.device).long()
    total, area = box_sum(maps, both, torch.cat([classes, classes]), use_reference=use_reference)
    k = boxes.shape[0]
    inside = _safe_mean(total[:k], area[:k])
    ring = _safe_mean(total[k:] - total[:k], area[k:] - area[:k])
    return inside, ring


class _BoxSumIntegral(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S, boxes, classes):
        ctx.save_for_backward(S, boxes, classes)
        return torch.ops.wsis_d2.box_sum_integral(S, boxes, classes)

    @staticmethod
    def backward(ctx, grad):
        S, boxes, classes = ctx.saved_tensors
        grad_boxes = torch.ops.wsis_d2.box_sum_integral_backward(
            grad.contiguous(), S, boxes, classes
        )
        return None, grad_boxes, None


class IntegralImage:
    """
    Integral images of fixed score maps, built once and queried at O(1) per box: CCGR's box
    refinement takes many gradient steps on the box coordinates while the maps stay fixed.
    Gradients flow to the boxes only (use ``box_mean`` / ``box_context_gap`` for map gradients).

    Args:
        maps: (N, C, H, W) score maps; S is stored as float64 (N, C, H+1, W+1).
    """

    def __init__(self, maps: torch.Tensor):
        maps = maps.detach()
        if maps.dim() != 4 or not maps.is_floating_point():
            raise ValueError(
                f"maps must be a floating (N, C, H, W) tensor, got {tuple(maps.shape)}"
            )
        if maps.shape[2] == 0 or maps.shape[3] == 0:
            raise ValueError(f"maps have zero size {tuple(maps.shape)}")
        self.shape = tuple(maps.shape)
        # boxes are scored in the maps' dtype (float32 for half-precision maps)
        self.dtype = maps.dtype if maps.dtype == torch.float64 else torch.float32
        if compiled_ops_available(maps.device):
            self.S = torch.ops.wsis_d2.integral_image(maps.contiguous())
        else:
            s = maps.double().cumsum(2).cumsum(3)
            self.S = torch.nn.functional.pad(s, (1, 0, 1, 0))
        # a map's total is finite iff all its values are (float64 sums of float32 do not overflow)
        finite = torch.isfinite(self.S[:, :, -1, -1])
        if not bool(finite.all()):
            n, c = torch.nonzero(~finite)[0].tolist()
            raise ValueError(f"maps[{n}, {c}] contains NaN or inf")
        self._maps = maps.to(self.dtype)  # for the reference fallback

    def box_sum(
        self, boxes: torch.Tensor, classes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Integral and area of each clipped box, differentiable w.r.t. boxes; see ``box_sum``."""
        classes = torch.as_tensor(classes, device=self.S.device).long()
        boxes = boxes.to(self.dtype)
        empty = self.S.new_zeros(self.shape[0], self.shape[1], 1, 1).to(self.dtype)
        clipped = _clip(boxes, self.shape[2], self.shape[3])
        areas = _areas(clipped)
        if self.S.device.type == "cpu" and compiled_ops_available(self.S.device):
            # the CPU kernel validates and clamps the boxes itself, as in ``box_sum``
            _check_shapes(empty, boxes, classes)
            return _BoxSumIntegral.apply(self.S, boxes.contiguous(), classes.contiguous()), areas
        _validate(empty, boxes, classes)  # shapes, NaN, order, index ranges (maps checked once)
        if not compiled_ops_available(self.S.device):
            return box_sum_reference(self._maps, clipped, classes), areas
        return _BoxSumIntegral.apply(self.S, clipped.contiguous(), classes.contiguous()), areas

    def box_mean(self, boxes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(K,) mean score Phi(B) inside each clipped box (0 when empty)."""
        return _safe_mean(*self.box_sum(boxes, classes))

    def box_context_gap(
        self, boxes: torch.Tensor, classes: torch.Tensor, context_scale: float = 1.5
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(inside_mean (K,), context_mean (K,)) as ``box_context_gap``, from the stored S."""
        if context_scale < 1:
            raise ValueError(f"context_scale must be >= 1, got {context_scale}")
        boxes = boxes.to(self.dtype)
        both = torch.cat([boxes, context_boxes(boxes, context_scale)], dim=0)
        classes = torch.as_tensor(classes, device=self.S.device).long()
        total, area = self.box_sum(both, torch.cat([classes, classes]))
        k = boxes.shape[0]
        return _safe_mean(total[:k], area[:k]), _safe_mean(
            total[k:] - total[:k], area[k:] - area[:k]
        )
