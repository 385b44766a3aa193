#!/usr/bin/env python
"""
Train and evaluate wsis_d2 models (LC/ILC, density counting, CCGR, and the stock Mask R-CNN
reference) with detectron2's DefaultTrainer.

    python tools/train_net.py --config-file configs/lc_r50.yaml
    python tools/train_net.py --config-file configs/lc_r50.yaml --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file configs/demo/lc_mnv2_synthetic_demo.yaml --num-gpus 2
        # 2 processes; on CPU (MODEL.DEVICE cpu) joined with gloo, each with half of the cores
"""

import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import DatasetEvaluators, PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import wsis_d2  # noqa: F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg
from wsis_d2.data import build_dataset_mapper
from wsis_d2.data.datasets import thing_classes_of
from wsis_d2.engine import WSISTrainer, launch
from wsis_d2.evaluation import (
    CountingEvaluator,
    DensityEvaluator,
    FastCOCOEvaluator,
    InstanceAPEvaluator,
)


class Trainer(WSISTrainer):
    """
    wsis_d2's trainer (optimizer choice, bfloat16 autocast also on CPU) with wsis_d2's mappers and
    an evaluator per dataset ``evaluator_type``.
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        evaluators = []
        # counting errors next to the mean-count baseline of the (first) training set
        baseline = cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else None
        # thing_classes_of: some registrations fill the classes only when the split is loaded
        if baseline is not None and thing_classes_of(baseline, False) != thing_classes_of(
            dataset_name, False
        ):
            baseline = None
        if evaluator_type == "wsis_instance":
            # image-level-supervised models add counts; mask models are scored by both protocols
            evaluators.append(InstanceAPEvaluator(dataset_name, output_dir=output_folder))
            evaluators.append(
                CountingEvaluator(
                    dataset_name, output_dir=output_folder, baseline_dataset=baseline
                )
            )
            if cfg.TEST.WSIS_COCO_EVAL:
                # detectron2's compiled COCOeval, else faster-coco-eval, else pycocotools
                evaluators.append(FastCOCOEvaluator(dataset_name, output_dir=output_folder))
        elif evaluator_type == "counting":
            evaluators.append(
                CountingEvaluator(
                    dataset_name, output_dir=output_folder, baseline_dataset=baseline
                )
            )
        elif evaluator_type == "density":
            evaluators.append(DensityEvaluator(dataset_name, output_dir=output_folder))
        elif evaluator_type == "coco":
            evaluators.append(FastCOCOEvaluator(dataset_name, output_dir=output_folder))
        elif evaluator_type == "pascal_voc":
            evaluators.append(PascalVOCDetectionEvaluator(dataset_name))
        else:
            raise ValueError(
                f"dataset {dataset_name!r}: no evaluator for evaluator_type={evaluator_type!r}"
            )
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = build_dataset_mapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)


def load_config(args):
    cfg = get_wsis_cfg(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    # wsis_d2's own log (evaluator tables, mapper and model messages) next to detectron2's
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="wsis_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=load_config(args).MODEL.DEVICE,
    )
