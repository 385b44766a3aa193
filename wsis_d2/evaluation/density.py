"""
Counting metrics of density maps against point annotations: MAE, RMSE, mean relative error and the
Grid Average Mean absolute Error GAME(L) of Guerrero-Gómez-Olmedo et al. ("Extremely overlapping
vehicle counting", IbPRIA 2015), plus plots (true-vs-predicted scatter, density overlays).
"""

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..utils.checks import check_array, check_finite, check_number
from .gather import gather_predictions
from .gt_cache import cached_ground_truth

__all__ = ["DensityEvaluator", "game", "count_errors", "GAME_LEVELS"]

logger = logging.getLogger(__name__)

GAME_LEVELS = (0, 1, 2, 3)


def _grid_edges(length: int, cells: int) -> np.ndarray:
    """Integer pixel edges of ``cells`` near-equal cells along an axis of ``length`` pixels."""
    return np.round(np.linspace(0, length, cells + 1)).astype(np.int64)


def game(
    density: np.ndarray,
    points: np.ndarray,
    level: int,
    classes: Optional[np.ndarray] = None,
) -> float:
    """
    GAME(L) of one image: split it into a 2^L x 2^L grid (4^L cells, edges rounded to pixels) and sum
    the absolute count errors over the cells,

        GAME_L = 1/C Σ_c Σ_{k=1}^{4^L} |∫_{cell k} D̂_c − #{points of class c in cell k}|.

    GAME(0) is the absolute count error. A point at (x, y) belongs to the cell holding pixel
    (floor(y), floor(x)) (points on the far border go to the last cell).

    Args:
        density: (C, H, W) or (H, W) predicted density.
        points: (P, 2) true points x, y. level: L >= 0.
        classes: (P,) classes in 0..C-1 (None: all 0).

    Returns:
        the image's GAME(L), averaged over the C classes.
    """
    where = "game"
    density = np.asarray(density, dtype=np.float64)
    check_array("density", density, ndim=(2, 3), where=where)
    check_finite("density", density, where)
    check_number("level", int(level) if isinstance(level, np.integer) else level, low=0,
                 integer=True, where=where)  # fmt: skip
    if density.ndim == 2:
        density = density[None]
    num_classes, height, width = density.shape
    cells = 2**level
    row_edges, col_edges = _grid_edges(height, cells), _grid_edges(width, cells)
    # integral image: sums over [r0, r1) x [c0, c1) in O(1)
    integral = np.zeros((num_classes, height + 1, width + 1))
    integral[:, 1:, 1:] = density.cumsum(axis=1).cumsum(axis=2)
    r0, r1 = row_edges[:-1, None], row_edges[1:, None]
    c0, c1 = col_edges[None, :-1], col_edges[None, 1:]
    pred = (
        integral[:, r1, c1] - integral[:, r0, c1] - integral[:, r1, c0] + integral[:, r0, c0]
    )  # (C, cells, cells)

    true = np.zeros_like(pred)
    points = np.asarray(points, dtype=np.float64)
    if points.size:  # an empty list stands for no points
        check_array("points", points, (None, 2), where)
        check_finite("points", points, where)
    points = points.reshape(-1, 2)
    if classes is not None:
        classes = np.asarray(classes)
        check_array("classes", classes, (len(points),), where)
        if len(classes) and not np.issubdtype(classes.dtype, np.integer):
            raise TypeError(f"{where}: 'classes' must have an integer dtype, got {classes.dtype}")
        if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
            raise ValueError(
                f"{where}: 'classes' must lie in 0..{num_classes - 1} (C of density), got "
                f"{classes.min()}..{classes.max()}"
            )
    if len(points):
        classes = np.zeros(len(points), dtype=np.int64) if classes is None else classes
        row = np.clip(np.floor(points[:, 1]), 0, height - 1)
        col = np.clip(np.floor(points[:, 0]), 0, width - 1)
        cell_r = np.clip(np.searchsorted(row_edges, row, side="right") - 1, 0, cells - 1)
        cell_c = np.clip(np.searchsorted(col_edges, col, side="right") - 1, 0, cells - 1)
        np.add.at(true, (classes, cell_r, cell_c), 1.0)
    return float(np.abs(pred - true).sum() / num_classes)


