"""
Count calibration after training: density models (``MODEL.DENSITY.CALIBRATION``) and LC / ILC
(``MODEL.LC.CALIBRATION``).

A density regressor's count error has a part that is the same on every image of a training run:
a gain (mass per object a little too high or low) and a background density (a count error growing
with the image area). Both change from one run (seed, CPU, schedule) to the next. Fitted by least
squares on the full training images
(:func:`wsis_d2.modeling.meta_arch.density.fit_count_calibration`) and stored in the model's
``count_gain`` / ``count_offset`` buffers, they are removed at inference.
"""

import logging
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

from detectron2.data import build_detection_test_loader
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..modeling.meta_arch.density import check_calibration_mode, fit_count_calibration
from ..modeling.meta_arch.lc import fit_lower_count_gain
from ..utils.progress import progress
from .health import collapsed_classes, warn_collapsed

__all__ = [
    "DensityCountCalibration",
    "LCCountCalibration",
    "build_calibration_loader",
    "build_lc_calibration_loader",
    "calibrate_density_counts",
    "calibrate_lc_counts",
    "density_count_predictions",
    "lc_count_predictions",
]

logger = logging.getLogger(__name__)


def _gathered(*columns: List) -> tuple:
    """Per-image lists of every process (each process calibrates on its shard), concatenated in
    rank order; the lists themselves in a single process."""
    stats = [columns]
    if comm.get_world_size() > 1:
        stats = comm.all_gather(columns)
    return tuple([item for s in stats for item in s[k]] for k in range(len(columns)))


def _calibrated_model(model, methods, setting: str, needed: str):
    """``model`` with DistributedDataParallel unwrapped, or a ValueError ("``setting`` needs
    ``needed``") when it lacks one of ``methods``."""
    net = model.module if hasattr(model, "module") else model
    if not all(hasattr(net, m) for m in methods):
        raise ValueError(f"{setting} needs {needed}, got {type(net).__name__}")
    return net


def _density_model(model, mode: str):
    """The DensityCounter inside ``model`` (DistributedDataParallel unwrapped), or a ValueError."""
    return _calibrated_model(
        model, ("set_count_calibration",), f"MODEL.DENSITY.CALIBRATION.MODE={mode!r}",
        "a density model (DensityCounter)",
    )


def calibrate_density_counts(model, data_loader: Iterable[List[Dict]], mode: str) -> Dict:
    """
    Fit and set ``model``'s count calibration on the images of ``data_loader``.

    Args:
        model: a :class:`DensityCounter` (or a DistributedDataParallel around one).
        data_loader: batches of mapped test-time inputs (full images) with "image", "points",
            "point_classes" and optionally "roi", e.g. from :func:`build_calibration_loader`.
            In distributed runs each process sees its shard; the statistics are gathered.
        mode: "gain", "affine" or "none" (nothing is done).

    Returns:
        {"gain": [α_c], "offset": [β_c] (density per pixel), "images": N, "collapsed": the
        classes whose counts have no spread (:func:`collapsed_classes`; WARNING, left
        uncalibrated), "mae_before", "mae_after"} (empty for "none").
    """
    if check_calibration_mode(mode) == "none":
        return {}
    net = _density_model(model, mode)
    pred, areas, true = density_count_predictions(net, data_loader)
    if not pred:
        raise ValueError("count calibration: the calibration datasets have no images")
    p = torch.stack(pred)
    a = torch.tensor(areas, dtype=torch.float64)
    t = torch.stack(true).double()
    gain, offset = fit_count_calibration(p, a, t, mode)
    if not (gain > 0).all():
        # a non-positive gain means the counts do not follow the truth at all: keep the identity
        logger.warning(
            "count calibration: fitted gain %s is not positive; calibration left off", gain.tolist()
        )
        gain, offset = torch.ones_like(gain), torch.zeros_like(offset)
    collapsed = collapsed_classes(p, t, a)
    if collapsed:
        # a constant count calibrated would become the mean training count: an ordinary-looking
        # error that hides the collapse, so these classes keep the identity
        warn_collapsed("count calibration", collapsed, p, t)
        logger.warning("count calibration: left off for the collapsed classes %s", collapsed)
        gain[collapsed], offset[collapsed] = 1.0, 0.0
    net.set_count_calibration(gain, offset)
    after = p * gain + a[:, None] * offset
    result = {
        "gain": gain.tolist(),
        "offset": offset.tolist(),
        "images": len(pred),
        "collapsed": collapsed,
        "mae_before": float((p - t).abs().mean()),
        "mae_after": float((after - t).abs().mean()),
    }
    logger.info(
        "count calibration (%s) on %d images: gain %s, offset %s per pixel (%s per mean image); "
        "count MAE on them %.3f -> %.3f",
        mode,
        len(pred),
        np.round(result["gain"], 4).tolist(),
        np.round(result["offset"], 8).tolist(),
        np.round((offset * a.mean()).numpy(), 2).tolist(),
        result["mae_before"],
        result["mae_after"],
    )
    return result


