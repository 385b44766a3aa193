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
    return cfg


def add_synthetic_config(cfg):
    """Embedded synthetic data (generated on first use and cached under $DETECTRON2_DATASETS)."""
    # the builtin splits are fixed by name (wsis_d2/data/datasets/builtin.py): no keys yet
    return cfg


def add_lc_config(cfg):
    """LC / ILC (Cholakkal et al., CVPR 2019)."""
    _C = cfg
    _C.MODEL.LC = CN()
    # number of object classes C (channels of the class maps M and density maps D)
    _C.MODEL.LC.NUM_CLASSES = 20
    # backbone feature fed to the two branches (e.g. "res5", or "res4" for R18/R34)
    _C.MODEL.LC.IN_FEATURE = "res5"
    # name in wsis_d2.modeling.heads.LC_HEAD_REGISTRY
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
    # --- data side (LCDatasetMapper, wsis_d2/data/mappers/lc_mapper.py) ---
    # ILC supervision: the training mapper turns counts >= t̃ into ">= t̃" (counts = t̃,
    # count_ge = True); False = exact counts for every class (LC with full count supervision:
    # the mapper marks them "count_exact", so counts >= t̃ enter the MSE instead of the ranking)
    _C.MODEL.LC.LOWER_COUNT_SUPERVISION = True
    # probability that a training input is a mosaic: a GRID x GRID tiling of the image and
    # GRID² − 1 random training images, each resized into its tile. Counts of the tiles are
    # censored one by one and then summed, so a mosaic whose tiles all have exact counts gives an
    # exact count beyond t̃ (without new labels); 0 = off
    _C.MODEL.LC.MOSAIC_PROB = 0.0
    _C.MODEL.LC.MOSAIC_GRID = 2
    # --- end of data side ---
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
    # MASK_MODE "segments": k (larger: bigger regions), Gaussian σ and minimum region size (input
    # pixels) of the graph-based segmentation
    _C.MODEL.LC.PRM.SEGMENT_SCALE = 1000.0
    _C.MODEL.LC.PRM.SEGMENT_SIGMA = 0.8
    _C.MODEL.LC.PRM.SEGMENT_MIN_SIZE = 10
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
    # box proposals (inputs' "proposals", e.g. from DATASETS.PROPOSAL_FILES_TEST): PRM retrieval
    # Q = α·Σ_box R̄ + Σ_contour R̄ − β·Σ_box Bg/(H·W); α:
    _C.MODEL.LC.PRM.PROPOSAL_BALANCE = 1.0
    # β of the proposal background penalty
    _C.MODEL.LC.PRM.PROPOSAL_BG_PENALTY = 1.0
    # background of class c: pixels where M^c < this fraction of the mean of M^c
    _C.MODEL.LC.PRM.PROPOSAL_BG_THRESHOLD = 1.0
    # width (input pixels) of the contour band of the proposal score
    _C.MODEL.LC.PRM.PROPOSAL_CONTOUR_WIDTH = 5
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
    # (0 = off); points move with the image. U-Net on the synthetic cells, PROB 0.5: calibrated test
    # MAE 3.32 / 3.20 -> 3.42 / 3.44 (seeds 0 / 1), wsis_cells_val_200 3.46 / 3.42 -> 3.93 / 3.93
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
    # keep weights and activations of convolutional models in channels-last (NHWC) memory format,
    # which oneDNN (CPU) and cuDNN (with autocast) run faster; results are the same up to rounding
    _C.MODEL.CHANNELS_LAST = False
    return cfg


def add_backbone_config(cfg):
    """Backbones wsis_d2 adds to detectron2's BACKBONE_REGISTRY (besides the density ones)."""
    _C = cfg
    # MobileNetV2 (wsis_d2/modeling/backbone/mobilenet.py), e.g. from torchvision's ImageNet
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


