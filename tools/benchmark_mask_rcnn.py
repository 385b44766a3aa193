#!/usr/bin/env python
"""
Benchmark of the fully supervised upper bound: the stock detectron2 Mask R-CNN on the ImageNet
MobileNetV2-FPN backbone (``configs/mask_rcnn_mnv2_fpn_synthetic.yaml``), trained with the
ground-truth masks of ``wsis_synth_train_4k`` on this 2-core CPU and evaluated on
``wsis_synth_val`` with ``InstanceAPEvaluator`` (mAP^r_25/50/75, mAP^b_50: the PRM / ILC / CCGR
protocol) and detectron2's ``COCOEvaluator`` (box and mask AP).

Inference speed: images per second of the trained model in evaluation mode, float32, batch 1,
``--threads`` threads, the forward pass only (the mapped inputs are prepared beforehand), at the
config's test size, over the first ``--speed-images`` validation images after one warm-up pass
over them.

The last line printed is one JSON object with mAP_r25, mAP_r50, mAP_r75, mAP_b50, coco_box_AP,
coco_mask_AP, iters, train_s, img_per_s_inference (and eval_s, the config, the threads). Targets
(docs/benchmarks.md): mAP_r50 >= 70 and >= 1.5 x the LC benchmark's; >= 10 images/s.

    python tools/benchmark_mask_rcnn.py                    # full run (~30 min on 2 cores)
    python tools/benchmark_mask_rcnn.py --iters 20 --eval-images 10 --speed-images 5  # smoke
    python tools/benchmark_mask_rcnn.py --weights output/benchmark_mask_rcnn/model_final.pth
"""

import argparse
import json
import logging
import os
import sys
import time

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetFromList, build_detection_test_loader
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wsis_d2  # noqa: E402,F401  (registers datasets, models and mappers)
from wsis_d2.data import build_dataset_mapper  # noqa: E402
from wsis_d2.evaluation import FastCOCOEvaluator, InstanceAPEvaluator  # noqa: E402
from wsis_d2.engine import WSISTrainer  # noqa: E402

from benchmark_utils import (  # noqa: E402
    ROOT,
    VAL_SET,
    bench_cfg,
    rescale_schedule,
)

CONFIG = os.path.join(ROOT, "configs", "mask_rcnn_mnv2_fpn_synthetic.yaml")
TRAIN_SET = "wsis_synth_train_4k"
OUTPUT_DIR = os.path.join("output", "benchmark_mask_rcnn")
JSON_NAME = "benchmark_mask_rcnn.json"

logger = logging.getLogger("benchmark_mask_rcnn")


def _val_inputs(cfg, num_images):
    """The first ``num_images`` validation dicts (0: all) and a batch-1 test loader over them."""
    dicts = DatasetCatalog.get(VAL_SET)
    if num_images > 0:
        dicts = dicts[:num_images]
    mapper = build_dataset_mapper(cfg, is_train=False)
    loader = build_detection_test_loader(
        DatasetFromList(dicts, copy=False), mapper=mapper, num_workers=0
    )
    return dicts, loader


def evaluate(cfg, model, num_images, output_dir):
    """mAP^r / mAP^b (SDS / VOC protocol) and COCO box / mask AP on the validation images."""
    _, loader = _val_inputs(cfg, num_images)
    evaluators = [InstanceAPEvaluator(VAL_SET, distributed=False, output_dir=output_dir)]
    if cfg.TEST.WSIS_COCO_EVAL:
        # detectron2's compiled COCOeval, else faster-coco-eval, else pycocotools
        evaluators.append(FastCOCOEvaluator(VAL_SET, distributed=False, output_dir=output_dir))
    return inference_on_dataset(model, loader, DatasetEvaluators(evaluators))


def inference_speed(cfg, model, num_images, threads):
    """Images per second of ``model`` (eval mode, float32, batch 1) on ``threads`` threads."""
    _, loader = _val_inputs(cfg, num_images)
    inputs = list(loader)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.eval()
    try:
        with torch.no_grad():
            for batch in inputs:  # warm-up: oneDNN primitives of every image size
                model(batch)
            start = time.perf_counter()
            for batch in inputs:
                model(batch)
            elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return len(inputs) / elapsed


def train_mask_rcnn(config_file, opts, iters, output_dir, train_set=TRAIN_SET):
    """
    Train the Mask R-CNN of ``config_file`` (schedule rescaled to ``iters`` when > 0) without
    periodic evaluation. Returns (cfg, model, seconds of training).
    """
    cfg = bench_cfg(config_file, opts, output_dir, train_set)
    if iters > 0:
        rescale_schedule(cfg, iters)
    cfg.SOLVER.CHECKPOINT_PERIOD = cfg.SOLVER.MAX_ITER + 1  # model_final.pth only
    cfg.freeze()
    trainer = WSISTrainer(cfg, evaluate=False)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    return cfg, trainer.model, time.perf_counter() - start


def load_mask_rcnn(config_file, opts, weights, output_dir):
    """The Mask R-CNN of ``config_file`` with the trained ``weights`` (no training)."""
    if not os.path.isfile(weights):
        raise ValueError(f"--weights: no such file {weights}")
    cfg = bench_cfg(config_file, opts, output_dir, TRAIN_SET)
    cfg.freeze()
    model = WSISTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return cfg, model


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=CONFIG, help="Mask R-CNN config")
    parser.add_argument("--train-set", default=TRAIN_SET, help="training split")
    parser.add_argument("--iters", type=int, default=0, help="iterations (0: the config's)")
    parser.add_argument(
        "--weights", default="", help="evaluate this checkpoint instead of training"
    )
    parser.add_argument("--eval-images", type=int, default=0, help="validation images (0: all)")
    parser.add_argument("--speed-images", type=int, default=100, help="images timed")
    parser.add_argument("--threads", type=int, default=2, help="threads of the timed inference")
    parser.add_argument("--output-dir", default=OUTPUT_DIR)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="wsis_d2")
    setup_logger(name="benchmark_mask_rcnn")
    torch.manual_seed(0)
    os.makedirs(args.output_dir, exist_ok=True)

    if args.weights:
        cfg, model = load_mask_rcnn(args.config_file, args.opts, args.weights, args.output_dir)
        train_s = 0.0
    else:
        cfg, model, train_s = train_mask_rcnn(
            args.config_file, args.opts, args.iters, args.output_dir, args.train_set
        )
    start = time.perf_counter()
    results = evaluate(cfg, model, args.eval_images, os.path.join(args.output_dir, "inference"))
    eval_s = time.perf_counter() - start
    speed = inference_speed(cfg, model, args.speed_images, args.threads)
    instance = results["wsis_instance"]
    out = {
        "mAP_r25": instance["mAP_r25"],
        "mAP_r50": instance["mAP_r50"],
        "mAP_r75": instance["mAP_r75"],
        "mAP_b50": instance["mAP_b50"],
        "coco_box_AP": results.get("bbox", {}).get("AP", float("nan")),
        "coco_mask_AP": results.get("segm", {}).get("AP", float("nan")),
        "iters": 0 if args.weights else cfg.SOLVER.MAX_ITER,
        "train_s": train_s,
        "img_per_s_inference": speed,
        "inference_threads": args.threads,
        "test_size": [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
        "eval_s": eval_s,
        "config": os.path.relpath(args.config_file, ROOT),
        "weights": args.weights,
    }
    with open(os.path.join(args.output_dir, JSON_NAME), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
