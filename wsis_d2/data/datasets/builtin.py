"""
Register the builtin datasets of wsis_d2 (imported by ``wsis_d2.data.datasets``, hence by
``import wsis_d2``).

The synthetic splits need no download: they are generated on first use under
``$DETECTRON2_DATASETS/wsis_synthetic/<split>/`` (default root ``datasets``) and cached there. See
``datasets/README.md``.
"""

import os
from typing import Dict, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

from .coco_counts import load_coco_counts_json
from .synthetic import SYNTHETIC_CLASSES, SyntheticSpec, prepare_synthetic_split

__all__ = ["get_synthetic_split", "register_all_synthetic", "register_synthetic_split"]

# ==== Predefined splits of the embedded synthetic data ==========
# name -> (directory under wsis_synthetic/, split parameters); every split has its own seed
_PREDEFINED_SPLITS_SYNTHETIC: Dict[str, Tuple[str, SyntheticSpec]] = {
    "wsis_synth_train": ("train", SyntheticSpec(num_images=800, seed=1001)),
    "wsis_synth_val": ("val", SyntheticSpec(num_images=200, seed=2002)),
    "wsis_synth_test": ("test", SyntheticSpec(num_images=200, seed=3003)),
    "wsis_synth_mini_train": ("mini_train", SyntheticSpec(num_images=16, seed=4004)),
    "wsis_synth_mini_val": ("mini_val", SyntheticSpec(num_images=8, seed=5005)),
    # a larger training split (generated in about a minute on first use)
    "wsis_synth_train_4k": ("train_4k", SyntheticSpec(num_images=4000, seed=6006)),
}

# name -> (root or None, split directory, spec) of every registered synthetic dataset
_REGISTERED: Dict[str, Tuple[Optional[str], str, SyntheticSpec]] = {}


def _datasets_root(root: Optional[str]) -> str:
    if root is not None:
        return root
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def get_synthetic_split(name: str) -> Tuple[str, str]:
    """
    Generate (if needed) the registered synthetic dataset ``name``.

    Returns:
        (json_file, image_root)
    """
    if name not in _REGISTERED:
        raise ValueError(f"{name!r} is not a registered synthetic dataset: {sorted(_REGISTERED)}")
    root, split, spec = _REGISTERED[name]
    return prepare_synthetic_split(_datasets_root(root), split, spec)


class _SyntheticMetadata(Metadata):
    """
    Metadata of a synthetic split. ``json_file`` and ``image_root`` are resolved when read, from
    the root given at registration or else from ``$DETECTRON2_DATASETS`` at that moment, and
    reading them generates the split if needed; so COCOEvaluator can be built before the data
    loader, and a DETECTRON2_DATASETS set after ``import wsis_d2`` (e.g. by tests) is honoured.
    """

    @property
    def json_file(self) -> str:
        return get_synthetic_split(self.name)[0]

    @property
    def image_root(self) -> str:
        return get_synthetic_split(self.name)[1]


def _load_synthetic(name: str):
    json_file, image_root = get_synthetic_split(name)
    return load_coco_counts_json(json_file, image_root, name)


def register_synthetic_split(
    name: str, split: str, spec: SyntheticSpec, root: Optional[str] = None
) -> None:
    """
    Register one synthetic dataset ``name`` in DatasetCatalog / MetadataCatalog (evaluator type
    "wsis_instance"), generated on first use under ``<root>/wsis_synthetic/<split>/``.

    Args:
        spec: its size and seed (e.g. ``SyntheticSpec(64, seed=7, min_image_size=128,
            max_image_size=128)`` for images of one size).
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` (default "datasets") each time
            the data is used rather than once now.
    """
    _REGISTERED[name] = (root, split, spec)
    DatasetCatalog.register(name, lambda: _load_synthetic(name))
    MetadataCatalog[name] = _SyntheticMetadata(name=name)
    MetadataCatalog.get(name).set(
        thing_classes=list(SYNTHETIC_CLASSES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SYNTHETIC_CLASSES))},
        evaluator_type="wsis_instance",
    )


def register_all_synthetic(root: Optional[str] = None) -> None:
    """
    Register the predefined synthetic splits (``wsis_synth_*``), see
    :func:`register_synthetic_split`.
    """
    for name, (split, spec) in _PREDEFINED_SPLITS_SYNTHETIC.items():
        register_synthetic_split(name, split, spec, root)


# None: resolve $DETECTRON2_DATASETS (default "datasets") on first use, not at import
register_all_synthetic(None)

from .point_datasets import register_all_density  # noqa: E402  (density counting splits)

register_all_density(None)

from .voc_counting import register_all_voc_counting  # noqa: E402  (PASCAL VOC splits)
from .coco_counting import register_all_coco_counting  # noqa: E402  (COCO 2014 / COCO-VOC)

register_all_voc_counting(None)
register_all_coco_counting(None)
