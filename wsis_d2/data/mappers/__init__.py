from .build import DATASET_MAPPER_REGISTRY, build_dataset_mapper
from .density_mapper import DensityDatasetMapper  # noqa: F401  (registers the mapper)
from .lc_mapper import LCDatasetMapper  # noqa: F401  (registers the mapper)
from .ccgr_mapper import CCGRDatasetMapper  # noqa: F401  (registers the mapper)

__all__ = ["DATASET_MAPPER_REGISTRY", "build_dataset_mapper"]
