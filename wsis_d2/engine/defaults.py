"""
``WSISTrainer``: detectron2's ``DefaultTrainer`` with wsis_d2's optimizer choice
(``SOLVER.OPTIMIZER``), training loop (``SOLVER.AMP.DTYPE``), dataset mappers
(``INPUT.DATASET_MAPPER``), an evaluator per dataset ``evaluator_type`` and the hooks that the
method packages register (:mod:`wsis_d2.engine.hooks`). ``tools/train_net.py``, the CCGR stages and
the benchmarks all train with it.
"""

import logging
import weakref
from typing import Dict, Optional

import numpy as np

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import RepeatFactorTrainingSampler

from ..data.image_labels import (
    filter_images_without_objects,
    image_labels_of,
    is_count_only,
    num_classes_of,
)
from ..data.mapper_registry import build_dataset_mapper
from ..evaluation.gt_cache import cached_ground_truth
from ..solver import build_optimizer
from .evaluators import build_evaluator
from .hooks import build_method_hooks
from .train_loop import build_train_loop

__all__ = ["WSISTrainer", "train_data"]

logger = logging.getLogger(__name__)


def train_data(
    cfg, reads_counts: bool, labels_suffice: bool = False, num_classes: Optional[int] = None
) -> Dict:
    """
    The training images of ``DATASETS.TRAIN`` and their sampler, as detectron2 builds them, with
    count-only images (objects counted, not annotated; :func:`is_count_only`) handled by model:

    - models trained on image-level targets (``reads_counts``: LC, CCGR) train on them:
      ``FILTER_EMPTY_ANNOTATIONS`` keeps an image with a positive count (or, with
      ``labels_suffice``, image labels), and ``RepeatFactorTrainingSampler`` takes an image's
      classes from its counts and labels too;
    - the others (Mask R-CNN) would learn them as background: they are dropped, with a warning.

    Args:
        num_classes: C of the image-level targets (default: the datasets' ``thing_classes``).

    Returns:
        {"dataset": list of dicts, "sampler": a sampler or None (detectron2's choice)}.
    """
    names = cfg.DATASETS.TRAIN
    dataset = get_detection_dataset_dicts(
        names,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and not reads_counts,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    count_only = sum(is_count_only(d) for d in dataset)
    if reads_counts and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dataset = filter_images_without_objects(dataset, labels_suffice)
    elif not reads_counts and count_only:
        logger.warning(
            f"DATASETS.TRAIN {tuple(names)}: {count_only} images have counted objects without "
            "annotations; this model would learn them as background, so they are left out"
        )
        dataset = [d for d in dataset if not is_count_only(d)]
    if not dataset:
        raise ValueError(
            f"DATASETS.TRAIN {tuple(names)}: no training image left (none with objects, see "
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS)"
        )
    sampler = None
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if reads_counts and name == "RepeatFactorTrainingSampler":
        # detectron2's factors from each image's classes, counted and labelled ones included
        num_classes = num_classes or num_classes_of(names)
        proxies = [
            {"annotations": [{"category_id": int(c)} for c in np.flatnonzero(labels)]}
            for labels in (image_labels_of(d, num_classes) for d in dataset)
        ]
        sqrt = {"sqrt": cfg.DATALOADER.REPEAT_SQRT} if "REPEAT_SQRT" in cfg.DATALOADER else {}
        sampler = RepeatFactorTrainingSampler(
            RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                proxies, cfg.DATALOADER.REPEAT_THRESHOLD, **sqrt
            )
        )
    elif reads_counts and count_only and name not in (
        "TrainingSampler", "RandomSubsetTrainingSampler"
    ):
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN {name!r} reads classes from annotations only, and "
            f"DATASETS.TRAIN has {count_only} count-only images: use TrainingSampler or "
            "RepeatFactorTrainingSampler"
        )
    return {"dataset": dataset, "sampler": sampler}


class WSISTrainer(DefaultTrainer):
    """
    DefaultTrainer whose optimizer is :func:`wsis_d2.solver.build_optimizer` (SGD or AdamW) and
    whose loop is :func:`wsis_d2.engine.build_train_loop`: with ``SOLVER.AMP.ENABLED`` and
    ``SOLVER.AMP.DTYPE`` "bfloat16" it runs autocast also on CPU (detectron2's own AMPTrainer is
    CUDA float16 only). Data loaders use the mapper named by ``INPUT.DATASET_MAPPER``; the
    evaluators are chosen by :func:`wsis_d2.engine.build_evaluator`; the method packages add
    their hooks (e.g. LC's and density's count calibration after the last iteration). Several
    processes (:func:`wsis_d2.engine.launch`) train with DistributedDataParallel on CUDA and on CPU
    (gloo).

    Args:
        cfg: the training config.
        evaluate: False leaves out detectron2's evaluation hook (CCGR stages and benchmarks
            evaluate what they need themselves).
    """

    def __init__(self, cfg, evaluate: bool = True):
        self._evaluate = bool(evaluate)
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
        detectron2's hooks (without its ``EvalHook`` when ``evaluate`` is False), and the hooks
        that the method packages register for this config, before the checkpointer (so that
        ``model_final.pth`` and the final evaluation have e.g. a count calibration).
        """
        hook_list = super().build_hooks()
        if not self._evaluate:
            hook_list = [h for h in hook_list if not isinstance(h, hooks.EvalHook)]
        at = next(
            (i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicCheckpointer)),
            len(hook_list),
        )
        hook_list[at:at] = build_method_hooks(self.cfg)
        return hook_list

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)  # SOLVER.OPTIMIZER: SGD (detectron2's) or AdamW

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = build_dataset_mapper(cfg, is_train=True)
        reads_counts = getattr(mapper, "reads_counts", False)
        labels_suffice = getattr(mapper, "labels_suffice", False)
        data = train_data(cfg, reads_counts, labels_suffice, getattr(mapper, "num_classes", None))
        return build_detection_train_loader(cfg, mapper=mapper, **data)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = build_dataset_mapper(cfg, is_train=False)
        if cfg.MODEL.LOAD_PROPOSALS:  # the dicts carry the proposal file's boxes too
            return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        # the trainer builds a loader at every evaluation: the split's dicts are loaded once per
        # registration (the loader pickles each dict, so no mapper changes the kept list)
        dicts = cached_ground_truth(
            "test_loader_dicts",
            dataset_name,
            lambda: get_detection_dataset_dicts([dataset_name], filter_empty=False),
        )
        return build_detection_test_loader(
            dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
        )
