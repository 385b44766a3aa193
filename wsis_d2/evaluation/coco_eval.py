"""
COCO AP (detectron2's ``COCOEvaluator``) with the fastest COCOeval this environment has:

1. "detectron2": detectron2's own compiled ``COCOeval_opt`` (``detectron2._C``), when built;
2. "faster_coco_eval": the faster-coco-eval package's ``COCOeval_faster`` (a maintained C++
   drop-in for pycocotools' COCOeval, same per-image matching and accumulation), when installed;
3. "pycocotools": the official pure-Python COCOeval.

The repaired detectron2 v0.6 has no compiled ``_C``, so without faster-coco-eval the choice is 3.
tools/benchmark_coco_eval.py measures 2 against 3 on the same predictions: equal AP to 1e-6.
"""

import contextlib
import importlib.machinery
import importlib.util
import logging
from typing import Optional

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco_evaluation

__all__ = ["COCO_EVAL_BACKENDS", "default_coco_backend", "cocoeval_class", "FastCOCOEvaluator"]

logger = logging.getLogger(__name__)

COCO_EVAL_BACKENDS = ("detectron2", "faster_coco_eval", "pycocotools")


def _detectron2_compiled() -> bool:
    """Whether ``detectron2._C`` is a compiled extension (the repaired v0.6 ships a Python
    module of stubs under that name, which raise NotImplementedError)."""
    spec = importlib.util.find_spec("detectron2._C")
    if spec is None or spec.origin is None:
        return False
    return spec.origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def default_coco_backend() -> str:
    """The first available of :data:`COCO_EVAL_BACKENDS`."""
    if _detectron2_compiled():
        return "detectron2"
    if importlib.util.find_spec("faster_coco_eval") is not None:
        return "faster_coco_eval"
    return "pycocotools"


def cocoeval_class(backend: str):
    """
    The COCOeval class of ``backend``: constructed as ``(coco_gt, coco_dt, iou_type)``, with
    ``params``, ``evaluate()``, ``accumulate()``, ``summarize()``, ``stats`` and
    ``eval["precision"]`` as pycocotools has them.
    """
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return COCOeval
    if backend == "detectron2":
        from detectron2.evaluation.fast_eval_api import COCOeval_opt

        return COCOeval_opt
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCOeval_faster
        except ImportError as exc:
            raise ValueError("COCO eval backend 'faster_coco_eval' is not installed") from exc

        class FasterCOCOeval(COCOeval_faster):
            """pycocotools' signature; its summary printed as pycocotools prints it (stdout),
            and the IoUs of an image computed in this thread (one job per core already)."""

            def __init__(self, coco_gt=None, coco_dt=None, iou_type="segm"):
                super().__init__(
                    coco_gt, coco_dt, iou_type, print_function=print, rle_iou_max_workers=1
                )

        return FasterCOCOeval
    raise ValueError(f"COCO eval backend must be one of {COCO_EVAL_BACKENDS}, got {backend!r}")


@contextlib.contextmanager
def _cocoeval_opt_as(cls):
    """detectron2's ``_evaluate_predictions_on_coco`` picks ``COCOeval_opt`` from its module when
    ``use_fast_impl``: point that name at ``cls`` for the duration (restored after)."""
    saved = d2_coco_evaluation.COCOeval_opt
    d2_coco_evaluation.COCOeval_opt = cls
    try:
        yield
    finally:
        d2_coco_evaluation.COCOeval_opt = saved


class FastCOCOEvaluator(COCOEvaluator):
    """
    detectron2's ``COCOEvaluator`` (same arguments, results and files) whose COCOeval is chosen by
    ``backend`` (default: :func:`default_coco_backend`).
    """

    def __init__(self, dataset_name: str, *args, backend: Optional[str] = None, **kwargs):
        backend = backend or default_coco_backend()
        if backend not in COCO_EVAL_BACKENDS:
            raise ValueError(
                f"COCO eval backend must be one of {COCO_EVAL_BACKENDS}, got {backend!r}"
            )
        kwargs.pop("use_fast_impl", None)
        super().__init__(dataset_name, *args, use_fast_impl=backend != "pycocotools", **kwargs)
        # upstream's __init__ turns use_fast_impl off when its own compiled COCOeval is missing
        self._use_fast_impl = backend != "pycocotools"
        self.backend = backend
        self._backend_class = cocoeval_class(backend)
        logger.info(f"COCO AP of {dataset_name} with {backend}'s COCOeval")

    def _eval_predictions(self, predictions, img_ids=None):
        if self.backend != "faster_coco_eval":
            return super()._eval_predictions(predictions, img_ids)
        with _cocoeval_opt_as(self._backend_class):
            return super()._eval_predictions(predictions, img_ids)
