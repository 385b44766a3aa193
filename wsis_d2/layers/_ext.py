"""
Loads the compiled extension ``wsis_d2._C`` (which registers ``torch.ops.wsis_d2.*``).

A missing extension is not fatal: ``compiled_ops_available()`` is False and the Python wrappers fall
back to the pure-PyTorch references, with one logged warning saying so.
"""
import logging

import torch  # noqa: F401  (must be imported before the extension: libc10)

logger = logging.getLogger(__name__)

try:
    from wsis_d2 import _C  # noqa: F401  (registers torch.ops.wsis_d2)

    _IMPORT_ERROR = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = e

_warned = False


def compiled_ops_available() -> bool:
    """Whether ``wsis_d2._C`` is loaded; warns once (logged) when it is not."""
    global _warned
    if _C is None and not _warned:
        logger.warning(
            "wsis_d2._C is not available (%s); using the pure-PyTorch reference ops instead. "
            "Build it with `pip install --no-build-isolation -e .` (or `make install`).",
            _IMPORT_ERROR,
        )
        _warned = True
    return _C is not None


def cuda_ops_available() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return _C is not None and _C.has_cuda()
