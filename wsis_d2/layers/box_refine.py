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

The compiled op (``torch.ops.wsis_d2.refine_context_gap``: CPU parallel over boxes, CUDA one
thread per box) runs every step in float64 inside C++: about a microsecond per box and step,
where the reference below, the same loop of autograd steps through ``IntegralImage``, costs about
a millisecond per step.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch

from ._ext import compiled_ops_available
from .box_score import IntegralImage

__all__ = ["refine_context_gap", "refine_context_gap_reference"]

_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8


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
    peaks = torch.as_tensor(peaks, device=device)[:, :3].double().reshape(-1, 3)
    if own_peaks is None:
        own_peaks = torch.full((k,), -1, dtype=torch.long, device=device)
    own_peaks = torch.as_tensor(own_peaks, device=device).long().reshape(-1)
    if own_peaks.shape[0] != k:
        raise ValueError(f"own_peaks must be (K,) with K = {k}, got {tuple(own_peaks.shape)}")
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
        snapshots: step counts (0..steps) at which the boxes are also returned.
        grow_only: keep every box containing its start box.
        use_reference: run the pure-PyTorch loop instead of the compiled op.

    Returns:
        refined (K, 4) boxes (dtype of ``boxes``, float32 for integer boxes), {step: (K, 4)}
        for ``snapshots``, stopped (K,) bool (the guard stopped the box).
    """
    if context_scale < 1:
        raise ValueError(f"context_scale must be >= 1, got {context_scale}")
    if steps < 0 or any(not 0 <= int(s) <= steps for s in snapshots):
        raise ValueError(f"steps must be >= 0 and snapshots in [0, steps], got {steps}, {snapshots}")
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    boxes, classes, peaks, own_peaks = _prepare(integral, boxes, classes, peaks, own_peaks)
    if use_reference or not compiled_ops_available(integral.S.device):
        return refine_context_gap_reference(
            integral, boxes.to(dtype), classes, peaks, own_peaks, steps=steps, lr=lr,
            context_scale=context_scale, min_size=min_size, snapshots=snapshots,
            grow_only=grow_only,
        )
    snap = [int(s) for s in snapshots]
    out, snaps, stopped = torch.ops.wsis_d2.refine_context_gap(
        integral.S, boxes.double().contiguous(), classes, peaks.contiguous(), own_peaks,
        int(steps), float(lr), float(context_scale), float(min_size),
        torch.tensor(snap, dtype=torch.long, device=integral.S.device), bool(grow_only),
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
) -> Tuple[torch.Tensor, Dict[int, torch.Tensor], torch.Tensor]:
    """
    Pure-PyTorch :func:`refine_context_gap`: per step, L from ``integral.box_context_gap``, its
    gradient by autograd, the Adam update and the clamp and guard as tensor ops. Computes in the
    integral image's dtype (float64 for float64 maps, else float32).
    """
    _, _, height, width = integral.shape
    device = integral.S.device
    k = boxes.shape[0]
    x = _clamp_boxes(boxes.detach().to(integral.dtype), height, width, min_size)
    start = x.clone()
    history = {}
    stopped = torch.zeros(k, dtype=torch.bool, device=device)
    if 0 in snapshots:
        history[0] = x.clone()
    if k == 0 or steps == 0:
        for s in snapshots:
            history.setdefault(int(s), x.clone())
        return x.to(boxes.dtype), {s: h.to(boxes.dtype) for s, h in history.items()}, stopped
    other = peaks[:, 0].long()[None, :] == classes[:, None]  # (K, P): peaks of the box's class
    has_own = own_peaks >= 0
    other[has_own, own_peaks[has_own]] = False
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
        if step in snapshots:
            history[step] = x.clone()
    return x.to(boxes.dtype), {s: h.to(boxes.dtype) for s, h in history.items()}, stopped
