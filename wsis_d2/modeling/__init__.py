from . import backbone, meta_arch  # noqa: F401  (registers into detectron2's registries)
