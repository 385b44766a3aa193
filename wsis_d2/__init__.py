"""
wsis_d2: weakly supervised counting and instance segmentation as Detectron2 parts.

One package per method over a shared core: :mod:`wsis_d2.lc` (LC / ILC), :mod:`wsis_d2.density`
(density-map counting) and :mod:`wsis_d2.ccgr` (CCGR); ``layers``, ``data``, ``evaluation``,
``engine`` and ``solver`` are shared. Importing the package registers every dataset,
meta-architecture, backbone, head, mapper and trainer hook with detectron2.
"""
from .config import add_wsis_config, get_wsis_cfg

# imported for their side effect of registering with detectron2's and wsis_d2's registries
from . import data  # noqa: F401  (builtin datasets, the mapper registry)
from . import modeling  # noqa: F401  (shared backbones)
from . import evaluation  # noqa: F401
from . import solver  # noqa: F401  (build_optimizer: SOLVER.OPTIMIZER)
from . import lc  # noqa: F401  (ImageLevelCounter, LCHead, LCDatasetMapper, calibration hook)
from . import density  # noqa: F401  (DensityCounter, FCRN / U-Net, DensityDatasetMapper, hook)
from . import ccgr  # noqa: F401  (CCGRNet, WSDDNROIHeads, PSPHead, CCGRDatasetMapper)

__version__ = "0.1.0"
__all__ = ["add_wsis_config", "get_wsis_cfg"]
