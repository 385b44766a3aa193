"""
Counting metrics of "Counting everyday objects in everyday scenes" (Chattopadhyay et al.,
CVPR 2017), used by LC / ILC (Cholakkal et al., CVPR 2019): mRMSE, mRMSE-nz, m-relRMSE,
m-relRMSE-nz and MAE.
"""

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..data.datasets.metadata import thing_classes_of
from .gather import gather_predictions
from .gt_cache import cached_ground_truth

__all__ = ["CountingEvaluator", "counting_metrics", "load_count_ground_truth"]

logger = logging.getLogger(__name__)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def counting_metrics(pred: np.ndarray, gt: np.ndarray) -> Dict[str, object]:
    """
    Per-class and mean counting errors over N images and C classes, with ĉ_ic the predicted and
    c_ic the true count of class c in image i:

        RMSE_c        = sqrt( 1/N sum_i (ĉ_ic - c_ic)^2 )
        relRMSE_c     = sqrt( 1/N sum_i (ĉ_ic - c_ic)^2 / (c_ic + 1) )
        RMSE-nz_c     = RMSE_c restricted to the images with c_ic > 0
        relRMSE-nz_c  = relRMSE_c restricted to the images with c_ic > 0
        MAE_c         = 1/N sum_i |ĉ_ic - c_ic|

    mRMSE, m_relRMSE and MAE average over all C classes; mRMSE_nz and m_relRMSE_nz over the classes
    with at least one image where c_ic > 0 (the others are NaN per class and left out). Predictions
    are used as given (no rounding).

    Args:
        pred: (N, C) predicted counts.
        gt: (N, C) ground-truth counts, >= 0.

    Returns:
        dict with floats "mRMSE", "mRMSE_nz", "m_relRMSE", "m_relRMSE_nz", "MAE" and (C,) float64
        arrays "RMSE_c", "RMSE_nz_c", "relRMSE_c", "relRMSE_nz_c", "MAE_c".
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(
            f"counting_metrics: 'pred' and 'gt' must both be (N, C), got {pred.shape} and "
            f"{gt.shape}"
        )
    if pred.shape[0] == 0:
        raise ValueError("counting_metrics: no images (N = 0)")
    if not np.isfinite(pred).all():
        raise ValueError("counting_metrics: 'pred' contains NaN or inf")
    if (gt < 0).any() or not np.isfinite(gt).all():
        raise ValueError("counting_metrics: 'gt' must be finite and >= 0")

    sq_err = (pred - gt) ** 2
    rel_sq_err = sq_err / (gt + 1.0)
    nonzero = gt > 0
    num_nonzero = nonzero.sum(axis=0)
    has_nonzero = num_nonzero > 0
    safe_den = np.maximum(num_nonzero, 1)

    rmse = np.sqrt(sq_err.mean(axis=0))
    rel_rmse = np.sqrt(rel_sq_err.mean(axis=0))
    rmse_nz = np.where(has_nonzero, np.sqrt((sq_err * nonzero).sum(axis=0) / safe_den), np.nan)
    rel_rmse_nz = np.where(
        has_nonzero, np.sqrt((rel_sq_err * nonzero).sum(axis=0) / safe_den), np.nan
    )
    mae = np.abs(pred - gt).mean(axis=0)
    return {
        "mRMSE": float(rmse.mean()),
        "mRMSE_nz": _nanmean(rmse_nz),
        "m_relRMSE": float(rel_rmse.mean()),
        "m_relRMSE_nz": _nanmean(rel_rmse_nz),
        "MAE": float(mae.mean()),
        "RMSE_c": rmse,
        "RMSE_nz_c": rmse_nz,
        "relRMSE_c": rel_rmse,
        "relRMSE_nz_c": rel_rmse_nz,
        "MAE_c": mae,
    }


def load_count_ground_truth(dataset_name: str) -> Dict[object, tuple]:
    """
    Per-image GT counts of a registered dataset: ``class_counts`` when present, otherwise the number
    of non-crowd annotations per ``category_id``.

    Args:
        dataset_name: a name registered in DatasetCatalog whose metadata has ``thing_classes``.

    Returns:
        {image_id: (index in the dataset, (C,) float64 counts)}.
    """
    num_classes = len(thing_classes_of(dataset_name))
    gt = {}
    for index, record in enumerate(DatasetCatalog.get(dataset_name)):
        where = f"dataset '{dataset_name}', file {record.get('file_name', '?')}"
        if "image_id" not in record:
            raise ValueError(f"{where}: missing field 'image_id'")
        if "class_counts" in record:
            counts = np.asarray(record["class_counts"], dtype=np.float64).reshape(-1)
            if counts.shape != (num_classes,) or (counts < 0).any():
                raise ValueError(
                    f"{where}: 'class_counts' must hold {num_classes} non-negative numbers, "
                    f"got {record['class_counts']}"
                )
        elif "annotations" in record:
            counts = np.zeros(num_classes, dtype=np.float64)
            for k, ann in enumerate(record["annotations"]):
                if ann.get("iscrowd", 0):
                    continue
                cls = int(ann["category_id"])
                if not 0 <= cls < num_classes:
                    raise ValueError(
                        f"{where}, annotation {k}: 'category_id' {cls} outside "
                        f"[0, {num_classes - 1}]"
                    )
                counts[cls] += 1
        else:
            raise ValueError(f"{where}: neither 'class_counts' nor 'annotations' is present")
        if record["image_id"] in gt:
            raise ValueError(f"{where}: duplicate 'image_id' {record['image_id']!r}")
        gt[record["image_id"]] = (index, counts)
    return gt


class CountingEvaluator(DatasetEvaluator):
    """
    Counting errors (see :func:`counting_metrics`) of per-image predicted counts
    ``outputs[i]["counts"]`` (C,) against the dataset's GT counts. Results under the task
    "counting": "mRMSE", "mRMSE_nz", "m_relRMSE", "m_relRMSE_nz", "MAE" and "MAE/<class>".
    The evaluated set is the set of images passed to :meth:`process`.

    With ``baseline_dataset`` (e.g. the training split) the results add "baseline_mRMSE", the
    mRMSE of predicting every evaluated image with that dataset's mean count of each class, and
    "mRMSE/baseline", the ratio of the two (the LC paper's yardstick).
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        baseline_dataset: Optional[str] = None,
    ):
        """
        Args:
            dataset_name: registered dataset; GT is read from ``DatasetCatalog.get(dataset_name)``.
            distributed: gather predictions from all ranks; only the main process returns results.
            output_dir: if given, all per-class metrics go to ``output_dir/counting.json``.
            baseline_dataset: optional registered dataset with the same classes whose mean
                per-class counts make the baseline (read once, at the first evaluation).
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._class_names = thing_classes_of(dataset_name)
        if baseline_dataset is not None:
            names = thing_classes_of(baseline_dataset, required=False)
            if names is None or list(names) != self._class_names:
                raise ValueError(
                    f"CountingEvaluator: baseline dataset '{baseline_dataset}' has classes "
                    f"{names}, dataset '{dataset_name}' {self._class_names}"
                )
        self._baseline_dataset = baseline_dataset
        self._baseline_counts = None  # (C,) mean counts, loaded lazily
        self._gt = None  # loaded lazily, on the main process only
        self.num_examples = 5  # images whose predicted and true counts are logged
        self.reset()

    def reset(self):
        self._predictions = []
        self._warned_missing = False

    def process(self, inputs, outputs):
        """
        Args:
            inputs: list of dataset dicts, each with "image_id".
            outputs: list of dicts with "counts": (C,) tensor of predicted counts.
        """
        for inp, out in zip(inputs, outputs):
            if "counts" not in out:
                if not self._warned_missing:
                    logger.warning(
                        "CountingEvaluator: a model output has no 'counts'; such outputs are "
                        "skipped and their images left out of the evaluated set."
                    )
                    self._warned_missing = True
                continue
            if "image_id" not in inp:
                raise ValueError(
                    f"CountingEvaluator: input {inp.get('file_name', '?')} has no field 'image_id'"
                )
            counts = out["counts"]
            if isinstance(counts, torch.Tensor):
                counts = counts.detach().to("cpu", torch.float64).numpy()
            counts = np.asarray(counts, dtype=np.float64).reshape(-1)
            if counts.shape != (len(self._class_names),):
                raise ValueError(
                    f"CountingEvaluator: 'counts' of image_id {inp['image_id']!r} has shape "
                    f"{counts.shape}, expected ({len(self._class_names)},)"
                )
            if not np.isfinite(counts).all():
                raise ValueError(
                    f"CountingEvaluator: 'counts' of image_id {inp['image_id']!r} "
                    f"({inp.get('file_name', '?')}) must be finite, got {counts.tolist()}"
                )
            self._predictions.append((inp["image_id"], counts))

    def _examples_table(self, image_ids, pred, gt) -> str:
        """Predicted vs true counts ("pred/true" per class with either > 0) of the first images."""
        lines = [f"Counts of the first {min(self.num_examples, len(image_ids))} images (pred/true):"]
        for k in range(min(self.num_examples, len(image_ids))):
            cells = [
                f"{name} {pred[k, c]:g}/{gt[k, c]:g}"
                for c, name in enumerate(self._class_names)
                if pred[k, c] > 0 or gt[k, c] > 0
            ]
            lines.append(f"  image {image_ids[k]}: " + (", ".join(cells) or "none"))
        return "\n".join(lines)

    def _mean_counts_of_baseline(self) -> np.ndarray:
        """(C,) mean count of each class over the baseline dataset's images."""
        train = load_count_ground_truth(self._baseline_dataset)
        return np.mean([c for _, c in train.values()], axis=0)

    def evaluate(self):
        predictions = gather_predictions(self._predictions, self._distributed)
        if predictions is None:  # not the main process
            return {}
        if len(predictions) == 0:
            logger.warning("CountingEvaluator: no predictions were processed.")
            return {}
        if self._gt is None:
            self._gt = cached_ground_truth(
                "counts", self._dataset_name, lambda: load_count_ground_truth(self._dataset_name)
            )

        unique = {}
        for image_id, counts in predictions:
            if image_id not in self._gt:
                raise ValueError(
                    f"CountingEvaluator: image_id {image_id!r} is not in dataset "
                    f"'{self._dataset_name}'"
                )
            unique.setdefault(image_id, counts)
        if len(unique) < len(predictions):
            logger.warning(
                f"CountingEvaluator: {len(predictions) - len(unique)} duplicate image(s) "
                "were evaluated once."
            )
        image_ids = sorted(unique, key=lambda i: self._gt[i][0])
        pred = np.stack([unique[i] for i in image_ids])
        gt = np.stack([self._gt[i][1] for i in image_ids])
        metrics = counting_metrics(pred, gt)

        results = OrderedDict(
            (k, metrics[k]) for k in ("mRMSE", "mRMSE_nz", "m_relRMSE", "m_relRMSE_nz", "MAE")
        )
        if self._baseline_dataset is not None:
            if self._baseline_counts is None:
                self._baseline_counts = cached_ground_truth(
                    "mean_counts", self._baseline_dataset, self._mean_counts_of_baseline
                )
            baseline = np.repeat(self._baseline_counts[None], gt.shape[0], axis=0)
            results["baseline_mRMSE"] = counting_metrics(baseline, gt)["mRMSE"]
            results["mRMSE/baseline"] = (
                results["mRMSE"] / results["baseline_mRMSE"]
                if results["baseline_mRMSE"] > 0
                else float("nan")
            )
        for name, value in zip(self._class_names, metrics["MAE_c"]):
            results[f"MAE/{name}"] = float(value)
        logger.info(
            "Counting on '{}' ({} images):\n{}".format(
                self._dataset_name,
                len(image_ids),
                create_small_table(
                    {k: v for k, v in results.items() if "/" not in k or k == "mRMSE/baseline"}
                ),
            )
        )
        if self._baseline_dataset is not None:
            logger.info(
                f"mRMSE {results['mRMSE']:.3f} vs. {results['baseline_mRMSE']:.3f} for the "
                f"baseline (each class's mean count in '{self._baseline_dataset}' for every "
                f"image): {results['mRMSE/baseline']:.2f} x baseline"
            )
        logger.info(self._examples_table(image_ids, pred, gt))
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            per_class = {
                key: {n: float(v) for n, v in zip(self._class_names, metrics[key])}
                for key in ("RMSE_c", "RMSE_nz_c", "relRMSE_c", "relRMSE_nz_c", "MAE_c")
            }
            with PathManager.open(os.path.join(self._output_dir, "counting.json"), "w") as f:
                json.dump({"results": results, "per_class": per_class}, f, indent=2)
        return OrderedDict({"counting": results})
