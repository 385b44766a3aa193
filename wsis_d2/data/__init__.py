from . import datasets  # noqa: F401  (registers builtin datasets)
from .mappers import DATASET_MAPPER_REGISTRY, build_dataset_mapper

__all__ = ["DATASET_MAPPER_REGISTRY", "build_dataset_mapper"]
