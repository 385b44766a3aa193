"""
Helpers of the count calibrations fitted after training (``wsis_d2.lc.calibration``,
``wsis_d2.density.calibration``): per-image statistics gathered over the processes, the model
unwrapped from DistributedDataParallel, and an evenly spaced subset of the calibration images.
"""

from typing import Dict, List

import numpy as np
from detectron2.utils import comm

from ..utils.dist import unwrap

__all__ = ["evenly_spaced", "gather_lists", "unwrap_model"]


def gather_lists(*columns: List) -> tuple:
    """Per-image lists of every process (each process calibrates on its shard), concatenated in
    rank order; the lists themselves in a single process."""
    stats = [columns]
    if comm.get_world_size() > 1:
        stats = comm.all_gather(columns)
    return tuple([item for s in stats for item in s[k]] for k in range(len(columns)))


def unwrap_model(model, methods, setting: str, needed: str):
    """``model`` with DistributedDataParallel unwrapped, or a ValueError ("``setting`` needs
    ``needed``") when it lacks one of ``methods``."""
    net = unwrap(model)
    if not all(hasattr(net, m) for m in methods):
        raise ValueError(f"{setting} needs {needed}, got {type(net).__name__}")
    return net


def evenly_spaced(dicts: List[Dict], max_images: int) -> List[Dict]:
    """``max_images`` of ``dicts`` evenly spaced (0: all)."""
    if 0 < max_images < len(dicts):
        keep = np.unique(np.linspace(0, len(dicts) - 1, max_images).round().astype(int))
        dicts = [dicts[i] for i in keep]
    return dicts
