from . import datasets  # noqa: F401  (registers builtin datasets)
from .mapper_registry import DATASET_MAPPER_REGISTRY, build_dataset_mapper

__all__ = ["DATASET_MAPPER_REGISTRY", "build_dataset_mapper"]
