"""
Ground truth derived from a registered split, kept across the evaluations of one process.

detectron2's trainer builds a new test loader and new evaluators at every evaluation
(``DefaultTrainer.test``), and each would load its split again; the counting baseline loads the
training split too. On COCO a load takes minutes. What they derive from a split (the test
loader's dicts, counts, instance RLEs, the count-only images, mean counts, density records) is
kept here per registration: the same name registered again, its metadata's ``json_file``
rewritten, its classes changed or ``$DETECTRON2_DATASETS`` changed loads it anew. A loader whose
result changes otherwise (files other than ``json_file``, data held in memory) needs
:func:`clear_ground_truth_cache` after the change. Callers must not modify what they get.
"""

import os
import threading
from collections import OrderedDict
from typing import Callable, Optional, Tuple, TypeVar

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["cached_ground_truth", "clear_ground_truth_cache"]

T = TypeVar("T")

# a "wsis_instance" split keeps 3 kinds (count-only check, instances, counts), the baseline 1:
# room for several test splits evaluated in turn, least recently used out first
MAX_ENTRIES = 32
_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_LOCK = threading.Lock()


def _registration(dataset_name: str) -> Optional[Tuple[tuple, Optional[tuple]]]:
    """
    What a split's loaded dicts depend on: (its registration, json stamp and
    ``$DETECTRON2_DATASETS``; its classes), or None when ``dataset_name`` is not registered.
    The classes apart: loading a split may fill them.
    """
    if dataset_name not in DatasetCatalog:
        return None
    meta = MetadataCatalog.get(dataset_name)
    json_file = meta.get("json_file", None)
    stamp = None
    if isinstance(json_file, str) and os.path.isfile(json_file):
        st = os.stat(json_file)
        stamp = (json_file, st.st_mtime_ns, st.st_size)
    classes = meta.get("thing_classes", None)
    source = (
        dataset_name,
        DatasetCatalog[dataset_name],  # the loader itself: a new registration is a new object
        stamp,
        os.environ.get("DETECTRON2_DATASETS"),  # built-in loaders resolve their paths with it
    )
    return source, tuple(classes) if classes is not None else None


def cached_ground_truth(kind: str, dataset_name: str, compute: Callable[[], T]) -> T:
    """
    ``compute()``, the ground truth of kind ``kind`` derived from ``dataset_name``, or the value
    it returned for the same registration before.

    Args:
        kind: what ``compute`` derives, e.g. "counts" (one name per function and arguments).
        dataset_name: the registered split ``compute`` loads; an unknown name is not cached
            (``compute`` raises, naming the registered ones).
        compute: loads the split and derives the value; called at most once per registration.
    """
    before = _registration(dataset_name)
    if before is None:
        return compute()
    key = (kind,) + before
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = compute()  # outside the lock: minutes on COCO
    after = _registration(dataset_name)
    # keyed with the classes as they are now (loading may have filled them), unless the source
    # (loader, json stamp, ...) changed during the load: then the value may be of neither
    if after is not None and after[0] == before[0]:
        with _LOCK:
            _CACHE[(kind,) + after] = value
            while len(_CACHE) > MAX_ENTRIES:
                _CACHE.popitem(last=False)
    return value


def clear_ground_truth_cache() -> None:
    """Forget every cached value (e.g. after a split's data changed under its registration)."""
    with _LOCK:
        _CACHE.clear()
