"""
wsis_d2's additions to detectron2's config. ``add_wsis_config(cfg)`` adds every key below to a
config obtained from ``detectron2.config.get_cfg()``; it never mutates detectron2's global defaults.
Call it before ``cfg.merge_from_file``.
"""
from detectron2.config import CfgNode as CN


def add_synthetic_config(cfg):
    """Embedded synthetic data (generated on first use and cached under $DETECTRON2_DATASETS)."""
    _C = cfg
    _C.DATASETS.SYNTHETIC = CN()
    # placeholder, filled by the data package
    return cfg


def add_lc_config(cfg):
    """LC / ILC (Cholakkal et al., CVPR 2019)."""
    return cfg


def add_density_config(cfg):
    """Point-supervised density-map counting (Lempitsky & Zisserman 2010; FCRN; U-Net)."""
    return cfg


def add_wsis_config(cfg):
    """Add all wsis_d2 keys to ``cfg`` (a detectron2 CfgNode) and return it."""
    add_synthetic_config(cfg)
    add_lc_config(cfg)
    add_density_config(cfg)
    return cfg
