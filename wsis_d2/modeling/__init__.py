from . import backbone, heads, meta_arch, roi_heads  # noqa: F401  (register into detectron2's registries)
