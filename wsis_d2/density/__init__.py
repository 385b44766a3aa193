"""
Point-supervised density-map counting (FCRN-A / FCRN-B, U-Net). Importing the package registers
``DensityCounter`` (META_ARCH), the ``FCRN_A`` / ``FCRN_B`` / ``UNet`` backbones,
``DensityDatasetMapper`` and the count calibration hook.
"""
from .config import add_density_config
from .fcrn import FCRN, FCRN_A, FCRN_B
from .unet import UNet
from .mapper import DensityDatasetMapper
from .meta_arch import DensityCounter
from .calibration import (  # also registers density_trainer_hooks
    DensityCountCalibration,
    calibrate_density_counts,
)

__all__ = [
    "DensityCountCalibration",
    "DensityCounter",
    "DensityDatasetMapper",
    "FCRN",
    "FCRN_A",
    "FCRN_B",
    "UNet",
    "add_density_config",
    "calibrate_density_counts",
]
