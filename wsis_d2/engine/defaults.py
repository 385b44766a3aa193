"""
``WSISTrainer``: detectron2's ``DefaultTrainer`` with wsis_d2's optimizer choice
(``SOLVER.OPTIMIZER``) and training loop (``SOLVER.AMP.DTYPE``). ``tools/train_net.py`` derives its
``Trainer`` from it and only adds data loaders and evaluators.
"""

from detectron2.engine import DefaultTrainer, hooks

from ..solver import build_optimizer
from .calibration import DensityCountCalibration
from .train_loop import build_train_loop

__all__ = ["WSISTrainer"]


class WSISTrainer(DefaultTrainer):
    """
    DefaultTrainer whose optimizer is :func:`wsis_d2.solver.build_optimizer` (SGD or AdamW) and
    whose loop is :func:`wsis_d2.engine.build_train_loop`: with ``SOLVER.AMP.ENABLED`` and
    ``SOLVER.AMP.DTYPE`` "bfloat16" it runs autocast also on CPU (detectron2's own AMPTrainer is
    CUDA float16 only). Density models get their count calibration fitted after the last
    iteration (``MODEL.DENSITY.CALIBRATION``).
    """

    def __init__(self, cfg):
        if not cfg.SOLVER.AMP.ENABLED:
            super().__init__(cfg)
            return
        # DefaultTrainer builds model, optimizer, loader, scheduler and hooks with its float32 loop;
        # the same model, loader and optimizer then run in the loop SOLVER.AMP asks for
        fp32_cfg = cfg.clone()
        fp32_cfg.defrost()
        fp32_cfg.SOLVER.AMP.ENABLED = False
        fp32_cfg.freeze()
        super().__init__(fp32_cfg)
        self.cfg.defrost()
        self.cfg.SOLVER.AMP.ENABLED = True
        self.cfg.freeze()
        loop = self._trainer
        # the new loop continues the float32 loop's iterator: a second iter() of the loader would
        # start its workers a second time (detectron2 v0.6 starts them in SimpleTrainer.__init__)
        self._trainer = build_train_loop(
            self.cfg, loop.model, _StartedIterator(loop), loop.optimizer
        )
        self._trainer.data_loader = loop.data_loader

    def build_hooks(self):
        """
        detectron2's hooks, plus :class:`DensityCountCalibration` before the checkpointer when
        ``MODEL.DENSITY.CALIBRATION.MODE`` is not "none" (so that ``model_final.pth`` and the
        final evaluation have the calibration).
        """
        hook_list = super().build_hooks()
        if self.cfg.MODEL.DENSITY.CALIBRATION.MODE != "none":
            at = next(
                (i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicCheckpointer)),
                len(hook_list),
            )
            hook_list.insert(at, DensityCountCalibration(self.cfg))
        return hook_list

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)  # SOLVER.OPTIMIZER: SGD (detectron2's) or AdamW


class _StartedIterator:
    """
    An iterable whose ``iter()`` is the data-loader iterator of an existing loop (created when first
    asked for, where the loop creates it lazily as in detectron2 main).
    """

    def __init__(self, loop):
        self._loop = loop

    def __iter__(self):
        return self._loop._data_loader_iter
