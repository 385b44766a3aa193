#!/usr/bin/env python
"""
Run a wsis_d2 model (LC / ILC, density counters, Mask R-CNN, ...) on images and save, per image,
one PNG with the instance masks (detectron2's Visualizer), the density heatmap with the peaks,
and the per-class counts; plus one ``counts.json`` with the counts of every image.

    python tools/demo.py --config-file configs/lc_r50.yaml --input img1.jpg "imgs/*.png" folder/ \
        --output out/ --opts MODEL.WEIGHTS model.pth MODEL.DEVICE cpu
    python tools/demo.py --config-file configs/demo/lc_mnv2_synthetic_demo.yaml \
        --dataset wsis_synth_val --num-images 6 --output out/ --opts MODEL.WEIGHTS model.pth
        # the first images of a registered dataset, with their true counts (pred/true)

Model outputs used (all optional, any model works):
    "instances": Instances with pred_masks / pred_boxes, scores, pred_classes;
    "counts": (C,) per-class counts (else: instances scoring >= --confidence-threshold);
    "density": (C, h, w) density maps over the whole image (resized for display);
    "peaks": (P, 3) rows (class, y, x) in pixel coordinates of the input image.
"""

import argparse
import glob
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import wsis_d2  # noqa: F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg
from wsis_d2.engine import check_device
from wsis_d2.evaluation.counting import load_count_ground_truth

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

logger = logging.getLogger("wsis_d2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="wsis_d2 demo: counts, density and instances")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, glob patterns or folders")
    source.add_argument(
        "--dataset",
        metavar="NAME",
        help="a registered dataset instead of --input: its first --num-images images, drawn with "
        "the true counts next to the predicted ones (pred/true)",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=6,
        help="how many images of --dataset (default 6)",
    )
    parser.add_argument("--output", required=True, help="output folder (PNGs + counts.json)")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        help="minimum score of the instances drawn (and counted when the model gives no counts); "
        "default 0.5, and for models that give counts (LC / ILC) the instances of the objects "
        "they counted",
    )
    parser.add_argument(
        "--density",
        choices=["sum", "per-class"],
        default="sum",
        help="one heatmap of the summed density maps, or one per class with a non-zero count",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides 'KEY VALUE' pairs"
    )
    return parser


def setup_cfg(args):
    cfg = get_wsis_cfg(args.config_file, args.opts)
    cfg.freeze()
    check_device(cfg.MODEL.DEVICE)
    return cfg


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """
    Image paths from files, glob patterns and folders (their images, not recursive), in the
    order given (sorted within a glob or folder), without duplicates.

    Raises:
        ValueError: a pattern that matches nothing.
    """
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not found:
            raise ValueError(f"--input {pattern!r}: no image file, folder or glob match")
        paths.extend(p for p in found if p not in paths)
    return paths


def class_names(metadata, num_classes: int) -> List[str]:
    """The dataset's thing_classes when they fit ``num_classes``, else "class0", "class1", ..."""
    names = getattr(metadata, "thing_classes", None) if metadata is not None else None
    if names is not None and len(names) == num_classes:
        return list(names)
    return [f"class{i}" for i in range(num_classes)]


def prediction_counts(
    predictions: Dict, num_classes: int, score_threshold: float
) -> Optional[np.ndarray]:
    """(C,) counts: the model's "counts", else the instances scoring >= the threshold per class;
    None when the model gives neither."""
    if "counts" in predictions:
        counts = predictions["counts"].detach().cpu().to(torch.float64).reshape(-1).numpy()
        return counts
    if "instances" in predictions:
        inst = predictions["instances"].to("cpu")
        classes = inst.pred_classes.numpy()
        if inst.has("scores"):
            classes = classes[inst.scores.numpy() >= score_threshold]
        return np.bincount(classes, minlength=num_classes).astype(np.float64)[:num_classes]
    return None


def num_classes_of(predictions: Dict, metadata) -> int:
    for key in ("counts", "density"):
        if key in predictions:
            return int(predictions[key].shape[0])
    names = getattr(metadata, "thing_classes", None) if metadata is not None else None
    if names is not None:
        return len(names)
    inst = predictions.get("instances")
    if inst is not None and len(inst) > 0:
        return int(inst.pred_classes.max()) + 1
    return 1


