"""Helpers for wsis_d2's tests (as ``detectron2.utils.testing``)."""

import contextlib
import os

__all__ = ["datasets_root"]


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
