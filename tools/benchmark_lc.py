#!/usr/bin/env python
"""
Benchmark of LC / ILC (``ImageLevelCounter``) on the embedded synthetic scenes, sized for a 2-core
CPU (~40 minutes in all at the default budgets):

1. train LC with a fixed schedule (``--lc-iters``) on ``wsis_synth_train_4k`` (``--train-set``),
   evaluate on ``wsis_synth_val`` (counting errors and mAP^r);
2. the counting baseline: every image predicted with each class's mean training count;
3. the fully supervised reference: the stock Mask R-CNN on the same ImageNet MobileNetV2 (FPN),
   trained with ground-truth masks on the same data (tools/benchmark_mask_rcnn.py). Its mAP^r_50 is
   read from ``--supervised-json`` (default: the JSON that benchmark_mask_rcnn.py writes, when
   present), else the model is trained here (``--supervised-iters``, 0: its config's schedule);
4. head_overhead: time of the LC heads + losses relative to the bare backbone forward + backward
   at 448x448, batch 2 (median of repeats);
5. prm_backward_ratio: time to get the masks of all retained peaks of an image (batched backward +
   mask extraction) / time of one forward, summed over validation images with instances.

The last line printed is one JSON object with mRMSE, mRMSE_nz, m_relRMSE, m_relRMSE_nz,
baseline_mRMSE, mAP_r25, mAP_r50, supervised_mAP_r50, head_overhead, prm_backward_ratio (and
timings). Targets: mRMSE <= 0.35 x baseline_mRMSE, mAP_r50 >= 0.5 x supervised_mAP_r50,
head_overhead <= 0.15, prm_backward_ratio <= 2.

    python tools/benchmark_lc.py                            # full run (~40 min on 2 cores)
    python tools/benchmark_lc.py --lc-iters 20 --supervised-iters 20 --eval-images 10 \
        --supervised-json ""                                                # smoke
    python tools/benchmark_lc.py --lc-weights output/benchmark_lc/lc/model_final.pth \
        MODEL.LC.PRM.MASK_MODE threshold    # re-evaluate a trained model with other settings
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetFromList
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wsis_d2  # noqa: E402,F401  (registers datasets, models and mappers)
from wsis_d2.data import build_dataset_mapper  # noqa: E402
from wsis_d2.engine import WSISTrainer  # noqa: E402
from wsis_d2.evaluation import (  # noqa: E402
    CountingEvaluator,
    InstanceAPEvaluator,
    counting_metrics,
)
from wsis_d2.lc import PRMInstanceDecoder  # noqa: E402

from benchmark_mask_rcnn import CONFIG as MASK_RCNN_CONFIG  # noqa: E402
from benchmark_mask_rcnn import JSON_NAME as JSON_MASK_RCNN  # noqa: E402
from benchmark_mask_rcnn import OUTPUT_DIR as OUTPUT_MASK_RCNN  # noqa: E402
from benchmark_mask_rcnn import evaluate as evaluate_mask_rcnn  # noqa: E402
from benchmark_mask_rcnn import train_mask_rcnn  # noqa: E402
from benchmark_utils import (  # noqa: E402
    ROOT,
    VAL_SET,
    bench_cfg,
    cpu_time,
    rescale_schedule,
)

LC_CONFIG = os.path.join(ROOT, "configs", "demo", "lc_mnv2_synthetic_bench.yaml")
# head_overhead: the paper's model (R-50, stride 32, 448x448, 20 classes)
OVERHEAD_CONFIG = os.path.join(ROOT, "configs", "lc_r50.yaml")
SUPERVISED_JSON = os.path.join(OUTPUT_MASK_RCNN, JSON_MASK_RCNN)
TRAIN_SET = "wsis_synth_train_4k"

logger = logging.getLogger("benchmark_lc")


def _cfg(config_file, opts, output_dir, train_set=TRAIN_SET):
    cfg = bench_cfg(config_file, opts, output_dir, train_set)
    cfg.TEST.WSIS_COCO_EVAL = False
    return cfg


def _evaluate(cfg, model, num_images):
    """Counting + instance evaluation on the first ``num_images`` of the validation set."""
    dicts = DatasetCatalog.get(VAL_SET)
    if num_images > 0:
        dicts = dicts[:num_images]
    mapper = build_dataset_mapper(cfg, is_train=False)
    loader = build_detection_test_loader(
        DatasetFromList(dicts, copy=False), mapper=mapper, num_workers=0
    )
    evaluators = [
        CountingEvaluator(VAL_SET, distributed=False),
        InstanceAPEvaluator(VAL_SET, distributed=False),
    ]
    return inference_on_dataset(model, loader, DatasetEvaluators(evaluators)), dicts, loader


def train_and_evaluate(cfg, eval_images):
    """Train with the trainer (no periodic evaluation) and evaluate the final model."""
    trainer = WSISTrainer(cfg, evaluate=False)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    results, dicts, loader = _evaluate(cfg, trainer.model, eval_images)
    return trainer.model, results, train_time, time.perf_counter() - start, dicts, loader


def evaluate_checkpoint(cfg, weights, eval_images):
    """Evaluate LC from a checkpoint of an earlier run (same config), without training."""
    if not os.path.isfile(weights):
        raise ValueError(f"--lc-weights: no such file {weights}")
    model = WSISTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    start = time.perf_counter()
    results, dicts, loader = _evaluate(cfg, model, eval_images)
    return model, results, 0.0, time.perf_counter() - start, dicts, loader


def baseline_mrmse(num_images, train_set):
    """mRMSE of predicting every image with each class's mean training count."""
    train = np.array([d["class_counts"] for d in DatasetCatalog.get(train_set)], dtype=np.float64)
    val = DatasetCatalog.get(VAL_SET)
    if num_images > 0:
        val = val[:num_images]
    gt = np.array([d["class_counts"] for d in val], dtype=np.float64)
    pred = np.repeat(train.mean(axis=0, keepdims=True), gt.shape[0], axis=0)
    return float(counting_metrics(pred, gt)["mRMSE"])


