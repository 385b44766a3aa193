"""LC / ILC's config keys (``MODEL.LC``, ``INPUT.LC``)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_lc_config"]


def add_lc_config(cfg):
    """LC / ILC (Cholakkal et al., CVPR 2019)."""
    _C = cfg
    _C.MODEL.LC = CN()
    # number of object classes C (channels of the class maps M and density maps D)
    _C.MODEL.LC.NUM_CLASSES = 20
    # backbone feature fed to the two branches (e.g. "res5", or "res4" for R18/R34)
    _C.MODEL.LC.IN_FEATURE = "res5"
    # name in wsis_d2.lc.heads.LC_HEAD_REGISTRY
    _C.MODEL.LC.HEAD_NAME = "LCHead"
    # P, channels of each branch's hidden 1x1 conv; 0 = ceil(1.5·C) as in the paper
    _C.MODEL.LC.BRANCH_CHANNELS = 0
    # normalisation in the branches: "BN", "GN", "SyncBN", "" (none)
    _C.MODEL.LC.NORM = "BN"
    # normalisation of the density branch alone: "same" (as NORM) or one of NORM's values
    _C.MODEL.LC.DENSITY_NORM = "same"
    # bilinear upsampling factor u of M and D (official: sub_pixel_locating_factor = 1)
    _C.MODEL.LC.UPSAMPLE = 1
    # peak finder: local-maximum window radius r (window 2r+1; official win_size 3: r = 1)
    _C.MODEL.LC.PEAK_RADIUS = 1
    # peak filter: "median" (peaks >= the map's median, official), "value" (>= PEAK_FILTER_VALUE),
    # "none"
    _C.MODEL.LC.PEAK_FILTER = "median"
    # absolute peak threshold used when PEAK_FILTER = "value"
    _C.MODEL.LC.PEAK_FILTER_VALUE = 0.0
    # lower-count threshold t̃: counts < t̃ are exact (S), counts >= t̃ only known as ">= t̃" (S̃)
    _C.MODEL.LC.LOWER_COUNT = 5
    # weight of the classification loss L_class
    _C.MODEL.LC.CLS_LOSS_WEIGHT = 1.0
    # weight of the spatial loss L_spatial = L_sp+ + L_sp−
    _C.MODEL.LC.SPATIAL_LOSS_WEIGHT = 1.0
    # weight of the count MSE term of the global loss
    _C.MODEL.LC.COUNT_LOSS_WEIGHT = 1.0
    # λ, weight of the ranking term max(0, t̃ − t̂_c) over S̃ (official 0.1)
    _C.MODEL.LC.RANK_LOSS_WEIGHT = 0.1
    # t̂_c: "paper" = Σ_ij D^c_ij, "official" = spatial mean of D^c (CountSeg)
    _C.MODEL.LC.COUNT_MODE = "paper"
    # L_sp+/L_sp−: "paper" = masked BCE per class over B^c normalised by |S|·ΣB^c (and
    # |S0|·H·W), "official" = BCE-with-logits pooled over the batch's guidance peaks (pixels)
    _C.MODEL.LC.SPATIAL_MODE = "paper"
    # count MSE over S ∪ S0 (absent classes too, t_c = 0; paper, official stage 2) or over S only
    _C.MODEL.LC.COUNT_ABSENT = True
    # official two-stage schedule: iterations of stage 1 (no spatial loss, count MSE over S
    # only); 0 = single stage as in the paper
    _C.MODEL.LC.SPATIAL_START_ITER = 0
    # iterations before it train the classification loss alone (L_spatial, the count MSE and the
    # ranking term are zero): the count MSE's gradients in the shared backbone held the
    # classification at the label prior for ~1,000 iterations on the synthetic scenes; 0 = off
    _C.MODEL.LC.DENSITY_START_ITER = 0
    # factor on the gradient the density branch passes into the backbone (1: joint training as
    # in the paper; < 1 keeps the count MSE from overriding the classification's features)
    _C.MODEL.LC.DENSITY_BACKBONE_GRAD = 1.0
    # inference: class c is present when σ(s_c) > this; counts round(t̂_c) there, 0 elsewhere
    _C.MODEL.LC.CLASS_THRESHOLD = 0.5
    # train the classification branch alone from image-level labels (PRM-style peak stimulation,
    # the classifier of CCGR's round-1 cues): L_class only, counts are never read
    _C.MODEL.LC.IMAGE_LABELS_ONLY = False
    _C.MODEL.LC.CALIBRATION = CN()
    # count calibration fitted after the last iteration (not in the paper): "gain" sets
    # α_c = argmin Σ_S (α·t̂ − t)² + Σ_S̃ max(0, t̃ − α·t̂)² over training images where class c is
    # present, with the training supervision (counts censored at t̃ as the training mapper does),
    # and inference uses α_c·D^c; "none": α = 1
    _C.MODEL.LC.CALIBRATION.MODE = "none"
    # datasets to fit on (full images at the test size); empty = DATASETS.TRAIN
    _C.MODEL.LC.CALIBRATION.DATASETS = ()
    # images of them used, evenly spaced over the list; 0 = all
    _C.MODEL.LC.CALIBRATION.MAX_IMAGES = 0

    _C.MODEL.LC.PRM = CN()
    # inference: one instance per retained peak (top round(t̂_c) peaks of present classes) with
    # a mask from its peak response map; False = counts only
    _C.MODEL.LC.PRM.ENABLED = True
    # σ (input pixels) of the Gaussian smoothing of the gradient magnitude Σ|∂M/∂I|
    _C.MODEL.LC.PRM.SMOOTH_SIGMA = 2.0
    # "threshold": mask = connected component (holding the peak) of PRM >= MASK_THRESHOLD · max PRM;
    # "segments": the same on the mean PRM of image regions (Felzenszwalb-Huttenlocher graph-based
    # segmentation of the input image), so that masks follow image edges
    _C.MODEL.LC.PRM.MASK_MODE = "threshold"
    _C.MODEL.LC.PRM.MASK_THRESHOLD = 0.3
    # (MASK_MODE "segments" reads the regions of MODEL.SEGMENTS)
    # largest number of peaks per batched backward pass (memory bound); 0 = all at once
    _C.MODEL.LC.PRM.MAX_BATCH = 32
    # peaks at least this far apart (input pixels) share one backward vector, their summed map
    # split by a seeded watershed; < 0 = one vector per peak (exact PRMs, ~1 backward per peak)
    _C.MODEL.LC.PRM.GROUP_DISTANCE = -1.0
    # the instances of a class are its prominent peaks first (h-maxima: a peak joined to a higher
    # one by a saddle shallower than this fraction of the map's range is a part of the same
    # object), then the others; each by value (0: by value alone, the paper)
    _C.MODEL.LC.PRM.PEAK_PROMINENCE = 0.0
    # β of the density-aware instance score σ(s_c)·σ(M^c_peak)·exp(−β·|1 − Σ_mask D̄^c|)
    _C.MODEL.LC.PRM.DENSITY_WEIGHT = 1.0
    # not in the paper: up to this many further peaks of each present class (after the
    # round(t̂_c) counted ones, in the same order) also become instances, their score × the
    # factor below, so that a ranking metric (mAP) can use objects the count missed, as a
    # detector's top-100 output does; counts are unchanged. 0 = the paper (counted peaks only)
    _C.MODEL.LC.PRM.EXTRA_PEAKS = 0
    _C.MODEL.LC.PRM.EXTRA_SCORE_FACTOR = 0.1
    # box proposals (inputs' "proposals", e.g. from DATASETS.PROPOSAL_FILES_TEST): PRM retrieval
    # Q = α·Σ_box R̄ + Σ_contour R̄ − β·Σ_box Bg/(H·W); α:
    _C.MODEL.LC.PRM.PROPOSAL_BALANCE = 1.0
    # β of the proposal background penalty
    _C.MODEL.LC.PRM.PROPOSAL_BG_PENALTY = 1.0
    # background of class c: pixels where M^c < this fraction of the mean of M^c
    _C.MODEL.LC.PRM.PROPOSAL_BG_THRESHOLD = 1.0
    # width (input pixels) of the contour band of the proposal score
    _C.MODEL.LC.PRM.PROPOSAL_CONTOUR_WIDTH = 5

    # --- data (LCDatasetMapper) ---
    _C.INPUT.LC = CN()
    # ILC supervision: the training mapper turns counts >= t̃ into ">= t̃" (counts = t̃,
    # count_ge = True); False = exact counts for every class (LC with full count supervision:
    # the mapper marks them "count_exact", so counts >= t̃ enter the MSE instead of the ranking)
    _C.INPUT.LC.LOWER_COUNT_SUPERVISION = True
    # probability that a training input is a mosaic: a GRID x GRID tiling of the image and
    # GRID² − 1 random training images, each resized into its tile. Counts of the tiles are
    # censored one by one and then summed, so a mosaic whose tiles all have exact counts gives an
    # exact count beyond t̃ (without new labels); 0 = off
    _C.INPUT.LC.MOSAIC_PROB = 0.0
    _C.INPUT.LC.MOSAIC_GRID = 2

    for old in ("LOWER_COUNT_SUPERVISION", "MOSAIC_PROB", "MOSAIC_GRID"):
        _C.register_renamed_key(f"MODEL.LC.{old}", f"INPUT.LC.{old}")
    for old, new in (("SCALE", "SCALE"), ("SIGMA", "SIGMA"), ("MIN_SIZE", "MIN_SIZE")):
        _C.register_renamed_key(f"MODEL.LC.PRM.SEGMENT_{old}", f"MODEL.SEGMENTS.{new}")
    return cfg
