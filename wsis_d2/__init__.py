"""
wsis_d2: weakly supervised counting and instance segmentation as Detectron2 parts.

Importing the package registers its datasets (DatasetCatalog / MetadataCatalog), meta-architectures
and backbones (detectron2 registries).
"""
from .config import add_wsis_config, get_wsis_cfg

# imported for their side effect of registering datasets, models and evaluators
from . import data  # noqa: F401  (registers builtin datasets)
from . import modeling  # noqa: F401  (registers META_ARCH / BACKBONE entries)
from . import evaluation  # noqa: F401
from . import solver  # noqa: F401  (build_optimizer: SOLVER.OPTIMIZER, used by engine.WSISTrainer)

__version__ = "0.1.0"
__all__ = ["add_wsis_config", "get_wsis_cfg"]
