"""
wsis_d2's additions to detectron2's config. ``add_wsis_config(cfg)`` adds every key below to a
config obtained from ``detectron2.config.get_cfg()``; it never mutates detectron2's global defaults.
Call it before ``cfg.merge_from_file``.
"""
from detectron2.config import CfgNode as CN


def add_data_config(cfg):
    """Keys shared by all methods' data pipelines."""
    _C = cfg
    # name in wsis_d2.data.DATASET_MAPPER_REGISTRY; "" = detectron2's DatasetMapper
    _C.INPUT.DATASET_MAPPER = ""
    # also run detectron2's COCOEvaluator (pure-Python COCOeval) on "wsis_instance" datasets
    _C.TEST.WSIS_COCO_EVAL = True
    return cfg


def add_synthetic_config(cfg):
    """Embedded synthetic data (generated on first use and cached under $DETECTRON2_DATASETS)."""
    # the builtin splits are fixed by name (wsis_d2/data/datasets/builtin.py): no keys yet
    return cfg


def add_lc_config(cfg):
    """LC / ILC (Cholakkal et al., CVPR 2019)."""
    return cfg


def add_density_config(cfg):
    """Point-supervised density-map counting (Lempitsky & Zisserman 2010; FCRN; U-Net)."""
    _C = cfg
    _C.MODEL.DENSITY = CN()
    # number of density channels C (one per point class); count_c = ∫ D̂_c
    _C.MODEL.DENSITY.NUM_CLASSES = 1
    # backbone feature map (stride 1) fed to the 1x1 density head
    _C.MODEL.DENSITY.IN_FEATURE = "dense"
    # std σ (pixels of the network input) of the Gaussian N(p; P_i, σ²I) placed at each point P_i
    _C.MODEL.DENSITY.SIGMA = 3.0
    # k of geometry-adaptive kernels σ_i = β·d̄_i (mean distance to k nearest points); 0 = fixed σ
    _C.MODEL.DENSITY.ADAPTIVE_K = 0
    # β of geometry-adaptive kernels σ_i = β·d̄_i
    _C.MODEL.DENSITY.ADAPTIVE_BETA = 0.3
    # (min, max) clamp of adaptive σ_i in pixels
    _C.MODEL.DENSITY.ADAPTIVE_SIGMA_RANGE = (1.0, 20.0)
    # density scale factor s: the network regresses s·D and counts divide by s (public U-Net: 100)
    _C.MODEL.DENSITY.SCALE = 100.0
    # weight λ of the pixel-wise MSE loss
    _C.MODEL.DENSITY.LOSS_WEIGHT = 1.0
    _C.MODEL.DENSITY.PEAKS = CN()
    # also return point detections (density peaks) as Instances
    _C.MODEL.DENSITY.PEAKS.ENABLED = False
    # non-maximum window radius r of the peak finder (pixels)
    _C.MODEL.DENSITY.PEAKS.RADIUS = 2
    # peak threshold t as a fraction of an isolated kernel's height 1/(2πσ²)
    _C.MODEL.DENSITY.PEAKS.THRESHOLD = 0.3
    # side of the square pred_boxes drawn around each peak (pixels of the output image)
    _C.MODEL.DENSITY.PEAKS.BOX_SIZE = 12.0

    # FCRN-A / FCRN-B (Xie, Noble & Zisserman 2016)
    _C.MODEL.FCRN = CN()
    # width of each down-sampling block; depth = len(CHANNELS) poolings and up-samplings
    _C.MODEL.FCRN.CHANNELS = [32, 64, 128]
    # width of the "fully connected" 3x3 block at the lowest resolution
    _C.MODEL.FCRN.MID_CHANNELS = 512
    # 3x3 convs per block; 0 = the variant's own (A: 1, pooling after every conv; B: 2)
    _C.MODEL.FCRN.CONVS_PER_BLOCK = 0
    # normalisation after each conv: "BN", "GN", "" (none)
    _C.MODEL.FCRN.NORM = "BN"

    # U-Net (Ronneberger et al. 2015) with skip connections
    _C.MODEL.UNET = CN()
    # width of each encoder block; depth = len(CHANNELS); the decoder mirrors it
    _C.MODEL.UNET.CHANNELS = [32, 64, 128]
    # width of the bottleneck block
    _C.MODEL.UNET.MID_CHANNELS = 256
    # 3x3 convs per block
    _C.MODEL.UNET.CONVS_PER_BLOCK = 2
    # normalisation after each conv: "BN", "GN", "" (none)
    _C.MODEL.UNET.NORM = "BN"

    _C.INPUT.DENSITY = CN()
    # random flips of training images: any of "horizontal", "vertical"
    _C.INPUT.DENSITY.FLIPS = ["horizontal", "vertical"]
    # also rotate training images by a random multiple of 90° (square crops only)
    _C.INPUT.DENSITY.ROTATE_90 = False
    return cfg


def add_wsis_config(cfg):
    """Add all wsis_d2 keys to ``cfg`` (a detectron2 CfgNode) and return it."""
    add_data_config(cfg)
    add_synthetic_config(cfg)
    add_lc_config(cfg)
    add_density_config(cfg)
    return cfg