def count_errors(pred: np.ndarray, gt: np.ndarray) -> Dict[str, object]:
    """
    Count errors over N images and C classes (ĉ_ic predicted, c_ic true count):

        MAE_c = 1/N Σ_i |ĉ_ic − c_ic|,   RMSE_c = sqrt(1/N Σ_i (ĉ_ic − c_ic)²),
        MRE   = 100 · mean_{(i,c): c_ic > 0} |ĉ_ic − c_ic| / c_ic   (percent; NaN if all c_ic = 0)

    MAE and RMSE average MAE_c / RMSE_c over classes.

    Args:
        pred, gt: (N, C).

    Returns:
        {"MAE", "RMSE", "MRE": float, "MAE_c", "RMSE_c": (C,) arrays}.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != gt.shape or pred.shape[0] == 0:
        raise ValueError(
            f"count_errors: 'pred' and 'gt' must be equal (N, C), N > 0, got {pred.shape}, "
            f"{gt.shape}"
        )
    check_finite("pred", pred, "count_errors")
    check_finite("gt", gt, "count_errors")
    if (gt < 0).any():
        raise ValueError(f"count_errors: 'gt' must be >= 0, got {gt.min()}")
    err = pred - gt
    mae_c = np.abs(err).mean(axis=0)
    rmse_c = np.sqrt((err**2).mean(axis=0))
    nonzero = gt > 0
    mre = (
        float(100.0 * (np.abs(err[nonzero]) / gt[nonzero]).mean())
        if nonzero.any()
        else float("nan")
    )
    return {
        "MAE": float(mae_c.mean()),
        "RMSE": float(rmse_c.mean()),
        "MRE": mre,
        "MAE_c": mae_c,
        "RMSE_c": rmse_c,
    }


class DensityEvaluator(DatasetEvaluator):
    """
    Evaluate ``outputs[i]["density"]`` (C, H, W) and ``outputs[i]["counts"]`` (C,) against the point
    annotations of the dataset (``DatasetCatalog.get(dataset_name)``, matched by ``image_id``).

    Results under the task "density": "MAE", "RMSE", "MRE" (percent), "GAME0".."GAME3" and, for
    C > 1, "MAE/<class>". Counts come from ``counts`` (the integral at network resolution), GAME
    from the density at the original resolution. With ``output_dir``, writes ``density_eval.json``
    (per-image counts), ``density_scatter.png`` and ``density_overlay_<k>.png`` for the first
    ``num_overlays`` images of the dataset that were evaluated.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        num_overlays: int = 4,
    ):
        """
        Args:
            dataset_name: a registered point dataset (dicts with "points").
            output_dir: where to write the json and the plots (None: nothing written).
            distributed: gather from all ranks; only the main process returns results.
            num_overlays: number of density overlay images to draw.
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._num_overlays = num_overlays
        metadata = MetadataCatalog.get(dataset_name)
        self._class_names = list(getattr(metadata, "thing_classes", ["object"]))
        self._gt = None
        self.reset()

    def reset(self):
        self._predictions = []
        self._warned_missing = False

    def _ground_truth(self) -> Dict:
        """{image_id: (index, record)} of the dataset, loaded once per registration."""
        if self._gt is None:
            self._gt = cached_ground_truth("density_records", self._dataset_name, self._load)
        return self._gt

    def _load(self) -> Dict:
        gt = {}
        for index, record in enumerate(DatasetCatalog.get(self._dataset_name)):
            if "image_id" not in record or "points" not in record:
                raise ValueError(
                    f"dataset '{self._dataset_name}', file {record.get('file_name', '?')}: "
                    "a density dataset dict needs 'image_id' and 'points'"
                )
            gt[record["image_id"]] = (index, record)
        return gt

    def process(self, inputs: List[Dict], outputs: List[Dict]):
        """
        Args:
            inputs: model inputs, each with "image_id".
            outputs: model outputs with "density" (C, H, W) and "counts" (C,).
        """
        gt = self._ground_truth()
        for inp, out in zip(inputs, outputs):
            if "density" not in out:
                if not self._warned_missing:
                    logger.warning(
                        "DensityEvaluator: a model output has no 'density'; such outputs are "
                        "skipped."
                    )
                    self._warned_missing = True
                continue
            image_id = inp.get("image_id")
            if image_id not in gt:
                raise ValueError(
                    f"DensityEvaluator: image_id {image_id!r} ({inp.get('file_name', '?')}) is "
                    f"not in dataset '{self._dataset_name}'"
                )
            index, record = gt[image_id]
            density = out["density"]
            if isinstance(density, torch.Tensor):
                density = density.detach().to("cpu", torch.float32).numpy()
            density = np.asarray(density, dtype=np.float32)
            if density.ndim == 2:
                density = density[None]
            expected = (record["height"], record["width"])
            if density.shape[1:] != expected:
                raise ValueError(
                    f"DensityEvaluator: density of {record['file_name']} has size "
                    f"{density.shape[1:]}, the image has {expected}"
                )
            counts = out.get("counts")
            if counts is None:
                counts = density.sum(axis=(1, 2))
            elif isinstance(counts, torch.Tensor):
                counts = counts.detach().to("cpu", torch.float64).numpy()
            counts = np.asarray(counts, dtype=np.float64).reshape(-1)
            num_classes = density.shape[0]
            where = f"DensityEvaluator: image_id {image_id!r} ({record['file_name']})"
            # a NaN density would give NaN errors that drop out of the means
            check_finite("density", density, where)
            check_finite("counts", counts, where)
            if counts.shape != (num_classes,):
                raise ValueError(
                    f"{where}: 'counts' must have shape ({num_classes},) like the density's C, "
                    f"got {counts.shape}"
                )
            points = np.asarray(record["points"], dtype=np.float64).reshape(-1, 2)
            classes = np.asarray(
                record.get("point_classes", np.zeros(len(points))), dtype=np.int64
            ).reshape(-1)
            true = np.bincount(classes, minlength=num_classes)[:num_classes].astype(np.float64)
            games = [game(density, points, level, classes) for level in GAME_LEVELS]
            keep_density = index < self._num_overlays
            self._predictions.append(
                {
                    "index": index,
                    "image_id": image_id,
                    "file_name": record["file_name"],
                    "pred": counts,
                    "true": true,
                    "game": games,
                    "density": density.sum(axis=0) if keep_density else None,
                }
            )

    def evaluate(self):
        predictions = gather_predictions(self._predictions, self._distributed)
        if predictions is None:  # not the main process
            return {}
        if not predictions:
            logger.warning("DensityEvaluator: no predictions were processed.")
            return {}
        unique = {}
        for p in predictions:
            unique.setdefault(p["image_id"], p)
        predictions = sorted(unique.values(), key=lambda p: p["index"])

        pred = np.stack([p["pred"] for p in predictions])
        true = np.stack([p["true"] for p in predictions])
        errors = count_errors(pred, true)
        results = OrderedDict((k, errors[k]) for k in ("MAE", "RMSE", "MRE"))
        game_values = np.asarray([p["game"] for p in predictions])
        for j, level in enumerate(GAME_LEVELS):
            results[f"GAME{level}"] = float(game_values[:, j].mean())
        if pred.shape[1] > 1:
            for name, value in zip(self._class_names, errors["MAE_c"]):
                results[f"MAE/{name}"] = float(value)
        logger.info(
            "Density counting on '{}' ({} images, mean true count {:.2f}):\n{}".format(
                self._dataset_name,
                len(predictions),
                float(true.sum(axis=1).mean()),
                create_small_table(dict(results)),
            )
        )
        if self._output_dir:
            self._write_outputs(predictions, results)
        return OrderedDict({"density": results})

    def _write_outputs(self, predictions: Sequence[Dict], results: Dict):
        PathManager.mkdirs(self._output_dir)
        per_image = [
            {
                "image_id": p["image_id"],
                "file_name": p["file_name"],
                "true": p["true"].tolist(),
                "pred": p["pred"].tolist(),
                "game": p["game"],
            }
            for p in predictions
        ]
        with PathManager.open(os.path.join(self._output_dir, "density_eval.json"), "w") as f:
            json.dump({"results": results, "images": per_image}, f, indent=1, default=str)

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        true = np.stack([p["true"] for p in predictions])
        pred = np.stack([p["pred"] for p in predictions])
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for c in range(true.shape[1]):
            label = self._class_names[c] if c < len(self._class_names) else str(c)
            ax.scatter(true[:, c], pred[:, c], s=10, alpha=0.7, label=label)
        hi = float(max(true.max(), pred.max(), 1.0)) * 1.05
        ax.plot([0, hi], [0, hi], "k--", lw=1)
        ax.set_xlim(0, hi)
        ax.set_ylim(min(0.0, float(pred.min()) * 1.05), hi)
        ax.set_xlabel("true count")
        ax.set_ylabel("predicted count")
        ax.set_title(f"{self._dataset_name}: MAE {results['MAE']:.2f}")
        if true.shape[1] > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self._output_dir, "density_scatter.png"), dpi=100)
        plt.close(fig)

        for k, p in enumerate(q for q in predictions if q["density"] is not None):
            with Image.open(p["file_name"]) as img:
                image = np.asarray(img.convert("RGB"))
            fig, axes = plt.subplots(1, 2, figsize=(8, 4))
            axes[0].imshow(image)
            axes[0].set_title(os.path.basename(p["file_name"]))
            axes[1].imshow(image, alpha=0.5)
            axes[1].imshow(p["density"], cmap="jet", alpha=0.5)
            axes[1].set_title(f"true {p['true'].sum():.0f}, predicted {p['pred'].sum():.1f}")
            for ax in axes:
                ax.axis("off")
            fig.tight_layout()
            fig.savefig(os.path.join(self._output_dir, f"density_overlay_{k}.png"), dpi=80)
            plt.close(fig)
