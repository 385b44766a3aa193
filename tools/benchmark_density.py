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

``--dataset vgg_cells`` runs the public VGG-cells protocol instead (Lempitsky & Zisserman 2010,
``<root>/vgg_cells/NNNcell.png`` + ``NNNdots.png``; ``--data-root``, default
``$DETECTRON2_DATASETS/vgg_cells``): for each of ``--draws`` random draws
(:func:`wsis_d2.data.datasets.point_datasets.vgg_cells_draw`, seeded by the draw's index) it
trains each model on N = ``--num-train`` images of the pool 1–100 with the configs
``configs/density_{fcrn_a,unet}_vgg_cells.yaml`` and tests on images 101–200. With ``--split
pool`` it tests on the pool images the draw left out instead: for choosing hyper-parameters
without looking at 101–200. The JSON line then has per draw and model ``mae_<model>_draw<d>``
(and the uncalibrated MAE, the training time) and over the draws ``mae_<model>_mean`` /
``mae_<model>_std`` (sample standard deviation, as the literature reports it).

Usage:
    python tools/benchmark_density.py                  # the full schedule
    python tools/benchmark_density.py --iters 50       # quick check of the pipeline
    DETECTRON2_DATASETS=../shared/datasets python tools/benchmark_density.py --dataset vgg_cells
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
    MetadataCatalog,
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
from wsis_d2.data.datasets.point_datasets import (  # noqa: E402
    VGG_CELLS_POOL,
    VGG_CELLS_TEST,
    load_vgg_cells,
    register_point_dataset,
    vgg_cells_draw,
)
from wsis_d2.density.mapper import DensityDatasetMapper  # noqa: E402
from wsis_d2.evaluation import DensityEvaluator  # noqa: E402
from wsis_d2.density.calibration import (  # noqa: E402
    build_calibration_loader,
    calibrate_density_counts,
)
from wsis_d2.engine import build_train_loop  # noqa: E402
from wsis_d2.solver import build_optimizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "fcrn_a": "configs/density_fcrn_a_cells.yaml",
    "unet": "configs/density_unet_cells.yaml",
}
VGG_MODELS = {
    "fcrn_a": "configs/density_fcrn_a_vgg_cells.yaml",
    "unet": "configs/density_unet_vgg_cells.yaml",
}


def vgg_root(args) -> str:
    """The VGG-cells folder, or SystemExit naming the path that is missing."""
    root = args.data_root or os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "vgg_cells"
    )
    if not os.path.isfile(os.path.join(root, "001cell.png")):
        raise SystemExit(
            f"VGG cells not found: {os.path.abspath(root)} has no 001cell.png. Get the 200 "
            "NNNcell.png / NNNdots.png pairs (datasets/README.md) and pass --data-root or set "
            "DETECTRON2_DATASETS to their parent folder."
        )
    return root


def register_vgg_draw(args, draw: int):
    """Registers this draw's training and test splits; returns their names."""
    root = vgg_root(args)
    train = vgg_cells_draw(args.num_train, draw)
    if args.split == "pool":
        test = [i for i in VGG_CELLS_POOL if i not in set(train)]
    else:
        test = list(VGG_CELLS_TEST)
    names = (
        f"vgg_cells_n{args.num_train}_draw{draw}_train",
        f"vgg_cells_n{args.num_train}_draw{draw}_{args.split}",
    )
    for name, indices in zip(names, (train, test)):
        if name not in DatasetCatalog.list():
            register_point_dataset(
                name, lambda i=indices: load_vgg_cells(root, i), thing_classes=["cell"]
            )
    return names


def tasks(args, names: List[str]) -> List[Dict]:
    """One training run per model (synthetic) or per (draw, model) (VGG cells)."""
    if args.dataset == "synthetic":
        return [
            {"model": n, "key": n, "config": MODELS[n], "train": args.train_set,
             "test": args.test_set}
            for n in names
        ]
    out = []
    for draw in range(args.first_draw, args.first_draw + args.draws):
        train, test = register_vgg_draw(args, draw)
        for n in names:
            out.append(
                {"model": n, "key": f"{n}_draw{draw}", "config": VGG_MODELS[n], "train": train,
                 "test": test, "draw": draw}
            )
    return out


