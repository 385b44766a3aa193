#!/usr/bin/env python
"""
Benchmark of CCGR's pseudo instance labels (part 1 of CCGR: no Mask R-CNN yet) on the embedded
synthetic scenes, measured on the training split against its ground truth, which the method
never sees (image-level labels only):

1. proposals: the selective search of ``wsis_d2.data.proposals`` on every training image
   (``--workers`` processes); recall at IoU 0.5 / 0.7 of the first 100 / 500 / 2,000 boxes,
   images per second;
2. the image-level classifier (``configs/demo/ccgr_cls_mnv2_synthetic.yaml``, trained on the
   image-level labels of ``--cls-train-set``) and its round-1 cues on the training images: peaks
   and pseudo semantic labels, whose mIoU against the ground-truth class maps is measured for both
   cue modes ("regions", "pixels"; the config's mode is used);
3. CCGRNet (``configs/ccgr_mnv2_synthetic.yaml``: WSDDN over bags + PSP) trained on them;
4. pseudo labels on the training images, scored by ``InstanceAPEvaluator`` (instances ranked by
   the MIL score), the paper's Table 3 analogue:
   (a) boxes and masks of the connected components of the segmentation, no MIL;
   (b) the MIL branch's boxes, no refinement; (c) MIL + CCGR (by default the search of the
   allowed boxes, ``MODEL.CCGR.REFINE_SEARCH``, then 200 steps, projected onto boxes that contain
   the MIL box, ``MODEL.CCGR.REFINE_GROW_ONLY``), (c) with the other grow-only setting
   (``c_ccgr_free``: unconstrained) and (c) with the other search setting (``c_ccgr_descent``:
   the paper's descent alone; ``c_ccgr_search`` when the config turns the search off);
   and mAP^b_50 after 0, 40, ..., 200 refinement steps (the paper's Fig. 5, also drawn as a PNG),
   and the mIoU of the SS branch's segmentation (argmax of S) against the ground truth;
5. the cost of refining all boxes of an image relative to one SS-branch forward (backbone + PSP
   head), CPU time of this process, medians over images.

The pseudo labels of (c) are written as a COCO json (``<output>/pseudo_labels.json``). The last
line printed is one JSON object with every number (and the time of each stage).

    python tools/benchmark_ccgr_labels.py                  # full run (~30 min on 2 cores)
    python tools/benchmark_ccgr_labels.py --train-set wsis_synth_mini_train \\
        --cls-train-set wsis_synth_mini_train --cls-iters 20 --ccgr-iters 10 --steps 20   # smoke
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wsis_d2  # noqa: E402,F401  (registers datasets, models and mappers)
from wsis_d2.data import build_dataset_mapper  # noqa: E402
from wsis_d2.ccgr.files import write_cues, write_pseudo_label_json  # noqa: E402
from wsis_d2.data.proposals import SelectiveSearchProposals, load_proposal_file  # noqa: E402
from wsis_d2.ccgr.stages import (  # noqa: E402
    compute_cues,
    cue_parameters,
    make_proposal_file,
    run_ccgr_inference,
)
from wsis_d2.evaluation import (  # noqa: E402
    InstanceAPEvaluator,
    SemanticConfusion,
    proposal_recall,
    semantic_ground_truth,
)
from wsis_d2.ccgr import ContextGapRefiner  # noqa: E402
from wsis_d2.ccgr.labels import component_instances  # noqa: E402
from wsis_d2.engine import WSISTrainer  # noqa: E402

from benchmark_utils import (  # noqa: E402
    ROOT,
    bench_cfg,
    cpu_time,
    rescale_schedule,
)

CLS_CONFIG = os.path.join(ROOT, "configs", "demo", "ccgr_cls_mnv2_synthetic.yaml")
CCGR_CONFIG = os.path.join(ROOT, "configs", "ccgr_mnv2_synthetic.yaml")
TRAIN_SET = "wsis_synth_train"

logger = logging.getLogger("benchmark_ccgr_labels")


def stage_proposals(args, dicts, path):
    generator = SelectiveSearchProposals(max_proposals=2000)
    stats = make_proposal_file(path, dicts, generator, workers=args.workers)
    data = load_proposal_file(path)
    gt = [
        np.array([a["bbox"] for a in d["annotations"]], np.float32).reshape(-1, 4) for d in dicts
    ]
    out = {"proposal_images_per_s": stats["images_per_s"], "proposals_per_image": stats["boxes_per_image"]}
    for iou in (0.5, 0.7):
        for top in (100, 500, 2000):
            out[f"proposal_recall_{int(iou * 100)}_{top}"] = proposal_recall(gt, data["boxes"], top, iou)
    return out, stats["seconds"]


def cue_quality(cues, dicts, num_classes):
    conf = SemanticConfusion(num_classes + 1)
    peaks_on_objects = peaks = objects_with_peak = objects = 0
    for d in dicts:
        pk, sem = cues[d["image_id"]]
        gt = semantic_ground_truth(d, num_classes)
        conf.add(sem.numpy(), gt)
        objects += len(d["annotations"])
        hit = set()
        for c, x, y, _ in pk.tolist():
            peaks += 1
            xi = min(int(x), gt.shape[1] - 1)
            yi = min(int(y), gt.shape[0] - 1)
            if gt[yi, xi] == int(c):
                peaks_on_objects += 1
            # the object (same class) whose box holds the peak
            for k, a in enumerate(d["annotations"]):
                x1, y1, x2, y2 = a["bbox"]
                if a["category_id"] == int(c) and x1 <= x <= x2 and y1 <= y <= y2:
                    hit.add(k)
        objects_with_peak += len(hit)
    s = conf.summary()
    return {
        "mIoU": s["mIoU"],
        "labelled": s["labelled"],
        "peaks_per_image": peaks / max(1, len(dicts)),
        "peak_precision": peaks_on_objects / max(1, peaks),
        "object_peak_recall": objects_with_peak / max(1, objects),
    }


def evaluate_variants(args, cfg, model, dataset, dicts):
    """Pseudo labels of every training image: variants (a), (b), (c), the refinement curve and
    the refinement cost; writes the pseudo-label json of (c)."""
    steps = list(range(0, cfg.MODEL.CCGR.REFINE_STEPS + 1, max(1, cfg.MODEL.CCGR.REFINE_STEPS // 5)))
    # the trained model with a refiner that also reports the boxes after each of ``steps``
    refiner = ContextGapRefiner(cfg, snapshots=steps)
    model = model.replace(refiner=refiner)
    evals = {k: InstanceAPEvaluator(dataset, distributed=False) for k in ("cc", "mil", "ccgr")}
    step_evals = {s: InstanceAPEvaluator(dataset, distributed=False) for s in steps}
    for e in list(evals.values()) + list(step_evals.values()):
        e.reset()
    loader = build_detection_test_loader(cfg, dataset, mapper=build_dataset_mapper(cfg, False))
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    gt_dicts = {d["image_id"]: d for d in dicts}
    ss_confusion = SemanticConfusion(num_classes + 1)  # the SS branch's argmax vs ground truth
    pseudo = {}
    t_ss, t_refine = [], []
    start = time.perf_counter()
    for n, (inp, out) in enumerate(run_ccgr_inference(model, loader)):
        sem = out["sem_seg"]
        ss_confusion.add(
            sem.argmax(dim=0).numpy(), semantic_ground_truth(gt_dicts[inp["image_id"]], num_classes)
        )
        evals["cc"].process([inp], [{"instances": component_instances(sem, inp["labels"])}])
        evals["ccgr"].process([inp], [out])
        pseudo[inp["image_id"]] = out["instances"]
        info = out.get("ccgr")
        if info is None:
            continue
        mil = model.labeller(sem, info["mil_boxes"], info["classes"], info["mil_scores"], inp)
        evals["mil"].process([inp], [{"instances": mil}])
        for s in steps:
            inst = model.labeller(
                sem, info["snapshots"][s], info["classes"], info["mil_scores"], inp
            )
            step_evals[s].process([inp], [{"instances": inst}])
        if n < args.timing_images:
            t_ss.append(ss_forward_time(model, inp))

            def refine():
                # as in the model: integral images of the classes with boxes, then all steps
                refiner(
                    sem, info["mil_boxes"], info["classes"], info["peaks"],
                    torch.arange(len(info["classes"])),
                )

            refine()  # warm-up
            t_refine.append(statistics.median(cpu_time(refine) for _ in range(3)))
    infer_s = time.perf_counter() - start
    res = {k: e.evaluate()["wsis_instance"] for k, e in evals.items()}
    curve = {s: e.evaluate()["wsis_instance"]["mAP_b50"] for s, e in step_evals.items()}
    res["ss_mIoU"] = ss_confusion.summary()["mIoU"]
    return res, curve, pseudo, infer_s, t_ss, t_refine


def evaluate_other_refinement(cfg, model, dataset, key):
    """mAP of variant (c) with the boolean refinement setting ``MODEL.CCGR.<key>`` flipped
    (``REFINE_GROW_ONLY``: the paper's unconstrained descent when the default grow-only one is in
    force; ``REFINE_SEARCH``: the paper's descent alone when the default search is on): the
    trained model with a refiner built from the flipped config, a second pass over the images."""
    other = cfg.clone()
    other.defrost()
    other.MODEL.CCGR[key] = not cfg.MODEL.CCGR[key]
    variant = model.replace(refiner=ContextGapRefiner(other))
    loader = build_detection_test_loader(cfg, dataset, mapper=build_dataset_mapper(cfg, False))
    evaluator = InstanceAPEvaluator(dataset, distributed=False)
    evaluator.reset()
    for inp, out in run_ccgr_inference(variant, loader):
        evaluator.process([inp], [out])
    return evaluator.evaluate()["wsis_instance"]


def ss_forward_time(model, inp):
    """CPU seconds of one SS-branch forward (backbone + PSP head) on one mapped input."""
    with torch.no_grad():
        images = model.preprocess_image([inp])

        def forward():
            model.sem_seg_head(model.backbone(images.tensor), None)

        forward()  # warm-up of this size
        return statistics.median(cpu_time(forward) for _ in range(3))


def plot_curve(curve, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(curve)
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.plot(steps, [curve[s] for s in steps], marker="o")
    ax.set_xlabel("refinement steps")
    ax.set_ylabel("pseudo-label mAP$^b_{50}$ (train)")
    ax.set_title("CCGR refinement (cf. the paper's Fig. 5)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-set", default=TRAIN_SET)
    parser.add_argument("--cls-config", default=CLS_CONFIG)
    parser.add_argument(
        "--cls-train-set",
        default="wsis_synth_train_4k",
        help="image-level labels the classifier is trained on (its cues are computed on "
        "--train-set)",
    )
    parser.add_argument("--ccgr-config", default=CCGR_CONFIG)
    parser.add_argument("--cls-iters", type=int, default=0, help="classifier iterations (0: config)")
    parser.add_argument("--ccgr-iters", type=int, default=0, help="CCGRNet iterations (0: config)")
    parser.add_argument("--steps", type=int, default=0, help="refinement steps (0: config)")
    parser.add_argument("--workers", type=int, default=2, help="proposal processes")
    parser.add_argument("--timing-images", type=int, default=20)
    parser.add_argument("--output-dir", default="output/benchmark_ccgr_labels")
    parser.add_argument("--plot", default="", help="PNG of the refinement curve (default: in output)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="CCGRNet config overrides")
    args = parser.parse_args(argv)
    for name in ("detectron2", "wsis_d2", "benchmark_ccgr_labels"):
        setup_logger(name=name)
    torch.manual_seed(0)
    os.makedirs(args.output_dir, exist_ok=True)
    dataset = args.train_set
    dicts = DatasetCatalog.get(dataset)
    meta = MetadataCatalog.get(dataset)
    num_classes = len(meta.thing_classes)
    times, out = {}, {}

    prop_file = os.path.join(args.output_dir, "proposals", f"{dataset}.pkl")
    stats, times["time_proposals_s"] = stage_proposals(args, dicts, prop_file)
    out.update(stats)
    logger.info("proposals: %s", json.dumps(stats))

    # the image-level classifier and its cues
    cls_cfg = bench_cfg(
        args.cls_config, [], os.path.join(args.output_dir, "classifier"), args.cls_train_set,
        dataset,
    )
    if args.cls_iters:
        rescale_schedule(cls_cfg, args.cls_iters)
    cls_cfg.freeze()
    start = time.perf_counter()
    cls_trainer = WSISTrainer(cls_cfg, evaluate=False)
    cls_trainer.resume_or_load(resume=False)
    cls_trainer.train()
    times["time_classifier_s"] = time.perf_counter() - start
    cue_loader = build_detection_test_loader(cls_cfg, dataset, mapper=build_dataset_mapper(cls_cfg, False))
    ccgr_cfg = bench_cfg(args.ccgr_config, args.opts, os.path.join(args.output_dir, "ccgr"), dataset, dataset)
    params = cue_parameters(ccgr_cfg)
    chosen = None
    for mode in ("regions", "pixels"):
        start = time.perf_counter()
        cues = compute_cues(cls_trainer.model, cue_loader, dict(params, mode=mode))
        times[f"time_cues_{mode}_s"] = time.perf_counter() - start
        quality = cue_quality(cues, dicts, num_classes)
        out[f"semseg_mIoU_round1_{mode}"] = quality["mIoU"]
        out[f"semseg_labelled_round1_{mode}"] = quality["labelled"]
        logger.info("cues (%s): %s", mode, json.dumps(quality))
        if mode == params["mode"]:
            chosen = cues
            out["peaks_per_image"] = quality["peaks_per_image"]
            out["peak_precision"] = quality["peak_precision"]
            out["object_peak_recall"] = quality["object_peak_recall"]
    out["semseg_mIoU_round1"] = out[f"semseg_mIoU_round1_{params['mode']}"]
    cues_file = os.path.join(args.output_dir, "round1", "cues.pkl")
    write_cues(cues_file, chosen, num_classes)

    # CCGRNet
    ccgr_cfg.INPUT.CCGR.CUES_FILE = cues_file
    ccgr_cfg.DATASETS.PROPOSAL_FILES_TRAIN = (prop_file,)
    ccgr_cfg.DATASETS.PROPOSAL_FILES_TEST = (prop_file,)
    rescale_schedule(ccgr_cfg, args.ccgr_iters or ccgr_cfg.SOLVER.MAX_ITER)  # final checkpoint only
    if args.steps:
        ccgr_cfg.MODEL.CCGR.REFINE_STEPS = args.steps
    ccgr_cfg.freeze()
    start = time.perf_counter()
    trainer = WSISTrainer(ccgr_cfg, evaluate=False)
    trainer.resume_or_load(resume=False)
    trainer.train()
    times["time_ccgr_train_s"] = time.perf_counter() - start

    res, curve, pseudo, times["time_pseudo_labels_s"], t_ss, t_refine = evaluate_variants(
        args, ccgr_cfg, trainer.model, dataset, dicts
    )
    others = (
        ("free" if ccgr_cfg.MODEL.CCGR.REFINE_GROW_ONLY else "grow_only", "REFINE_GROW_ONLY"),
        ("descent" if ccgr_cfg.MODEL.CCGR.REFINE_SEARCH else "search", "REFINE_SEARCH"),
    )
    for other, key in others:
        start = time.perf_counter()
        res[other] = evaluate_other_refinement(ccgr_cfg, trainer.model, dataset, key)
        times[f"time_pseudo_labels_{other}_s"] = time.perf_counter() - start
    variants = (("cc", "a_cc"), ("mil", "b_mil"), ("ccgr", "c_ccgr")) + tuple(
        (other, f"c_ccgr_{other}") for other, _ in others
    )
    for key, name in variants:
        out[f"mAP_b50_{name}"] = res[key]["mAP_b50"]
        out[f"mAP_r50_{name}"] = res[key]["mAP_r50"]
        out[f"mAP_r25_{name}"] = res[key]["mAP_r25"]
    out["steps_mAP_b50"] = {str(s): v for s, v in sorted(curve.items())}
    out["semseg_mIoU_ss_branch"] = res["ss_mIoU"]
    logger.info("pseudo labels: %s", json.dumps({k: v for k, v in out.items() if "mAP" in k}))
    out["refine_over_ss_forward"] = (
        statistics.median(t_refine) / statistics.median(t_ss) if t_ss else float("nan")
    )
    out["ss_forward_cpu_s"] = statistics.median(t_ss) if t_ss else float("nan")
    out["refine_cpu_s"] = statistics.median(t_refine) if t_refine else float("nan")
    plot = args.plot or os.path.join(args.output_dir, "refinement_curve.png")
    plot_curve(curve, plot)
    json_file = os.path.join(args.output_dir, "pseudo_labels.json")
    ids = meta.thing_dataset_id_to_contiguous_id
    inverse = {v: k for k, v in ids.items()}
    out["pseudo_instances"] = write_pseudo_label_json(
        json_file, dicts, pseudo, [inverse[c] for c in range(num_classes)], meta.thing_classes
    )
    out.update(times)
    with open(os.path.join(args.output_dir, "benchmark_ccgr_labels.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
