"""Parts shared by the methods: the MobileNetV2 backbone (and FPN on it)."""
from .mobilenet import MobileNetV2Backbone  # noqa: F401  (registers the MobileNetV2 backbones)
