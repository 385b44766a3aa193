#!/usr/bin/env python
"""
Benchmark of LC, CCGR and the fully supervised bound on a real data set in COCO format (instance
masks, plus the image-level ``"image_labels"`` that ``register_coco_counts_instances`` reads;
LC's counts are those of the annotations), on this 2-core CPU:

1. a seeded validation split, stratified by the set of classes an image shows
   (``--val-fraction`` of each stratum, ``--split-seed``), written to ``<output>/split/`` as two
   COCO files; the methods train on the rest and are all scored on it;
2. ``supervised``: the stock Mask R-CNN of ``--is-config`` trained on the ground-truth masks of the
   training images (the bound), with CCGR's IS-branch schedule (``--is-iters``);
3. ``lc``: LC / ILC of ``--lc-config`` trained on the training images' image-level counts (its
   count calibration on them): counting errors on the validation images (mRMSE, mRMSE-nz,
   m-relRMSE, MAE) next to the mean-count baseline (each class's mean training count), mAP^r;
4. ``ccgr``: CCGR from the training images' image-level labels, all rounds
   (``wsis_d2.ccgr.rounds.CCGRRounds``, the code of ``tools/train_ccgr.py``): per round the
   pseudo labels' quality on the training images (their masks are read only to score them) and
   the IS branch's mAP^r_25/50/75 and mAP^b_50 on the validation images.

Everything takes the data set from the command line, so the same benchmark runs on your own data::

    python tools/benchmark_real.py --json ../shared/datasets/fruits3_train/train.json \\
        --images ../shared/datasets/fruits3_train/images --output output/real_fruits3
    python tools/benchmark_real.py ... --methods supervised,lc     # a subset
    python tools/benchmark_real.py ... --resume                    # continue a killed run

The number of classes comes from the file's ``categories`` (``--num-classes`` checks it). The last
line printed is one JSON object (also ``<output>/benchmark_real.json``) with ``supervised_*``,
``lc_*``, ``ccgr_rounds`` and the target ratios: ``ccgr_final_over_supervised_r50``,
``lc_over_supervised_r50``, ``lc_mRMSE_over_baseline``. The file is also written after each
finished method, with ``"unfinished"`` naming the methods still to run, so that a failure later
keeps the figures of the methods before it.
"""

import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wsis_d2  # noqa: E402,F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg  # noqa: E402
from wsis_d2.data import build_dataset_mapper  # noqa: E402
from wsis_d2.data.datasets import register_coco_counts_instances  # noqa: E402
from wsis_d2.ccgr.rounds import CCGRRounds, instance_ap  # noqa: E402
from wsis_d2.evaluation import (  # noqa: E402
    CountingEvaluator,
    InstanceAPEvaluator,
    counting_metrics,
)

from benchmark_ccgr import schedule_opts, train_or_load  # noqa: E402
from benchmark_utils import ROOT, bench_cfg  # noqa: E402

METHODS = ("supervised", "lc", "ccgr")
CCGR_CONFIG = os.path.join(ROOT, "configs", "real", "ccgr_mnv2_real.yaml")
CLS_CONFIG = os.path.join(ROOT, "configs", "real", "ccgr_cls_mnv2_real.yaml")
IS_CONFIG = os.path.join(ROOT, "configs", "real", "mask_rcnn_mnv2_fpn_real.yaml")
LC_CONFIG = os.path.join(ROOT, "configs", "real", "lc_mnv2_real.yaml")

logger = logging.getLogger("benchmark_real")


def _labels_of(image: Dict, anns: List[Dict]) -> Tuple[int, ...]:
    """The category ids an image shows: its ``image_labels`` or, without them, its annotations'."""
    if "image_labels" in image:
        return tuple(sorted(int(c) for c in image["image_labels"]))
    return tuple(sorted({int(a["category_id"]) for a in anns if not a.get("iscrowd", 0)}))