def _paired_ratio(fn_a, fn_b, repeats):
    """Median over interleaved repeats of cpu(fn_b) / cpu(fn_a), after one warm-up of each."""
    fn_a()
    fn_b()
    ratios, times_a, times_b = [], [], []
    for _ in range(repeats):
        t_a = cpu_time(fn_a)
        t_b = cpu_time(fn_b)
        ratios.append(t_b / t_a)
        times_a.append(t_a)
        times_b.append(t_b)
    return statistics.median(ratios), statistics.median(times_a), statistics.median(times_b)


def head_overhead(cfg, repeats=7):
    """
    (LC model forward + backward − backbone forward + backward) / backbone, 448x448, batch 2, in
    process CPU time (median over interleaved repeats).
    """
    torch.manual_seed(0)
    model = build_model(cfg).train()
    num_classes = cfg.MODEL.LC.NUM_CLASSES
    g = torch.Generator().manual_seed(0)
    batch = []
    for i in range(2):
        counts = torch.zeros(num_classes, dtype=torch.long)
        counts[i] = 2
        counts[(i + 3) % num_classes] = 7
        batch.append(
            {
                "image": torch.randint(0, 256, (3, 448, 448), generator=g, dtype=torch.uint8),
                "labels": (counts > 0).float(),
                "counts": counts.clamp(max=cfg.MODEL.LC.LOWER_COUNT),
                "count_ge": counts >= cfg.MODEL.LC.LOWER_COUNT,
            }
        )
    x = model.preprocess_image(batch).tensor

    def bare():
        model.zero_grad(set_to_none=True)
        model.backbone(x)[model.in_feature].sum().backward()

    def full():
        model.zero_grad(set_to_none=True)
        sum(model(batch).values()).backward()

    with EventStorage(0):
        ratio, t_bare, t_full = _paired_ratio(bare, full, repeats)
    return ratio - 1.0, t_bare, t_full


