"""
Count calibration of density models after training (``MODEL.DENSITY.CALIBRATION``).

A density regressor's count error has a part that is the same on every image of a training run:
a gain (mass per object a little too high or low) and a background density (a count error growing
with the image area). Both change from one run (seed, CPU, schedule) to the next. Fitted by least
squares on the full training images (:func:`fit_count_calibration`) and
stored in the model's ``count_gain`` / ``count_offset`` buffers, they are removed at inference.
"""

import logging
from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..engine.calibration import evenly_spaced, gather_lists, unwrap_model
from ..engine.health import CountHealthCheck, collapsed_classes, warn_collapsed
from ..engine.hooks import TRAINER_HOOK_REGISTRY
from ..utils.progress import progress
from .mapper import DensityDatasetMapper

__all__ = [
    "CALIBRATION_MODES",
    "DensityCountCalibration",
    "check_calibration_mode",
    "fit_count_calibration",
    "build_calibration_loader",
    "calibrate_density_counts",
    "density_count_predictions",
]

logger = logging.getLogger(__name__)


CALIBRATION_MODES = ("none", "gain", "affine")


def check_calibration_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`CALIBRATION_MODES`, else a ValueError naming the field."""
    if mode not in CALIBRATION_MODES:
        raise ValueError(
            f"MODEL.DENSITY.CALIBRATION.MODE must be one of {CALIBRATION_MODES}, got {mode!r}"
        )
    return mode


def fit_count_calibration(
    pred_counts: torch.Tensor,
    areas: torch.Tensor,
    true_counts: torch.Tensor,
    mode: str = "affine",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Least-squares count calibration of a trained density regressor on images with known counts:

        "affine": min_{α_c, β_c} Σ_i (α_c·ĉ_ic + β_c·|Ω_i| − t_ic)²,
        "gain":   the same with β_c = 0,

    where ĉ_ic = ∫ D̂_c is the predicted count of class c in image i, |Ω_i| its number of counted
    pixels (image or ROI) and t_ic the true count. The calibrated density is α_c·D̂_c + β_c: α
    corrects a global over/under-estimate of the mass per object, β a constant background density
    (a count error that grows with the image area, not with the number of objects). Both vary
    from one training run to another; fitted on the training images they carry over to new images
    of the same kind as long as the network does not fit its training counts much better than
    others (the benchmark's U-Net: training-image MAE about the test MAE).

    "affine" falls back to "gain" for a class whose normal equations are singular (e.g. one image,
    or all images of one size with counts proportional to their area), "gain" to the identity for
    a class predicted empty everywhere.

    Args:
        pred_counts: (N, C) uncalibrated ĉ_ic.
        areas: (N,) |Ω_i| in pixels of the network input.
        true_counts: (N, C) t_ic.
        mode: "gain" or "affine" ("none" returns the identity).

    Returns:
        gain (C,) α and offset (C,) β (density per pixel), float64.
    """
    check_calibration_mode(mode)
    p = torch.as_tensor(pred_counts, dtype=torch.float64)
    t = torch.as_tensor(true_counts, dtype=torch.float64)
    a = torch.as_tensor(areas, dtype=torch.float64).reshape(-1)
    if p.dim() != 2 or p.shape != t.shape or a.shape[0] != p.shape[0]:
        raise ValueError(
            f"count calibration needs pred (N, C), true (N, C) and areas (N,); got "
            f"{tuple(p.shape)}, {tuple(t.shape)} and {tuple(a.shape)}"
        )
    num_classes = p.shape[1]
    gain = torch.ones(num_classes, dtype=torch.float64)
    offset = torch.zeros(num_classes, dtype=torch.float64)
    if mode == "none" or p.shape[0] == 0:
        return gain, offset
    for c in range(num_classes):
        pc, tc = p[:, c], t[:, c]
        spp, spa, saa = (pc * pc).sum(), (pc * a).sum(), (a * a).sum()
        spt, sat = (pc * tc).sum(), (a * tc).sum()
        det = spp * saa - spa * spa
        if mode == "affine" and det > 1e-9 * spp * saa:
            gain[c] = (saa * spt - spa * sat) / det
            offset[c] = (spp * sat - spa * spt) / det
        elif spp > 0:
            gain[c] = spt / spp
    return gain, offset


def _density_model(model, mode: str):
    """The DensityCounter inside ``model`` (DistributedDataParallel unwrapped), or a ValueError."""
    return unwrap_model(
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
    return gather_lists(pred, areas, true)


def build_calibration_loader(cfg, max_images: int = 0):
    """
    Full-image test-time loader over ``MODEL.DENSITY.CALIBRATION.DATASETS`` (default:
    ``DATASETS.TRAIN``) with the test-time :class:`DensityDatasetMapper`; ``max_images`` > 0:
    that many of their images, evenly spaced.
    """
    names = tuple(cfg.MODEL.DENSITY.CALIBRATION.DATASETS) or tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("MODEL.DENSITY.CALIBRATION.DATASETS and DATASETS.TRAIN are both empty")
    mapper = DensityDatasetMapper(cfg, is_train=False)
    if max_images <= 0:
        return build_detection_test_loader(cfg, list(names), mapper=mapper)
    dicts = evenly_spaced([d for name in names for d in DatasetCatalog.get(name)], max_images)
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


def _training_count_predictions(net, cfg, max_images: int):
    """CountHealthCheck's view of a density model: (pred, true, areas) on training images."""
    pred, areas, true = density_count_predictions(
        net, build_calibration_loader(cfg, max_images=max_images)
    )
    return pred, true, areas


@TRAINER_HOOK_REGISTRY.register()
def density_trainer_hooks(cfg) -> List[HookBase]:
    """:class:`DensityCountCalibration` when ``MODEL.DENSITY.CALIBRATION.MODE`` is not "none",
    and :class:`CountHealthCheck` for DensityCounter models (its spread check only where no
    calibration checks the counts)."""
    calibrate = check_calibration_mode(cfg.MODEL.DENSITY.CALIBRATION.MODE) != "none"
    out: List[HookBase] = [DensityCountCalibration(cfg)] if calibrate else []
    if cfg.MODEL.META_ARCHITECTURE == "DensityCounter":
        out.append(
            CountHealthCheck(
                cfg, None if calibrate else _training_count_predictions, "density training"
            )
        )
    return out
