"""
detectron2's tracing export (``TracingAdapter``, the flatten schemas), importable on both
detectron2 versions wsis_d2 supports.
"""

import importlib
import logging
import os
import sys
import types

__all__ = ["detectron2_export"]

logger = logging.getLogger(__name__)


def detectron2_export() -> types.ModuleType:
    """
    The ``detectron2.export`` package. v0.6's ``__init__`` imports its Caffe2 exporter first,
    which needs the long-removed ``caffe2`` module (upstream main made that import optional);
    there the package is set up without its ``__init__`` and only the tracing modules are loaded.
    """
    try:
        return importlib.import_module("detectron2.export")
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("caffe2"):
            raise
    import detectron2

    package = types.ModuleType("detectron2.export")
    package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
    package.__package__ = "detectron2.export"
    sys.modules["detectron2.export"] = package
    detectron2.export = package
    flatten = importlib.import_module("detectron2.export.flatten")
    torchscript = importlib.import_module("detectron2.export.torchscript")
    package.TracingAdapter = flatten.TracingAdapter
    package.scripting_with_instances = torchscript.scripting_with_instances
    package.dump_torchscript_IR = torchscript.dump_torchscript_IR
    logger.info("detectron2.export without its Caffe2 part (no caffe2 module; detectron2 v0.6)")
    return package
