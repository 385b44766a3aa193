"""Collecting the per-rank predictions of a DatasetEvaluator on the main process."""
from typing import List, Optional

from detectron2.utils import comm

__all__ = ["gather_predictions"]


def gather_predictions(predictions: List, distributed: bool) -> Optional[List]:
    """
    All ranks' predictions, concatenated in rank order, on the main process.

    Args:
        predictions: this rank's list of predictions.
        distributed: gather from all ranks (synchronising them); False: ``predictions`` as is.

    Returns:
        the list on the main process (or when not distributed); None on the other ranks, which
        must then return ``{}`` from ``evaluate``.
    """
    if not distributed:
        return predictions
    comm.synchronize()
    gathered = comm.gather(predictions, dst=0)
    if not comm.is_main_process():
        return None
    return [p for part in gathered for p in part]
