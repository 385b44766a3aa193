"""
LC / ILC (Cholakkal et al., CVPR 2019): object counting and instance segmentation from image-level
(lower) counts. Importing the package registers ``ImageLevelCounter`` (META_ARCH), ``LCHead``
(LC_HEAD_REGISTRY), ``LCDatasetMapper`` and the count calibration hook. The meta-architecture's
components: ``LCHead``, ``LCLoss`` (the losses) and ``PRMInstanceDecoder`` (the instances).
"""
from .config import add_lc_config
from .heads import LC_HEAD_REGISTRY, LCHead, build_lc_head
from .losses import LCLoss
from .mapper import LCDatasetMapper
from .meta_arch import ImageLevelCounter
from .prm import PRMInstanceDecoder
from .calibration import LCCountCalibration, calibrate_lc_counts  # also registers lc_trainer_hooks

__all__ = [
    "ImageLevelCounter",
    "LCCountCalibration",
    "LCDatasetMapper",
    "LCHead",
    "LCLoss",
    "LC_HEAD_REGISTRY",
    "PRMInstanceDecoder",
    "add_lc_config",
    "build_lc_head",
    "calibrate_lc_counts",
]
