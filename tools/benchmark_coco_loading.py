#!/usr/bin/env python
"""
Seconds to load a COCO instances json into wsis_d2's dataset dicts (``load_coco_counts_json``:
validation, RLE masks, a point per object), and what detectron2's trainer pays for it at every
evaluation, where it builds a new test loader and new evaluators: ``WSISTrainer.build_test_loader``
(images not read) and ``build_evaluator`` for a "wsis_instance" split, with the split itself as
the counting baseline, scoring empty predictions.

Without ``--json`` the file is generated (seeded) in a temporary folder: ``--images`` images of
640 x 480 with Poisson(7) polygon objects of 24 vertices each, 80 classes, about COCO's density
(train2014: 82,783 images, 604,907 annotations). With ``--json`` (e.g. ``instances_val2014.json``)
that file is timed; its images are not read.

    .venv/bin/python tools/benchmark_coco_loading.py --images 5000

Prints the timings, then as its last line one JSON object.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from wsis_d2 import get_wsis_cfg  # noqa: E402
from wsis_d2.data.datasets import register_coco_counts_instances  # noqa: E402
from wsis_d2.data.datasets.coco_counts import load_coco_counts_json  # noqa: E402
from wsis_d2.engine import WSISTrainer, build_evaluator  # noqa: E402


def write_coco_like(path: str, num_images: int, seed: int = 0) -> None:
    """A COCO-like json of ``num_images`` 640 x 480 images (see the module docstring)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640})
        for _ in range(rng.poisson(7)):
            r = rng.uniform(8, 120)
            cx, cy = rng.uniform(r, 640 - r), rng.uniform(r, 480 - r)
            t = np.sort(rng.uniform(0, 2 * np.pi, 24))
            rr = r * rng.uniform(0.7, 1.0, 24)
            poly = np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], 1).round(2).ravel()
            x0, y0, x1, y1 = poly[0::2].min(), poly[1::2].min(), poly[0::2].max(), poly[1::2].max()
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1,
                "category_id": int(rng.integers(1, 81)), "segmentation": [poly.tolist()],
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0,
            })
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(80)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def time_evaluations(name: str, repeats: int):
    """
    Seconds of each of ``repeats`` evaluations: building the trainer's test loader (its images
    are not read), and new evaluators scoring empty predictions.
    """
    cfg = get_wsis_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.TEST.WSIS_COCO_EVAL = False  # COCOeval reads the json itself
    cfg.DATALOADER.NUM_WORKERS = 0
    dicts = DatasetCatalog.get(name)
    records = [(d["image_id"], d["height"], d["width"]) for d in dicts]
    num_classes = len(dicts[0]["class_counts"]) if dicts else 0
    loader_seconds, seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        WSISTrainer.build_test_loader(cfg, name)
        loader_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        evaluator = build_evaluator(cfg, name)
        evaluator.reset()
        for image_id, h, w in records:
            inst = Instances((h, w))
            inst.pred_masks = torch.zeros(0, h, w, dtype=torch.bool)
            inst.pred_boxes = Boxes(torch.zeros(0, 4))
            inst.scores, inst.pred_classes = torch.zeros(0), torch.zeros(0, dtype=torch.long)
            inputs = [{"image_id": image_id, "height": h, "width": w}]
            evaluator.process(inputs, [{"instances": inst, "counts": torch.zeros(num_classes)}])
        evaluator.evaluate()
        seconds.append(time.perf_counter() - start)
    return loader_seconds, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="a COCO instances json to time (default: generated)")
    parser.add_argument("--images", type=int, default=5000, help="images of the generated json")
    parser.add_argument("--evaluations", type=int, default=3)
    args = parser.parse_args()
    if args.images < 1 or args.evaluations < 1:
        parser.error("--images and --evaluations must be at least 1")
    if args.json is not None and not os.path.isfile(args.json):
        parser.error(f"--json: no such file: {args.json}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.json
        if path is None:
            path = os.path.join(tmp, "coco_like.json")
            write_coco_like(path, args.images)
        start = time.perf_counter()
        dicts = load_coco_counts_json(path, tmp)
        load_s = time.perf_counter() - start
        num_anns = sum(len(d["annotations"]) for d in dicts)
        print(f"{path}: {len(dicts)} images, {num_anns} annotations loaded in {load_s:.2f} s "
              f"({1e3 * load_s / max(num_anns, 1):.3f} ms per annotation)")
        name = "wsis_benchmark_coco_loading"
        register_coco_counts_instances(name, {}, path, tmp)
        loaders, evals = time_evaluations(name, args.evaluations)
        print("test loader's seconds per evaluation: " + ", ".join(f"{s:.1f}" for s in loaders))
        print("evaluators' own seconds per evaluation: " + ", ".join(f"{s:.1f}" for s in evals))
    print(json.dumps({
        "images": len(dicts), "annotations": num_anns, "load_s": round(load_s, 2),
        "ms_per_annotation": round(1e3 * load_s / max(num_anns, 1), 4),
        "test_loader_s": [round(s, 2) for s in loaders],
        "evaluation_s": [round(s, 2) for s in evals],
    }))


if __name__ == "__main__":
    main()