def density_count_predictions(net, data_loader: Iterable[List[Dict]]):
    """
    Uncalibrated predicted counts of a DensityCounter on the images of ``data_loader`` (its
    calibration is restored afterwards), gathered over the processes.

    Returns:
        three per-image lists: pred (C,) float64, areas (counted pixels), true (C,) int64.
    """
    num_classes = net.num_classes
    was_training = net.training
    saved = (net.count_gain.clone(), net.count_offset.clone())
    net.set_count_calibration(1.0, 0.0)
    net.eval()
    pred, areas, true = [], [], []
    try:
        with torch.no_grad():
            for batch in progress(data_loader, "density counts", unit="batch"):
                outputs = net(batch)
                for inp, out in zip(batch, outputs):
                    if "points" not in inp:
                        raise ValueError(
                            f"count calibration: input {inp.get('file_name', '?')} has no "
                            "'points' (use DensityDatasetMapper)"
                        )
                    classes = inp.get("point_classes")
                    num_points = len(inp["points"])
                    if classes is None:
                        classes = torch.zeros(num_points, dtype=torch.long)
                    classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
                    true.append(torch.bincount(classes, minlength=num_classes)[:num_classes])
                    pred.append(out["counts"].detach().double().cpu())
                    roi = inp.get("roi")
                    if roi is not None:
                        areas.append(float(torch.as_tensor(roi).sum()))
                    else:
                        areas.append(float(inp["image"].shape[-2] * inp["image"].shape[-1]))
    finally:
        net.set_count_calibration(*saved)
        net.train(was_training)
    return _gathered(pred, areas, true)


def _evenly_spaced(dicts: List[Dict], max_images: int) -> List[Dict]:
    """``max_images`` of ``dicts`` evenly spaced (0: all)."""
    if 0 < max_images < len(dicts):
        keep = np.unique(np.linspace(0, len(dicts) - 1, max_images).round().astype(int))
        dicts = [dicts[i] for i in keep]
    return dicts


def build_calibration_loader(cfg, max_images: int = 0):
    """
    Full-image test-time loader over ``MODEL.DENSITY.CALIBRATION.DATASETS`` (default:
    ``DATASETS.TRAIN``) with the test-time :class:`DensityDatasetMapper`; ``max_images`` > 0:
    that many of their images, evenly spaced.
    """
    from detectron2.data import DatasetCatalog

    from ..data.mappers.density_mapper import DensityDatasetMapper

    names = tuple(cfg.MODEL.DENSITY.CALIBRATION.DATASETS) or tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("MODEL.DENSITY.CALIBRATION.DATASETS and DATASETS.TRAIN are both empty")
    mapper = DensityDatasetMapper(cfg, is_train=False)
    if max_images <= 0:
        return build_detection_test_loader(cfg, list(names), mapper=mapper)
    dicts = _evenly_spaced([d for name in names for d in DatasetCatalog.get(name)], max_images)
    return build_detection_test_loader(dicts, mapper=mapper)


