"""
COCO AP with pycocotools' COCOeval against faster-coco-eval's (``wsis_d2.evaluation.coco_eval``),
and detectron2's compiled one where built, on the same predictions: seconds of loadRes +
evaluate + accumulate + summarize (median of ``--repeats``, one thread) and the largest difference
of the 12 summary numbers and of the precision array, for box and mask AP. Prints JSON.

Predictions come from a detectron2 COCO results file (``--predictions``, e.g. the
``coco_instances_results.json`` that ``COCOEvaluator`` writes) or are made by running a Mask R-CNN
(``--config-file``, ``--weights``) over the ground truth's images, resized as DefaultPredictor
does (written to ``<output>/predictions.json``):

    DETECTRON2_DATASETS=../shared/datasets .venv/bin/python tools/benchmark_coco_eval.py \
        --config-file <is/config.yaml> --weights <is/model_final.pth>
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import time

import numpy as np
import torch

from detectron2.engine import DefaultPredictor
from detectron2.evaluation.coco_evaluation import instances_to_coco_json

from pycocotools.coco import COCO

from wsis_d2 import get_wsis_cfg
from wsis_d2.evaluation.coco_eval import _detectron2_compiled, cocoeval_class


def make_predictions(gt: COCO, image_root: str, config: str, weights: str, score: float):
    """COCO results of the Mask R-CNN on every ground-truth image (class i -> i-th category id)."""
    cfg = get_wsis_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score
    predictor = DefaultPredictor(cfg)
    cat_ids = sorted(gt.getCatIds())
    results = []
    from detectron2.data.detection_utils import read_image

    for img_id in sorted(gt.getImgIds()):
        info = gt.loadImgs(img_id)[0]
        image = read_image(os.path.join(image_root, info["file_name"]), format="BGR")
        with torch.no_grad():
            instances = predictor(image)["instances"].to("cpu")
        for r in instances_to_coco_json(instances, img_id):
            r["category_id"] = cat_ids[r["category_id"]]
            results.append(r)
    return results


def evaluate(gt: COCO, results, iou_type: str, backend: str):
    """(seconds, COCOeval) of one full COCO evaluation, its printout swallowed."""
    cls = cocoeval_class(backend)
    dets = [dict(r) for r in results]
    if iou_type == "segm":
        for d in dets:
            d.pop("bbox", None)  # as detectron2 does: mask AP's area ranges from the mask area
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = cls(gt, gt.loadRes(dets), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return time.perf_counter() - start, coco_eval


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    parser.add_argument("--gt", default=os.path.join(root, "fruits3_train", "train.json"))
    parser.add_argument("--image-root", default=os.path.join(root, "fruits3_train", "images"))
    parser.add_argument("--predictions", help="detectron2 COCO results json")
    parser.add_argument("--config-file")
    parser.add_argument("--weights")
    parser.add_argument("--score", type=float, default=0.01, help="score threshold of the model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="output/benchmark_coco_eval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not os.path.isfile(args.gt):
        raise ValueError(f"--gt {args.gt!r} not found (set DETECTRON2_DATASETS)")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(args.gt)
    if args.predictions:
        if not os.path.isfile(args.predictions):
            raise ValueError(f"--predictions {args.predictions!r} not found")
        with open(args.predictions) as f:
            results = json.load(f)
    else:
        if not (args.config_file and args.weights):
            raise ValueError("give --predictions, or --config-file and --weights of a Mask R-CNN")
        results = make_predictions(gt, args.image_root, args.config_file, args.weights, args.score)
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "predictions.json"), "w") as f:
            json.dump(results, f)
    report = {"images": len(gt.getImgIds()), "ground_truth": len(gt.getAnnIds())}
    report["detections"] = len(results)
    for iou_type in ("bbox", "segm"):
        row = {}
        evals = {}
        backends = ["pycocotools", "faster_coco_eval"]
        if _detectron2_compiled():  # e.g. upstream built from source: its COCOeval_opt too
            backends.append("detectron2")
        for backend in backends:
            times = []
            for _ in range(args.repeats):
                sec, evals[backend] = evaluate(gt, results, iou_type, backend)
                times.append(sec)
            row[f"{backend}_s"] = statistics.median(times)
        ref, fast = evals["pycocotools"], evals["faster_coco_eval"]
        row["stats_pycocotools"] = [round(float(v), 6) for v in ref.stats]
        row["max_stats_diff"] = float(np.abs(np.asarray(ref.stats) - np.asarray(fast.stats)).max())
        p_ref, p_fast = np.asarray(ref.eval["precision"]), np.asarray(fast.eval["precision"])
        row["precision_shape_equal"] = p_ref.shape == p_fast.shape
        if p_ref.shape == p_fast.shape:
            row["max_precision_diff"] = float(np.abs(p_ref - p_fast).max())
        row["speedup"] = row["pycocotools_s"] / row["faster_coco_eval_s"]
        if "detectron2" in evals:
            d2_stats = np.asarray(evals["detectron2"].stats)
            row["max_stats_diff_detectron2"] = float(np.abs(np.asarray(ref.stats) - d2_stats).max())
        report[iou_type] = row
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
