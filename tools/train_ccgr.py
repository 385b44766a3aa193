#!/usr/bin/env python
"""
CCGR from image-level labels to the final IS branch (Mask R-CNN), all rounds, one command:

    python tools/train_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml
    python tools/train_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml --resume
        # continue at the first unfinished stage (inside it, from its last checkpoint)
    python tools/train_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml MODEL.CCGR.ROUNDS.NUM 5
    python tools/train_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml \
        --until round1/pseudo_labels      # stop there, e.g. to look at the first pseudo labels
    python tools/train_ccgr.py --config-file ... --num-gpus 4     # every stage on 4 processes
    python tools/train_ccgr.py --config-file ... --num-gpus 4 --num-machines 2 \
        --machine-rank 0 --dist-url tcp://<host of rank 0>:29500   # and rank 1 on the other machine

Each stage writes into its own folder under OUTPUT_DIR (see wsis_d2.ccgr.rounds); the
final model is OUTPUT_DIR/round<ROUNDS>/is/model_final.pth, a stock Mask R-CNN for
DefaultPredictor and tools/demo.py with MODEL.CCGR.ROUNDS.IS_CONFIG. With several processes (detectron2's
launch; gloo on CPU) SOLVER.IMS_PER_BATCH is the total batch of all of them, inference stages split
the images, and OUTPUT_DIR must be on a file system all machines share.
"""

import json

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import wsis_d2  # noqa: F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg
from wsis_d2.engine import check_device, launch
from wsis_d2.ccgr.rounds import CCGRRounds


def load_config(args):
    cfg = get_wsis_cfg(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    cfg = load_config(args)
    check_device(cfg.MODEL.DEVICE)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="wsis_d2")
    return cfg


def main(args):
    """One process's part of the run (all stages); called by :func:`launch` in every process."""
    if args.eval_only:
        raise SystemExit("tools/train_ccgr.py has no --eval-only: evaluate the IS branch with "
                         "tools/train_net.py --eval-only --config-file <MODEL.CCGR.ROUNDS.IS_CONFIG>")
    cfg = setup(args)
    metrics = CCGRRounds(cfg).run(resume=args.resume, until=getattr(args, "until", "") or None)
    if comm.is_main_process():
        print(json.dumps({str(k): v for k, v in metrics.items()}))
    return metrics


def run(args):
    """``main`` on ``--num-gpus`` processes per machine (detectron2's launch: NCCL on GPUs,
    gloo on CPU), or in this process when there is one in all."""
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=load_config(args).MODEL.DEVICE,
    )


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--until", default="", metavar="STAGE",
        help="stop after this stage, e.g. round1/pseudo_labels (the stages: proposals, "
        "round1/classifier, round1/cues, round<k>/{cues,mil_ss,pseudo_labels,is})",
    )
    return parser


if __name__ == "__main__":
    run(argument_parser().parse_args())
