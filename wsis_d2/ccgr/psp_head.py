"""
Pyramid pooling head (PSPNet: Zhao, Shi, Qi, Wang & Jia, "Pyramid Scene Parsing Network",
CVPR 2017), the semantic-segmentation (SS) branch of CCGR. Registered in detectron2's
``SEM_SEG_HEADS_REGISTRY`` with the contract of its ``SemSegFPNHead``: in training
``(None, {"loss_sem_seg": ...})``, at inference ``(logits, {})`` with logits at the input
resolution.

For a feature X (N, C_in, h, w) and each bin size b in ``BINS`` (1, 2, 3, 6):
P_b = upsample_bilinear(ReLU(Norm(conv1x1(adaptive_avg_pool_b(X))))) with ``CONVS_DIM`` channels;
then Y = conv1x1(dropout(ReLU(Norm(conv3x3([X, P_1, P_2, P_3, P_6]))))) gives the class logits
(``NUM_CLASSES``: in CCGR the C object classes and background, in the order of the targets),
bilinearly upsampled by the feature stride to the input size. The loss is the multi-class cross
entropy against the (pseudo) labels, pixels equal to ``IGNORE_VALUE`` excluded: its mean over
all labelled pixels (PSPNet), or with ``MODEL.CCGR.PSP.BALANCE_BACKGROUND`` the mean over the
background pixels plus the mean over the object pixels (as DSRG's seeding loss, Huang et al.
CVPR 2018, separates them), so that the few object pixels of weak labels (6 % in the synthetic
scenes) are not drowned by the background.
"""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..utils.dist import mean_over_processes

__all__ = ["PSPHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class PSPHead(nn.Module):
    """
    PSPNet pyramid pooling head on one backbone feature (``MODEL.SEM_SEG_HEAD.IN_FEATURES[0]``).

    Forward: features {name: (N, C_in, h, w)}, targets (N, H, W) long or None, where H, W = the
    padded input size (h · stride, w · stride). Returns ``(None, losses)`` in training and
    ``((N, num_classes, H, W) logits, {})`` otherwise.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        bins: List[int],
        pool_dim: int,
        hidden_dim: int,
        norm: str = "BN",
        dropout: float = 0.1,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        balance_background: bool = False,
    ):
        """
        Args:
            input_shape: backbone output shapes.
            in_feature: the feature pooled.
            num_classes: output classes (C object classes + background).
            bins: output sizes of the adaptive average pools.
            pool_dim: channels of each pooled branch (0: C_in / len(bins), as PSPNet's C_in / 4).
            hidden_dim: channels of the 3x3 conv after the concatenation.
            norm: detectron2 norm name ("BN", "GN", "SyncBN", "" for none).
            dropout: dropout probability before the classifier.
            ignore_value: target value excluded from the loss.
            loss_weight: weight of ``loss_sem_seg``.
            balance_background: the loss is mean CE over background pixels (the last class,
                ``num_classes − 1``) + mean CE over the other labelled pixels.
        """
        super().__init__()
        if in_feature not in input_shape:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES[0]={in_feature!r} is not a backbone output: "
                f"{sorted(input_shape)}"
            )
        if not bins or min(bins) < 1:
            raise ValueError(f"MODEL.CCGR.PSP.BINS must be positive sizes, got {list(bins)}")
        spec = input_shape[in_feature]
        in_channels = spec.channels
        self.in_feature = in_feature
        self.stride = int(spec.stride)
        self.ignore_value = int(ignore_value)
        self.loss_weight = float(loss_weight)
        self.balance_background = bool(balance_background)
        self.num_classes = int(num_classes)
        self.bins = [int(b) for b in bins]
        pool_dim = int(pool_dim) or max(1, in_channels // len(self.bins))
        use_bias = norm == ""
        self.pools = nn.ModuleList(
            Conv2d(
                in_channels,
                pool_dim,
                kernel_size=1,
                bias=use_bias,
                norm=get_norm(norm, pool_dim),
                activation=F.relu,
            )
            for _ in self.bins
        )
        self.fuse = Conv2d(
            in_channels + pool_dim * len(self.bins),
            hidden_dim,
            kernel_size=3,
            padding=1,
            bias=use_bias,
            norm=get_norm(norm, hidden_dim),
            activation=F.relu,
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = Conv2d(hidden_dim, num_classes, kernel_size=1)
        for m in list(self.pools) + [self.fuse]:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        if len(head.IN_FEATURES) != 1:
            raise ValueError(
                f"PSPHead pools one feature: MODEL.SEM_SEG_HEAD.IN_FEATURES must name one, got "
                f"{list(head.IN_FEATURES)}"
            )
        return {
            "input_shape": input_shape,
            "in_feature": head.IN_FEATURES[0],
            "num_classes": head.NUM_CLASSES,
            "bins": list(cfg.MODEL.CCGR.PSP.BINS),
            "pool_dim": head.CONVS_DIM,
            "hidden_dim": cfg.MODEL.CCGR.PSP.HIDDEN_DIM,
            "norm": head.NORM,
            "dropout": cfg.MODEL.CCGR.PSP.DROPOUT,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
            "balance_background": cfg.MODEL.CCGR.PSP.BALANCE_BACKGROUND,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, num_classes, h, w) logits at the feature's resolution."""
        x = features[self.in_feature]
        size = x.shape[-2:]
        branches = [x]
        for b, conv in zip(self.bins, self.pools):
            pooled = conv(F.adaptive_avg_pool2d(x, b))
            branches.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=False))
        return self.predictor(self.dropout(self.fuse(torch.cat(branches, dim=1))))

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        logits = self.layers(features)
        logits = F.interpolate(
            logits.float(), scale_factor=self.stride, mode="bilinear", align_corners=False
        )
        if self.training:
            if targets is None:
                raise ValueError("PSPHead: training needs targets (N, H, W)")
            return None, self.losses(logits, targets)
        return logits, {}

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Cross entropy −(1/|Ω|) Σ_{p ∈ Ω} log softmax(Y_p)[t_p] over the labelled pixels Ω
        (t_p != ignore), or with ``balance_background`` the same mean over Ω ∩ background plus
        over Ω \\ background (a missing part adds 0); logits (N, K, H, W) and targets (N, H', W')
        are cropped to their common size (both cover the padded input from its top-left corner).
        0 when Ω is empty. Under several processes |Ω| (and the two parts' sizes) are the means
        over the processes, so that the averaged gradients are those of the whole batch's mean.
        """
        h = min(logits.shape[-2], targets.shape[-2])
        w = min(logits.shape[-1], targets.shape[-1])
        logits, targets = logits[..., :h, :w], targets[..., :h, :w].long()
        labelled = targets != self.ignore_value
        background = targets == self.num_classes - 1
        parts = [labelled] if not self.balance_background else [background, labelled & ~background]
        # the divisors: pixels per process averaged over the processes (every process's pixels
        # count alike once DDP averages the gradients); this process's counts in a single one
        counts = mean_over_processes(torch.stack([p.sum() for p in parts])).tolist()
        if not bool(labelled.any()):
            return {"loss_sem_seg": logits.sum() * 0.0}
        per_pixel = F.cross_entropy(logits, targets, ignore_index=self.ignore_value, reduction="none")
        loss = per_pixel.sum() * 0.0
        for part, count in zip(parts, counts):
            if count > 0:
                loss = loss + per_pixel[part].sum() / count
        return {"loss_sem_seg": loss * self.loss_weight}
