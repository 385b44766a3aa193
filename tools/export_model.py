#!/usr/bin/env python
"""
Export a trained model to TorchScript or ONNX (detectron2's ``TracingAdapter``) and check the file
against the PyTorch model on real images:

    .venv/bin/python tools/export_model.py --config-file <cfg> --weights <model.pth> \
        --format {torchscript,onnx} --output <dir> --images a.png b.png [--opts KEY VALUE ...]

Exports the density models (FCRN-A, FCRN-B, U-Net: image → density map, counts), LC / ILC
(image → counts, density maps, class probabilities; not its PRM instance masks, which need a
backward pass at inference) and CCGR's IS branch (the stock Mask R-CNN, as detectron2 exports it:
boxes, scores, classes and 28×28 mask probabilities before the paste into the image). The model
is traced on the first image; every image (read and resized as ``DefaultPredictor`` does) then
runs through both, and the script prints, per image, the largest absolute difference of each
output and the median CPU latency of both, and writes them to ``<dir>/export_check.json``.
It exits with status 1 when a difference exceeds ``--tolerance`` × max(1, the output's largest
|value|).
"""

import argparse
import json
import os
import sys

import torch

import detectron2.data.transforms as T
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import detection_utils as utils
from detectron2.modeling import GeneralizedRCNN, build_model

import wsis_d2  # noqa: F401  (registers the meta-architectures and backbones)
from wsis_d2 import get_wsis_cfg
from wsis_d2.lc.meta_arch import ImageLevelCounter
from wsis_d2.export import (
    FORMATS,
    METHODS,
    compare_outputs,
    export_model,
    lc_counting_vs_model,
    load_exported,
    median_seconds,
    reference_outputs,
)


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", default="", help="checkpoint (.pth); none: random init")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="tracing",
        help="scripting: a Mask R-CNN with detectron2's own backbones, to TorchScript",
    )
    parser.add_argument("--output", required=True, help="folder for the exported model")
    parser.add_argument("--images", nargs="+", required=True, help="images to check on")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed difference of an output, relative to max(1, its largest |value|)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per image and model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both models")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE pairs")
    return parser


def load_image(cfg, path: str) -> torch.Tensor:
    """(3, H, W) float32 in cfg.INPUT.FORMAT, resized as DefaultPredictor does."""
    if not os.path.isfile(path):
        raise ValueError(f"--images: {path!r} is not a file")
    image = utils.read_image(path, format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1).copy())


def _summary(path, image, fmt, row, diffs) -> str:
    """One line per image: the output furthest from PyTorch (relative to max(1, |value|); another
    shape counts as infinitely far) and both latencies."""

    def distance(name):
        diff, scale = diffs[name]
        return float("inf") if diff != diff else diff / max(1.0, scale)

    line = f"{os.path.basename(path)} {tuple(image.shape[1:])}: largest difference "
    if diffs:
        worst = max(diffs, key=distance)
        line += f"{diffs[worst][0]:.3g} in {worst} (|value| <= {diffs[worst][1]:.3g})"
    line += f", PyTorch {row['pytorch_ms']:.1f} ms, {fmt} {row['exported_ms']:.1f} ms"
    if "detections" in row:
        line += f", {row['detections']} detections"
    if "vs_model_inference" in row:
        line += f", vs inference_single {row['vs_model_inference']}"
    return line


def main(args) -> dict:
    if not os.path.isfile(args.config_file):
        raise ValueError(f"--config-file {args.config_file!r} does not exist")
    if args.weights and not os.path.isfile(args.weights):
        raise ValueError(f"--weights {args.weights!r} does not exist")
    if args.runs < 1 or args.threads < 1 or not args.tolerance >= 0:
        raise ValueError(
            f"--runs and --threads must be >= 1 and --tolerance >= 0, got {args.runs}, "
            f"{args.threads}, {args.tolerance}"
        )
    cfg = get_wsis_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    cfg.MODEL.WEIGHTS = args.weights
    images = [load_image(cfg, p) for p in args.images]
    torch.set_num_threads(args.threads)
    model = build_model(cfg)
    if args.weights:
        DetectionCheckpointer(model).load(args.weights)
    model.eval()
    exported = export_model(model, images[0], args.format, args.output, args.method)
    run = load_exported(
        exported.path, args.format, args.threads, exported.method, exported.output_names
    )
    report = {
        "model": type(model).__name__,
        "format": args.format,
        "method": args.method,
        "file": exported.path,
        "outputs": exported.output_names,
        "images": [],
    }
    for path, image in zip(args.images, images):
        ref = reference_outputs(exported, image)
        diffs = compare_outputs(exported.output_names, ref, run(image))
        row = {
            "image": path,
            "size": list(image.shape[1:]),
            "max_abs_diff": {k: d for k, (d, _) in diffs.items()},
            "max_abs_value": {k: s for k, (_, s) in diffs.items()},
            "pytorch_ms": 1e3
            * median_seconds(lambda: reference_outputs(exported, image), args.runs),
            "exported_ms": 1e3 * median_seconds(lambda: run(image), args.runs),
        }
        # NaN (another shape) fails too
        row["ok"] = all(d <= args.tolerance * max(1.0, s) for d, s in diffs.values())
        if isinstance(model, GeneralizedRCNN):
            row["detections"] = int(ref[exported.output_names.index("instances.scores")].numel())
        if isinstance(model, ImageLevelCounter):
            # the exported counting part is a re-statement of inference_single: check it too
            row["vs_model_inference"] = lc_counting_vs_model(model, image)
            row["ok"] = row["ok"] and max(row["vs_model_inference"].values()) <= args.tolerance
        report["images"].append(row)
        print(_summary(path, image, args.format, row, diffs))
    report["max_abs_diff"] = max(
        (d for r in report["images"] for d in r["max_abs_diff"].values()), default=0.0
    )
    report["ok"] = all(r["ok"] for r in report["images"])
    with open(os.path.join(args.output, "export_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"{exported.path}: outputs {exported.output_names}; "
        + ("all within" if report["ok"] else "NOT all within")
        + f" {args.tolerance} x max(1, |value|)"
    )
    return report


if __name__ == "__main__":
    result = main(argument_parser().parse_args())
    sys.exit(0 if result["ok"] else 1)