def build_cfg(task: Dict, args):
    """The task's config with the benchmark's data, device and (optionally) schedule."""
    cfg = get_wsis_cfg(os.path.join(ROOT, task["config"]), args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (task["train"],)
    cfg.DATASETS.TEST = (task["test"],)
    cfg.DATALOADER.NUM_WORKERS = args.workers
    iters = args.iters or cfg.SOLVER.MAX_ITER
    cfg.SOLVER.MAX_ITER = iters
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(iters // 10, 1))
    cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < iters)
    cfg.SEED = args.seed + 1000 * task.get("draw", 0)
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


def refit(cfg, weights: str):
    """The model of an earlier run (``weights``) with its count calibration fitted again under
    this config's inference settings (e.g. ``MODEL.DENSITY.TEST_DIHEDRAL``)."""
    if not os.path.isfile(weights):
        raise SystemExit(f"--weights-from: no such file {weights}")
    model = build_model(cfg)
    model.load_state_dict(torch.load(weights))
    model.set_count_calibration(1.0, 0.0)
    calibrate_density_counts(
        model, build_calibration_loader(cfg), cfg.MODEL.DENSITY.CALIBRATION.MODE
    )
    return model


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
    target = model.targets.density(points, None, (record["height"], record["width"]))[0]
    image = inp["image"].permute(1, 2, 0).numpy()[:, :, ::-1]  # BGR -> RGB
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    axes[0].imshow(image)
    axes[0].scatter(points[:, 0] - 0.5, points[:, 1] - 0.5, s=4, c="red")
    axes[0].set_title(f"{cfg.DATASETS.TEST[0]}, {len(points)} points")
    vmax = float(target.max())
    axes[1].imshow(target.numpy(), cmap="magma", vmin=0, vmax=vmax)
    axes[1].set_title(f"target density, sigma={model.targets.sigma:g} (sum {float(target.sum()):.1f})")
    axes[2].imshow(out["density"][0].numpy(), cmap="magma", vmin=0, vmax=vmax)
    axes[2].set_title(f"U-Net density (sum {float(out['counts'][0]):.1f})")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_one(task: Dict, args) -> Dict:
    """Train, save and evaluate one task in this process; returns its part of the summary."""
    cfg = build_cfg(task, args)
    name, key = task["model"], task["key"]
    iters = cfg.SOLVER.MAX_ITER
    what = f"loading {args.weights_from}" if args.weights_from else f"training {iters} iterations"
    print(f"{key}: {what} ({task['config']}, {task['train']})", flush=True)
    out_dir = os.path.join(args.output_dir, key)
    os.makedirs(out_dir, exist_ok=True)
    if args.weights_from:
        model, train_s = refit(cfg, os.path.join(args.weights_from, key, "model_final.pth")), 0.0
    else:
        model, train_s = train(cfg, key)
    torch.save(model.state_dict(), os.path.join(out_dir, "model_final.pth"))
    results, eval_s = evaluate(cfg, model, out_dir)
    print(
        f"{key}: train {train_s:.0f}s, eval {eval_s:.0f}s on {task['test']}; "
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
            f"mae_{key}_uncalibrated": raw["MAE"],
            f"calibration_{key}": [float(gain[0]), float(offset[0])],
        }
    return {
        f"mae_{key}": results["MAE"],
        f"rmse_{key}": results["RMSE"],
        f"game3_{key}": results["GAME3"],
        f"train_s_{key}": round(train_s, 1),
        f"iters_{key}": iters,
        **extra,
    }


def _worker_command(task: Dict, args, result_json: str) -> List[str]:
    """This script, run for one task in a child process (same data, schedule and overrides)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        task["key"],
        "--result-json",
        result_json,
    ]
    cmd += ["--dataset", args.dataset, "--train-set", args.train_set, "--test-set", args.test_set]
    cmd += ["--num-train", str(args.num_train), "--split", args.split, "--models", args.models]
    cmd += ["--draws", str(args.draws), "--first-draw", str(args.first_draw)]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    cmd += ["--threads", str(args.threads), "--workers", str(args.workers)]
    cmd += ["--seed", str(args.seed), "--output-dir", args.output_dir]
    if args.iters:
        cmd += ["--iters", str(args.iters)]
    if args.weights_from:
        cmd += ["--weights-from", args.weights_from]
    return cmd + list(args.opts)


def run_parallel(todo: List[Dict], args) -> Dict:
    """
    Train the tasks in up to ``args.jobs`` child processes at once (each with ``args.threads``
    threads); returns the merged summaries. A failing child stops the benchmark with its exit code.
    """
    summary: Dict = {}
    pending = list(todo)
    running = []
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and len(running) < args.jobs:
                task = pending.pop(0)
                result_json = os.path.join(tmp, f"{task['key']}.json")
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                proc = subprocess.Popen(_worker_command(task, args, result_json), env=env)
                running.append((task["key"], proc, result_json))
            time.sleep(1.0)
            for item in list(running):
                key, proc, result_json = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    for _, other, _ in running:
                        other.terminate()
                    raise SystemExit(f"{key}: training failed with exit code {proc.returncode}")
                with open(result_json) as f:
                    summary.update(json.load(f))
    return summary


def _split_counts(name: str) -> np.ndarray:
    return np.asarray([len(r["points"]) for r in DatasetCatalog.get(name)], float)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="override SOLVER.MAX_ITER of both configs"
    )
    parser.add_argument("--models", default="fcrn_a,unet")
    parser.add_argument(
        "--dataset",
        choices=("synthetic", "vgg_cells"),
        default="synthetic",
        help="synthetic: --train-set / --test-set; vgg_cells: the public protocol (draws)",
    )
    parser.add_argument("--train-set", default="wsis_cells_train_32")
    parser.add_argument("--test-set", default="wsis_cells_test")
    parser.add_argument(
        "--data-root", default="", help="vgg_cells: the folder of NNNcell.png / NNNdots.png"
    )
    parser.add_argument("--num-train", type=int, default=32, help="vgg_cells: N, images per draw")
    parser.add_argument("--draws", type=int, default=3, help="vgg_cells: random draws")
    parser.add_argument("--first-draw", type=int, default=0, help="vgg_cells: index of the first")
    parser.add_argument(
        "--split",
        choices=("test", "pool"),
        default="test",
        help="vgg_cells: test on 101-200 (test) or on the pool images left out by the draw (pool)",
    )
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
    parser.add_argument("--output-dir", default="")
    parser.add_argument("--example", default="", help="save an example figure (U-Net) here")
    parser.add_argument(
        "--weights-from",
        default="",
        help="no training: evaluate the models an earlier run wrote to this --output-dir (count "
        "calibration fitted again), e.g. with other inference options",
    )
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
    if args.draws < 1 or args.first_draw < 0:
        parser.error("--draws must be >= 1 and --first-draw >= 0")
    if not args.output_dir:
        args.output_dir = (
            "output/benchmark_density" if args.dataset == "synthetic"
            else f"output/benchmark_density_vgg_n{args.num_train}_{args.split}"
        )
    cpus = os.cpu_count() or 1
    todo = tasks(args, names)
    if args.threads <= 0:
        args.threads = max(cpus // min(args.jobs, len(todo)), 1)

    for name in ("wsis_d2", "detectron2"):
        setup_logger(name=name)
        logging.getLogger(name).setLevel(logging.WARNING)

    if args.worker:  # child process of run_parallel
        torch.set_num_threads(args.threads)
        (task,) = [t for t in todo if t["key"] == args.worker]
        with open(args.result_json, "w") as f:
            json.dump(run_one(task, args), f)
        return

    total_start = time.perf_counter()
    # generates the synthetic splits on first use, before any child process reads them
    summary = {"dataset": args.dataset}
    for task in todo:
        if task["model"] == names[0]:  # once per pair of splits
            train_counts, test_counts = _split_counts(task["train"]), _split_counts(task["test"])
            print(
                f"train {task['train']}: {len(train_counts)} images, mean count "
                f"{train_counts.mean():.1f}; test {task['test']}: {len(test_counts)} images, "
                f"mean count {test_counts.mean():.1f}",
                flush=True,
            )
            suffix = f"_draw{task['draw']}" if "draw" in task else ""
            summary[f"baseline_mae{suffix}"] = float(
                np.abs(test_counts - train_counts.mean()).mean()
            )
            summary[f"mean_true_count{suffix}"] = float(test_counts.mean())
    print(
        f"{len(todo)} training run(s), {min(args.jobs, len(todo))} at a time, "
        f"{args.threads} thread(s) each",
        flush=True,
    )

    if args.jobs > 1 and len(todo) > 1:
        summary.update(run_parallel(todo, args))
    else:
        torch.set_num_threads(args.threads)
        for task in todo:
            summary.update(run_one(task, args))
    if args.dataset == "synthetic":
        for name in names:
            summary[f"rel_mae_{name}"] = summary[f"mae_{name}"] / summary["mean_true_count"]
    else:
        summary.update(num_train=args.num_train, split=args.split, draws=args.draws)
        for name in names:
            maes = [summary[f"mae_{t['key']}"] for t in todo if t["model"] == name]
            summary[f"mae_{name}_mean"] = float(np.mean(maes))
            summary[f"mae_{name}_std"] = float(np.std(maes, ddof=1)) if len(maes) > 1 else 0.0
            times = [summary[f"train_s_{t['key']}"] for t in todo if t["model"] == name]
            summary[f"train_s_{name}_max"] = max(times)
    if "unet" in names:
        # inference speed alone on the machine, all cores, float32, from the saved weights
        torch.set_num_threads(cpus)
        task = [t for t in todo if t["model"] == "unet"][0]
        cfg = build_cfg(task, args)
        model = build_model(cfg)
        state = torch.load(os.path.join(args.output_dir, task["key"], "model_final.pth"))
        model.load_state_dict(state)
        summary["img_per_s_inference"] = inference_speed(model)
        summary["inference_threads"] = cpus
        if args.example:
            save_example(cfg, model, args.example)
    summary["total_s"] = round(time.perf_counter() - total_start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
