#!/usr/bin/env python
"""
CCGR from image-level labels to the final IS branch (Mask R-CNN), all rounds, one command:

    python tools/train_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml
    python tools/train_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml --resume
        # continue at the first unfinished stage (inside it, from its last checkpoint)
    python tools/train_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml CCGR.ROUNDS 5
    python tools/train_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml \
        --until round1/pseudo_labels      # stop there, e.g. to look at the first pseudo labels

Each stage writes into its own folder under OUTPUT_DIR (see wsis_d2.engine.ccgr_rounds); the
final model is OUTPUT_DIR/round<ROUNDS>/is/model_final.pth, a stock Mask R-CNN for
DefaultPredictor and tools/demo.py with CCGR.IS_CONFIG.
"""

import json

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils.logger import setup_logger

import wsis_d2  # noqa: F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg
from wsis_d2.engine import check_device
from wsis_d2.engine.ccgr_rounds import CCGRRounds


def setup(args):
    cfg = get_wsis_cfg(args.config_file, args.opts)
    cfg.freeze()
    check_device(cfg.MODEL.DEVICE)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, name="wsis_d2")
    return cfg


def main(args):
    if args.num_gpus != 1 or args.num_machines != 1 or args.eval_only:
        raise SystemExit("tools/train_ccgr.py runs its stages in one process (no --num-gpus, "
                         "--num-machines or --eval-only)")
    cfg = setup(args)
    metrics = CCGRRounds(cfg).run(resume=args.resume, until=getattr(args, "until", "") or None)
    print(json.dumps({str(k): v for k, v in metrics.items()}))
    return metrics


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--until", default="", metavar="STAGE",
        help="stop after this stage, e.g. round1/pseudo_labels (the stages: proposals, "
        "round1/classifier, round1/cues, round<k>/{cues,mil_ss,pseudo_labels,is})",
    )
    return parser


if __name__ == "__main__":
    main(argument_parser().parse_args())