class DensityCountCalibration(HookBase):
    """
    Fits the count calibration after the last training iteration, before the final checkpoint
    (register it before detectron2's ``PeriodicCheckpointer``) and the final evaluation.
    """

    def __init__(self, cfg):
        self._cfg = cfg.clone()
        self._mode = check_calibration_mode(cfg.MODEL.DENSITY.CALIBRATION.MODE)

    def before_train(self):
        _density_model(self.trainer.model, self._mode)  # not after the whole training run

    def after_step(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            return
        result = calibrate_density_counts(
            self.trainer.model, build_calibration_loader(self._cfg), self._mode
        )
        if result and comm.is_main_process():
            for c, (g, o) in enumerate(zip(result["gain"], result["offset"])):
                self.trainer.storage.put_scalar(f"density/calibration_gain_{c}", g)
                self.trainer.storage.put_scalar(f"density/calibration_offset_{c}", o)


# ------------------------------------------------------------------------------------------------
# LC / ILC


def check_lc_calibration_mode(mode: str) -> str:
    if mode not in ("none", "gain"):
        raise ValueError(f"MODEL.LC.CALIBRATION.MODE must be 'none' or 'gain', got {mode!r}")
    return mode


def _check_counts_supervised(cfg) -> None:
    """The LC calibration fits counts: a ValueError for a model trained on image labels alone."""
    if cfg.MODEL.LC.IMAGE_LABELS_ONLY:
        raise ValueError(
            "MODEL.LC.CALIBRATION needs counts, and MODEL.LC.IMAGE_LABELS_ONLY trains from "
            "image-level labels alone: set MODEL.LC.CALIBRATION.MODE 'none'"
        )


def _lc_model(model):
    """The ImageLevelCounter inside ``model`` (DistributedDataParallel unwrapped), or a
    ValueError."""
    return _calibrated_model(
        model, ("set_count_gain", "raw_counts"), "MODEL.LC.CALIBRATION.MODE 'gain'",
        "an LC model (ImageLevelCounter)",
    )


def calibrate_lc_counts(model, data_loader: Iterable[List[Dict]], lower_count=None) -> Dict:
    """
    Fit and set the count gain α of an LC / ILC model (:func:`fit_lower_count_gain`) on the
    images of ``data_loader``.

    Args:
        model: an :class:`ImageLevelCounter` (or a DistributedDataParallel around one).
        data_loader: batches of test-time LC inputs (full images) with exact "counts" (C,),
            e.g. from :func:`build_lc_calibration_loader`. In distributed runs each process sees
            its shard; the statistics are gathered.
        lower_count: t̃ of the training supervision: counts >= t̃ are only used as lower bounds
            (as the training mapper censors them); None: all counts are exact.

    Returns:
        {"gain": [α_c], "images": N, "collapsed" (classes left at α = 1, see
        :func:`calibrate_density_counts`), "mae_before", "mae_after"} (count MAE over the present
        classes with exact counts, on these images).
    """
    net = _lc_model(model)
    pred, counts, count_ge, areas = lc_count_predictions(net, data_loader, lower_count)
    if not pred:
        raise ValueError("count calibration: the calibration datasets have no images")
    p, t, ge = torch.stack(pred), torch.stack(counts).double(), torch.stack(count_ge)
    gain = fit_lower_count_gain(p, t, ge)
    collapsed = collapsed_classes(p, t, torch.tensor(areas, dtype=torch.float64))
    if collapsed:
        # a constant count with a fitted gain would look like the mean training count
        warn_collapsed("LC count calibration", collapsed, p, t)
        logger.warning("LC count calibration: left off for the collapsed classes %s", collapsed)
        gain[collapsed] = 1.0
    net.set_count_gain(gain)
    exact = (t >= 1) & ~ge
    before = (p.clamp_min(0) - t).abs()[exact]
    after = (p.clamp_min(0) * gain - t).abs()[exact]
    result = {
        "gain": gain.tolist(),
        "images": len(pred),
        "collapsed": collapsed,
        "mae_before": float(before.mean()) if before.numel() else float("nan"),
        "mae_after": float(after.mean()) if after.numel() else float("nan"),
    }
    logger.info(
        "LC count calibration on %d images (t̃=%s): gain %s; count MAE of the exact present "
        "counts %.3f -> %.3f",
        len(pred),
        lower_count,
        np.round(result["gain"], 4).tolist(),
        result["mae_before"],
        result["mae_after"],
    )
    return result


def lc_count_predictions(net, data_loader: Iterable[List[Dict]], lower_count=None):
    """
    Uncalibrated counts t̂ of an ImageLevelCounter on the images of ``data_loader`` with their
    targets (``image_level_targets`` with ``lower_count``), gathered over the processes.

    Returns:
        four per-image lists: pred (C,) float64, counts (C,), count_ge (C,) bool, areas (the
        count of a unit density: a constant output's counts are proportional to it).
    """
    from ..data.mappers.lc_mapper import image_level_targets

    was_training = net.training
    net.eval()
    pred, counts, count_ge, areas = [], [], [], []
    try:
        for batch in progress(data_loader, "LC counts", unit="batch"):
            for inp in batch:
                if "counts" not in inp:
                    raise ValueError(
                        f"count calibration: input {inp.get('file_name', '?')} has no 'counts' "
                        "(use LCDatasetMapper on a dataset with counts)"
                    )
                _, t, ge = image_level_targets(inp["counts"].numpy(), lower_count)
                raw, area = net.raw_counts(inp, with_area=True)
                pred.append(raw.double().cpu())
                counts.append(t)
                count_ge.append(ge)
                areas.append(area)
    finally:
        net.train(was_training)
    return _gathered(pred, counts, count_ge, areas)


def build_lc_calibration_loader(cfg, max_images: Optional[int] = None):
    """
    Test-time loader of full images with their exact counts over ``MODEL.LC.CALIBRATION.DATASETS``
    (default: ``DATASETS.TRAIN``), ``MAX_IMAGES`` of them (``max_images`` where given) evenly
    spaced (0: all). Annotations are reduced to per-class counts (no masks are decoded).
    """
    from detectron2.data import DatasetCatalog

    from ..data.mappers.lc_mapper import LCDatasetMapper, class_counts_of

    calib = cfg.MODEL.LC.CALIBRATION
    names = tuple(calib.DATASETS) or tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("MODEL.LC.CALIBRATION.DATASETS and DATASETS.TRAIN are both empty")
    _check_counts_supervised(cfg)
    num_classes = cfg.MODEL.LC.NUM_CLASSES
    dicts = [d for name in names for d in DatasetCatalog.get(name)]
    if calib.MAX_IMAGES < 0:
        raise ValueError(f"MODEL.LC.CALIBRATION.MAX_IMAGES must be >= 0, got {calib.MAX_IMAGES}")
    dicts = _evenly_spaced(dicts, calib.MAX_IMAGES if max_images is None else max_images)
    slim = []
    for d in dicts:
        item = {k: v for k, v in d.items() if k not in ("annotations", "image_labels")}
        item["class_counts"] = class_counts_of(d, num_classes)
        slim.append(item)
    mapper = LCDatasetMapper(cfg, is_train=False)
    return build_detection_test_loader(slim, mapper=mapper)


class LCCountCalibration(HookBase):
    """
    Fits the LC count gain (``MODEL.LC.CALIBRATION``) after the last training iteration, before
    the final checkpoint (register it before detectron2's ``PeriodicCheckpointer``) and the final
    evaluation.
    """

    def __init__(self, cfg):
        self._cfg = cfg.clone()
        check_lc_calibration_mode(cfg.MODEL.LC.CALIBRATION.MODE)
        _check_counts_supervised(cfg)
        lc = cfg.MODEL.LC
        self._lower_count = lc.LOWER_COUNT if lc.LOWER_COUNT_SUPERVISION else None

    def before_train(self):
        _lc_model(self.trainer.model)  # not after the whole training run

    def after_step(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            return
        result = calibrate_lc_counts(
            self.trainer.model, build_lc_calibration_loader(self._cfg), self._lower_count
        )
        if comm.is_main_process():
            for c, g in enumerate(result["gain"]):
                self.trainer.storage.put_scalar(f"lc/calibration_gain_{c}", g)
