from .calibration import (
    DensityCountCalibration,
    LCCountCalibration,
    build_calibration_loader,
    build_lc_calibration_loader,
    calibrate_density_counts,
    calibrate_lc_counts,
)
from .defaults import WSISTrainer
from .health import CountHealthCheck, collapsed_classes
from .launch import check_device, launch
from .train_loop import AutocastTrainer, amp_dtype, build_train_loop

__all__ = [
    "AutocastTrainer",
    "CountHealthCheck",
    "DensityCountCalibration",
    "LCCountCalibration",
    "WSISTrainer",
    "amp_dtype",
    "build_calibration_loader",
    "build_lc_calibration_loader",
    "build_train_loop",
    "check_device",
    "collapsed_classes",
    "calibrate_density_counts",
    "calibrate_lc_counts",
    "launch",
]
