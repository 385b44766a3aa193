"""Helpers for wsis_d2's tests (as ``detectron2.utils.testing``)."""

import contextlib
import os

__all__ = ["datasets_root", "device_under_test"]


@contextlib.contextmanager
def datasets_root(path: str):
    """
    Point ``$DETECTRON2_DATASETS`` (where the builtin datasets are read and the synthetic splits
    generated) at ``path`` inside the block, then restore it (or unset it again). In a
    ``unittest.TestCase``: ``cls.enterClassContext(datasets_root(...))`` in ``setUpClass`` or
    ``self.enterContext(...)`` in a test.
    """
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("DETECTRON2_DATASETS", None)
        else:
            os.environ["DETECTRON2_DATASETS"] = old


def device_under_test() -> str:
    """
    The ``MODEL.DEVICE`` of the end-to-end tests (training, CCGR stages and rounds): "cpu" unless
    ``$WSIS_TEST_DEVICE`` names another (``WSIS_TEST_DEVICE=cuda make test`` on a GPU machine runs
    them on CUDA; the op tests have their own CUDA classes, run whenever a GPU is visible).
    """
    device = os.environ.get("WSIS_TEST_DEVICE", "cpu") or "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"$WSIS_TEST_DEVICE is {device!r} but torch sees no GPU")
    return device
