#!/usr/bin/env python
"""
Per-stage throughput of CCGR's rounds (``wsis_d2.ccgr.rounds``, the code of
``tools/train_ccgr.py``) with 1 and with N processes (``wsis_d2.engine.launch``; gloo on CPU), and
what one round writes per 1,000 training images.

On ``--images`` synthetic scenes (``--sizes``: 128-320 px), every training stage ``--iters``
iterations at ``--batch`` images in all, ``MODEL.CCGR.ROUNDS.NUM 2`` up to round 2's cues (so every kind of
stage runs once).
One JSON line per (processes, stage): seconds, images/s (inference stages) or iterations/s
(training stages), and for inference stages the seconds spent on the main process alone (gathering
and writing; ``serial_share`` of the stage); then one line with the bytes the round wrote per
1,000 images (proposals, cues with their label maps, pseudo labels). Also written to
``<output>/benchmark_ccgr_dist.json``. On a machine with fewer cores than processes x threads the
processes share the cores, and more processes are not faster.

    python tools/benchmark_ccgr_dist.py --processes 1 2 --images 32 --iters 4
"""

import argparse
import json
import os
import sys
import time

import yaml
from detectron2.data import DatasetCatalog
from detectron2.utils import comm

import wsis_d2  # noqa: F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg
from wsis_d2.data.datasets import SyntheticSpec, register_synthetic_split
from wsis_d2.engine import launch
from wsis_d2.ccgr.dist import seed_stage
from wsis_d2.ccgr.rounds import STAGE_FILE, CCGRRounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = ("classifier", "mil_ss", "is")
STAGES = ["proposals", "round1/classifier", "round1/cues", "round1/mil_ss", "round1/pseudo_labels",
          "round1/is", "round2/cues"]  # fmt: skip


def _register(root, images, sizes=(128, 320)):
    name = f"wsis_bench_dist_{images}_{sizes[0]}_{sizes[1]}"
    if name not in DatasetCatalog.list():
        spec = SyntheticSpec(
            num_images=images, seed=6106, min_image_size=sizes[0], max_image_size=sizes[1]
        )
        register_synthetic_split(name, name[len("wsis_"):], spec, root)
    return name


def _cfg(args, train_set, out):
    fast = ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.CHECKPOINT_PERIOD", "100000",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu"]  # fmt: skip
    return get_wsis_cfg(os.path.join(REPO, "configs", "ccgr_mnv2_synthetic.yaml"), fast + [
        "OUTPUT_DIR", out, "SEED", "1", "DATASETS.TRAIN", f"('{train_set}',)",
        "MODEL.CCGR.ROUNDS.NUM", "2", "MODEL.CCGR.ROUNDS.WORKERS", "0", "MODEL.CCGR.HEALTH.ENABLED", "False",
        "MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG",
        os.path.join(REPO, "configs", "demo", "ccgr_cls_mnv2_synthetic.yaml"),
        "MODEL.CCGR.ROUNDS.IS_CONFIG", os.path.join(REPO, "configs", "mask_rcnn_mnv2_fpn_synthetic.yaml"),
        "MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS", fast,
        "MODEL.CCGR.ROUNDS.IS_OPTS", fast + ["DATASETS.TEST", f"('{train_set}',)"],
        "MODEL.CCGR.ROUNDS.IS_SCORE_THRESHOLD", "0.0",
    ])  # fmt: skip


def _run(args, root, out):
    """One process's part: register the split, run the stages up to round 2's cues."""
    train_set = _register(root, args.images, args.sizes)
    cfg = _cfg(args, train_set, out)
    cfg.freeze()
    seed_stage(cfg.SEED)
    CCGRRounds(cfg).run(until="round2/cues")


def _folder_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _report(out, processes, images):
    rows = []
    for stage in STAGES:
        marker = os.path.join(out, stage, STAGE_FILE)
        if not os.path.isfile(marker):
            break
        with open(marker) as f:
            done = json.load(f)
        row = {"processes": processes, "stage": stage, "seconds": round(done["seconds"], 2)}
        if stage.split("/")[-1] in TRAINING:
            with open(os.path.join(out, stage, "config.yaml")) as f:
                iters = yaml.safe_load(f)["SOLVER"]["MAX_ITER"]
            row["iters_per_s"] = round(iters / done["seconds"], 3)
        else:
            row["images_per_s"] = round(images / done["seconds"], 3)
            serial = done.get("serial_seconds", 0.0)
            row["serial_seconds"] = round(serial, 3)
            row["serial_share"] = round(serial / done["seconds"], 4)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=32, help="synthetic training images")
    parser.add_argument("--iters", type=int, default=4, help="iterations of each training stage")
    parser.add_argument("--batch", type=int, default=4, help="SOLVER.IMS_PER_BATCH, all processes")
    parser.add_argument("--sizes", type=int, nargs=2, default=[128, 320], metavar=("MIN", "MAX"),
                        help="image height and width drawn in [MIN, MAX] (VOC: about 375 500)")
    parser.add_argument("--output", default="output/benchmark_ccgr_dist")
    args = parser.parse_args()
    for n in args.processes:
        if n < 1 or args.batch % n:
            raise SystemExit(f"--processes {n}: must be >= 1 and divide --batch {args.batch}")
    if args.images < max(args.processes):
        raise SystemExit(f"--images {args.images}: fewer than --processes {max(args.processes)}")
    root = os.path.join(args.output, "data")
    # generated once here, not by several processes at once
    DatasetCatalog.get(_register(root, args.images, args.sizes))
    results = {"images": args.images, "sizes": args.sizes, "iters": args.iters, "batch": args.batch,
               "cpu_count": os.cpu_count(), "stages": []}  # fmt: skip
    for n in args.processes:
        out = os.path.join(args.output, f"p{n}")
        start = time.perf_counter()
        launch(_run, n, dist_url="auto", args=(args, root, out), device="cpu")
        for row in _report(out, n, args.images):
            print(json.dumps(row), flush=True)
            results["stages"].append(row)
        results[f"wall_seconds_p{n}"] = round(time.perf_counter() - start, 1)
    out = os.path.join(args.output, f"p{args.processes[0]}")
    name = _register(root, args.images, args.sizes)
    per_1000 = {
        "proposals": _folder_bytes(os.path.join(out, "proposals", f"{name}.pkl")),
        "round1_cues": _folder_bytes(os.path.join(out, "round1", "cues", "cues.pkl"))
        + _folder_bytes(os.path.join(out, "round1", "cues", "cues_sem_seg")),
        "pseudo_labels": _folder_bytes(
            os.path.join(out, "round1", "pseudo_labels", "pseudo_labels.json")
        ),
        "round2_cues": _folder_bytes(os.path.join(out, "round2", "cues", "cues.pkl"))
        + _folder_bytes(os.path.join(out, "round2", "cues", "cues_sem_seg")),
    }
    per_1000 = {k: int(v * 1000 / args.images) for k, v in per_1000.items()}
    results["bytes_per_1000_images"] = per_1000
    print(json.dumps({"bytes_per_1000_images": per_1000}))
    with open(os.path.join(args.output, "benchmark_ccgr_dist.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
