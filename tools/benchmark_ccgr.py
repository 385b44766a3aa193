#!/usr/bin/env python
"""
Benchmark of CCGR end to end (CCGR part 2) on the embedded synthetic scenes, on this 2-core CPU:

1. CCGR from image-level labels, all rounds (``wsis_d2.ccgr.rounds.CCGRRounds``, the code of
   ``tools/train_ccgr.py``): proposals, the image-level classifier and its round-1 cues, then per
   round the MIL + SS model, the CCGR pseudo labels (scored against the training set's ground
   truth, which the method never sees) and the IS branch (the stock Mask R-CNN of
   ``configs/mask_rcnn_mnv2_fpn_synthetic.yaml``, trained on the pseudo masks alone) evaluated on
   ``--test-set``;
2. the fully supervised bound: the same Mask R-CNN config, the same schedule and training images,
   trained on their ground-truth masks;
3. LC on the same test set: the LC model of ``--lc-config`` trained on its own data (image-level
   counts), or a checkpoint of it (``--lc-weights``).

Schedules are shortened to fit 90 minutes (``--cls-iters``, ``--mil-ss-iters``, ``--is-iters``:
each config's schedule rescaled, steps at the same fractions); rounds after the first fine-tune the
MIL + SS model for ``MODEL.CCGR.ROUNDS.FINETUNE_FRACTION`` of its schedule and start the IS branch from the
previous round's (``MODEL.CCGR.ROUNDS.IS_FINETUNE``; the supervised bound trains once, as round 1's IS branch),
as ``train_ccgr.py`` does. The last
line printed is one JSON object: per round ``mAP_r25``, ``mAP_r50``, ``mAP_r75``, ``mAP_b50`` on
the test set and the pseudo labels' ``pseudo_mAP_r25/r50/b50`` on the training set,
``supervised_*``, ``lc_*``, the target ratios and the time of every stage. Also written to
``<output>/benchmark_ccgr.json``.

    python tools/benchmark_ccgr.py                       # full run (~80 min on 2 cores)
    python tools/benchmark_ccgr.py --resume              # continue a killed run
    python tools/benchmark_ccgr.py --train-set wsis_synth_mini_train \\
        --test-set wsis_synth_mini_val --rounds 2 --cls-iters 4 --mil-ss-iters 4 --is-iters 4 \\
        --lc-iters 4 --output output/benchmark_ccgr_smoke     # smoke run, a few minutes
"""

import argparse
import json
import logging
import os
import sys
import time

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wsis_d2  # noqa: E402,F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg  # noqa: E402
from wsis_d2.ccgr.rounds import CCGRRounds, instance_ap  # noqa: E402
from wsis_d2.engine import WSISTrainer  # noqa: E402

from benchmark_utils import ROOT, bench_cfg, rescale_schedule  # noqa: E402

CCGR_CONFIG = os.path.join(ROOT, "configs", "ccgr_mnv2_synthetic.yaml")
CLS_CONFIG = os.path.join(ROOT, "configs", "demo", "ccgr_cls_mnv2_synthetic.yaml")
IS_CONFIG = os.path.join(ROOT, "configs", "mask_rcnn_mnv2_fpn_synthetic.yaml")
LC_CONFIG = os.path.join(ROOT, "configs", "demo", "lc_mnv2_synthetic_demo.yaml")

logger = logging.getLogger("benchmark_ccgr")


def schedule_opts(config_file, iters):
    """Config options that rescale ``config_file``'s schedule to ``iters`` (0: keep it)."""
    if iters <= 0:
        return []
    cfg = get_wsis_cfg(config_file)
    rescale_schedule(cfg, iters)
    opts = [
        "SOLVER.MAX_ITER", str(cfg.SOLVER.MAX_ITER),
        "SOLVER.STEPS", str(tuple(cfg.SOLVER.STEPS)),
        "SOLVER.WARMUP_ITERS", str(cfg.SOLVER.WARMUP_ITERS),
        "SOLVER.CHECKPOINT_PERIOD", str(cfg.SOLVER.CHECKPOINT_PERIOD),
    ]  # fmt: skip
    if cfg.MODEL.META_ARCHITECTURE == "ImageLevelCounter":  # what rescale_schedule rescales
        opts += ["MODEL.LC.SPATIAL_START_ITER", str(cfg.MODEL.LC.SPATIAL_START_ITER),
                 "MODEL.LC.DENSITY_START_ITER", str(cfg.MODEL.LC.DENSITY_START_ITER)]
    return opts


