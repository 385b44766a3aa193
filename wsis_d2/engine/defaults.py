"""
``WSISTrainer``: detectron2's ``DefaultTrainer`` with wsis_d2's optimizer choice
(``SOLVER.OPTIMIZER``) and training loop (``SOLVER.AMP.DTYPE``). ``tools/train_net.py`` derives its
``Trainer`` from it and only adds data loaders and evaluators.
"""

import logging
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..solver import build_optimizer
from .calibration import DensityCountCalibration, LCCountCalibration, check_lc_calibration_mode
from .health import CountHealthCheck
from .train_loop import build_train_loop

__all__ = ["WSISTrainer"]


class WSISTrainer(DefaultTrainer):
    """
    DefaultTrainer whose optimizer is :func:`wsis_d2.solver.build_optimizer` (SGD or AdamW) and
    whose loop is :func:`wsis_d2.engine.build_train_loop`: with ``SOLVER.AMP.ENABLED`` and
    ``SOLVER.AMP.DTYPE`` "bfloat16" it runs autocast also on CPU (detectron2's own AMPTrainer is
    CUDA float16 only). Density and LC models get their count calibration fitted after the
    last iteration (``MODEL.DENSITY.CALIBRATION``, ``MODEL.LC.CALIBRATION``). Several processes (:func:`wsis_d2.engine.launch`)
    train with DistributedDataParallel on CUDA and on CPU (gloo).
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ (the same in detectron2 v0.6 and main) with two changes: the loop
        # is build_train_loop's, and DistributedDataParallel gets device_ids only on CUDA (both
        # versions pass [local_rank], which DDP rejects for a CPU module)
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cuda = torch.device(cfg.MODEL.DEVICE).type == "cuda"
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            device_ids=[comm.get_local_rank()] if on_cuda else None,
        )
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """
        detectron2's hooks, plus :class:`DensityCountCalibration` (``MODEL.DENSITY.CALIBRATION``)
        or :class:`LCCountCalibration` (``MODEL.LC.CALIBRATION``) before the checkpointer when
        their MODE is not "none" (so that ``model_final.pth`` and the final evaluation have the
        calibration), and :class:`CountHealthCheck` for density and LC models (a WARNING when the
        model collapsed to a constant output; the calibrations check their own images, so the
        hook runs the model on training images only without one).
        """
        hook_list = super().build_hooks()
        calibrations = []
        if self.cfg.MODEL.DENSITY.CALIBRATION.MODE != "none":
            calibrations.append(DensityCountCalibration(self.cfg))
        if check_lc_calibration_mode(self.cfg.MODEL.LC.CALIBRATION.MODE) != "none":
            calibrations.append(LCCountCalibration(self.cfg))
        at = next(
            (i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicCheckpointer)),
            len(hook_list),
        )
        arch = self.cfg.MODEL.META_ARCHITECTURE
        if arch in ("DensityCounter", "ImageLevelCounter"):
            calibrations.append(CountHealthCheck(self.cfg, check_spread=not calibrations))
        hook_list[at:at] = calibrations
        return hook_list

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)  # SOLVER.OPTIMIZER: SGD (detectron2's) or AdamW

