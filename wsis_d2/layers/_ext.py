"""
Loads the compiled extension ``wsis_d2._C`` (which registers ``torch.ops.wsis_d2.*``).

A missing extension is not fatal: ``compiled_ops_available()`` is False and the Python wrappers fall
back to the pure-PyTorch references, with one logged warning saying so. The same holds for CUDA
tensors when the extension was built without its CUDA kernels.
"""

import logging
from typing import Optional

import torch  # noqa: F401  (must be imported before the extension: libc10)

logger = logging.getLogger(__name__)

try:
    from wsis_d2 import _C  # noqa: F401  (registers torch.ops.wsis_d2)

    _IMPORT_ERROR = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = e

_warned = False
_warned_cuda = False


def compiled_ops_available(device: Optional[torch.device] = None) -> bool:
    """
    Whether the compiled ops can run (on ``device``'s type when given); warns once (logged) when
    the Python wrappers have to fall back to the references.
    """
    global _warned, _warned_cuda
    if _C is None:
        if not _warned:
            logger.warning(
                "wsis_d2._C is not available (%s); using the pure-PyTorch reference ops instead. "
                "Build it with `pip install --no-build-isolation -e .` (or `make install`).",
                _IMPORT_ERROR,
            )
            _warned = True
        return False
    if device is not None and torch.device(device).type == "cuda" and not _C.has_cuda():
        if not _warned_cuda:
            logger.warning(
                "wsis_d2._C was built without CUDA kernels; using the pure-PyTorch reference ops "
                "for CUDA tensors. Rebuild with FORCE_CUDA=1 (and CUDA_HOME) to compile them."
            )
            _warned_cuda = True
        return False
    return True


def cuda_ops_available() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return _C is not None and _C.has_cuda()