def _decoder(cfg, enabled):
    """The model's instance decoder as ``cfg`` builds it, with the PRMs on or off."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.LC.PRM.ENABLED = enabled
    return PRMInstanceDecoder(cfg)


def prm_backward_ratio(cfg, model, loader, dicts, max_images, repeats=3):
    """
    Σ (CPU time of inference with masks − counts only) / Σ CPU time of counts only (one forward
    and the peak search), over validation images with at least one object. The retained peaks
    are the image's true number of objects per class (``inference_single(..., counts=GT)``), so
    the ratio measures the masks of all the objects of an image whatever the model predicts.
    Both runs use decoder variants built from ``cfg`` (its mask settings, with PRMs on and off).
    Each image is run once with and once without masks first (so that first-call costs of its
    size are not counted), then ``repeats`` times each, interleaved; the medians are used.
    """
    model.eval()
    masks_decoder, counts_decoder = _decoder(cfg, True), _decoder(cfg, False)
    gt = {d["image_id"]: torch.as_tensor(d["class_counts"], dtype=torch.float32) for d in dicts}
    t_masks = t_forward = 0.0
    used = peaks = 0
    for inputs in loader:
        inp = inputs[0]
        counts = gt[inp["image_id"]]
        if float(counts.sum()) == 0:
            continue
        outputs = []

        def counts_only():
            with torch.no_grad():
                model.inference_single(inp, counts=counts, decoder=counts_decoder)

        def with_masks():
            with torch.no_grad():
                outputs.append(model.inference_single(inp, counts=counts, decoder=masks_decoder))

        # warm-up of this image size (oneDNN primitives of the forward and of the backward),
        # then the median of interleaved repeats of each
        counts_only()
        with_masks()
        forwards, totals = [], []
        for _ in range(repeats):
            forwards.append(cpu_time(counts_only))
            totals.append(cpu_time(with_masks))
        forward, total = statistics.median(forwards), statistics.median(totals)
        t_forward += forward
        t_masks += max(0.0, total - forward)
        peaks += int(counts.sum())
        used += 1
        if used >= max_images:
            break
    return (t_masks / t_forward if t_forward > 0 else float("nan")), used, peaks


def supervised_map(args):
    """(mAP^r_50 of the supervised reference, its training seconds; 0 when read from a file)."""
    if args.supervised_json and os.path.isfile(args.supervised_json):
        with open(args.supervised_json) as f:
            data = json.load(f)
        for key in ("supervised_mAP_r50", "mAP_r50"):
            if key in data:
                return float(data[key]), 0.0
        # e.g. the instance_ap.json that tools/train_net.py writes: {"results": {"mAP_r50": ...}}
        for key in ("wsis_instance", "results"):
            if isinstance(data.get(key), dict) and "mAP_r50" in data[key]:
                return float(data[key]["mAP_r50"]), 0.0
        raise ValueError(
            f"{args.supervised_json}: no field 'mAP_r50', 'supervised_mAP_r50', "
            "'wsis_instance.mAP_r50' or 'results.mAP_r50'"
        )
    if args.supervised_json and args.supervised_json != SUPERVISED_JSON:
        raise ValueError(f"--supervised-json: no such file {args.supervised_json}")
    logger.info(
        "supervised reference: training %s (%s iterations)",
        args.supervised_config,
        args.supervised_iters or "the config's",
    )
    output_dir = os.path.join(args.output_dir, "supervised")
    cfg, model, train_time = train_mask_rcnn(
        args.supervised_config, [], args.supervised_iters, output_dir, args.train_set
    )
    results = evaluate_mask_rcnn(cfg, model, args.eval_images, output_dir)
    return float(results["wsis_instance"]["mAP_r50"]), train_time


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=LC_CONFIG, help="LC config (model and solver)")
    parser.add_argument(
        "--train-set",
        default=TRAIN_SET,
        help="training split of LC, of the supervised reference and of the counting baseline",
    )
    parser.add_argument("--lc-iters", type=int, default=6000, help="LC training iterations")
    parser.add_argument(
        "--lc-weights",
        default="",
        help="evaluate this LC checkpoint (trained by an earlier run with the same config and "
        "--lc-iters) instead of training; e.g. to measure other inference settings",
    )
    parser.add_argument(
        "--supervised-config", default=MASK_RCNN_CONFIG, help="Mask R-CNN config"
    )
    parser.add_argument(
        "--supervised-iters", type=int, default=0, help="Mask R-CNN iterations (0: the config's)"
    )
    parser.add_argument(
        "--supervised-json",
        default=SUPERVISED_JSON,
        help="read the supervised mAP_r50 from this JSON if it exists ('': always train)",
    )
    parser.add_argument("--eval-images", type=int, default=0, help="validation images (0: all)")
    parser.add_argument("--prm-images", type=int, default=20, help="images for prm_backward_ratio")
    parser.add_argument(
        "--overhead-config",
        default=OVERHEAD_CONFIG,
        help="LC config whose backbone and heads are timed for head_overhead",
    )
    parser.add_argument("--output-dir", default="output/benchmark_lc")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LC config overrides KEY VALUE ...")
    args = parser.parse_args()
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="benchmark_lc")
    torch.manual_seed(0)
    os.makedirs(args.output_dir, exist_ok=True)

    cfg = _cfg(args.config_file, args.opts, os.path.join(args.output_dir, "lc"), args.train_set)
    rescale_schedule(cfg, args.lc_iters)
    cfg.freeze()
    if args.lc_weights:
        model, results, lc_train_time, lc_eval_time, dicts, loader = evaluate_checkpoint(
            cfg, args.lc_weights, args.eval_images
        )
    else:
        model, results, lc_train_time, lc_eval_time, dicts, loader = train_and_evaluate(
            cfg, args.eval_images
        )
    counting, instance = results["counting"], results["wsis_instance"]
    ratio, prm_images, prm_peaks = prm_backward_ratio(cfg, model, loader, dicts, args.prm_images)
    overhead_cfg = _cfg(args.overhead_config, [], os.path.join(args.output_dir, "overhead"))
    overhead, t_bare, t_full = head_overhead(overhead_cfg)
    sup_map, sup_train_time = supervised_map(args)
    out = {
        "mRMSE": counting["mRMSE"],
        "mRMSE_nz": counting["mRMSE_nz"],
        "m_relRMSE": counting["m_relRMSE"],
        "m_relRMSE_nz": counting["m_relRMSE_nz"],
        "baseline_mRMSE": baseline_mrmse(args.eval_images, args.train_set),
        "mAP_r25": instance["mAP_r25"],
        "mAP_r50": instance["mAP_r50"],
        "supervised_mAP_r50": sup_map,
        "head_overhead": overhead,
        "prm_backward_ratio": ratio,
        "prm_images": prm_images,
        "prm_peaks_per_image": prm_peaks / max(1, prm_images),
        "backbone_fwd_bwd_s": t_bare,
        "lc_fwd_bwd_s": t_full,
        "lc_iters": args.lc_iters,
        "lc_train_s": lc_train_time,
        "lc_weights": args.lc_weights,
        "lc_eval_s": lc_eval_time,
        "supervised_iters": 0 if sup_train_time == 0 else args.supervised_iters,
        "supervised_train_s": sup_train_time,
    }
    with open(os.path.join(args.output_dir, "benchmark_lc.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
