"""
The two evaluation helpers wsis_d2 keeps next to detectron2's equivalents
(``wsis_d2.evaluation.instance_ap``): VOC all-point AP (``voc_ap`` against
``detectron2.evaluation.pascal_voc_evaluation.voc_ap``) and box IoU (``pairwise_box_iou`` against
``detectron2.structures.pairwise_iou``): largest difference and time per call, one thread. Prints
JSON.

    .venv/bin/python tools/benchmark_eval_helpers.py
"""

import json
import time

import numpy as np
import torch

from detectron2.evaluation.pascal_voc_evaluation import voc_ap as d2_voc_ap
from detectron2.structures import Boxes, pairwise_iou

from wsis_d2.evaluation.instance_ap import pairwise_box_iou, voc_ap


def per_call(fn, repeats):
    """Mean seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def d2_box_iou(a, b):
    return pairwise_iou(Boxes(torch.from_numpy(a)), Boxes(torch.from_numpy(b))).numpy()


def random_boxes(rng, n):
    xy = rng.uniform(0, 200, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(1, 80, (n, 2))], axis=1)


def main():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    report = {"voc_ap": [], "box_iou": []}
    for num in (10**3, 10**4, 10**5):
        labels = rng.random(num) < 0.3
        tp, fp = np.cumsum(labels), np.cumsum(~labels)
        recall, precision = tp / (1.2 * tp[-1] + 1), tp / np.maximum(tp + fp, 1)
        ours, theirs = voc_ap(recall, precision), d2_voc_ap(recall, precision)
        report["voc_ap"].append(
            {
                "detections": num,
                "abs_diff": abs(ours - theirs),
                "wsis_ms": 1e3 * per_call(lambda: voc_ap(recall, precision), 20),
                "detectron2_ms": 1e3 * per_call(lambda: d2_voc_ap(recall, precision), 3),
            }
        )
    for dets, gts in ((20, 5), (100, 10), (1000, 100)):
        a, b = random_boxes(rng, dets), random_boxes(rng, gts)
        report["box_iou"].append(
            {
                "boxes": [dets, gts],
                "max_abs_diff": float(np.abs(pairwise_box_iou(a, b) - d2_box_iou(a, b)).max()),
                "wsis_us": 1e6 * per_call(lambda: pairwise_box_iou(a, b), 200),
                "detectron2_us": 1e6 * per_call(lambda: d2_box_iou(a, b), 200),
            }
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
