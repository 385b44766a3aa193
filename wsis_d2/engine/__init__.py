from .defaults import WSISTrainer
from .train_loop import AutocastTrainer, amp_dtype, build_train_loop

__all__ = ["AutocastTrainer", "WSISTrainer", "amp_dtype", "build_train_loop"]