def split_coco(data: Dict, val_fraction: float, seed: int) -> Tuple[Dict, Dict]:
    """
    A validation split stratified by the set of classes an image shows: in each stratum (sorted
    by its classes) a seeded permutation, the first round(``val_fraction`` · n) images to the
    validation split (a stratum of one image: with probability ``val_fraction``).

    Args:
        data: a COCO instances dict. val_fraction: in (0, 1). seed: of the permutation.

    Returns:
        (train, val) COCO dicts with the same categories and ``info``.
    """
    by_image = defaultdict(list)
    for a in data.get("annotations", []):
        by_image[a["image_id"]].append(a)
    strata = defaultdict(list)
    for img in data["images"]:
        strata[_labels_of(img, by_image[img["id"]])].append(img["id"])
    rng = np.random.RandomState(seed)
    val_ids = set()
    for key in sorted(strata):
        ids = sorted(strata[key], key=lambda i: (isinstance(i, str), i))  # int and str ids
        order = rng.permutation(len(ids))
        n_val = int(round(val_fraction * len(ids))) if len(ids) > 1 else int(
            rng.rand() < val_fraction
        )
        val_ids.update(ids[i] for i in order[:n_val])

    def subset(keep):
        images = [img for img in data["images"] if keep(img["id"])]
        ids = {img["id"] for img in images}
        return {
            **{k: v for k, v in data.items() if k not in ("images", "annotations")},
            "images": images,
            "annotations": [a for a in data.get("annotations", []) if a["image_id"] in ids],
        }

    return subset(lambda i: i not in val_ids), subset(lambda i: i in val_ids)


