"""
Count calibration of LC / ILC models after training (``MODEL.LC.CALIBRATION``): a gain α_c per
class fitted on the training images with their (censored) training supervision.
"""

import logging
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..engine.calibration import evenly_spaced, gather_lists, unwrap_model
from ..engine.health import CountHealthCheck, collapsed_classes, warn_collapsed
from ..engine.hooks import TRAINER_HOOK_REGISTRY
from ..utils.progress import progress
from .mapper import LCDatasetMapper, class_counts_of, image_level_targets
from .meta_arch import fit_lower_count_gain

__all__ = [
    "LCCountCalibration",
    "build_lc_calibration_loader",
    "calibrate_lc_counts",
    "check_lc_calibration_mode",
    "lc_count_predictions",
]

logger = logging.getLogger(__name__)


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
    return unwrap_model(
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
    return gather_lists(pred, counts, count_ge, areas)


def build_lc_calibration_loader(cfg, max_images: Optional[int] = None):
    """
    Test-time loader of full images with their exact counts over ``MODEL.LC.CALIBRATION.DATASETS``
    (default: ``DATASETS.TRAIN``), ``MAX_IMAGES`` of them (``max_images`` where given) evenly
    spaced (0: all). Annotations are reduced to per-class counts (no masks are decoded).
    """
    calib = cfg.MODEL.LC.CALIBRATION
    names = tuple(calib.DATASETS) or tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("MODEL.LC.CALIBRATION.DATASETS and DATASETS.TRAIN are both empty")
    _check_counts_supervised(cfg)
    num_classes = cfg.MODEL.LC.NUM_CLASSES
    dicts = [d for name in names for d in DatasetCatalog.get(name)]
    if calib.MAX_IMAGES < 0:
        raise ValueError(f"MODEL.LC.CALIBRATION.MAX_IMAGES must be >= 0, got {calib.MAX_IMAGES}")
    dicts = evenly_spaced(dicts, calib.MAX_IMAGES if max_images is None else max_images)
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
        self._lower_count = lc.LOWER_COUNT if cfg.INPUT.LC.LOWER_COUNT_SUPERVISION else None

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


def _training_count_predictions(net, cfg, max_images: int):
    """CountHealthCheck's view of an LC model: (pred, true, areas) on training images."""
    pred, true, _, areas = lc_count_predictions(
        net, build_lc_calibration_loader(cfg, max_images=max_images)
    )
    return pred, true, areas


@TRAINER_HOOK_REGISTRY.register()
def lc_trainer_hooks(cfg) -> List[HookBase]:
    """:class:`LCCountCalibration` when ``MODEL.LC.CALIBRATION.MODE`` is not "none", and the
    collapse check of :class:`CountHealthCheck` for ImageLevelCounter models (its spread check
    only where no calibration checks the counts and the model counts at all)."""
    calibrate = check_lc_calibration_mode(cfg.MODEL.LC.CALIBRATION.MODE) != "none"
    out: List[HookBase] = [LCCountCalibration(cfg)] if calibrate else []
    if cfg.MODEL.META_ARCHITECTURE == "ImageLevelCounter":
        counts = not (calibrate or cfg.MODEL.LC.IMAGE_LABELS_ONLY)
        out.append(
            CountHealthCheck(cfg, _training_count_predictions if counts else None, "LC training")
        )
    return out
