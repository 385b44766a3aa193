"""
CCGR's center-context-gap box refinement (Eq. 2–3 of "Center-context-gap Refinement for Weakly
Supervised Instance Segmentation", AAAI 2020) as one op over all boxes of an image and all steps.

For each box B of class c, L = Φ(C) − Φ(B): Φ(B) the mean of the class score map S_c inside B,
Φ(C) its mean in the context ring C = (B scaled by ``context_scale`` about its centre) \\ B, both
clamped to the image and read from the integral images of S (:class:`IntegralImage`, built once).
Each step moves the four coordinates by Adam on ∂L/∂(x1, y1, x2, y2) (β1 = 0.9, β2 = 0.999,
ε = 1e-8; the step size ``lr`` is in pixels: about ``lr`` per coordinate and step, whatever the
scale of the gap, so that boxes of every size move), then clamps the box into the image and to at
least ``min_size`` (min(min_size, W or H)) wide and high. The derivatives are those of
:func:`box_context_gap` (one-sided at integer coordinates, zero at the image bounds); NaN or
infinite ones count as 0, so a degenerate box never turns NaN. A box whose step would make it
contain a peak of its class other than its own keeps its previous coordinates and stops for good
(the paper's guard against swallowing a second instance).

The descent alone (``search=False``, the paper) stalls on plateaus: while B and its ring lie in
one flat region of S, Φ(B) = Φ(C) and ∂L/∂B = 0, and S averaged over image regions is piecewise
constant. With ``search`` (the default, ``MODEL.CCGR.REFINE_SEARCH``) each box is first moved to
the minimiser of L that a global search finds among the allowed boxes A — inside the image, at
least min_size, holding its own peak, no other peak of its class, with ``grow_only`` containing
the start box; coordinates the integers and the start box's own — and the descent then polishes
it; the op returns the box of A with least L among those visited. The search (see ``BoxRefine.h``
for the why of each part): a coarse grid of every allowed box whose coordinates lie 0, 2, 4, 8,
... pixels from the own peak (with ``grow_only``: from the start box's sides) out to the image
border keeps its 6 best boxes of distinct basins (IoU <= 0.3); from those and from the start box,
coordinate-wise exact line search (each coordinate in turn to its best allowed value) until no
coordinate moves; ~10^4 box scores per box. Against an exhaustive search of all integer boxes on
plateau maps (``tests/layers/test_box_refine.py``, 104 boxes started a third of their object's
size around its peak): the refined box is within IoU 0.9 of the optimum for 103 (grow_only:
104), the paper's descent alone for 39 (48).

The compiled op (``torch.ops.wsis_d2.refine_context_gap``: CPU parallel over boxes, CUDA one
thread per box) runs the search and every step in float64 inside C++: about a microsecond per box
and step, plus about 0.3 ms per box for the search on ~300 x 250 maps (one CPU thread), where the
reference below, the same loop of autograd steps through ``IntegralImage`` and the same search in
tensor ops, costs about a millisecond per step and 20 ms per box for the search.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..utils.checks import check_number, check_tensor
from ._ext import compiled_ops_available
from .box_score import IntegralImage

__all__ = ["refine_context_gap", "refine_context_gap_reference"]

_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8
# the search's constants (BoxRefine.h): L values within _TOL are equal (the first in scan order
# wins); the _STARTS best coarse boxes overlapping each other at IoU <= _BASIN_IOU start line
# searches of at most _ROUNDS rounds
_TOL, _STARTS, _ROUNDS, _BASIN_IOU = 1e-9, 6, 100, 0.3


def _prepare(integral, boxes, classes, peaks, own_peaks):
    device = integral.S.device
    k = boxes.shape[0]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4), got {tuple(boxes.shape)}")
    if integral.shape[0] != 1:
        raise ValueError(f"refinement takes the integral images of one image, got {integral.shape}")
    classes = torch.as_tensor(classes, device=device).long().reshape(-1)
    if classes.shape[0] != k:
        raise ValueError(f"classes must be (K,) with K = {k}, got {tuple(classes.shape)}")
    if k and (int(classes.min()) < 0 or int(classes.max()) >= integral.shape[1]):
        raise ValueError(f"classes must be in [0, {integral.shape[1]})")
    if peaks is None:
        peaks = torch.zeros(0, 3, device=device)
    peaks = torch.as_tensor(peaks, device=device)
    if peaks.numel() and (peaks.dim() != 2 or peaks.shape[1] < 3):
        raise ValueError(
            f"peaks must be (P, >=3) rows (class, x, y, ...), got {tuple(peaks.shape)}"
        )
    peaks = peaks[:, :3].reshape(-1, 3) if peaks.numel() else peaks.new_zeros(0, 3)
    peaks = peaks.double()
    if own_peaks is None:
        own_peaks = torch.full((k,), -1, dtype=torch.long, device=device)
    own_peaks = torch.as_tensor(own_peaks, device=device).long().reshape(-1)
    if own_peaks.shape[0] != k:
        raise ValueError(f"own_peaks must be (K,) with K = {k}, got {tuple(own_peaks.shape)}")
    if k and (int(own_peaks.min()) < -1 or int(own_peaks.max()) >= peaks.shape[0]):
        raise ValueError(
            f"own_peaks must be -1 or rows of peaks in [0, {peaks.shape[0]}), got "
            f"{int(own_peaks.min())}..{int(own_peaks.max())}"
        )
    if k and not bool(torch.isfinite(boxes).all()):
        raise ValueError("boxes must be finite")
    return boxes.to(device), classes, peaks, own_peaks


def refine_context_gap(
    integral: IntegralImage,
    boxes: torch.Tensor,
    classes: torch.Tensor,
    peaks: Optional[torch.Tensor] = None,
    own_peaks: Optional[torch.Tensor] = None,
    *,
    steps: int = 200,
    lr: float = 0.5,
    context_scale: float = 1.5,
    min_size: float = 4.0,
    snapshots: Sequence[int] = (),
    grow_only: bool = False,
    search: bool = True,
    use_reference: bool = False,
) -> Tuple[torch.Tensor, Dict[int, torch.Tensor], torch.Tensor]:
    """
    Refine all boxes of one image (see the module docstring).

    ``grow_only`` constrains the descent to boxes B ⊇ B⁰, the start box (clamped into the
    image). The paper's premise is that a MIL box covers the most discriminative part of its
    object and CCGR recovers the rest; unconstrained, minimising the mean-based gap also cuts off
    thin or pointed parts of an object that fills its box only partly: for a solid triangle of
    score 1, its tight box has L = 0 − 1/2, the box of its lower half L ≈ 0.09 − 3/4 (the 1.5×
    ring holds a little of the apex), and the descent from the tight box ends on a strip along
    the base (L ≈ −0.78).

    Args:
        integral: ``IntegralImage`` of the (1, C, H, W) class score maps S of the image.
        boxes: (K, 4) XYXY boxes in the maps' pixels.
        classes: (K,) long class of each box.
        peaks: (P, >=3) rows (class, x, y, ...) of the image's peaks, or None (no guard).
        own_peaks: (K,) long row in ``peaks`` of each box's own peak (−1: none).
        steps: gradient steps (the paper's Fig. 4: 200).
        lr: Adam step size in pixels.
        context_scale: side ratio of C to B (>= 1).
        min_size: smallest width and height.
        snapshots: step counts (0..steps) at which the boxes are also returned (with
            ``search``: 0 the searched box, t the box of least L after t steps).
        grow_only: keep every box containing its start box.
        search: search the allowed boxes for the least L before the descent (False: the
            paper's pure descent from the start box).
        use_reference: run the pure-PyTorch loop instead of the compiled op.

    Returns:
        refined (K, 4) boxes (dtype of ``boxes``, float32 for integer boxes), {step: (K, 4)}
        for ``snapshots``, stopped (K,) bool (the guard stopped the box's descent). A box for
        which the search finds no allowed box (e.g. its start box holds another peak of its
        class and ``grow_only``) is refined by the descent alone.
    """
    if context_scale < 1:
        raise ValueError(f"context_scale must be >= 1, got {context_scale}")
    check_number("lr", lr, low=0.0, low_open=True, where="refine_context_gap")
    check_number("min_size", min_size, low=0.0, where="refine_context_gap")
    check_number("steps", steps, low=0, integer=True, where="refine_context_gap")
    if not isinstance(integral, IntegralImage):
        kind = type(integral).__name__
        raise TypeError(f"refine_context_gap: 'integral' must be an IntegralImage, got {kind}")
    check_tensor("boxes", boxes, (None, 4), where="refine_context_gap")
    if steps < 0 or any(not 0 <= int(s) <= steps for s in snapshots):
        raise ValueError(f"steps must be >= 0 and snapshots in [0, steps], got {steps}, {snapshots}")
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    boxes, classes, peaks, own_peaks = _prepare(integral, boxes, classes, peaks, own_peaks)
    if use_reference or not compiled_ops_available(integral.S.device):
        return refine_context_gap_reference(
            integral, boxes.to(dtype), classes, peaks, own_peaks, steps=steps, lr=lr,
            context_scale=context_scale, min_size=min_size, snapshots=snapshots,
            grow_only=grow_only, search=search,
        )
    snap = [int(s) for s in snapshots]
    out, snaps, stopped = torch.ops.wsis_d2.refine_context_gap(
        integral.S, boxes.double().contiguous(), classes, peaks.contiguous(), own_peaks,
        int(steps), float(lr), float(context_scale), float(min_size),
        torch.tensor(snap, dtype=torch.long, device=integral.S.device), bool(grow_only),
        bool(search),
    )
    return out.to(dtype), {s: snaps[i].to(dtype) for i, s in enumerate(snap)}, stopped


def _clamp_boxes(boxes: torch.Tensor, height: int, width: int, min_size: float) -> torch.Tensor:
    """Keep boxes (K, 4) inside [0, W] x [0, H] and at least ``min_size`` wide and high."""
    mw = min(float(min_size), float(width))
    mh = min(float(min_size), float(height))
    x1 = boxes[:, 0].clamp(0.0, width - mw)
    y1 = boxes[:, 1].clamp(0.0, height - mh)
    x2 = torch.maximum(boxes[:, 2], x1 + mw).clamp(max=float(width))
    y2 = torch.maximum(boxes[:, 3], y1 + mh).clamp(max=float(height))
    return torch.stack([x1, y1, x2, y2], dim=1)


def _context_gaps(S: torch.Tensor, cls: torch.Tensor, boxes: torch.Tensor, scale: float):
    """
    L = Φ(C) − Φ(B) of boxes (N, 4) float64 of classes ``cls`` (N,) on the integral images S
    (C, H+1, W+1) float64, in the op's arithmetic (``context_gap`` in BoxRefine.h), no autograd.
    """
    height, width = S.shape[1] - 1, S.shape[2] - 1
    x1, y1, x2, y2 = boxes.unbind(1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = (x2 - x1) * (scale / 2), (y2 - y1) * (scale / 2)
    # B and C clamped to the image: (N, 2) corners x1, x2 and y1, y2
    xs = torch.stack([x1, x2, cx - hw, cx + hw], dim=1).clamp(0, width).view(-1, 2, 2)
    ys = torch.stack([y1, y2, cy - hh, cy + hh], dim=1).clamp(0, height).view(-1, 2, 2)
    # F at the 4 corners of both boxes, (N, box, y corner, x corner): S interpolated bilinearly
    # as ``locate`` / ``interp`` do
    x = xs[:, :, None, :].expand(-1, -1, 2, -1)
    y = ys[:, :, :, None].expand(-1, -1, -1, 2)
    i = x.floor().clamp(0, width - 1)
    j = y.floor().clamp(0, height - 1)
    fx, fy = x - i, y - j
    r0 = (cls[:, None, None, None] * (height + 1) + j.long()) * (width + 1) + i.long()
    flat = S.reshape(-1)
    r1 = r0 + (width + 1)
    f = (1 - fy) * ((1 - fx) * flat[r0] + fx * flat[r0 + 1]) + fy * (
        (1 - fx) * flat[r1] + fx * flat[r1 + 1]
    )
    total = f[:, :, 1, 1] - f[:, :, 1, 0] - f[:, :, 0, 1] + f[:, :, 0, 0]  # (N, 2): B, C
    area = (xs[:, :, 1] - xs[:, :, 0]) * (ys[:, :, 1] - ys[:, :, 0])
    sb, sc, ab, ac = total[:, 0], total[:, 1], area[:, 0], area[:, 1]
    inside = torch.where(ab > 0, sb / ab, torch.zeros_like(sb))
    ring = torch.where(ac - ab > 0, (sc - sb) / (ac - ab), torch.zeros_like(sb))
    return ring - inside


def _allowed(boxes, height, width, mw, mh, grow_only, start, own_xy, has_own, pxy, other):
    """
    (N,) whether boxes (N, 4) lie in the allowed set A of the search: inside the image, at least
    mw x mh, with ``grow_only`` containing ``start`` (N or 1, 4), holding ``own_xy`` (N or 1, 2)
    where ``has_own`` (N or 1,), and none of the peaks ``pxy`` (P, 2) marked in ``other``
    (N or 1, P); boxes are closed, as the descent's guard.
    """
    x1, y1, x2, y2 = boxes.unbind(1)
    ok = (x1 >= 0) & (y1 >= 0) & (x2 <= width) & (y2 <= height) & (x2 - x1 >= mw)
    ok &= y2 - y1 >= mh
    if grow_only:
        ok &= (x1 <= start[:, 0]) & (y1 <= start[:, 1]) & (x2 >= start[:, 2])
        ok &= y2 >= start[:, 3]
    holds_own = (x1 <= own_xy[:, 0]) & (own_xy[:, 0] <= x2) & (y1 <= own_xy[:, 1])
    ok &= ~has_own | (holds_own & (own_xy[:, 1] <= y2))
    if pxy.shape[0]:
        holds = (x1[:, None] <= pxy[None, :, 0]) & (pxy[None, :, 0] <= x2[:, None])
        holds &= (y1[:, None] <= pxy[None, :, 1]) & (pxy[None, :, 1] <= y2[:, None])
        ok &= ~(holds & other).any(dim=1)
    return ok


def _ladder(a: float, exact: bool, lower: bool, bound: int) -> List[float]:
    """``ladder`` of BoxRefine.h: the coarse grid's values of one coordinate, ascending."""
    d = float(bound)
    out = [0.0 if lower else d]
    if not math.isfinite(a):  # no anchor value or step lands in [0, d] (as in C++)
        return out
    base = a if exact else float(math.floor(a) if lower else math.ceil(a))
    if 0 <= base <= d:
        out.append(base)
    step, cap = 2.0, 3 + bound.bit_length()  # ``ladder_capacity``
    for _ in range(62):
        if len(out) >= cap:
            break
        v = float(math.floor(a - step)) if lower else float(math.ceil(a + step))
        if (lower and not v >= 0) or (not lower and not v <= d):
            break
        if 0 <= v <= d:
            out.append(v)
        step *= 2
    return sorted(set(out))


class _Space:
    """The allowed set A of one box and its class's integral image (``SearchSpace``)."""

    def __init__(self, S, cls, height, width, scale, mw, mh, grow_only, start, own, pxy, other):
        self.S, self.scale = S, scale
        self.height, self.width, self.mw, self.mh = height, width, mw, mh
        self.grow_only = grow_only
        self.start = start[None]  # (1, 4)
        self.has_own = torch.tensor([own is not None], device=start.device)
        self.own = (own if own is not None else start.new_zeros(2))[None]
        self.pxy, self.other = pxy, other[None]
        self.cls = torch.tensor([cls], device=start.device)

    def gaps(self, boxes: torch.Tensor) -> torch.Tensor:
        return _context_gaps(self.S, self.cls.expand(boxes.shape[0]), boxes, self.scale)

    def allowed(self, boxes: torch.Tensor) -> torch.Tensor:
        return _allowed(
            boxes,
            self.height,
            self.width,
            self.mw,
            self.mh,
            self.grow_only,
            self.start,
            self.own,
            self.has_own,
            self.pxy,
            self.other,
        )


def _first_min(gaps: torch.Tensor) -> int:
    """The first index whose value is within _TOL of the least (the op's tie rule)."""
    return int(torch.nonzero(gaps <= gaps.min() + _TOL)[0])


def _coordinate_search(
    space: _Space, box: torch.Tensor, gap: float, done: Sequence[torch.Tensor] = ()
) -> Tuple[torch.Tensor, float]:
    """
    ``coordinate_search`` of BoxRefine.h: exact line searches, each coordinate in turn, until 4
    in a row (3 after a move) move nothing, or the box meets one of ``done``.
    """
    box = box.clone()
    size = (space.width, space.height)
    idle, need = 0, 4
    for it in range(4 * _ROUNDS):
        if any(bool((box == d).all()) for d in done):
            break
        q = it % 4
        axis = q % 2
        values = torch.cat(
            [
                torch.arange(size[axis] + 1, dtype=box.dtype, device=box.device),
                space.start[0, [axis, axis + 2]],
            ]
        ).unique()  # sorted
        boxes = box[None].repeat(values.shape[0], 1)
        boxes[:, q] = values
        ok = space.allowed(boxes)
        values, boxes = values[ok], boxes[ok]
        gaps = space.gaps(boxes) if values.shape[0] else boxes.new_zeros(0)
        if values.shape[0] and float(gaps.min()) < gap - _TOL:
            i = _first_min(gaps)
            box[q] = values[i]
            gap = float(gaps[i])
            idle, need = 0, 3
        else:
            idle += 1
            if idle >= need:
                break
    return box, gap


def _box_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU (N,) of boxes (N, 4) with one box (4,), in the op's arithmetic (``box_iou``)."""
    iw = (torch.minimum(boxes[:, 2], box[2]) - torch.maximum(boxes[:, 0], box[0])).clamp(min=0)
    ih = (torch.minimum(boxes[:, 3], box[3]) - torch.maximum(boxes[:, 1], box[1])).clamp(min=0)
    inter = iw * ih
    union = (
        (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        + (box[2] - box[0]) * (box[3] - box[1])
        - inter
    )
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def _coarse_starts(space: _Space) -> List[torch.Tensor]:
    """``coarse_starts`` of BoxRefine.h: the best boxes of the coarse grid, distinct basins."""
    start = space.start[0].tolist()
    if space.grow_only:
        anchors = start
    elif bool(space.has_own):
        anchors = space.own[0].tolist() * 2
    else:
        anchors = [(start[0] + start[2]) / 2, (start[1] + start[3]) / 2] * 2
    sizes = (space.width, space.height)
    ladders = [
        torch.tensor(
            _ladder(anchors[q], space.grow_only, q < 2, sizes[q % 2]),
            dtype=space.start.dtype,
            device=space.start.device,
        )
        for q in range(4)
    ]
    grid = torch.cartesian_prod(*ladders)  # x1 slowest, y2 fastest, as the op's loop
    gaps = torch.full((grid.shape[0],), math.inf, dtype=grid.dtype, device=grid.device)
    ok = space.allowed(grid)
    if bool(ok.any()):
        gaps[ok] = space.gaps(grid[ok])
    picks = []
    while len(picks) < _STARTS and bool(torch.isfinite(gaps).any()):
        pick = grid[_first_min(gaps)]
        picks.append(pick)
        gaps[torch.isfinite(gaps) & (_box_iou(grid, pick) > _BASIN_IOU)] = math.inf  # one per basin
    return picks


def _search_box(space: _Space, box: torch.Tensor) -> Tuple[Optional[torch.Tensor], float]:
    """``search_box`` of BoxRefine.h: the box of least L found (None: no allowed box) and L."""
    starts = [box] if bool(space.allowed(box[None])[0]) else []
    best, best_gap, done = None, 0.0, []
    for b in starts + _coarse_starts(space):
        b, gap = _coordinate_search(space, b, float(space.gaps(b[None])[0]), done)
        done.append(b)
        if best is None or gap < best_gap - _TOL:
            best, best_gap = b, gap
    return best, best_gap


def refine_context_gap_reference(
    integral: IntegralImage,
    boxes: torch.Tensor,
    classes: torch.Tensor,
    peaks: torch.Tensor,
    own_peaks: torch.Tensor,
    *,
    steps: int,
    lr: float,
    context_scale: float,
    min_size: float,
    snapshots: Sequence[int] = (),
    grow_only: bool = False,
    search: bool = False,
) -> Tuple[torch.Tensor, Dict[int, torch.Tensor], torch.Tensor]:
    """
    Pure-PyTorch :func:`refine_context_gap`: with ``search``, the op's search box by box in tensor
    ops (float64); then per step, L from ``integral.box_context_gap``, its gradient by autograd,
    the Adam update and the clamp and guard as tensor ops. The descent computes in the integral
    image's dtype (float64 for float64 maps, else float32).
    """
    _, _, height, width = integral.shape
    device = integral.S.device
    k = boxes.shape[0]
    x = _clamp_boxes(boxes.detach().to(integral.dtype), height, width, min_size)
    start = x.clone()
    history = {}
    stopped = torch.zeros(k, dtype=torch.bool, device=device)
    other = peaks[:, 0].long()[None, :] == classes[:, None]  # (K, P): peaks of the box's class
    has_own = own_peaks >= 0
    other[has_own, own_peaks[has_own]] = False
    # the search's allowed sets, in float64 as the op
    S = integral.S[0]
    mw, mh = min(float(min_size), float(width)), min(float(min_size), float(height))
    pxy64 = peaks[:, 1:3].double()
    own_xy = pxy64.new_zeros(k, 2)
    own_xy[has_own] = pxy64[own_peaks[has_own]]
    start64 = start.double()
    searched = torch.zeros(k, dtype=torch.bool, device=device)
    best_gap = torch.zeros(k, dtype=torch.float64, device=device)
    if search:
        for i in range(k):
            space = _Space(
                S,
                int(classes[i]),
                height,
                width,
                float(context_scale),
                mw,
                mh,
                grow_only,
                start64[i],
                own_xy[i] if bool(has_own[i]) else None,
                pxy64,
                other[i],
            )
            found, gap = _search_box(space, start64[i])
            if found is not None:
                x[i] = found.to(x.dtype)
                best_gap[i] = gap
                searched[i] = True
    best = x.clone()  # with the search: the allowed box of least L so far
    if 0 in snapshots:
        history[0] = x.clone()
    if k == 0 or steps == 0:
        for s in snapshots:
            history.setdefault(int(s), x.clone())
        return x.to(boxes.dtype), {s: h.to(boxes.dtype) for s, h in history.items()}, stopped
    pxy = peaks[:, 1:3].to(x.dtype)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    index = torch.zeros(k, 1, device=device, dtype=x.dtype)
    for step in range(1, steps + 1):
        with torch.enable_grad():  # also inside a model's no-grad inference
            xb = x.clone().requires_grad_(True)
            inside, ring = integral.box_context_gap(
                torch.cat([index, xb], dim=1), classes, context_scale
            )
            (grad,) = torch.autograd.grad((ring - inside).sum(), xb)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        m = _BETA1 * m + (1 - _BETA1) * grad
        v = _BETA2 * v + (1 - _BETA2) * grad * grad
        mhat = m / (1 - _BETA1**step)
        vhat = v / (1 - _BETA2**step)
        new = _clamp_boxes(x - lr * mhat / (vhat.sqrt() + _EPS), height, width, min_size)
        if grow_only:  # the start box is inside the image and large enough: the clamp holds
            new = torch.cat(
                [torch.minimum(new[:, :2], start[:, :2]), torch.maximum(new[:, 2:], start[:, 2:])],
                dim=1,
            )
        if peaks.shape[0] > 0:
            holds = (
                (new[:, 0:1] <= pxy[None, :, 0])
                & (pxy[None, :, 0] <= new[:, 2:3])
                & (new[:, 1:2] <= pxy[None, :, 1])
                & (pxy[None, :, 1] <= new[:, 3:4])
            )
            stopped |= (holds & other).any(dim=1)
        x = torch.where(stopped[:, None], x, new)
        if bool(searched.any()):
            x64 = x.double()
            gaps = _context_gaps(S, classes, x64, float(context_scale))
            ok = _allowed(
                x64, height, width, mw, mh, grow_only, start64, own_xy, has_own, pxy64, other
            )
            better = searched & ~stopped & ok & (gaps < best_gap - _TOL)
            best = torch.where(better[:, None], x, best)
            best_gap = torch.where(better, gaps, best_gap)
        if step in snapshots:
            history[step] = torch.where(searched[:, None], best, x).clone()
    x = torch.where(searched[:, None], best, x)
    return x.to(boxes.dtype), {s: h.to(boxes.dtype) for s, h in history.items()}, stopped