def prepare_data(args) -> Tuple[str, str, List[str]]:
    """Split the file, register the two splits; returns (train name, val name, class names)."""
    for path, what in ((args.json, "--json"), (args.images, "--images")):
        if not os.path.exists(path):
            raise SystemExit(f"{what}: {os.path.abspath(path)} does not exist")
    with open(args.json) as f:
        data = json.load(f)
    for key in ("images", "categories"):
        if key not in data:
            raise SystemExit(f"{args.json}: no '{key}' list (a COCO instances file is needed)")
    classes = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    if args.num_classes and args.num_classes != len(classes):
        raise SystemExit(
            f"--num-classes {args.num_classes}, but {args.json} has {len(classes)} categories"
        )
    annotated = {a.get("image_id") for a in data.get("annotations", [])}
    count_only = [
        img.get("id") for img in data["images"]
        if img.get("id") not in annotated and isinstance(img.get("image_counts"), dict)
        and any(img["image_counts"].values())
    ]
    if count_only:  # the supervised bound and mAP need every counted object's mask
        raise SystemExit(
            f"{args.json}: {len(count_only)} images have 'image_counts' but no annotations (ids "
            f"{count_only[:5]}{' ...' if len(count_only) > 5 else ''}); this benchmark needs "
            "every object annotated with a mask. Train LC on count-only images with "
            "tools/train_net.py (docs/lc.md)"
        )
    if not 0 < args.val_fraction < 1:
        raise SystemExit(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    train, val = split_coco(data, args.val_fraction, args.split_seed)
    for part, split in (("training", train), ("validation", val)):
        if not split["images"]:  # before any training, not after the first method
            raise SystemExit(
                f"--val-fraction {args.val_fraction} leaves the {part} split of the "
                f"{len(data['images'])} images in {args.json} empty (each set of classes "
                "is split on its own); choose another fraction"
            )
    folder = os.path.join(args.output, "split")
    os.makedirs(folder, exist_ok=True)
    names = []
    for part, split in (("train", train), ("val", val)):
        path = os.path.join(folder, f"{part}.json")
        with open(path, "w") as f:
            json.dump(split, f)
        name = f"{args.name}_{part}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)  # another file's classes may have been set there
        register_coco_counts_instances(name, {"thing_classes": classes}, path, args.images)
        names.append(name)
        logger.info(
            f"{name}: {len(split['images'])} images, {len(split['annotations'])} instances "
            f"({path})"
        )
    return names[0], names[1], classes


def class_opts(num_classes: int) -> Dict[str, List[str]]:
    """The NUM_CLASSES options of each model for ``num_classes`` classes."""
    c = str(num_classes)
    return {
        "is": ["MODEL.ROI_HEADS.NUM_CLASSES", c],
        "lc": ["MODEL.LC.NUM_CLASSES", c],
        "ccgr": ["MODEL.ROI_HEADS.NUM_CLASSES", c, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(num_classes + 1)],
    }


def run_supervised(args, train_set, val_set, is_opts):
    """The IS branch's config and schedule trained on the ground-truth masks."""
    cfg = bench_cfg(args.is_config, is_opts, os.path.join(args.output, "supervised"), train_set,
                    val_set)
    cfg.freeze()
    model, seconds = train_or_load(cfg, args.resume)
    start = time.perf_counter()
    res = instance_ap(cfg, model, val_set)
    return res, seconds, time.perf_counter() - start


def run_lc(args, train_set, val_set, num_classes):
    """LC trained on the image-level counts; counting errors and mAP on the validation split."""
    opts = schedule_opts(args.lc_config, args.lc_iters) + class_opts(num_classes)["lc"]
    cfg = bench_cfg(args.lc_config, opts, os.path.join(args.output, "lc"), train_set, val_set)
    cfg.MODEL.LC.CALIBRATION.DATASETS = (train_set,)
    cfg.freeze()
    model, seconds = train_or_load(cfg, args.resume)
    start = time.perf_counter()
    loader = build_detection_test_loader(cfg, val_set, mapper=build_dataset_mapper(cfg, False))
    evaluators = DatasetEvaluators(
        [CountingEvaluator(val_set, distributed=False),
         InstanceAPEvaluator(val_set, distributed=False)]
    )
    res = inference_on_dataset(model, loader, evaluators)
    train = np.array([d["class_counts"] for d in DatasetCatalog.get(train_set)], np.float64)
    gt = np.array([d["class_counts"] for d in DatasetCatalog.get(val_set)], np.float64)
    base = counting_metrics(np.repeat(train.mean(0, keepdims=True), len(gt), 0), gt)
    out = {m: float(res["wsis_instance"][m]) for m in ("mAP_r25", "mAP_r50", "mAP_r75", "mAP_b50")}
    out.update({m: float(v) for m, v in res["counting"].items() if np.ndim(v) == 0})
    out.update({f"baseline_{m}": float(v) for m, v in base.items() if np.ndim(v) == 0})
    return out, seconds, time.perf_counter() - start, cfg.SOLVER.MAX_ITER


def ccgr_cfg(args, train_set, num_classes, is_opts) -> CfgNode:
    """The frozen CCGR config of the rounds: ``--ccgr-config`` with the data, classes, sub-configs,
    ``--rounds`` (0: the config's own MODEL.CCGR.ROUNDS.NUM) and the positional opts."""
    copts = class_opts(num_classes)
    cls_opts = schedule_opts(args.cls_config, args.cls_iters) + copts["lc"]
    rounds = ["MODEL.CCGR.ROUNDS.NUM", str(args.rounds)] if args.rounds > 0 else []
    opts = schedule_opts(args.ccgr_config, args.mil_ss_iters) + copts["ccgr"] + [
        "OUTPUT_DIR", os.path.join(args.output, "ccgr"),
        "DATASETS.TRAIN", f"('{train_set}',)",
        "MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG", args.cls_config,
        "MODEL.CCGR.ROUNDS.IS_CONFIG", args.is_config,
        "MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS", cls_opts,
        "MODEL.CCGR.ROUNDS.IS_OPTS", is_opts,
    ] + rounds + list(args.opts)  # fmt: skip
    cfg = get_wsis_cfg(args.ccgr_config, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def run_ccgr(args, train_set, num_classes, is_opts):
    """All CCGR rounds; returns ({round: metrics}, {stage: seconds})."""
    rounds = CCGRRounds(ccgr_cfg(args, train_set, num_classes, is_opts))
    metrics = rounds.run(resume=args.resume, until=args.ccgr_until or None)
    # stages after --ccgr-until did not run and have no time
    times = {name: round(t, 1) for name, t in rounds.stage_seconds().items()}
    return metrics, times


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True, help="COCO instances file of the data set")
    parser.add_argument("--images", required=True, help="folder of its images")
    parser.add_argument("--num-classes", type=int, default=0, help="check: number of categories")
    parser.add_argument("--name", default="real", help="prefix of the registered splits")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=0,
                        help="CCGR rounds (0: the CCGR config's MODEL.CCGR.ROUNDS.NUM)")
    parser.add_argument("--cls-iters", type=int, default=0, help="image-level classifier (0: config)")
    parser.add_argument("--mil-ss-iters", type=int, default=0, help="MIL + SS model (0: config)")
    parser.add_argument("--is-iters", type=int, default=0,
                        help="IS branch of every round and the supervised bound (0: config)")
    parser.add_argument("--lc-iters", type=int, default=0, help="LC (0: the config's)")
    parser.add_argument("--lc-config", default=LC_CONFIG)
    parser.add_argument("--ccgr-config", default=CCGR_CONFIG)
    parser.add_argument("--cls-config", default=CLS_CONFIG)
    parser.add_argument("--is-config", default=IS_CONFIG)
    parser.add_argument("--ccgr-until", default="", metavar="STAGE",
                        help="stop CCGR after this stage, e.g. round1/pseudo_labels")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run: finished stages are not run again")
    parser.add_argument("--output", default="output/benchmark_real")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="options of the CCGR (MIL + SS) config, KEY VALUE pairs")
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=os.path.join(args.output, "log.txt"))
    setup_logger(name="wsis_d2")
    setup_logger(name="benchmark_real")
    start = time.perf_counter()
    train_set, val_set, classes = prepare_data(args)
    is_opts = (
        schedule_opts(args.is_config, args.is_iters)
        + class_opts(len(classes))["is"]
        + ["DATASETS.TEST", f"('{val_set}',)"]
    )
    out: Dict = {"json": args.json, "classes": classes, "train_set": train_set, "val_set": val_set,
                 "train_images": len(DatasetCatalog.get(train_set)),
                 "val_images": len(DatasetCatalog.get(val_set))}
    times = {}
    r2 = lambda v: round(float(v), 3)  # noqa: E731
    result_file = os.path.join(args.output, "benchmark_real.json")

    def save(done: str):
        # after each method, so that a later method's failure keeps the finished ones' figures
        left = [m for m in METHODS[METHODS.index(done) + 1:] if m in methods]
        with open(result_file, "w") as f:
            json.dump(dict(out, times_s=times, unfinished=left), f, indent=2)

    if "supervised" in methods:
        res, train_s, eval_s = run_supervised(args, train_set, val_set, is_opts)
        out.update({f"supervised_{m}": r2(v) for m, v in res.items()})
        times["supervised/train"], times["supervised/eval"] = round(train_s, 1), round(eval_s, 1)
        save("supervised")
    if "lc" in methods:
        res, train_s, eval_s, iters = run_lc(args, train_set, val_set, len(classes))
        out.update({f"lc_{m}": r2(v) for m, v in res.items()})
        out["lc_mRMSE_over_baseline"] = r2(res["mRMSE"] / max(res["baseline_mRMSE"], 1e-9))
        out["lc_iters"] = iters
        times["lc/train"], times["lc/eval"] = round(train_s, 1), round(eval_s, 1)
        save("lc")
    if "ccgr" in methods:
        rounds, stage_times = run_ccgr(args, train_set, len(classes), is_opts)
        out["ccgr_rounds"] = {str(k): {m: r2(v) for m, v in r.items()} for k, r in rounds.items()}
        r50 = [rounds[k]["mAP_r50"] for k in sorted(rounds) if "mAP_r50" in rounds[k]]
        if r50:
            out["ccgr_final_mAP_r50"] = r2(r50[-1])
        out["ccgr_rounds_non_decreasing_r50"] = all(b >= a for a, b in zip(r50, r50[1:]))
        times.update({f"ccgr/{k}": v for k, v in stage_times.items()})
        out["ccgr_s"] = round(sum(stage_times.values()), 1)
    if "supervised_mAP_r50" in out:
        sup = max(out["supervised_mAP_r50"], 1e-9)
        if "ccgr_final_mAP_r50" in out:
            out["ccgr_final_over_supervised_r50"] = r2(out["ccgr_final_mAP_r50"] / sup)
        if "lc_mAP_r50" in out:
            out["lc_over_supervised_r50"] = r2(out["lc_mAP_r50"] / sup)
    out["times_s"] = times
    out["total_s"] = round(time.perf_counter() - start, 1)
    if args.resume:
        out["resumed"] = True  # total_s is this process's time only; stage times are complete
    with open(result_file, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
