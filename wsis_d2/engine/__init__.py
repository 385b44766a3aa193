from .calibration import DensityCountCalibration, build_calibration_loader, calibrate_density_counts
from .defaults import WSISTrainer
from .launch import check_device, launch
from .train_loop import AutocastTrainer, amp_dtype, build_train_loop

__all__ = [
    "AutocastTrainer",
    "DensityCountCalibration",
    "WSISTrainer",
    "amp_dtype",
    "build_calibration_loader",
    "build_train_loop",
    "check_device",
    "calibrate_density_counts",
    "launch",
]
