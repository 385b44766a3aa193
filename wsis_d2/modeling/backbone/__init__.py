from .fcrn import FCRN, FCRN_A, FCRN_B  # noqa: F401  (registers FCRN_A / FCRN_B backbones)
from .unet import UNet  # noqa: F401  (registers the UNet backbone)
from .mobilenet import MobileNetV2Backbone  # noqa: F401  (registers build_mobilenet_v2_backbone)
