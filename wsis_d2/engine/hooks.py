"""
Hooks that the methods add to :class:`wsis_d2.engine.WSISTrainer` (count calibrations, health
checks): each method package registers a function ``fn(cfg) -> List[HookBase]`` here, so that the
shared trainer never names a method.
"""

from typing import List

from detectron2.engine import HookBase
from detectron2.utils.registry import Registry

__all__ = ["TRAINER_HOOK_REGISTRY", "build_method_hooks"]

TRAINER_HOOK_REGISTRY = Registry("TRAINER_HOOK")
TRAINER_HOOK_REGISTRY.__doc__ = """
Functions ``fn(cfg) -> List[HookBase]`` registered by the method packages. WSISTrainer calls every
one of them and registers the hooks they return after the training loop's own and before
detectron2's ``PeriodicCheckpointer``, so that ``model_final.pth`` and the final evaluation see what
they do (e.g. a count calibration fitted after the last iteration). A function returns ``[]`` for
a config that is not its method's.
"""


def build_method_hooks(cfg) -> List[HookBase]:
    """The hooks of every registered method for ``cfg``, in registration order."""
    out: List[HookBase] = []
    for _, fn in TRAINER_HOOK_REGISTRY:
        out.extend(fn(cfg))
    return out
