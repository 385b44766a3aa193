"""
wsis_d2's additions to detectron2's config. ``add_wsis_config(cfg)`` adds every key below to a
config obtained from ``detectron2.config.get_cfg()``; it never mutates detectron2's global defaults.
Call it before ``cfg.merge_from_file``.
"""

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_data_config(cfg):
    """Keys shared by all methods' data pipelines."""
    _C = cfg
    # name in wsis_d2.data.DATASET_MAPPER_REGISTRY; "" = detectron2's DatasetMapper
    _C.INPUT.DATASET_MAPPER = ""
    # also run COCO AP on "wsis_instance" datasets (FastCOCOEvaluator: the fastest COCOeval here)
    _C.TEST.WSIS_COCO_EVAL = True
    # wsis_d2's mappers (LC, CCGR and, for INPUT.DATASET_MAPPER "", detectron2's DatasetMapper): a
    # JPEG whose shorter side is at least 4x the largest input size is decoded at 1/2, 1/4 or 1/8
    # scale (libjpeg's DCT scaling, wsis_d2.data.image_io), keeping at least twice the input's
    # resolution: several times faster loading of large photographs
    _C.INPUT.REDUCED_DECODE = True
    # graph-based segmentation of the input image (Felzenszwalb & Huttenlocher), whose regions
    # let masks and scores follow image edges: LC's PRM masks (MASK_MODE "segments"), CCGR's cues
    # and pseudo labels (CUE_MODE / SCORE_MODE "regions")
    _C.MODEL.SEGMENTS = CN()
    # k of the region merging criterion (larger: bigger regions)
    _C.MODEL.SEGMENTS.SCALE = 300.0
    # σ (input pixels) of the Gaussian smoothing before the segmentation
    _C.MODEL.SEGMENTS.SIGMA = 0.8
    # smallest region (input pixels); smaller ones are merged into a neighbour
    _C.MODEL.SEGMENTS.MIN_SIZE = 20
    return cfg


def add_solver_config(cfg):
    """Optimizer choice (``wsis_d2.solver.build_optimizer``)."""
    _C = cfg
    # "SGD" (detectron2's, as in the papers) or "AdamW" (faster from random init on small budgets)
    _C.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (β1, β2)
    _C.SOLVER.BETAS = (0.9, 0.999)
    return cfg


def add_engine_config(cfg):
    """Mixed precision and memory format of training (``wsis_d2.engine``)."""
    _C = cfg
    # autocast dtype when SOLVER.AMP.ENABLED (wsis_d2.engine.build_train_loop): "float16" is
    # detectron2's AMPTrainer (CUDA, gradient scaler); "bfloat16" is wsis_d2's AutocastTrainer (CPU
    # or CUDA, no scaler; about 1.5-2x faster convolutions on CPUs with AVX-512 BF16 or AMX)
    _C.SOLVER.AMP.DTYPE = "float16"
    # "bfloat16" on a device without native bfloat16 (CPUs without AVX-512 BF16 / AMX, where
    # oneDNN emulates it and a step runs 7-18x slower): train in float32 instead, with a warning
    _C.SOLVER.AMP.BF16_FALLBACK = True
    # keep weights and activations of convolutional models in channels-last (NHWC) memory format,
    # which oneDNN (CPU) and cuDNN (with autocast) run faster; results are the same up to rounding
    _C.MODEL.CHANNELS_LAST = False
    # CPU training: memory freed by a step stays in the process for the next one (glibc malloc's
    # mmap and trim thresholds raised, wsis_d2.utils.memory) instead of being faulted in afresh
    # from the kernel; helps models with large full-resolution activations (the density configs
    # turn it on), not the detectors measured (docs/notes/results_real.md)
    _C.SOLVER.CPU_RETAIN_FREED_MEMORY = False
    return cfg


def add_backbone_config(cfg):
    """Backbones wsis_d2 adds to detectron2's BACKBONE_REGISTRY (besides the density ones)."""
    _C = cfg
    # MobileNetV2 (wsis_d2/modeling/mobilenet.py), e.g. from torchvision's ImageNet
    # weights converted by tools/fetch_mobilenet_weights.py; build_mobilenet_v2_fpn_backbone puts
    # detectron2's FPN (MODEL.FPN.*) on the stages named in MODEL.FPN.IN_FEATURES
    _C.MODEL.MOBILENET = CN()
    # stages to return: "m1".."m5" (output strides 2, 4, 8, 16, 32)
    _C.MODEL.MOBILENET.OUT_FEATURES = ["m4"]
    # the first FREEZE_AT stages keep their weights (0: train all)
    _C.MODEL.MOBILENET.FREEZE_AT = 2
    # "FrozenBN" (ImageNet statistics fixed, for fine-tuning from weights), "BN" (trainable) or
    # "GN" (GroupNorm with gcd(32, C) groups; a BN checkpoint gives its γ, β)
    _C.MODEL.MOBILENET.NORM = "FrozenBN"
    # 2: "m5" at stride 16 (dilated depthwise convs) instead of 32
    _C.MODEL.MOBILENET.M5_DILATION = 1
    return cfg


def add_wsis_config(cfg):
    """Add all wsis_d2 keys to ``cfg`` (a detectron2 CfgNode): the shared ones, then each
    method's (its package's ``config.py``), and return it."""
    # imported here: the method packages import the engine, and CCGR's rounds import this module
    from .ccgr.config import add_ccgr_config
    from .density.config import add_density_config
    from .lc.config import add_lc_config

    add_data_config(cfg)
    add_backbone_config(cfg)
    add_solver_config(cfg)
    add_engine_config(cfg)
    add_lc_config(cfg)
    add_density_config(cfg)
    add_ccgr_config(cfg)
    return cfg


def get_wsis_cfg(config_file: str = "", opts=()) -> CN:
    """
    detectron2's default config with every wsis_d2 key, then ``config_file`` (if given) and the
    "KEY VALUE" list ``opts`` merged in, in that order; not frozen.
    """
    cfg = add_wsis_config(get_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg
