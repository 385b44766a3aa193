from .coco_counts import load_coco_counts_json, register_coco_counts_instances
from .metadata import thing_classes_of
from .synthetic import SYNTHETIC_CLASSES, SyntheticSpec, prepare_synthetic_split
from . import builtin  # noqa: F401  (registers the builtin synthetic splits)
from .builtin import get_synthetic_split, register_all_synthetic, register_synthetic_split

__all__ = [k for k in globals().keys() if not k.startswith("_")]
