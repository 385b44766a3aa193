"""
WSDDN over bags (Bilen & Vedaldi, "Weakly Supervised Deep Detection Networks", CVPR 2016), the
MIL branch of CCGR. Where WSDDN's bag is an image and its instances all the image's proposals,
CCGR's bag is one peak of a present class and its instances are the K proposals chosen for that
peak (:func:`wsis_d2.ccgr.labels.build_bags`); the detection softmax runs over the proposals of
one bag.

Bags are given padded: ``bags`` (B, K) long indices into the proposals' rows, −1 for padding
(a bag has 1..K proposals).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..utils.checks import check_finite, check_integer_dtype, check_tensor

__all__ = ["wsddn_bag_scores", "wsddn_loss"]


def wsddn_bag_scores(
    cls_logits: torch.Tensor, det_logits: torch.Tensor, bags: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Bag scores φ_B = Σ_{r ∈ B} σ_cls(x^cls)_r ⊙ σ_det(x^det)_r, with σ_cls the softmax over the C
    classes of each proposal and σ_det the softmax over the proposals of the bag, per class.

    Args:
        cls_logits: (R, C) x^cls of the proposals.
        det_logits: (R, C) x^det of the proposals.
        bags: (B, K) long proposal rows, −1 for padding; every bag has at least one proposal.

    Returns:
        phi: (B, C) bag scores in [0, 1] (not clamped), float32 or float64;
        contributions: (B, K, C) σ_cls ⊙ σ_det of each bag member (0 for padding), whose sum over
        K is ``phi``; the member with the largest contribution to the bag's class is the MIL
        branch's box.
    """
    where = "wsddn_bag_scores"
    check_tensor("bags", bags, where=where)
    check_integer_dtype("bags", bags, where)
    if bags.dim() != 2:
        raise ValueError(f"bags must be (B, K), got {tuple(bags.shape)}")
    if cls_logits.shape != det_logits.shape or cls_logits.dim() != 2:
        raise ValueError(
            f"cls_logits and det_logits must both be (R, C), got {tuple(cls_logits.shape)} and "
            f"{tuple(det_logits.shape)}"
        )
    num_bags, k = bags.shape
    c = cls_logits.shape[1]
    if num_bags == 0:
        return cls_logits.new_zeros(0, c), cls_logits.new_zeros(0, k, c)
    valid = bags >= 0
    if not bool(valid[:, 0].all()) or not bool(valid.any(dim=1).all()):
        raise ValueError("every bag needs at least one proposal, listed first in its row")
    if int(bags.max()) >= cls_logits.shape[0]:
        raise ValueError(
            f"{where}: 'bags' must index the R = {cls_logits.shape[0]} proposal rows of "
            f"cls_logits, got row {int(bags.max())}"
        )
    rows = bags.clamp_min(0)
    # at least float32 also under bfloat16 autocast: bfloat16 rounds 1 − ε to 1, and log(1 − φ)
    # with it (float64 inputs stay float64)
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    sigma_cls = F.softmax(cls_logits[rows].to(dtype), dim=2)  # (B, K, C)
    det = det_logits[rows].to(dtype).masked_fill(~valid[:, :, None], float("-inf"))
    sigma_det = F.softmax(det, dim=1)  # over the bag's proposals
    contributions = sigma_cls * sigma_det * valid[:, :, None].to(sigma_cls.dtype)
    return contributions.sum(dim=1), contributions


def wsddn_loss(
    phi: torch.Tensor,
    bag_labels: torch.Tensor,
    eps: float = 1e-6,
    normalization: str = "bags",
    num_bags: Optional[float] = None,
) -> torch.Tensor:
    """
    L_MIL = Σ_B L(B), L(B) = −Σ_c [y_c log φ̄_c + (1 − y_c) log(1 − φ̄_c)], where y is the one-hot
    label of the bag's class and φ̄ = clamp(φ_B, ε, 1 − ε) (public WSDDN code clamps with ε from
    1e-10 to 1e-6, so that the log stays finite).

    Args:
        phi: (B, C) bag scores.
        bag_labels: (B,) long class of each bag.
        eps: ε of the clamp.
        normalization: "bags" (divide by B, the default: independent of the number of peaks per
            batch) or "none" (the plain sum Σ_B L(B) of the paper).
        num_bags: the divisor of "bags"; default B. Under several processes the mean B of the
            processes (:func:`wsis_d2.utils.dist.mean_over_processes`), so that the average of
            their gradients is that of the mean over all of the batch's bags.

    Returns:
        scalar loss; 0 (connected to ``phi``) without bags.
    """
    if normalization not in ("bags", "none"):
        raise ValueError(
            f"MODEL.CCGR.WSDDN.LOSS_NORMALIZATION must be 'bags' or 'none', got {normalization!r}"
        )
    if not 0.0 < eps < 0.5:
        raise ValueError(f"MODEL.CCGR.WSDDN.EPS must be in (0, 0.5), got {eps}")
    where = "wsddn_loss"
    check_tensor("phi", phi, ndim=2, where=where)
    check_tensor("bag_labels", bag_labels, (phi.shape[0],), where)
    check_integer_dtype("bag_labels", bag_labels, where)
    if phi.shape[0] == 0:
        return phi.sum() * 0.0
    check_finite("phi", phi, where)
    if int(bag_labels.min()) < 0 or int(bag_labels.max()) >= phi.shape[1]:
        raise ValueError(
            f"{where}: 'bag_labels' must lie in 0..{phi.shape[1] - 1} (C of phi), got "
            f"{int(bag_labels.min())}..{int(bag_labels.max())}"
        )
    target = F.one_hot(bag_labels.long(), phi.shape[1]).to(phi.dtype)
    p = phi.clamp(eps, 1.0 - eps)
    per_bag = -(target * torch.log(p) + (1.0 - target) * torch.log1p(-p)).sum(dim=1)
    loss = per_bag.sum()
    if normalization == "none":
        return loss
    return loss / (phi.shape[0] if num_bags is None else num_bags)
