"""
wsis_d2's additions to detectron2's config. ``add_wsis_config(cfg)`` adds every key below to a
config obtained from ``detectron2.config.get_cfg()``; it never mutates detectron2's global defaults.
Call it before ``cfg.merge_from_file``.
"""
from detectron2.config import CfgNode as CN


def add_data_config(cfg):
    """Keys shared by all methods' data pipelines."""
    _C = cfg
    # name in wsis_d2.data.DATASET_MAPPER_REGISTRY; "" = detectron2's DatasetMapper
    _C.INPUT.DATASET_MAPPER = ""
    # also run detectron2's COCOEvaluator (pure-Python COCOeval) on "wsis_instance" datasets
    _C.TEST.WSIS_COCO_EVAL = True
    return cfg


def add_synthetic_config(cfg):
    """Embedded synthetic data (generated on first use and cached under $DETECTRON2_DATASETS)."""
    # the builtin splits are fixed by name (wsis_d2/data/datasets/builtin.py): no keys yet
    return cfg


def add_lc_config(cfg):
    """LC / ILC (Cholakkal et al., CVPR 2019)."""
    return cfg


def add_density_config(cfg):
    """Point-supervised density-map counting (Lempitsky & Zisserman 2010; FCRN; U-Net)."""
    return cfg


def add_wsis_config(cfg):
    """Add all wsis_d2 keys to ``cfg`` (a detectron2 CfgNode) and return it."""
    add_data_config(cfg)
    add_synthetic_config(cfg)
    add_lc_config(cfg)
    add_density_config(cfg)
    return cfg
