"""
Registry of dataset mappers, so that a config chooses how dataset dicts become model inputs.
"""
from detectron2.data import DatasetMapper
from detectron2.utils.registry import Registry

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Registry for dataset mappers: callables turning one detectron2 dataset dict into one model input.

A registered object is called as ``obj(cfg, is_train)`` (``@configurable`` classes accept this) and
selected by ``cfg.INPUT.DATASET_MAPPER``; the empty string selects detectron2's ``DatasetMapper``.
"""


def build_dataset_mapper(cfg, is_train: bool):
    """
    Build the mapper named by ``cfg.INPUT.DATASET_MAPPER`` ("" = detectron2's ``DatasetMapper``).

    Args:
        cfg: a config with wsis_d2's keys (``add_wsis_config``).
        is_train: build the training (augmenting) or the test mapper.
    """
    name = cfg.INPUT.DATASET_MAPPER
    if not name:
        return DatasetMapper(cfg, is_train)
    if name not in DATASET_MAPPER_REGISTRY:
        raise ValueError(
            f"cfg.INPUT.DATASET_MAPPER={name!r} is not a registered mapper; "
            f"known: {sorted(k for k, _ in DATASET_MAPPER_REGISTRY)}"
        )
    return DATASET_MAPPER_REGISTRY.get(name)(cfg, is_train)
