"""CCGR's config keys: ``MODEL.CCGR`` (model, refinement, pseudo labels, WSDDN and PSP heads,
rounds, health checks) and ``INPUT.CCGR`` (the round's cues read by the mapper)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_ccgr_config"]

# keys of the top-level CCGR node before MODEL.CCGR.ROUNDS (old name -> new name under it)
_OLD_ROUND_KEYS = {
    "ROUNDS": "NUM", "CLASSIFIER_CONFIG": "CLASSIFIER_CONFIG", "IS_CONFIG": "IS_CONFIG",
    "CLASSIFIER_OPTS": "CLASSIFIER_OPTS", "IS_OPTS": "IS_OPTS",
    "IS_SCORE_THRESHOLD": "IS_SCORE_THRESHOLD", "IS_SEED_CENTRE_NMS": "IS_SEED_CENTRE_NMS",
    "FINETUNE": "FINETUNE", "FINETUNE_FRACTION": "FINETUNE_FRACTION", "IS_FINETUNE": "IS_FINETUNE",
    "PROPOSAL_MAX": "PROPOSAL_MAX", "WORKERS": "WORKERS", "PROPOSAL_FILE": "PROPOSAL_FILE",
}


def add_ccgr_config(cfg):
    """CCGR: center-context-gap refinement for weakly supervised instance segmentation (AAAI 2020),
    image-level labels only."""
    _C = cfg
    _C.MODEL.CCGR = CN()
    # --- bags (wsis_d2.ccgr.labels.build_bags) ---
    # instances per bag: the top-K proposals containing the bag's peak and no other peak of its
    # class, ranked by R(B) = B_S − γ·Σ_B(1 − O)/|B| (Eq. 4)
    _C.MODEL.CCGR.BAG_SIZE = 10
    # γ of Eq. 4 (0.1 in the paper)
    _C.MODEL.CCGR.BAG_SEG_WEIGHT = 0.1
    # rounds k >= 2: each IS box that seeds a bag is itself an instance of that bag, beside the
    # BAG_SIZE - 1 boxes of highest IoU among the proposals and the other seed boxes (False: the
    # BAG_SIZE proposals of highest IoU only)
    _C.MODEL.CCGR.SEED_IN_BAG = True
    # --- round-1 cues from the image-level classifier (wsis_d2.ccgr.labels.class_map_cues) ---
    # local-maximum window radius r of the peak finder on the classifier's class maps
    _C.MODEL.CCGR.PEAK_RADIUS = 1
    # a local maximum of a present class's map is a peak (a bag) when its value is at least this
    # fraction of that map's largest value
    _C.MODEL.CCGR.PEAK_RELATIVE_THRESHOLD = 0.5
    # ... and a prominence of at least this fraction of the map's range (max − min): a peak
    # joined to a higher one by a saddle less deep is a part of the same object (0: off, as in
    # the paper)
    _C.MODEL.CCGR.PEAK_PROMINENCE = 0.0
    # round-1 pseudo semantic labels from the class maps: "regions" (class maps averaged over
    # the regions of MODEL.SEGMENTS, then thresholded) or "pixels" (thresholded per pixel)
    _C.MODEL.CCGR.CUE_MODE = "regions"
    # a pixel (region) is foreground of class c when its normalised class score (M^c / max M^c)
    # is >= FG_THRESHOLD and c is the best present class; background when every present class
    # scores < BG_THRESHOLD; the ignore value in between
    _C.MODEL.CCGR.FG_THRESHOLD = 0.4
    _C.MODEL.CCGR.BG_THRESHOLD = 0.15
    # --- refinement (Eq. 2-3, wsis_d2.layers.refine_context_gap) ---
    # gradient steps on the box coordinates (the paper's Fig. 4: 200)
    _C.MODEL.CCGR.REFINE_STEPS = 200
    # Adam step size in pixels of the score map
    _C.MODEL.CCGR.REFINE_LR = 0.5
    # side ratio of the context box C to the box B (1.5)
    _C.MODEL.CCGR.CONTEXT_SCALE = 1.5
    # boxes keep at least this width and height (pixels)
    _C.MODEL.CCGR.MIN_BOX_SIZE = 4.0
    # projected descent: each refined box keeps containing its MIL box, so the refinement only
    # enlarges part boxes, as the paper intends (False: the paper's unconstrained descent, which
    # also cuts the thin parts off objects that fill their box only partly)
    _C.MODEL.CCGR.REFINE_GROW_ONLY = True
    # search the allowed boxes for the least L of Eq. 3, then descend (False: the paper's descent)
    _C.MODEL.CCGR.REFINE_SEARCH = True
    # --- pseudo instance masks (wsis_d2.ccgr.labels.pseudo_instances) ---
    # mask = pixels of the refined box whose class score S_c is >= this
    _C.MODEL.CCGR.MASK_THRESHOLD = 0.5
    # the S that the refinement and the pseudo masks read: "pixels" (the SS branch's scores, as
    # the paper) or "regions" (averaged over the regions of MODEL.SEGMENTS, so that boxes and
    # masks follow image edges)
    _C.MODEL.CCGR.SCORE_MODE = "regions"
    # then re-label each mask by GrabCut on the image colours, the mask probable foreground and the
    # box's context ring background ("grabcut"; not in the paper), or keep the thresholded scores
    # ("none", the paper)
    _C.MODEL.CCGR.MASK_REFINE = "grabcut"
    # GrabCut iterations of MASK_REFINE "grabcut"
    _C.MODEL.CCGR.GRABCUT_ITERS = 3
    # GrabCut works on the input image upsampled to the masks' (the original image's) size: on
    # large photographs at most this many times the input's size (the upsampling adds no colour
    # detail; masks resized back), ~100x less work at 12 MP; 0 = always at the masks' size
    _C.MODEL.CCGR.GRABCUT_MAX_UPSCALE = 4.0
    # pseudo instances of one class overlapping a better-scored one at box IoU > this are dropped
    # (1.0: keep all)
    _C.MODEL.CCGR.NMS_THRESHOLD = 0.5

    # WSDDN MIL branch over bags (wsis_d2.ccgr.wsddn_head), on detectron2's ROIPooler
    # (MODEL.ROI_BOX_HEAD.POOLER_*) and box head (MODEL.ROI_BOX_HEAD.NAME, NUM_FC, FC_DIM)
    _C.MODEL.CCGR.WSDDN = CN()
    # ε of the clamp of φ_B into (ε, 1 − ε) before the binary cross entropy
    _C.MODEL.CCGR.WSDDN.EPS = 1e-6
    # "bags": L_MIL averaged over the batch's bags; "none": summed as Σ_B L(B) (the paper)
    _C.MODEL.CCGR.WSDDN.LOSS_NORMALIZATION = "bags"
    _C.MODEL.CCGR.WSDDN.LOSS_WEIGHT = 1.0

    # PSPNet pyramid pooling head of the SS branch (wsis_d2.ccgr.psp_head); also
    # MODEL.SEM_SEG_HEAD.{IN_FEATURES, NUM_CLASSES (C + 1), IGNORE_VALUE, NORM, LOSS_WEIGHT,
    # CONVS_DIM (channels of each pooled branch; 0: in/len(BINS) as PSPNet)}
    _C.MODEL.CCGR.PSP = CN()
    # output sizes of the adaptive average pools (PSPNet: 1, 2, 3, 6)
    _C.MODEL.CCGR.PSP.BINS = [1, 2, 3, 6]
    # channels of the 3x3 conv after the concatenation
    _C.MODEL.CCGR.PSP.HIDDEN_DIM = 128
    # dropout before the classifier (PSPNet: 0.1)
    _C.MODEL.CCGR.PSP.DROPOUT = 0.1
    # loss = mean CE over background pixels + mean CE over object pixels (DSRG), instead of the
    # mean over all labelled pixels: object pixels are few in pseudo labels
    _C.MODEL.CCGR.PSP.BALANCE_BACKGROUND = False

    # the rounds (wsis_d2.ccgr.rounds, tools/train_ccgr.py): the main config is CCGRNet's; these
    # name the other stages' configs and the round settings
    _C.MODEL.CCGR.ROUNDS = CN()
    # rounds of MIL + SS -> CCGR pseudo labels -> IS branch (the paper: 3-5)
    _C.MODEL.CCGR.ROUNDS.NUM = 3
    # config of the round-1 image-level classifier (ImageLevelCounter with
    # MODEL.LC.IMAGE_LABELS_ONLY); trained on DATASETS.TRAIN
    _C.MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG = "configs/demo/ccgr_cls_mnv2_synthetic.yaml"
    # config of the IS branch (stock Mask R-CNN), trained on each round's pseudo labels
    _C.MODEL.CCGR.ROUNDS.IS_CONFIG = "configs/mask_rcnn_mnv2_fpn_synthetic.yaml"
    # "KEY VALUE" overrides of those two configs, e.g. ["SOLVER.MAX_ITER", "500"]
    _C.MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS = []
    _C.MODEL.CCGR.ROUNDS.IS_OPTS = []
    # rounds k >= 2: the IS branch's boxes scoring at least this (of present classes) seed bags;
    # low, because the IS branch trained on round-1 labels scores many true objects low
    _C.MODEL.CCGR.ROUNDS.IS_SCORE_THRESHOLD = 0.2
    # rounds k >= 2: of those boxes, drop one whose centre lies in a better-scored box of its class
    # (one seed per object, as PEAK_PROMINENCE gives round 1; parts of an object otherwise stay
    # separate bags and bar each other's boxes from growing). False: every box seeds (the paper)
    _C.MODEL.CCGR.ROUNDS.IS_SEED_CENTRE_NMS = False
    # rounds k >= 2: a present class none of whose IS boxes reaches IS_SCORE_THRESHOLD keeps its
    # best box as seed (OICR's top box per present class); otherwise its objects become
    # background in round k's labels, and a weak IS branch leaves whole classes unseeded.
    # False: only boxes above the threshold (the paper)
    _C.MODEL.CCGR.ROUNDS.IS_SEED_EVERY_CLASS = False
    # rounds k >= 2: fine-tune the MIL + SS model of round k - 1 for FINETUNE_FRACTION of its
    # schedule (True), or train it again from MODEL.WEIGHTS (False)
    _C.MODEL.CCGR.ROUNDS.FINETUNE = True
    _C.MODEL.CCGR.ROUNDS.FINETUNE_FRACTION = 0.5
    # rounds k >= 2: the IS branch starts from round k - 1's IS model (True; its whole schedule
    # again, on round k's labels) instead of the IS config's MODEL.WEIGHTS (False)
    _C.MODEL.CCGR.ROUNDS.IS_FINETUNE = True
    # rounds k >= 2: the IS branch trains on the pseudo labels of rounds k, k - 1, ... (this many
    # label sets; each training image once per set) instead of round k's alone (1, the paper):
    # one round's labels, e.g. of another MIL seed, move the IS branch by a few points
    _C.MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS = 1
    # MIL + SS models per round, each with its own seed (SEED + 1000 (j - 1) for set j when SEED
    # >= 0) and from the same cues; each writes a pseudo-label set and the round's IS branch trains
    # on all of them (each training image once per set). 1: one model per round (the paper)
    _C.MODEL.CCGR.ROUNDS.LABEL_SETS = 1
    # selective-search proposals per training image, and processes that compute them
    _C.MODEL.CCGR.ROUNDS.PROPOSAL_MAX = 2000
    _C.MODEL.CCGR.ROUNDS.WORKERS = 2
    # an existing proposal file of DATASETS.TRAIN instead (e.g. MCG / COB boxes converted by
    # tools/make_proposals.py); checked against the training images, then used as is
    _C.MODEL.CCGR.ROUNDS.PROPOSAL_FILE = ""

    # health figures written to each stage's stage.json (wsis_d2.ccgr.health); a figure out of
    # its range stops the run at that stage with what to try
    _C.MODEL.CCGR.HEALTH = CN()
    _C.MODEL.CCGR.HEALTH.ENABLED = True
    # figures of a model trained fewer iterations are written but not checked (smoke tests)
    _C.MODEL.CCGR.HEALTH.MIN_ITERS = 200
    # classifier: final loss / the label prior's entropy (a stalled run sits near 1)
    _C.MODEL.CCGR.HEALTH.MAX_CLASSIFIER_LOSS_OVER_PRIOR = 0.6
    # training stages: final / initial loss (about 1: learnt nothing); a stage fine-tuned from the
    # previous round (FINETUNE, IS_FINETUNE) starts near its final loss: there only NaN / inf stops
    _C.MODEL.CCGR.HEALTH.MAX_LOSS_DROP = 0.9
    # peaks (round 1), seed boxes (k >= 2) and pseudo instances per (image, present class)
    _C.MODEL.CCGR.HEALTH.MIN_PER_POSITIVE = 0.5

    # --- data (CCGRDatasetMapper) ---
    _C.INPUT.CCGR = CN()
    # file of the round's cues (peaks and pseudo semantic label maps per image id; written by
    # wsis_d2.ccgr.files.write_cues); the rounds set it per round
    _C.INPUT.CCGR.CUES_FILE = ""

    # an old key in a user's YAML or opts fails with its new name
    renamed = {"MODEL.WSDDN": "MODEL.CCGR.WSDDN", "MODEL.PSP": "MODEL.CCGR.PSP",
               "MODEL.CCGR.CUES_FILE": "INPUT.CCGR.CUES_FILE", "CCGR.HEALTH": "MODEL.CCGR.HEALTH"}
    for sub in ("SCALE", "SIGMA", "MIN_SIZE"):
        renamed[f"MODEL.CCGR.SEGMENT_{sub}"] = f"MODEL.SEGMENTS.{sub}"
    for sub in ("EPS", "LOSS_NORMALIZATION", "LOSS_WEIGHT"):
        renamed[f"MODEL.WSDDN.{sub}"] = f"MODEL.CCGR.WSDDN.{sub}"
    for sub in ("BINS", "HIDDEN_DIM", "DROPOUT", "BALANCE_BACKGROUND"):
        renamed[f"MODEL.PSP.{sub}"] = f"MODEL.CCGR.PSP.{sub}"
    for sub in ("ENABLED", "MIN_ITERS", "MAX_CLASSIFIER_LOSS_OVER_PRIOR", "MAX_LOSS_DROP",
                "MIN_PER_POSITIVE"):
        renamed[f"CCGR.HEALTH.{sub}"] = f"MODEL.CCGR.HEALTH.{sub}"
    for old, new in _OLD_ROUND_KEYS.items():
        renamed[f"CCGR.{old}"] = f"MODEL.CCGR.ROUNDS.{new}"
    for old, new in renamed.items():
        _C.register_renamed_key(old, new)
    # the whole top-level node (a YAML block "CCGR:")
    _C.register_renamed_key(
        "CCGR",
        ("MODEL.CCGR.ROUNDS", "the top-level CCGR node moved: CCGR.ROUNDS is "
         "MODEL.CCGR.ROUNDS.NUM, CCGR.HEALTH is MODEL.CCGR.HEALTH, every other CCGR.<KEY> is "
         "MODEL.CCGR.ROUNDS.<KEY>"),
    )
    return cfg
