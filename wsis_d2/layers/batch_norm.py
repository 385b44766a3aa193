"""
Frozen batch normalisation that stays cheap when the input requires a gradient.

detectron2's :class:`~detectron2.layers.FrozenBatchNorm2d` computes ``x * scale + bias`` with two
elementwise ops whenever ``x.requires_grad`` (so that ``F.batch_norm``'s backward does not compute
weight and bias gradients). That path is taken in every layer after the first trainable one during
training, and in all layers for peak response maps (the gradient of a class peak with respect to
the input image). On MobileNetV2 at 160x240 on a CPU it took 7 ms of a 19 ms forward, and
``native_batch_norm_backward`` would cost even more than the two ops' backward. Here the forward
is always the single fused op and the backward, the input gradient only, is one multiplication:

    y = (x − μ) / sqrt(σ² + eps) · γ + β,      ∂L/∂x = ∂L/∂y · γ / sqrt(σ² + eps).
"""

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

__all__ = ["FusedFrozenBatchNorm2d", "fuse_frozen_batchnorm"]


class _FrozenBatchNormFunction(torch.autograd.Function):
    """Eval-mode batch norm with fixed statistics; backward to the input only."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        ctx.save_for_backward(weight * (var + eps).rsqrt())
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype).view(1, -1, 1, 1), None, None, None, None, None


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """
    :class:`~detectron2.layers.FrozenBatchNorm2d` computed by one ``F.batch_norm(...,
    training=False)`` with the fixed buffers μ = running_mean, σ² = running_var, γ = weight,
    β = bias, and (when a gradient is needed) a backward that multiplies by γ / sqrt(σ² + eps).
    Inputs (N, C, H, W) of any floating dtype (the buffers stay float32); same state dict. No
    gradients reach the buffers, and double backward is not supported.
    """

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenBatchNormFunction.apply(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=False,
            eps=self.eps,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a frozen layer has no batch counter; checkpoints that carry one (BatchNorm2d, or
        # detectron2 main's FrozenBatchNorm2d, see fuse_frozen_batchnorm) load without noise
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fuse_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """
    Turn every :class:`~detectron2.layers.FrozenBatchNorm2d` inside ``module`` (in place, also
    ``module`` itself) into a :class:`FusedFrozenBatchNorm2d`. The state-dict keys are weight,
    bias, running_mean and running_var on every detectron2 version: detectron2 main's
    ``FrozenBatchNorm2d.convert_frozen_batchnorm`` copies a BatchNorm2d's ``num_batches_tracked``
    counter into a buffer that v0.6's ``FrozenBatchNorm2d`` does not have. A frozen layer never
    counts batches, so the counter is removed here; checkpoints then load under both versions
    without "not found" or "unused" keys.

    Returns:
        ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"fuse_frozen_batchnorm: 'module' must be an nn.Module, got {type(module).__name__}"
        )
    for m in module.modules():
        if type(m) is FrozenBatchNorm2d:
            m.__class__ = FusedFrozenBatchNorm2d
            if getattr(m, "num_batches_tracked", None) is not None:  # detectron2 main only
                m.num_batches_tracked = None
    return module