def train_or_load(cfg, resume):
    """Train ``cfg`` (frozen) without periodic evaluation, or, with ``resume`` and a finished
    run in its folder, load its model_final.pth. Returns (model, seconds of training)."""
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if resume and os.path.isfile(final):
        model = WSISTrainer.build_model(cfg)
        DetectionCheckpointer(model).load(final)
        logger.info(f"{final} exists: loaded, not trained again")
        return model, 0.0
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    trainer = WSISTrainer(cfg, evaluate=False)
    trainer.resume_or_load(resume=resume)
    start = time.perf_counter()
    trainer.train()
    return trainer.model, time.perf_counter() - start


def run_ccgr(args):
    """All CCGR rounds; returns ({round: metrics}, {stage: seconds}, the IS branch's opts)."""
    is_opts = schedule_opts(IS_CONFIG, args.is_iters) + ["DATASETS.TEST", f"('{args.test_set}',)"]
    cls_opts = schedule_opts(CLS_CONFIG, args.cls_iters)
    opts = schedule_opts(CCGR_CONFIG, args.mil_ss_iters) + [
        "OUTPUT_DIR", os.path.join(args.output, "ccgr"),
        "DATASETS.TRAIN", f"('{args.train_set}',)",
        "MODEL.CCGR.ROUNDS.NUM", str(args.rounds),
        "MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG", CLS_CONFIG,
        "MODEL.CCGR.ROUNDS.IS_CONFIG", IS_CONFIG,
        "MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS", cls_opts,
        "MODEL.CCGR.ROUNDS.IS_OPTS", is_opts,
        "MODEL.CCGR.ROUNDS.FINETUNE", str(args.finetune),
        "MODEL.CCGR.ROUNDS.IS_FINETUNE", str(args.is_finetune),
    ] + list(args.opts)  # fmt: skip
    cfg = get_wsis_cfg(CCGR_CONFIG, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    rounds = CCGRRounds(cfg)
    metrics = rounds.run(resume=args.resume)
    times = {name: round(t, 1) for name, t in rounds.stage_seconds().items()}
    return metrics, times, is_opts


def run_supervised(args, is_opts):
    """The IS branch's config and schedule on the training set's ground-truth masks."""
    cfg = bench_cfg(IS_CONFIG, is_opts, os.path.join(args.output, "supervised"), args.train_set,
                    args.test_set)
    cfg.freeze()
    model, seconds = train_or_load(cfg, args.resume)
    start = time.perf_counter()
    res = instance_ap(cfg, model, args.test_set)
    return res, seconds, time.perf_counter() - start


def run_lc(args):
    """LC of ``--lc-config`` on its own training data (or ``--lc-weights``), on the test set."""
    opts = schedule_opts(args.lc_config, args.lc_iters)
    train_set = args.lc_train_set or get_wsis_cfg(args.lc_config).DATASETS.TRAIN[0]
    cfg = bench_cfg(args.lc_config, opts, os.path.join(args.output, "lc"), train_set,
                    args.test_set)
    if args.lc_weights:
        if not os.path.isfile(args.lc_weights):
            raise ValueError(f"--lc-weights: no such file {args.lc_weights}")
        cfg.MODEL.WEIGHTS = args.lc_weights
        cfg.freeze()
        model = WSISTrainer.build_model(cfg)
        DetectionCheckpointer(model).load(args.lc_weights)
        seconds = 0.0
    else:
        cfg.freeze()
        model, seconds = train_or_load(cfg, args.resume)
    start = time.perf_counter()
    res = instance_ap(cfg, model, args.test_set)
    return res, seconds, time.perf_counter() - start, cfg.SOLVER.MAX_ITER, train_set


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-set", default="wsis_synth_train",
                        help="CCGR's training images (image-level labels only) and the supervised "
                        "bound's (ground-truth masks)")
    parser.add_argument("--test-set", default="wsis_synth_val")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cls-iters", type=int, default=800, help="image-level classifier")
    parser.add_argument("--mil-ss-iters", type=int, default=1000,
                        help="MIL + SS model of round 1 (later rounds: MODEL.CCGR.ROUNDS.FINETUNE_FRACTION)")
    parser.add_argument("--is-iters", type=int, default=1000,
                        help="IS branch of every round and the supervised bound")
    parser.add_argument("--no-finetune", dest="finetune", action="store_false",
                        help="retrain the MIL + SS model from ImageNet weights in every round")
    parser.add_argument("--no-is-finetune", dest="is_finetune", action="store_false",
                        help="train the IS branch from ImageNet weights in every round")
    parser.add_argument("--lc-config", default=LC_CONFIG)
    parser.add_argument("--lc-iters", type=int, default=0, help="LC iterations (0: the config's)")
    parser.add_argument("--lc-train-set", default="", help="LC's training set ('': the config's)")
    parser.add_argument("--lc-weights", default="", help="evaluate this LC checkpoint instead")
    parser.add_argument("--skip-lc", action="store_true")
    parser.add_argument("--skip-supervised", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run: finished stages are not run again")
    parser.add_argument("--output", default="output/benchmark_ccgr")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="options of the CCGR (MIL + SS) config, KEY VALUE pairs")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=os.path.join(args.output, "log.txt"))
    setup_logger(name="wsis_d2")
    setup_logger(name="benchmark_ccgr")
    start = time.perf_counter()

    rounds, times, is_opts = run_ccgr(args)
    out = {"rounds": {str(k): {m: round(v, 2) for m, v in r.items()} for k, r in rounds.items()}}
    first, last = rounds[1], rounds[max(rounds)]
    out["round1_mAP_r50"] = round(first["mAP_r50"], 2)
    out["final_mAP_r50"] = round(last["mAP_r50"], 2)
    out["final_minus_round1_r50"] = round(last["mAP_r50"] - first["mAP_r50"], 2)
    if not args.skip_supervised:
        res, train_s, eval_s = run_supervised(args, is_opts)
        out.update({f"supervised_{m}": round(v, 2) for m, v in res.items()})
        out["final_over_supervised_r50"] = round(
            last["mAP_r50"] / max(res["mAP_r50"], 1e-9), 3
        )
        times["supervised/train"], times["supervised/eval"] = round(train_s, 1), round(eval_s, 1)
    if not args.skip_lc:
        res, train_s, eval_s, lc_iters, lc_train = run_lc(args)
        out.update({f"lc_{m}": round(v, 2) for m, v in res.items()})
        out["final_minus_lc_r50"] = round(last["mAP_r50"] - res["mAP_r50"], 2)
        out["lc_config"] = os.path.relpath(args.lc_config, ROOT)
        out["lc_iters"], out["lc_train_set"] = lc_iters, lc_train
        out["lc_weights"] = args.lc_weights
        times["lc/train"], times["lc/eval"] = round(train_s, 1), round(eval_s, 1)
    out.update({
        "train_set": args.train_set, "test_set": args.test_set, "rounds_n": args.rounds,
        "cls_iters": args.cls_iters, "mil_ss_iters": args.mil_ss_iters,
        "is_iters": args.is_iters, "finetune": args.finetune,
        "is_finetune": args.is_finetune,
        "times_s": times, "total_s": round(time.perf_counter() - start, 1),
    })  # fmt: skip
    if args.resume:
        out["resumed"] = True  # total_s is this process's time only; stage times are complete
    with open(os.path.join(args.output, "benchmark_ccgr.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
