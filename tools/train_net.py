#!/usr/bin/env python
"""
Train and evaluate wsis_d2 models (LC/ILC, density counting, CCGR's stages, and the stock Mask R-CNN
reference) with :class:`wsis_d2.engine.WSISTrainer` (detectron2's DefaultTrainer with wsis_d2's
mappers, evaluators, optimizer choice and method hooks).

    python tools/train_net.py --config-file configs/lc_r50.yaml
    python tools/train_net.py --config-file configs/lc_r50.yaml --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file configs/demo/lc_mnv2_synthetic_demo.yaml --num-gpus 2
        # 2 processes; on CPU (MODEL.DEVICE cpu) joined with gloo, each with half of the cores
"""

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import wsis_d2  # noqa: F401  (registers datasets, models, mappers and trainer hooks)
from wsis_d2 import get_wsis_cfg
from wsis_d2.engine import WSISTrainer, launch


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
        model = WSISTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return WSISTrainer.test(cfg, model)
    trainer = WSISTrainer(cfg)
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