def add_ccgr_config(cfg):
    """CCGR: center-context-gap refinement for weakly supervised instance segmentation (AAAI 2020),
    image-level labels only."""
    _C = cfg
    _C.MODEL.CCGR = CN()
    # --- bags (wsis_d2/modeling/ccgr.py: build_bags) ---
    # instances per bag: the top-K proposals containing the bag's peak and no other peak of its
    # class, ranked by R(B) = B_S − γ·Σ_B(1 − O)/|B| (Eq. 4)
    _C.MODEL.CCGR.BAG_SIZE = 10
    # γ of Eq. 4 (0.1 in the paper)
    _C.MODEL.CCGR.BAG_SEG_WEIGHT = 0.1
    # rounds k >= 2: each IS box that seeds a bag is itself an instance of that bag, beside the
    # BAG_SIZE - 1 boxes of highest IoU among the proposals and the other seed boxes (False: the
    # BAG_SIZE proposals of highest IoU only)
    _C.MODEL.CCGR.SEED_IN_BAG = True
    # --- round-1 cues from the image-level classifier (wsis_d2/modeling/ccgr.py) ---
    # a local maximum (radius MODEL.LC.PEAK_RADIUS) of a present class's map is a peak (a bag)
    # when its value is at least this fraction of that map's largest value
    _C.MODEL.CCGR.PEAK_RELATIVE_THRESHOLD = 0.5
    # ... and a prominence of at least this fraction of the map's range (max − min): a peak
    # joined to a higher one by a saddle less deep is a part of the same object (0: off, as in
    # the paper)
    _C.MODEL.CCGR.PEAK_PROMINENCE = 0.0
    # round-1 pseudo semantic labels from the class maps: "regions" (class maps averaged over
    # graph-based image regions, then thresholded) or "pixels" (thresholded per pixel)
    _C.MODEL.CCGR.CUE_MODE = "regions"
    # a pixel (region) is foreground of class c when its normalised class score (M^c / max M^c)
    # is >= FG_THRESHOLD and c is the best present class; background when every present class
    # scores < BG_THRESHOLD; the ignore value in between
    _C.MODEL.CCGR.FG_THRESHOLD = 0.4
    _C.MODEL.CCGR.BG_THRESHOLD = 0.15
    # graph-based segmentation of CUE_MODE "regions" (k, σ, minimum size in pixels)
    _C.MODEL.CCGR.SEGMENT_SCALE = 300.0
    _C.MODEL.CCGR.SEGMENT_SIGMA = 0.8
    _C.MODEL.CCGR.SEGMENT_MIN_SIZE = 20
    # file of the round's cues (peaks and pseudo semantic label maps per image id; written by
    # wsis_d2.modeling.ccgr.write_cues), read by CCGRDatasetMapper
    _C.MODEL.CCGR.CUES_FILE = ""
    # --- refinement (Eq. 2-3) ---
    # gradient steps on the box coordinates (the paper's Fig. 4: 200)
    _C.MODEL.CCGR.REFINE_STEPS = 200
    # Adam step size in pixels of the score map
    _C.MODEL.CCGR.REFINE_LR = 0.5
    # side ratio of the context box C to the box B (1.5)
    _C.MODEL.CCGR.CONTEXT_SCALE = 1.5
    # boxes keep at least this width and height (pixels)
    _C.MODEL.CCGR.MIN_BOX_SIZE = 4.0
    # projected descent: each refined box keeps containing its MIL box, so the refinement only
    # enlarges part boxes, as the paper intends (True); False: the paper's unconstrained descent,
    # which also cuts the pointed or thin parts off objects that fill their box only partly
    # (wsis_d2.layers.refine_context_gap; measured in docs/notes/results_synthetic.md)
    _C.MODEL.CCGR.REFINE_GROW_ONLY = True
    # search the allowed boxes for the least L of Eq. 3, then descend (False: the paper's descent)
    _C.MODEL.CCGR.REFINE_SEARCH = True
    # --- pseudo instance masks ---
    # mask = pixels of the refined box whose class score S_c is >= this
    _C.MODEL.CCGR.MASK_THRESHOLD = 0.5
    # the S that the refinement and the pseudo masks read: "pixels" (the SS branch's scores, as
    # the paper) or "regions" (averaged over graph-based image regions, SEGMENT_SCALE / SIGMA /
    # MIN_SIZE as the round-1 cues, so that boxes and masks follow image edges)
    _C.MODEL.CCGR.SCORE_MODE = "regions"
    # then re-label each mask by GrabCut on the image colours, the mask probable foreground and the
    # box's context ring (CONTEXT_SCALE) background ("grabcut"; not in the paper, see
    # wsis_d2.modeling.ccgr.grabcut_masks), or keep the thresholded scores ("none", the paper)
    _C.MODEL.CCGR.MASK_REFINE = "grabcut"
    # GrabCut iterations of MASK_REFINE "grabcut"
    _C.MODEL.CCGR.GRABCUT_ITERS = 3
    # pseudo instances of one class overlapping a better-scored one at box IoU > this are dropped
    # (1.0: keep all)
    _C.MODEL.CCGR.NMS_THRESHOLD = 0.5

    # WSDDN MIL branch over bags (wsis_d2/modeling/roi_heads/wsddn.py), on detectron2's ROIPooler
    # (MODEL.ROI_BOX_HEAD.POOLER_*) and box head (MODEL.ROI_BOX_HEAD.NAME, NUM_FC, FC_DIM)
    _C.MODEL.WSDDN = CN()
    # ε of the clamp of φ_B into (ε, 1 − ε) before the binary cross entropy
    _C.MODEL.WSDDN.EPS = 1e-6
    # "bags": L_MIL averaged over the batch's bags; "none": summed as Σ_B L(B) (the paper)
    _C.MODEL.WSDDN.LOSS_NORMALIZATION = "bags"
    _C.MODEL.WSDDN.LOSS_WEIGHT = 1.0

    # PSPNet pyramid pooling head of the SS branch (wsis_d2/modeling/heads/psp_head.py); also
    # MODEL.SEM_SEG_HEAD.{IN_FEATURES, NUM_CLASSES (C + 1), IGNORE_VALUE, NORM, LOSS_WEIGHT,
    # CONVS_DIM (channels of each pooled branch; 0: in/len(BINS) as PSPNet)}
    _C.MODEL.PSP = CN()
    # output sizes of the adaptive average pools (PSPNet: 1, 2, 3, 6)
    _C.MODEL.PSP.BINS = [1, 2, 3, 6]
    # channels of the 3x3 conv after the concatenation
    _C.MODEL.PSP.HIDDEN_DIM = 128
    # dropout before the classifier (PSPNet: 0.1)
    _C.MODEL.PSP.DROPOUT = 0.1
    # loss = mean CE over background pixels + mean CE over object pixels (DSRG), instead of the
    # mean over all labelled pixels; background = the last of SEM_SEG_HEAD.NUM_CLASSES
    _C.MODEL.PSP.BALANCE_BACKGROUND = False

    # CCGR's rounds (wsis_d2/engine/ccgr_rounds.py, tools/train_ccgr.py): the main config is
    # CCGRNet's; these name the other stages' configs and the round settings
    _C.CCGR = CN()
    # rounds of MIL + SS -> CCGR pseudo labels -> IS branch (the paper: 3-5)
    _C.CCGR.ROUNDS = 3
    # config of the round-1 image-level classifier (ImageLevelCounter with
    # MODEL.LC.IMAGE_LABELS_ONLY); trained on DATASETS.TRAIN
    _C.CCGR.CLASSIFIER_CONFIG = "configs/demo/ccgr_cls_mnv2_synthetic.yaml"
    # config of the IS branch (stock Mask R-CNN), trained on each round's pseudo labels
    _C.CCGR.IS_CONFIG = "configs/mask_rcnn_mnv2_fpn_synthetic.yaml"
    # "KEY VALUE" overrides of those two configs, e.g. ["SOLVER.MAX_ITER", "500"]
    _C.CCGR.CLASSIFIER_OPTS = []
    _C.CCGR.IS_OPTS = []
    # rounds k >= 2: the IS branch's boxes scoring at least this (of present classes) seed bags;
    # the IS branch trained on round-1 labels, which miss a quarter of the objects, scores many
    # objects low (docs/notes/results_synthetic.md: 0.2 finds 90 % of the training objects, 0.5 82 %)
    _C.CCGR.IS_SCORE_THRESHOLD = 0.2
    # rounds k >= 2: of those boxes, drop one whose centre lies in a better-scored box of its class
    # (one seed per object, as PEAK_PROMINENCE gives round 1; parts of an object otherwise stay
    # separate bags and bar each other's boxes from growing). False: every box seeds (the paper)
    _C.CCGR.IS_SEED_CENTRE_NMS = False
    # rounds k >= 2: fine-tune the MIL + SS model of round k - 1 for FINETUNE_FRACTION of its
    # schedule (True), or train it again from MODEL.WEIGHTS (False)
    _C.CCGR.FINETUNE = True
    _C.CCGR.FINETUNE_FRACTION = 0.5
    # rounds k >= 2: the IS branch starts from round k - 1's IS model (True; its whole schedule
    # again, on round k's labels) instead of the IS config's MODEL.WEIGHTS (False). Round 2 of the
    # benchmark, same labels: mAP^r_50 / r75 91.6 / 75.0 vs 91.5 / 73.1 (docs/notes/results_synthetic.md)
    _C.CCGR.IS_FINETUNE = True
    # selective-search proposals per training image, and processes that compute them
    _C.CCGR.PROPOSAL_MAX = 2000
    _C.CCGR.WORKERS = 2
    # an existing proposal file of DATASETS.TRAIN instead (e.g. MCG / COB boxes converted by
    # tools/make_proposals.py); checked against the training images, then used as is
    _C.CCGR.PROPOSAL_FILE = ""
    # health figures written to each stage's stage.json (wsis_d2/engine/stage_health.py); a figure
    # out of its range stops the run at that stage with what to try
    _C.CCGR.HEALTH = CN()
    _C.CCGR.HEALTH.ENABLED = True
    # figures of a model trained fewer iterations are written but not checked (smoke tests)
    _C.CCGR.HEALTH.MIN_ITERS = 200
    # classifier: final loss / the label prior's entropy (a stalled run sits near 1)
    _C.CCGR.HEALTH.MAX_CLASSIFIER_LOSS_OVER_PRIOR = 0.6
    # training stages: final / initial loss (about 1: learnt nothing); a stage fine-tuned from the
    # previous round (FINETUNE, IS_FINETUNE) starts near its final loss: there only NaN / inf stops
    _C.CCGR.HEALTH.MAX_LOSS_DROP = 0.9
    # peaks (round 1), seed boxes (k >= 2) and pseudo instances per (image, present class)
    _C.CCGR.HEALTH.MIN_PER_POSITIVE = 0.5
    return cfg


def add_wsis_config(cfg):
    """Add all wsis_d2 keys to ``cfg`` (a detectron2 CfgNode) and return it."""
    add_data_config(cfg)
    add_backbone_config(cfg)
    add_solver_config(cfg)
    add_engine_config(cfg)
    add_synthetic_config(cfg)
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
