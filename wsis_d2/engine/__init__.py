"""Shared training glue: the trainer, evaluator selection, method hooks, launch and the loop."""
from .defaults import WSISTrainer
from .evaluators import build_evaluator
from .health import CountHealthCheck, collapsed_classes
from .hooks import TRAINER_HOOK_REGISTRY, build_method_hooks
from .launch import check_device, launch
from .train_loop import AutocastTrainer, amp_dtype, build_train_loop

__all__ = [
    "AutocastTrainer",
    "CountHealthCheck",
    "TRAINER_HOOK_REGISTRY",
    "WSISTrainer",
    "amp_dtype",
    "build_evaluator",
    "build_method_hooks",
    "build_train_loop",
    "check_device",
    "collapsed_classes",
    "launch",
]
