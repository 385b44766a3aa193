"""
Optimizer choice for wsis_d2 models: detectron2's SGD (the default, as in the papers) or AdamW,
selected by ``SOLVER.OPTIMIZER``. Both use detectron2's per-parameter groups (no weight decay on
norm layers when ``SOLVER.WEIGHT_DECAY_NORM`` is 0, ``SOLVER.BIAS_LR_FACTOR``) and its gradient
clipping (``SOLVER.CLIP_GRADIENTS``). AdamW converges much faster than SGD when a model is trained
from random weights on a small budget, which is the setting of the CPU demos and benchmarks
(no ImageNet weights can be downloaded here).
"""
import torch

from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.solver.build import get_default_optimizer_params

__all__ = ["build_optimizer"]

_OPTIMIZERS = ("SGD", "ADAMW")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """
    Build the optimizer named by ``cfg.SOLVER.OPTIMIZER`` ("SGD" or "AdamW", case-insensitive).

    SGD is exactly detectron2's ``build_optimizer``. AdamW uses ``SOLVER.BASE_LR``,
    ``SOLVER.BETAS`` and ``SOLVER.WEIGHT_DECAY`` (decoupled weight decay).
    """
    name = str(cfg.SOLVER.OPTIMIZER).upper()
    if name not in _OPTIMIZERS:
        raise ValueError(
            f"SOLVER.OPTIMIZER must be one of 'SGD', 'AdamW' (case-insensitive), "
            f"got {cfg.SOLVER.OPTIMIZER!r}"
        )
    if name == "SGD":
        return d2_build_optimizer(cfg, model)
    betas = tuple(float(b) for b in cfg.SOLVER.BETAS)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"SOLVER.BETAS must be two numbers in [0, 1), got {cfg.SOLVER.BETAS!r}")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        params, lr=cfg.SOLVER.BASE_LR, betas=betas, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )
