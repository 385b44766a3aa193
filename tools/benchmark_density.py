#!/usr/bin/env python
"""
Benchmark of point-supervised density counting on the synthetic fluorescence cells: trains FCRN-A
and U-Net (configs/density_{fcrn_a,unet}_cells.yaml, their SOLVER schedules: bfloat16 autocast,
channels-last) on the 32 images of wsis_cells_train_32 with a fixed schedule sized for about 30
minutes in total on a 2-core CPU, fits each model's count calibration on its 32 training images
(``MODEL.DENSITY.CALIBRATION``), evaluates both on the 100 images of wsis_cells_test, and prints as
its last line one JSON object:

    {"mae_fcrn_a", "mae_unet", "mean_true_count", "rel_mae_fcrn_a", "rel_mae_unet",
     "baseline_mae" (predicting the mean training count), "img_per_s_inference" (U-Net, 256x256,
     batch 1, float32, all cores, measured after training), "mae_*_uncalibrated" (the same
     models without the calibration), "calibration_*" ([gain α, offset β per pixel]), ...}

The two models train at the same time in two child processes (``--jobs 2``) with one thread each
(``--threads``: CPU count / jobs), which uses a 2-core machine about twice as well as one process
with two threads for these small networks.

Usage:
    python tools/benchmark_density.py                  # the full schedule
    python tools/benchmark_density.py --iters 50       # quick check of the pipeline
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import (  # noqa: E402
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import hooks  # noqa: E402
from detectron2.evaluation import inference_on_dataset  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_lr_scheduler  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import wsis_d2  # noqa: E402, F401  (registers datasets and models)
from wsis_d2 import get_wsis_cfg  # noqa: E402
from wsis_d2.data.mappers.density_mapper import DensityDatasetMapper  # noqa: E402
from wsis_d2.evaluation import DensityEvaluator  # noqa: E402
from wsis_d2.engine import (  # noqa: E402
    build_calibration_loader,
    build_train_loop,
    calibrate_density_counts,
)
from wsis_d2.solver import build_optimizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "fcrn_a": "configs/density_fcrn_a_cells.yaml",
    "unet": "configs/density_unet_cells.yaml",
}


def build_cfg(config_file: str, args):
    """The model's config with the benchmark's data, device and (optionally) schedule."""
    cfg = get_wsis_cfg(os.path.join(ROOT, config_file), args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (args.train_set,)
    cfg.DATASETS.TEST = (args.test_set,)
    cfg.DATALOADER.NUM_WORKERS = args.workers
    iters = args.iters or cfg.SOLVER.MAX_ITER
    cfg.SOLVER.MAX_ITER = iters
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(iters // 10, 1))
    cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < iters)
    cfg.SEED = args.seed
    return cfg


def train(cfg, name: str = ""):
    """
    Train ``cfg`` for SOLVER.MAX_ITER iterations and fit its count calibration
    (``MODEL.DENSITY.CALIBRATION``) on the full training images; returns (model, seconds).
    """
    torch.manual_seed(cfg.SEED)
    np.random.seed(cfg.SEED)
    model = build_model(cfg)
    loader = build_detection_train_loader(cfg, mapper=DensityDatasetMapper(cfg, True))
    optimizer = build_optimizer(cfg, model)
    trainer = build_train_loop(cfg, model, loader, optimizer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer)),
            _LossPrinter(name, period=max(cfg.SOLVER.MAX_ITER // 10, 1)),
        ]
    )
    start = time.perf_counter()
    trainer.train(0, cfg.SOLVER.MAX_ITER)
    calib = calibrate_density_counts(
        model, build_calibration_loader(cfg), cfg.MODEL.DENSITY.CALIBRATION.MODE
    )
    if calib:
        print(
            f"  {name} count calibration on {calib['images']} training images: gain "
            f"{calib['gain'][0]:.4f}, offset {calib['offset'][0]:.3g} per pixel; their MAE "
            f"{calib['mae_before']:.2f} -> {calib['mae_after']:.2f}",
            flush=True,
        )
    return model, time.perf_counter() - start


class _LossPrinter(hooks.HookBase):
    def __init__(self, name: str, period: int):
        self._name = name
        self._period = period

    def after_step(self):
        it = self.trainer.iter + 1
        if it % self._period == 0 or it == self.trainer.max_iter:
            storage = self.trainer.storage
            loss = storage.history("total_loss").median(self._period)
            mae = storage.history("density/count_mae").median(self._period)
            print(
                f"  {self._name} iter {it}: loss {loss:.4f}, crop count MAE {mae:.2f}", flush=True
            )


def evaluate(cfg, model, output_dir: str):
    model.eval()
    loader = build_detection_test_loader(
        cfg, cfg.DATASETS.TEST[0], mapper=DensityDatasetMapper(cfg, False)
    )
    evaluator = DensityEvaluator(cfg.DATASETS.TEST[0], output_dir=output_dir, distributed=False)
    start = time.perf_counter()
    with torch.no_grad():
        results = inference_on_dataset(model, loader, evaluator)["density"]
    return results, time.perf_counter() - start


def inference_speed(model, num: int = 20) -> float:
    """Images per second of ``model`` on 256x256 images, batch 1 (after 3 warm-up runs)."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, 256, 256), generator=gen, dtype=torch.uint8) for _ in range(num)
    ]
    with torch.no_grad():
        for img in images[:3]:
            model([{"image": img}])
        start = time.perf_counter()
        for img in images:
            model([{"image": img}])
    return num / (time.perf_counter() - start)


def save_example(cfg, model, path: str):
    """Figure: a test image with its true points, the target density and the predicted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
    inp = DensityDatasetMapper(cfg, False)(record)
    model.eval()
    with torch.no_grad():
        out = model([inp])[0]
    points = torch.as_tensor(record["points"])
    target = model.target_density(points, None, (record["height"], record["width"]))[0]
    image = inp["image"].permute(1, 2, 0).numpy()[:, :, ::-1]  # BGR -> RGB
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    axes[0].imshow(image)
    axes[0].scatter(points[:, 0] - 0.5, points[:, 1] - 0.5, s=4, c="red")
    axes[0].set_title(f"synthetic cells, {len(points)} points")
    vmax = float(target.max())
    axes[1].imshow(target.numpy(), cmap="magma", vmin=0, vmax=vmax)
    axes[1].set_title(f"target density, sigma={model.sigma:g} (sum {float(target.sum()):.1f})")
    axes[2].imshow(out["density"][0].numpy(), cmap="magma", vmin=0, vmax=vmax)
    axes[2].set_title(f"U-Net density (sum {float(out['counts'][0]):.1f})")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_one(name: str, args) -> Dict:
    """Train, save and evaluate one model in this process; returns its part of the summary."""
    cfg = build_cfg(MODELS[name], args)
    iters = cfg.SOLVER.MAX_ITER
    print(f"{name}: training {iters} iterations ({MODELS[name]})", flush=True)
    model, train_s = train(cfg, name)
    out_dir = os.path.join(args.output_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, "model_final.pth"))
    results, eval_s = evaluate(cfg, model, out_dir)
    print(
        f"{name}: train {train_s:.0f}s, eval {eval_s:.0f}s; "
        + ", ".join(f"{k} {v:.3f}" for k, v in results.items()),
        flush=True,
    )
    extra = {}
    if cfg.MODEL.DENSITY.CALIBRATION.MODE != "none":
        # the same model without its calibration, for comparison
        gain, offset = model.count_gain.clone(), model.count_offset.clone()
        model.set_count_calibration(1.0, 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            raw, _ = evaluate(cfg, model, tmp)
        model.set_count_calibration(gain, offset)
        extra = {
            f"mae_{name}_uncalibrated": raw["MAE"],
            f"calibration_{name}": [float(gain[0]), float(offset[0])],
        }
    return {
        f"mae_{name}": results["MAE"],
        f"rmse_{name}": results["RMSE"],
        f"game3_{name}": results["GAME3"],
        f"train_s_{name}": round(train_s, 1),
        f"iters_{name}": iters,
        **extra,
    }


def _worker_command(name: str, args, result_json: str) -> List[str]:
    """This script, run for one model in a child process (same data, schedule and overrides)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--result-json",
        result_json,
    ]
    cmd += ["--train-set", args.train_set, "--test-set", args.test_set]
    cmd += ["--threads", str(args.threads), "--workers", str(args.workers)]
    cmd += ["--seed", str(args.seed), "--output-dir", args.output_dir]
    if args.iters:
        cmd += ["--iters", str(args.iters)]
    return cmd + list(args.opts)


def run_parallel(names: List[str], args) -> Dict:
    """
    Train the models in up to ``args.jobs`` child processes at once (each with ``args.threads``
    threads); returns the merged summaries. A failing child stops the benchmark with its exit code.
    """
    summary: Dict = {}
    pending = list(names)
    running = []
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                result_json = os.path.join(tmp, f"{name}.json")
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                proc = subprocess.Popen(_worker_command(name, args, result_json), env=env)
                running.append((name, proc, result_json))
            time.sleep(1.0)
            for item in list(running):
                name, proc, result_json = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    for _, other, _ in running:
                        other.terminate()
                    raise SystemExit(f"{name}: training failed with exit code {proc.returncode}")
                with open(result_json) as f:
                    summary.update(json.load(f))
    return summary


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="override SOLVER.MAX_ITER of both configs"
    )
    parser.add_argument("--models", default="fcrn_a,unet")
    parser.add_argument("--train-set", default="wsis_cells_train_32")
    parser.add_argument("--test-set", default="wsis_cells_test")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="models trained at once, each in its own process (1: one after the other, in-process)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per training process (0: the CPU count divided by --jobs)",
    )
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="output/benchmark_density")
    parser.add_argument("--example", default="", help="save an example figure (U-Net) here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result-json", default="", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    cpus = os.cpu_count() or 1
    if args.threads <= 0:
        args.threads = max(cpus // min(args.jobs, len(names)), 1)

    for name in ("wsis_d2", "detectron2"):
        setup_logger(name=name)
        logging.getLogger(name).setLevel(logging.WARNING)

    if args.worker:  # child process of run_parallel
        torch.set_num_threads(args.threads)
        with open(args.result_json, "w") as f:
            json.dump(run_one(args.worker, args), f)
        return

    total_start = time.perf_counter()
    # generates the synthetic splits on first use, before any child process reads them
    train_counts = [len(r["points"]) for r in DatasetCatalog.get(args.train_set)]
    test_counts = np.asarray([len(r["points"]) for r in DatasetCatalog.get(args.test_set)], float)
    baseline = float(np.abs(test_counts - np.mean(train_counts)).mean())
    mean_true = float(test_counts.mean())
    print(
        f"train {args.train_set}: {len(train_counts)} images, mean count {np.mean(train_counts):.1f}; "
        f"test {args.test_set}: {len(test_counts)} images, mean count {mean_true:.1f}; "
        f"{min(args.jobs, len(names))} training process(es) of {args.threads} thread(s)",
        flush=True,
    )

    if args.jobs > 1 and len(names) > 1:
        summary = run_parallel(names, args)
    else:
        torch.set_num_threads(args.threads)
        summary = {}
        for name in names:
            summary.update(run_one(name, args))
    for name in names:
        summary[f"rel_mae_{name}"] = summary[f"mae_{name}"] / mean_true
    if "unet" in names:
        # inference speed alone on the machine, all cores, float32, from the saved weights
        torch.set_num_threads(cpus)
        cfg = build_cfg(MODELS["unet"], args)
        model = build_model(cfg)
        state = torch.load(os.path.join(args.output_dir, "unet", "model_final.pth"))
        model.load_state_dict(state)
        summary["img_per_s_inference"] = inference_speed(model)
        summary["inference_threads"] = cpus
        if args.example:
            save_example(cfg, model, args.example)
    summary["mean_true_count"] = mean_true
    summary["baseline_mae"] = baseline
    summary["total_s"] = round(time.perf_counter() - total_start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
