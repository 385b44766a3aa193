"""
Point-supervised density-map counting (FCRN-A / FCRN-B, U-Net). Importing the package registers
``DensityCounter`` (META_ARCH), the ``FCRN_A`` / ``FCRN_B`` / ``UNet`` backbones,
``DensityDatasetMapper`` and the count calibration hook.
"""
from .config import add_density_config
from .fcrn import FCRN, FCRN_A, FCRN_B
from .unet import UNet
from .mapper import DensityDatasetMapper
from .losses import DensityLoss
from .meta_arch import DensityCounter
from .postprocessing import DensityPointDetector
from .targets import DensityTargets
from .calibration import (  # also registers density_trainer_hooks
    DensityCountCalibration,
    calibrate_density_counts,
)

__all__ = [
    "DensityCountCalibration",
    "DensityCounter",
    "DensityDatasetMapper",
    "DensityLoss",
    "DensityPointDetector",
    "DensityTargets",
    "FCRN",
    "FCRN_A",
    "FCRN_B",
    "UNet",
    "add_density_config",
    "calibrate_density_counts",
]