def heatmap_overlay(image_rgb: np.ndarray, density: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """
    Args:
        image_rgb: (H, W, 3) uint8.
        density: (h, w) map, resized bilinearly to (H, W) and scaled by its maximum (negative
            values shown as 0).

    Returns:
        (H, W, 3) uint8 RGB: the image blended with the JET colour map of the density.
    """
    h, w = image_rgb.shape[:2]
    d = density.detach().float().cpu()[None, None]
    d = F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp_min(0)
    peak = float(d.max())
    d = (d / peak if peak > 0 else d).numpy()
    colour = cv2.applyColorMap(np.uint8(np.round(d * 255)), cv2.COLORMAP_JET)[:, :, ::-1]
    return np.uint8(np.round((1 - alpha) * image_rgb + alpha * colour))


def draw_peaks(
    panel: np.ndarray, peaks: np.ndarray, classes: Optional[Sequence[int]] = None
) -> np.ndarray:
    """Draw (P, 3) peaks (class, y, x) as white-ringed black dots; only ``classes`` if given."""
    out = panel.copy()
    radius = max(2, round(min(panel.shape[:2]) / 100))
    for c, y, x in peaks:
        if classes is not None and int(c) not in classes:
            continue
        centre = (int(round(float(x))), int(round(float(y))))
        cv2.circle(out, centre, radius + 1, (255, 255, 255), -1, lineType=cv2.LINE_AA)
        cv2.circle(out, centre, radius, (0, 0, 0), -1, lineType=cv2.LINE_AA)
    return out


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    out = panel.copy()
    cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _format_count(v: float) -> str:
    return str(int(round(v))) if abs(v - round(v)) < 1e-6 else f"{v:.2f}"


def counts_strip(
    width: int,
    counts: Optional[np.ndarray],
    names: Sequence[str],
    true_counts: Optional[np.ndarray] = None,
) -> np.ndarray:
    """
    A white band listing "name: count" for the non-zero counts (several per line); with
    ``true_counts``, "name: predicted/true" for every class where either is non-zero.
    """
    if true_counts is not None:
        pred = np.zeros(len(true_counts)) if counts is None else counts
        items = [
            f"{names[c]}: {_format_count(p)}/{_format_count(t)}"
            for c, (p, t) in enumerate(zip(pred, true_counts))
            if p != 0 or t != 0
        ]
        items = ["predicted/true"] + (items or ["no objects"])
    elif counts is None:
        items = ["no counts"]
    else:
        items = [f"{names[c]}: {_format_count(v)}" for c, v in enumerate(counts) if v != 0]
        items = items or ["no objects counted"]
    lines, line = [], ""
    for item in items:
        candidate = f"{line}   {item}" if line else item
        if line and cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0] > width - 8:
            lines.append(line)
            candidate = item
        line = candidate
    lines.append(line)
    strip = np.full((8 + 20 * len(lines), width, 3), 255, dtype=np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(
            strip, text, (4, 20 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA
        )
    return strip


def _peaks_array(predictions: Dict) -> Optional[np.ndarray]:
    peaks = predictions.get("peaks")
    if peaks is None:
        return None
    peaks = torch.as_tensor(peaks).detach().cpu().to(torch.float64)
    if peaks.ndim != 2 or peaks.shape[1] != 3:
        logger.warning(f"ignoring 'peaks' of shape {tuple(peaks.shape)}: expected (P, 3)")
        return None
    return peaks.numpy()


def render(
    image_rgb: np.ndarray,
    predictions: Dict,
    names: Sequence[str],
    counts: Optional[np.ndarray],
    score_threshold: float = 0.5,
    density_mode: str = "sum",
    true_counts: Optional[np.ndarray] = None,
    counted_only: bool = False,
) -> np.ndarray:
    """
    One picture of a model's output on one image: [instances | density heatmap(s) + peaks] side
    by side above a band with the per-class counts (predicted/true when ``true_counts`` (C,) is
    given).

    Args:
        image_rgb: (H, W, 3) uint8 input image.
        predictions: the model output for it (see the module docstring).
        names: C class names.
        counts: (C,) counts shown in the band (None: "no counts").
        score_threshold: instances scoring less are not drawn.
        counted_only: draw only the instances of counted peaks (LC's "counted" field; the
            others are ``MODEL.LC.PRM.EXTRA_PEAKS``).
        density_mode: "sum" (one heatmap of Σ_c D^c) or "per-class" (one per class with a
            non-zero count, or with a peak when there are no counts).

    Returns:
        (H', W', 3) uint8 RGB.
    """
    meta = Metadata(name="wsis_d2_demo")
    meta.set(thing_classes=list(names))
    panels = []
    peaks = _peaks_array(predictions)

    if "instances" in predictions:
        inst = predictions["instances"].to("cpu")
        if inst.has("scores"):
            inst = inst[inst.scores >= score_threshold]
        if counted_only and inst.has("counted"):
            inst = inst[inst.counted]
        vis = Visualizer(image_rgb, meta).draw_instance_predictions(inst)
        panels.append(_label(vis.get_image(), f"instances ({len(inst)})"))
    if "density" in predictions:
        density = predictions["density"]
        if density_mode == "sum":
            heat = heatmap_overlay(image_rgb, density.sum(dim=0))
            if peaks is not None:
                heat = draw_peaks(heat, peaks)
            panels.append(_label(heat, "density (all classes)"))
        else:
            if counts is not None:
                shown = [c for c in range(density.shape[0]) if counts[c] != 0]
            else:
                shown = sorted({int(c) for c in peaks[:, 0]}) if peaks is not None else []
            for c in shown:
                heat = heatmap_overlay(image_rgb, density[c])
                if peaks is not None:
                    heat = draw_peaks(heat, peaks, [c])
                panels.append(_label(heat, f"density: {names[c]}"))
    elif peaks is not None:
        panels.append(_label(draw_peaks(image_rgb, peaks), "peaks"))
    if not panels:
        panels.append(image_rgb)
    top = np.concatenate(panels, axis=1)
    band = counts_strip(top.shape[1], counts, names, true_counts)
    return np.concatenate([top, band], axis=0)


def _output_name(path: str, used: set) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name + ".png"


def dataset_inputs(dataset_name: str, num_images: int) -> Tuple[List[str], List[np.ndarray]]:
    """
    The image files of the first ``num_images`` records of a registered dataset and their (C,)
    true counts (``class_counts``, else the non-crowd annotations per class).

    Raises:
        ValueError: an unknown dataset name, ``num_images`` < 1, or records without counts.
    """
    if dataset_name not in DatasetCatalog.list():
        raise ValueError(
            f"--dataset {dataset_name!r} is not registered (registered datasets with 'wsis' in "
            f"the name: {sorted(n for n in DatasetCatalog.list() if 'wsis' in n)})"
        )
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    # the split first: some registrations (a COCO json registered before it existed) fill
    # thing_classes, which load_count_ground_truth reads, only when it is loaded
    records = DatasetCatalog.get(dataset_name)
    gt = load_count_ground_truth(dataset_name)
    chosen = records[:num_images]
    return [r["file_name"] for r in chosen], [gt[r["image_id"]][1] for r in chosen]


def run_demo(
    cfg,
    inputs: Sequence[str],
    output: str,
    score_threshold: Optional[float] = None,
    density_mode: str = "sum",
    true_counts: Optional[Sequence[np.ndarray]] = None,
    metadata=None,
) -> Dict[str, Dict]:
    """
    Predict, render and save every image.

    Args:
        score_threshold: instances scoring less are not drawn (None: 0 when the model gives
            counts, else 0.5).
        true_counts: optional (C,) true counts per input file (``inputs`` are then files, in
            the same order), drawn next to the predicted counts and saved as "true_counts".
        metadata: the class names' source (default: the predictor's, i.e. DATASETS.TEST[0], else
            DATASETS.TRAIN[0]).

    Returns:
        what ``counts.json`` holds: ``{input path: {"counts": {class: count}, "num_instances",
        "output": png path[, "true_counts": {class: count}]}}``.
    """
    predictor = DefaultPredictor(cfg)
    if metadata is None:
        metadata = getattr(predictor, "metadata", None)
    if metadata is None and len(cfg.DATASETS.TRAIN):
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    os.makedirs(output, exist_ok=True)
    results: Dict[str, Dict] = {}
    used: set = set()
    paths = list(inputs) if true_counts is not None else expand_inputs(inputs)
    if true_counts is not None and len(true_counts) != len(paths):
        raise ValueError(f"{len(paths)} inputs but {len(true_counts)} true counts")
    for k, path in enumerate(paths):
        truth = None if true_counts is None else np.asarray(true_counts[k], dtype=np.float64)
        try:
            image_bgr = utils.read_image(path, format="BGR")
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(f"Cannot read image {path}: {e}") from e
        predictions = predictor(image_bgr)
        num_classes = num_classes_of(predictions, metadata)
        names = class_names(metadata, num_classes)
        threshold = score_threshold
        if threshold is None:
            threshold = 0.0 if "counts" in predictions else 0.5
        # by default a counting model's picture shows what it counted
        counted_only = score_threshold is None and "counts" in predictions
        counts = prediction_counts(predictions, num_classes, threshold)
        if truth is not None and len(truth) != num_classes:
            raise ValueError(
                f"{path}: the model gives {num_classes} classes, the dataset {len(truth)}"
            )
        picture = render(
            image_bgr[:, :, ::-1].copy(),
            predictions,
            names,
            counts,
            threshold,
            density_mode,
            truth,
            counted_only,
        )
        out_png = os.path.join(output, _output_name(path, used))
        cv2.imwrite(out_png, picture[:, :, ::-1])
        inst = predictions.get("instances")
        results[path] = {
            "counts": (
                None if counts is None else {n: float(v) for n, v in zip(names, counts.tolist())}
            ),
            "num_instances": 0 if inst is None else int(len(inst)),
            "output": out_png,
        }
        if truth is not None:
            results[path]["true_counts"] = {n: float(v) for n, v in zip(names, truth.tolist())}
        logger.info(f"{path}: {len(results[path]['counts'] or {})} classes -> {out_png}")
    with open(os.path.join(output, "counts.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def main(args) -> Dict[str, Dict]:
    setup_logger(name="wsis_d2")
    cfg = setup_cfg(args)
    if args.dataset:
        inputs, truth = dataset_inputs(args.dataset, args.num_images)
        metadata = MetadataCatalog.get(args.dataset)
    else:
        inputs, truth, metadata = args.input, None, None
    results = run_demo(
        cfg,
        inputs,
        args.output,
        args.confidence_threshold,
        args.density,
        true_counts=truth,
        metadata=metadata,
    )
    what = "instance masks, density heatmap with the peaks, counts"
    what += " predicted/true" if truth is not None else ""
    print(f"{len(results)} pictures ({what}) in {os.path.abspath(args.output)}/")
    return results


if __name__ == "__main__":
    main(get_parser().parse_args())
