"""Density counting's config keys (``MODEL.DENSITY``, ``MODEL.FCRN``, ``MODEL.UNET``, ``INPUT.DENSITY``)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_density_config"]


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
    # weight μ of the local count loss: squared error of the counts in non-overlapping windows
    # (0 = off); the pixel-wise MSE alone leaves the mass of crowded regions free to drift
    _C.MODEL.DENSITY.COUNT_LOSS_WEIGHT = 0.0
    # side (input pixels) of the count-loss windows
    _C.MODEL.DENSITY.COUNT_LOSS_WINDOW = 16
    # inference averages the density over the 8 flips and quarter turns of the image (8x the cost)
    _C.MODEL.DENSITY.TEST_DIHEDRAL = False
    _C.MODEL.DENSITY.CALIBRATION = CN()
    # count calibration fitted on the full training images after training (least squares of the
    # true counts t_i): "none"; "gain": D̂' = α·D̂; "affine": D̂' = α·D̂ + β per pixel, i.e.
    # count' = α·count + β·|Ω| (a background offset β grows with the image area |Ω|)
    _C.MODEL.DENSITY.CALIBRATION.MODE = "none"
    # datasets to fit on (full images, test-time mapper); empty = DATASETS.TRAIN
    _C.MODEL.DENSITY.CALIBRATION.DATASETS = ()
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
    # (min, max) of a random intensity gain per training image (pixels x factor, clipped);
    # (1, 1): off
    _C.INPUT.DENSITY.BRIGHTNESS = (1.0, 1.0)
    # (min, max) of an independent random gain per colour channel (stain strengths); (1, 1): off
    _C.INPUT.DENSITY.CHANNEL_GAIN = (1.0, 1.0)
    # probability and (min, max) σ in pixels of a random Gaussian blur of training images
    _C.INPUT.DENSITY.BLUR_PROB = 0.0
    _C.INPUT.DENSITY.BLUR_SIGMA = (0.3, 1.0)
    # random elastic deformation of training images (after crops, flips and turns): displacement
    # std ALPHA px per control point on a grid of SPACING px, applied with probability PROB
    # (0 = off, the default: it did not lower the U-Net's error on the synthetic cells); points
    # move with the image
    _C.INPUT.DENSITY.ELASTIC = CN()
    _C.INPUT.DENSITY.ELASTIC.PROB = 0.0
    _C.INPUT.DENSITY.ELASTIC.ALPHA = 2.0
    _C.INPUT.DENSITY.ELASTIC.SPACING = 32.0
    # Training crops: loss mask of this many pixels along the borders that are crop cuts (a cell
    # cut there is labelled by whether its centre fell inside; at real image borders every visible
    # cell is labelled). 0 = off.
    _C.INPUT.DENSITY.CROP_EDGE_MARGIN = 0
    # probability per axis that a training crop is snapped to an image edge (absolute crops only)
    _C.INPUT.DENSITY.CROP_EDGE_PROB = 0.0
    # MiB of decoded training images kept in memory per data-loading process (0 = decode the file
    # for every crop)
    _C.INPUT.DENSITY.IMAGE_CACHE_MB = 0.0
    return cfg
