"""
Health figures of CCGR's stages: numbers that tell a stage that learnt nothing from one that works,
read from what the stage wrote (its training curve, its outputs), checked against ranges from the
config (``MODEL.CCGR.HEALTH``).

A stage can finish without an error and still be broken: the image-level classifier can stay at the
label prior for its whole schedule (every image scored with the class frequencies, loss flat at
the prior's entropy), and every later stage then works on empty cues. Nothing downstream fails; the
final mAP is just low. These figures make such a run stop at the stage that broke.
"""
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "StageHealthError",
    "prior_bce",
    "loss_curve_ends",
    "training_health",
    "check_health",
]


class StageHealthError(RuntimeError):
    """A stage finished, but one of its health figures is out of its range."""


def prior_bce(labels: np.ndarray) -> float:
    """
    Mean binary cross-entropy (nats) of the constant classifier that predicts each class's
    frequency: the loss of a multi-label classifier that learnt only the label prior.

    Args:
        labels: (N, C) bool / {0, 1} image-level labels of the training images.

    Returns:
        (1/C) Σ_c H(p_c), p_c the share of images with class c; 0 for a class always or never
        present.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise ValueError(f"labels: expected an (N, C) array with N >= 1, got shape {labels.shape}")
    p = labels.astype(np.float64).mean(0)
    q = np.clip(p, 1e-12, 1 - 1e-12)
    h = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    h[(p <= 0) | (p >= 1)] = 0.0
    return float(h.mean())


def _read_metrics(path: str) -> List[Dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def loss_curve_ends(
    metrics_json: str, key: str = "total_loss", window: float = 0.1
) -> Tuple[float, float]:
    """
    Median of ``key`` over the first and over the last ``window`` share (at least one row) of
    the logged iterations of a detectron2 ``metrics.json``.

    Returns:
        (first, last); NaN for both when the file logs no ``key``.

    Raises:
        ValueError naming the file when it does not exist.
    """
    if not os.path.isfile(metrics_json):
        raise ValueError(f"{metrics_json}: no training log (detectron2 metrics.json) to check")
    if not 0 < window <= 0.5:
        raise ValueError(f"window: expected a share in (0, 0.5], got {window}")
    values = [float(r[key]) for r in _read_metrics(metrics_json) if key in r]
    if not values:
        return math.nan, math.nan
    n = max(1, int(round(window * len(values))))
    return float(np.median(values[:n])), float(np.median(values[-n:]))


def training_health(metrics_json: str, prior_loss: Optional[float] = None) -> Dict[str, float]:
    """
    Health figures of a training stage from its ``metrics.json``:

    * ``health_loss_drop``: last / first (median of the last and first 10 % of the logged
      total loss); about 1 for a model that did not learn, NaN or inf for one that diverged;
    * ``health_loss_over_prior`` (when ``prior_loss`` is given): last / ``prior_loss``, about 1
      for a classifier stuck at the label prior.
    """
    first, last = loss_curve_ends(metrics_json)
    out = {"health_loss_drop": last / first if first > 0 else math.nan}
    if prior_loss is not None:
        out["health_loss_over_prior"] = last / prior_loss if prior_loss > 0 else math.nan
    return out


def check_health(
    stage: str, figures: Dict[str, float], ranges: Dict[str, Tuple[float, float, str]]
) -> None:
    """
    Raise :class:`StageHealthError` for the first figure outside its range.

    Args:
        stage: the stage's name, for the message.
        figures: {name: value} (a NaN or infinite value is out of any range).
        ranges: {name: (low, high, what to try)}; figures without a range are not checked.
    """
    for name, (low, high, advice) in ranges.items():
        if name not in figures:
            continue
        value = float(figures[name])
        if not (math.isfinite(value) and low <= value <= high):
            raise StageHealthError(
                f"CCGR stage {stage}: {name} = {value:.4g}, outside the healthy range "
                f"[{low:g}, {high:g}]. {advice}"
            )


def positive_pairs(labels: Sequence[np.ndarray]) -> int:
    """Number of (image, present class) pairs of a list of (C,) image-level label arrays."""
    return int(sum(int(np.asarray(l).astype(bool).sum()) for l in labels))
