"""
CCGR's rounds (the paper's iterative optimisation) as resumable stages, each in its own folder
under ``OUTPUT_DIR``:

    proposals/                    selective search over the training images (detectron2 file)
    round1/classifier/            the image-level classifier (LC classification branch)
    round1/cues/                  its peaks and pseudo semantic labels (cues.pkl)
    round<k>/mil_ss/              CCGRNet (WSDDN MIL branch + PSP SS branch) on the round's cues
    round<k>/pseudo_labels/       its pseudo instances after CCGR refinement (pseudo_labels.json)
    round<k>/{mil_ss,pseudo_labels}_<j>/  label set j >= 2 (MODEL.CCGR.ROUNDS.LABEL_SETS)
    round<k>/is/                  the IS branch (stock Mask R-CNN) trained on them (k >= 2: from
                                  round k-1's, MODEL.CCGR.ROUNDS.IS_FINETUNE), evaluated on the DATASETS.TEST
                                  of its config
    round<k+1>/cues/              bags seeded by the IS branch's boxes, SS labels = union of its masks

A stage that finished writes ``stage.json`` (its metrics and seconds). :meth:`CCGRRounds.run` with
``resume=True`` skips finished stages and continues a training stage from its last checkpoint.
Per-round metrics go to detectron2's event storage (``OUTPUT_DIR/metrics.json`` and tensorboard,
step = round) and to ``OUTPUT_DIR/rounds.json``.

Under several processes (``tools/train_ccgr.py --num-gpus N``, :mod:`wsis_d2.ccgr.dist`)
every stage runs on all of them: training with DistributedDataParallel, inference on each rank's
share of the images gathered to the main process, which alone writes files; all ranks take the
main process's view of which stages are done and of each stage's metrics.
"""

import json
import logging
import os
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, JSONWriter, TensorboardXWriter

from ..config import get_wsis_cfg
from ..data import build_dataset_mapper
from .files import (
    check_pseudo_label_json,
    encode_label_map,
    pseudo_label_annotations,
    write_cues,
    write_pseudo_label_json,
)
from ..data.datasets import register_coco_counts_instances
from ..data.image_labels import image_labels_of, is_count_only
from ..data.proposals import SelectiveSearchProposals, check_proposals, load_proposal_file
from ..evaluation import CCGRStageDiagnostics, InstanceAPEvaluator
from .labels import semantic_labels_from_instances
from ..utils.progress import progress
from .stages import compute_cues, cue_parameters, run_ccgr_inference
from .dist import (
    check_shared_output,
    distributed_proposal_file,
    from_main,
    gather_by_id,
    main_first,
    seed_stage,
    serial_part,
)
from ..utils.dist import unwrap
from ..engine.defaults import WSISTrainer
from .health import check_health, positive_pairs, prior_bce, training_health

__all__ = ["CCGRRounds", "seed_cues_from_instances"]

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


def suppress_contained_centres(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor):
    """
    Greedy, best score first: a box whose centre lies inside a kept box of its class is dropped.
    Its centre would be a second peak on that object, and a peak of its class inside a box bars
    the box from the bags and from growing in the refinement, which keeps that object in parts.

    Args:
        boxes: (N, 4) XYXY; scores (N,); classes (N,) long.

    Returns:
        (K,) long indices of the kept boxes, best score first.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order].float()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    # (N, N) [i, j]: centre of box i inside box j, same class
    inside = (
        (cx[:, None] >= b[None, :, 0]) & (cx[:, None] <= b[None, :, 2])
        & (cy[:, None] >= b[None, :, 1]) & (cy[:, None] <= b[None, :, 3])
        & (classes[order][:, None] == classes[order][None, :])
    )
    keep = torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        keep[i] = not bool((inside[i, :i] & keep[:i]).any())
    return order[keep]


def seed_cues_from_instances(
    instances,
    labels: torch.Tensor,
    num_classes: int,
    score_threshold: float,
    centre_nms: bool = False,
    every_class: bool = False,
):
    """
    The cues of round k + 1 of one image from the IS branch's predictions of round k.

    Args:
        instances: Instances at the image's original size (pred_boxes, pred_masks, scores,
            pred_classes).
        labels: (C,) image-level labels; boxes of absent classes are dropped.
        num_classes: C.
        score_threshold: boxes scoring less are dropped.
        centre_nms: also drop a box whose centre lies in a better-scored kept box of its class
            (:func:`suppress_contained_centres`); its mask still joins the semantic labels.
        every_class: a present class none of whose boxes reaches ``score_threshold`` keeps its
            best-scored box (and mask) all the same, as OICR takes the top proposal of each
            present class: the image label says the object is there, and without a seed it
            would be background in both branches' labels.

    Returns:
        peaks (P, 4) rows (class, x, y, score): the kept boxes' centres;
        sem_seg (H, W) uint8: the union of the kept masks of each class, C background, 255 where
        two classes overlap;
        seed_boxes (P, 6) rows (class, x1, y1, x2, y2, score), row p the box of peak p.
    """
    inst = instances.to("cpu")
    height, width = inst.image_size
    present = torch.as_tensor(labels).reshape(-1).cpu() > 0.5
    keep = (inst.scores >= score_threshold) & present[inst.pred_classes]
    if every_class:
        for c in torch.nonzero(present).flatten().tolist():
            of_c = inst.pred_classes == c
            if of_c.any() and not (keep & of_c).any():
                keep[torch.argmax(torch.where(of_c, inst.scores, -torch.inf))] = True
    inst = inst[keep]
    seeds_of = inst
    if centre_nms and len(inst) > 0:
        kept = suppress_contained_centres(inst.pred_boxes.tensor, inst.scores, inst.pred_classes)
        seeds_of = inst[kept]
    boxes = seeds_of.pred_boxes.tensor.float()
    classes = seeds_of.pred_classes.float()
    scores = seeds_of.scores.float()
    seeds = torch.cat([classes[:, None], boxes, scores[:, None]], dim=1).reshape(-1, 6)
    peaks = torch.stack(
        [classes, (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, scores], dim=1
    ).reshape(-1, 4)
    if inst.has("pred_masks") and len(inst) > 0:
        # every kept instance's mask, the seeds' and those centre_nms dropped; the better last
        order = torch.argsort(inst.scores, stable=True)
        sem = semantic_labels_from_instances(
            inst.pred_masks[order].bool(), inst.pred_classes[order], num_classes
        )
    else:
        sem = torch.full((height, width), num_classes, dtype=torch.uint8)
    return peaks, sem, seeds


def instance_ap(cfg: CfgNode, model, dataset: str) -> Dict[str, float]:
    """mAP^r_25/50/75 and mAP^b_50 (VOC protocol, ``InstanceAPEvaluator``) of ``model`` on
    ``dataset``, mapped by ``cfg``'s test mapper: how the IS branch of every round is scored.
    Under several processes each runs its share of the images; every rank returns the figures."""
    loader = build_detection_test_loader(cfg, dataset, mapper=build_dataset_mapper(cfg, False))
    res = inference_on_dataset(model, loader, InstanceAPEvaluator(dataset, distributed=True))
    names = ("mAP_r25", "mAP_r50", "mAP_r75", "mAP_b50")
    return from_main(lambda: {m: float(res["wsis_instance"][m]) for m in names})


class CCGRRounds:
    """
    Runs CCGR from image-level labels to the final IS branch (see the module docstring).

    The main config (e.g. ``configs/ccgr_mnv2_synthetic.yaml``) is CCGRNet's; ``CCGR.*`` names the
    classifier and IS-branch configs and the round settings. Training images:
    ``DATASETS.TRAIN`` (one dataset; only its image-level labels are read; the main config's
    DATASETS.TEST is not used); the IS branch is evaluated after each round on the DATASETS.TEST
    of its own config (``MODEL.CCGR.ROUNDS.IS_CONFIG`` with ``MODEL.CCGR.ROUNDS.IS_OPTS``).
    """

    def __init__(self, cfg: CfgNode, trainer_cls: Callable = WSISTrainer):
        if len(cfg.DATASETS.TRAIN) != 1:
            raise ValueError(
                f"CCGR rounds need exactly one training dataset in DATASETS.TRAIN, got "
                f"{list(cfg.DATASETS.TRAIN)}"
            )
        if cfg.MODEL.CCGR.ROUNDS.NUM < 1:
            raise ValueError(f"MODEL.CCGR.ROUNDS.NUM must be >= 1, got {cfg.MODEL.CCGR.ROUNDS.NUM}")
        if cfg.MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS < 1:
            raise ValueError(
                "MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS must be >= 1 (1: each round's own pseudo labels),"
                f" got {cfg.MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS}"
            )
        if cfg.MODEL.CCGR.ROUNDS.LABEL_SETS < 1:
            raise ValueError(
                "MODEL.CCGR.ROUNDS.LABEL_SETS must be >= 1 (1: one MIL + SS model per round),"
                f" got {cfg.MODEL.CCGR.ROUNDS.LABEL_SETS}"
            )
        for key in ("CLASSIFIER_CONFIG", "IS_CONFIG"):
            path = cfg.MODEL.CCGR.ROUNDS[key]
            if not path or not os.path.isfile(path):
                raise ValueError(f"MODEL.CCGR.ROUNDS.{key}: config file {path!r} does not exist")
        self.cfg = cfg
        self.trainer_cls = trainer_cls
        self.output = cfg.OUTPUT_DIR
        self.train_set = cfg.DATASETS.TRAIN[0]
        self.dicts = main_first(lambda: DatasetCatalog.get(self.train_set))
        self._ids = [d["image_id"] for d in self.dicts]
        self.meta = MetadataCatalog.get(self.train_set)
        self.num_classes = len(self.meta.thing_classes)
        self.has_gt_masks = any(
            "segmentation" in a for d in self.dicts for a in d.get("annotations", [])
        )
        # (C,) image-level labels of each training image, the only supervision CCGR reads
        self._labels = [image_labels_of(d, self.num_classes) for d in self.dicts]
        self.resume = False
        # seconds of the running stage spent gathering and writing on the main process alone
        self._serial: List[float] = []
        self.metrics: Dict[int, Dict[str, float]] = OrderedDict()

    # --------------------------------------------------------------------------------------
    # stage bookkeeping

    def _dir(self, *parts) -> str:
        return os.path.join(self.output, *parts)

    def _stage(self, name: str, fn: Callable[[str], Dict], seed_offset: int = 0) -> Dict:
        """Run stage ``name`` (a folder) unless it finished and we resume; returns its metrics.
        The stage starts from SEED + ``seed_offset`` (SEED >= 0; SEED < 0: not reseeded)."""
        folder = self._dir(name)
        marker = os.path.join(folder, STAGE_FILE)
        # the main process's view of the marker, on every rank: all run the same stages
        done = from_main(lambda: self._finished(marker))
        if done is not None:
            logger.info(f"CCGR: stage {name} finished earlier ({done['seconds']:.0f} s), skipped")
            return done["metrics"]
        if comm.is_main_process() and os.path.isfile(marker):
            os.remove(marker)
        os.makedirs(folder, exist_ok=True)
        comm.synchronize()
        logger.info(f"CCGR: stage {name} ...")
        seed_stage(self.cfg.SEED + seed_offset if self.cfg.SEED >= 0 else self.cfg.SEED)
        self._serial = []
        start = time.perf_counter()
        metrics = fn(folder)
        comm.synchronize()  # marked finished only once every rank is through it
        seconds = time.perf_counter() - start
        if comm.is_main_process():
            part = marker + ".part"
            with open(part, "w") as f:
                record = {"metrics": metrics, "seconds": seconds}
                if self._serial:
                    record["serial_seconds"] = sum(self._serial)
                record["processes"] = comm.get_world_size()
                json.dump(record, f, indent=2)
            os.replace(part, marker)
        comm.synchronize()
        logger.info(f"CCGR: stage {name} done in {seconds:.0f} s: {json.dumps(metrics)}")
        return metrics

    def _finished(self, marker: str) -> Optional[Dict]:
        """The contents of a finished stage's ``stage.json`` when resuming, else None."""
        if self.resume and os.path.isfile(marker):
            with open(marker) as f:
                return json.load(f)
        return None

    def _check(
        self, stage: str, figures: Dict[str, float], iters: int, finetuned: bool = False
    ) -> None:
        """Stop (:class:`StageHealthError`) when a health figure of ``stage`` is out of its
        ``MODEL.CCGR.HEALTH`` range; not checked when the model behind the figures trained fewer than
        ``MODEL.CCGR.HEALTH.MIN_ITERS`` iterations (a smoke-test schedule learns too little to judge)."""
        h = self.cfg.MODEL.CCGR.HEALTH
        if not h.ENABLED or iters < h.MIN_ITERS:
            return
        retrain = f"Remove {self._dir(stage)} before re-running with --resume, or it is skipped"
        ranges = {
            "health_loss_over_prior": (
                0.0,
                h.MAX_CLASSIFIER_LOSS_OVER_PRIOR,
                "The classifier stayed near the label prior (loss ~ the prior's entropy). Try "
                "another SEED or a lower SOLVER.BASE_LR in MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS, and check "
                f"MODEL.PIXEL_MEAN / PIXEL_STD against your images. {retrain}.",
            ),
            "health_loss_drop": (
                0.0,
                # a model fine-tuned from the previous round starts near its final loss: only
                # a NaN / inf (diverged) is out of range there
                float("inf") if finetuned else h.MAX_LOSS_DROP,
                "Its training loss did not fall (or diverged): check the learning rate and "
                f"the stage's inputs (the previous stage's outputs). {retrain}.",
            ),
            "health_peaks_per_positive": (
                h.MIN_PER_POSITIVE,
                float("inf"),
                "Few peaks for the classes the images hold: the classifier's maps are flat "
                f"(see round1/classifier). {retrain}.",
            ),
            "health_seeds_per_positive": (
                h.MIN_PER_POSITIVE,
                float("inf"),
                "The previous round's IS branch scores few boxes above MODEL.CCGR.ROUNDS.IS_SCORE_THRESHOLD "
                "for the classes the images hold; lower it, set MODEL.CCGR.ROUNDS.IS_SEED_EVERY_CLASS "
                f"(each present class keeps its best box) or check that IS branch. {retrain}.",
            ),
            "health_pseudo_per_positive": (
                h.MIN_PER_POSITIVE,
                float("inf"),
                "Few pseudo instances for the classes the images hold: look at the round's cues "
                f"and the MIL + SS model (tools/draw_ccgr.py). {retrain}.",
            ),
        }
        check_health(stage, figures, ranges)

    @staticmethod
    def _set_stage(k: int, stage: str, j: int) -> str:
        """Round k's MIL + SS or pseudo-label stage (and folder) of label set j: set 1 keeps the
        plain name, e.g. round2/mil_ss, round2/mil_ss_2."""
        return f"round{k}/{stage}" if j == 1 else f"round{k}/{stage}_{j}"

    def _mil_ss_iters(self, k: int, j: int = 1) -> int:
        """The schedule the round-k MIL + SS model of label set j trained (its saved config)."""
        path = self._dir(self._set_stage(k, "mil_ss", j), "config.yaml")
        if os.path.isfile(path):
            return int(get_wsis_cfg(path).SOLVER.MAX_ITER)
        return int(self.cfg.SOLVER.MAX_ITER)

    def _sub_cfg(self, config_file: Optional[str], folder: str, opts=()) -> CfgNode:
        if config_file is None:
            cfg = self.cfg.clone()
            cfg.defrost()
        else:
            cfg = get_wsis_cfg(config_file)
        cfg.merge_from_list(list(opts))
        cfg.MODEL.DEVICE = self.cfg.MODEL.DEVICE
        cfg.TEST.EVAL_PERIOD = 0
        if config_file != self.cfg.MODEL.CCGR.ROUNDS.IS_CONFIG:
            # image-level stages: an image without objects is a negative example, not noise
            cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
        cfg.OUTPUT_DIR = folder
        return cfg

    def _trained(self, cfg: CfgNode, dataset: str):
        """The model of a finished training stage (cfg.OUTPUT_DIR/model_final.pth, frozen cfg)
        and a test loader over ``dataset`` with the stage's test mapper."""
        cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        cfg.freeze()
        model = self.trainer_cls.build_model(cfg)
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        model.eval()
        loader = build_detection_test_loader(cfg, dataset, mapper=build_dataset_mapper(cfg, False))
        return model, loader

    def _train(self, cfg: CfgNode):
        cfg.freeze()
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        if comm.is_main_process():
            with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
                f.write(cfg.dump())  # the stage's full config, as default_setup writes it
        trainer = self.trainer_cls(cfg, evaluate=False)  # a stage evaluates what it needs
        trainer.resume_or_load(resume=self.resume)
        trainer.train()
        comm.synchronize()  # model_final.pth and metrics.json (main process) are complete
        return unwrap(trainer.model)

    # --------------------------------------------------------------------------------------
    # stages

    def _proposals(self, folder: str) -> Dict:
        given = self.cfg.MODEL.CCGR.ROUNDS.PROPOSAL_FILE
        if given:
            return from_main(lambda: self._check_given_proposals(given))
        path = os.path.join(folder, f"{self.train_set}.pkl")
        generator = SelectiveSearchProposals(max_proposals=self.cfg.MODEL.CCGR.ROUNDS.PROPOSAL_MAX)
        stats = distributed_proposal_file(
            path,
            self.dicts,
            generator,
            workers=self.cfg.MODEL.CCGR.ROUNDS.WORKERS,
            # selective search segments at its min_size: a large JPEG needs no full decode
            decode_short_side=generator.min_size if self.cfg.INPUT.REDUCED_DECODE else 0,
        )
        self._serial.append(stats["serial_seconds"])
        return {"proposal_images_per_s": stats["images_per_s"]}

    def _check_given_proposals(self, given: str) -> Dict:
        # ValueError naming the file for a malformed file, a missing image or a bad box
        data = load_proposal_file(given)
        check_proposals(f"MODEL.CCGR.ROUNDS.PROPOSAL_FILE {given}", data, self.dicts)
        index = {image_id: i for i, image_id in enumerate(data["ids"])}
        n = sum(len(data["boxes"][index[d["image_id"]]]) for d in self.dicts)
        return {"proposals_per_image": n / max(1, len(self.dicts))}

    def _proposal_file(self) -> str:
        if self.cfg.MODEL.CCGR.ROUNDS.PROPOSAL_FILE:
            return self.cfg.MODEL.CCGR.ROUNDS.PROPOSAL_FILE
        return self._dir("proposals", f"{self.train_set}.pkl")

    def _classifier(self, folder: str) -> Dict:
        cfg = self._sub_cfg(self.cfg.MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG, folder, self.cfg.MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS)
        cfg.DATASETS.TRAIN = (self.train_set,)
        cfg.DATASETS.TEST = ()
        self._train(cfg)
        prior = prior_bce(np.stack(self._labels))
        figures = from_main(
            lambda: training_health(os.path.join(folder, "metrics.json"), prior_loss=prior)
        )
        self._check("round1/classifier", figures, cfg.SOLVER.MAX_ITER)
        return figures

    def _round1_cues(self, folder: str) -> Dict:
        cfg = self._sub_cfg(
            self.cfg.MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG,
            self._dir("round1", "classifier"),
            self.cfg.MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS,
        )
        cfg.DATASETS.TEST = (self.train_set,)
        model, loader = self._trained(cfg, self.train_set)
        # this rank's share of the images (the test loader's InferenceSampler), then all of them
        local = compute_cues(model, loader, cue_parameters(self.cfg))
        # PNG bytes, not (H, W) maps: what the main process gathers and holds
        local = {i: (peaks, encode_label_map(sem)) for i, (peaks, sem) in local.items()}

        def write():
            write_cues(os.path.join(folder, "cues.pkl"), cues, self.num_classes)
            n = sum(len(p) for p, _ in cues.values())
            return {
                "peaks_per_image": n / max(1, len(cues)),
                "health_peaks_per_positive": n / max(1, positive_pairs(self._labels)),
            }

        with serial_part(self._serial):
            cues = gather_by_id(local, self._ids, "round1/cues")
            metrics = from_main(write)
        self._check("round1/cues", metrics, cfg.SOLVER.MAX_ITER)
        return metrics

    def _mil_ss_cfg(self, k: int, folder: str) -> CfgNode:
        cfg = self._sub_cfg(None, folder)
        cfg.INPUT.CCGR.CUES_FILE = self._dir(f"round{k}", "cues", "cues.pkl")
        cfg.DATASETS.TRAIN = (self.train_set,)
        cfg.DATASETS.TEST = (self.train_set,)
        cfg.DATASETS.PROPOSAL_FILES_TRAIN = (self._proposal_file(),)
        cfg.DATASETS.PROPOSAL_FILES_TEST = (self._proposal_file(),)
        return cfg

    def _mil_ss(self, k: int, j: int, folder: str) -> Dict:
        cfg = self._mil_ss_cfg(k, folder)
        if k > 1 and self.cfg.MODEL.CCGR.ROUNDS.FINETUNE:
            # label set j fine-tunes its own model of the round before
            cfg.MODEL.WEIGHTS = self._dir(self._set_stage(k - 1, "mil_ss", j), "model_final.pth")
            cfg.SOLVER.MAX_ITER = max(1, int(round(cfg.SOLVER.MAX_ITER * self.cfg.MODEL.CCGR.ROUNDS.FINETUNE_FRACTION)))
            cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < cfg.SOLVER.MAX_ITER)
            cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER // 10)
        self._train(cfg)
        figures = from_main(lambda: training_health(os.path.join(folder, "metrics.json")))
        self._check(
            self._set_stage(k, "mil_ss", j),
            figures,
            cfg.SOLVER.MAX_ITER,
            k > 1 and self.cfg.MODEL.CCGR.ROUNDS.FINETUNE,
        )
        return figures

    def _pseudo_labels(self, k: int, j: int, folder: str) -> Dict:
        model, loader = self._trained(
            self._mil_ss_cfg(k, self._dir(self._set_stage(k, "mil_ss", j))), self.train_set
        )
        # count-only training images (objects counted, not annotated) are not scored
        evaluator = InstanceAPEvaluator(self.train_set, distributed=True, skip_count_only=True)
        evaluator.reset()
        diagnostics = CCGRStageDiagnostics()
        by_id = {d["image_id"]: d for d in self.dicts}
        category_ids = self._category_ids()
        pseudo = {}
        for inp, out in run_ccgr_inference(model, loader):
            # RLE annotations, not (H, W) masks: what is kept and sent to the main process
            record = by_id[inp["image_id"]]
            pseudo[inp["image_id"]] = pseudo_label_annotations(record, out["instances"], category_ids)
            if not self.has_gt_masks:
                diagnostics.process({"height": inp["height"], "width": inp["width"]}, out)
            elif not is_count_only(record):
                diagnostics.process(record, out)
                evaluator.process([inp], [out])
        # collectives, on every rank in this order: the pseudo labels, the diagnostics, the AP
        with serial_part(self._serial):
            stage = self._set_stage(k, "pseudo_labels", j)
            pseudo = gather_by_id(pseudo, self._ids, stage)
            shares = comm.gather(diagnostics, dst=0)
            result = evaluator.evaluate() if self.has_gt_masks else {}
            metrics = from_main(
                lambda: self._write_pseudo_labels(folder, pseudo, shares, result)
            )
        self._check(stage, metrics, self._mil_ss_iters(k, j))
        return metrics

    def _category_ids(self) -> List[int]:
        """The dataset's category id of each contiguous class."""
        ids = self.meta.get("thing_dataset_id_to_contiguous_id", None)
        inverse = (
            {v: k for k, v in ids.items()} if ids else {c: c for c in range(self.num_classes)}
        )
        return [inverse[c] for c in range(self.num_classes)]

    def _write_pseudo_labels(self, folder, pseudo, shares, result) -> Dict:
        """Main process: write the stage's pseudo_labels.json and sum up its figures."""
        diagnostics = shares[0]
        for share in shares[1:]:
            diagnostics.merge(share)
        n = write_pseudo_label_json(
            os.path.join(folder, "pseudo_labels.json"),
            self.dicts,
            pseudo,
            self._category_ids(),
            self.meta.thing_classes,
        )
        metrics = {
            "pseudo_instances": float(n),
            "health_pseudo_per_positive": n / max(1, positive_pairs(self._labels)),
        }
        diag = diagnostics.summary()
        gt_free = ("bags_per_image", "pseudo_per_image")
        metrics.update(
            {f"diag_{k}": v for k, v in diag.items() if self.has_gt_masks or k in gt_free}
        )
        if self.has_gt_masks:
            res = result["wsis_instance"]
            metrics.update({f"pseudo_{m}": res[m] for m in ("mAP_r25", "mAP_r50", "mAP_b50")})
        return metrics

    def _pseudo_dataset(self, k: int, j: int = 1) -> str:
        """Register round k's pseudo labels of label set j as a dataset (checked against the
        training set)."""
        name = f"{self.train_set}_ccgr_round{k}" + ("" if j == 1 else f"_set{j}")
        path = self._dir(self._set_stage(k, "pseudo_labels", j), "pseudo_labels.json")
        what = f"CCGR round {k}" + ("" if j == 1 else f" label set {j}")
        check_pseudo_label_json(path, self.dicts, self.meta.thing_classes, what)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        meta = {"thing_classes": list(self.meta.thing_classes)}
        ids = self.meta.get("thing_dataset_id_to_contiguous_id", None)
        if ids:
            meta["thing_dataset_id_to_contiguous_id"] = dict(ids)
        register_coco_counts_instances(name, meta, path, "")
        return name

    def _is_cfg(self, k: int) -> CfgNode:
        cfg = self._sub_cfg(
            self.cfg.MODEL.CCGR.ROUNDS.IS_CONFIG, self._dir(f"round{k}", "is"), self.cfg.MODEL.CCGR.ROUNDS.IS_OPTS
        )
        # round k's label sets, and those of the rounds before it up to IS_LABEL_ROUNDS rounds
        first = max(1, k - self.cfg.MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS + 1)
        cfg.DATASETS.TRAIN = tuple(
            self._pseudo_dataset(r, j)
            for r in range(k, first - 1, -1)
            for j in range(1, self.cfg.MODEL.CCGR.ROUNDS.LABEL_SETS + 1)
        )
        return cfg

    def _is_branch(self, k: int, folder: str) -> Dict:
        cfg = self._is_cfg(k)  # registers (and checks) the pseudo labels once
        if k > 1 and self.cfg.MODEL.CCGR.ROUNDS.IS_FINETUNE:
            cfg.MODEL.WEIGHTS = self._dir(f"round{k - 1}", "is", "model_final.pth")
        model = self._train(cfg)  # frozen from here
        metrics = from_main(lambda: training_health(os.path.join(folder, "metrics.json")))
        self._check(
            f"round{k}/is", metrics, cfg.SOLVER.MAX_ITER, k > 1 and self.cfg.MODEL.CCGR.ROUNDS.IS_FINETUNE
        )
        tests = tuple(cfg.DATASETS.TEST)
        for name in tests:
            for m, value in instance_ap(cfg, model, name).items():
                metrics[m if len(tests) == 1 else f"{name}/{m}"] = value
        return metrics

    def _seed_cues(self, k: int, folder: str) -> Dict:
        """Round k's cues from the IS branch of round k − 1."""
        cfg = self._is_cfg(k - 1)
        cfg.DATASETS.TEST = (self.train_set,)
        threshold = self.cfg.MODEL.CCGR.ROUNDS.IS_SCORE_THRESHOLD
        every_class = self.cfg.MODEL.CCGR.ROUNDS.IS_SEED_EVERY_CLASS
        if every_class:
            # every box the IS branch has for a class, so that a present one keeps its best
            cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
        model, loader = self._trained(cfg, self.train_set)
        labels_of = dict(zip(self._ids, self._labels))
        cues, seeds = {}, {}
        with torch.no_grad():
            for batch in progress(loader, "CCGR seed cues", unit="batch"):
                for inp, out in zip(batch, model(batch)):
                    peaks, sem, sb = seed_cues_from_instances(
                        out["instances"],
                        torch.as_tensor(labels_of[inp["image_id"]]),
                        self.num_classes,
                        threshold,
                        centre_nms=self.cfg.MODEL.CCGR.ROUNDS.IS_SEED_CENTRE_NMS,
                        every_class=every_class,
                    )
                    cues[inp["image_id"]] = (peaks, encode_label_map(sem))
                    seeds[inp["image_id"]] = sb

        def write():
            path = os.path.join(folder, "cues.pkl")
            write_cues(path, cues, self.num_classes, seed_boxes=seeds)
            n = sum(len(s) for s in seeds.values())
            positives = positive_pairs(self._labels)
            # (image, present class) pairs seeded only below the threshold (IS_SEED_EVERY_CLASS)
            # and not at all: the image labels' objects that round k cannot find
            below = unseeded = 0
            for image_id, s in seeds.items():
                for c in np.flatnonzero(labels_of[image_id] > 0.5):
                    scores = s[s[:, 0] == c, 5]
                    unseeded += len(scores) == 0
                    below += len(scores) > 0 and bool((scores < threshold).all())
            return {
                "seed_boxes_per_image": n / max(1, len(seeds)),
                "positives_seeded_below_threshold": below / max(1, positives),
                "positives_without_seed": unseeded / max(1, positives),
                "health_seeds_per_positive": n / max(1, positives),
            }

        with serial_part(self._serial):
            cues = gather_by_id(cues, self._ids, f"round{k}/cues")
            seeds = gather_by_id(seeds, self._ids, f"round{k}/cues (seed boxes)")
            metrics = from_main(write)
        self._check(f"round{k}/cues", metrics, cfg.SOLVER.MAX_ITER)
        return metrics

    # --------------------------------------------------------------------------------------

    def stages(self) -> List[str]:
        names = ["proposals", "round1/classifier", "round1/cues"]
        for k in range(1, self.cfg.MODEL.CCGR.ROUNDS.NUM + 1):
            if k > 1:
                names.append(f"round{k}/cues")
            for j in range(1, self.cfg.MODEL.CCGR.ROUNDS.LABEL_SETS + 1):
                names += [self._set_stage(k, s, j) for s in ("mil_ss", "pseudo_labels")]
            names.append(f"round{k}/is")
        return names

    def stage_seconds(self) -> Dict[str, float]:
        """{stage: seconds} of the stages that finished (their ``stage.json``), in run order."""
        times = {}
        for name in self.stages():
            marker = self._dir(name, STAGE_FILE)
            if os.path.isfile(marker):
                with open(marker) as f:
                    times[name] = float(json.load(f)["seconds"])
        return times

    def run(self, resume: bool = False, until: Optional[str] = None) -> Dict[int, Dict[str, float]]:
        """
        Run (or, with ``resume``, continue) every stage.

        Args:
            resume: skip finished stages, continue a training stage from its last checkpoint.
            until: stop after this stage (one of :meth:`stages`), e.g. "round1/pseudo_labels"
                to look at the first pseudo labels before training on them.

        Returns:
            {round: metrics}: the pseudo labels' quality on the training set (when it has
            ground-truth masks) and the IS branch's mAP on DATASETS.TEST (rounds that finished
            their IS branch; with ``until``, also the round that stopped, as far as it went).
        """
        if until is not None and until not in self.stages():
            raise ValueError(f"until: {until!r} is not a stage; the stages are {self.stages()}")
        self.resume = resume
        os.makedirs(self.output, exist_ok=True)
        check_shared_output(self.output)
        writers = [
            JSONWriter(os.path.join(self.output, "metrics.json")),
            TensorboardXWriter(self.output),
        ] if comm.is_main_process() else []
        total = len(self.stages())
        done = 0

        class _Until(Exception):
            pass

        def stage(name, fn, seed_offset=0, prefix=""):
            nonlocal done
            done += 1
            logger.info(f"CCGR: [{done}/{total}] {name}")
            out = {prefix + m: v for m, v in self._stage(name, fn, seed_offset).items()}
            if name == until:
                metrics.update(out)
                raise _Until()
            return out

        metrics = OrderedDict()
        try:
            stage("proposals", self._proposals)
            stage("round1/classifier", self._classifier)
            cues1 = stage("round1/cues", self._round1_cues)
            for k in range(1, self.cfg.MODEL.CCGR.ROUNDS.NUM + 1):
                metrics = OrderedDict(cues1 if k == 1 else {})
                if k > 1:
                    metrics.update(stage(f"round{k}/cues", lambda f, k=k: self._seed_cues(k, f)))
                for j in range(1, self.cfg.MODEL.CCGR.ROUNDS.LABEL_SETS + 1):
                    # set 1's figures keep their names; set j's are prefixed set{j}_
                    offset, prefix = 1000 * (j - 1), "" if j == 1 else f"set{j}_"
                    stage(
                        self._set_stage(k, "mil_ss", j),
                        lambda f, k=k, j=j: self._mil_ss(k, j, f),
                        offset,
                        prefix,
                    )
                    metrics.update(stage(
                        self._set_stage(k, "pseudo_labels", j),
                        lambda f, k=k, j=j: self._pseudo_labels(k, j, f),
                        offset,
                        prefix,
                    ))
                metrics.update(stage(f"round{k}/is", lambda f, k=k: self._is_branch(k, f)))
                self._finish_round(k, metrics, writers)
        except _Until:
            k = next(
                (r for r in range(1, self.cfg.MODEL.CCGR.ROUNDS.NUM + 1) if until.startswith(f"round{r}/")),
                0,
            )
            if k and metrics:
                self._finish_round(k, metrics, writers)
            logger.info(f"CCGR: stopped after stage {until}")
        for w in writers:
            w.close()
        return self.metrics

    def _finish_round(self, k: int, metrics: Dict[str, float], writers) -> None:
        """Record round k's metrics (event storage, rounds.json, log)."""
        self.metrics[k] = metrics
        with EventStorage(start_iter=k) as storage:
            for key, value in metrics.items():
                storage.put_scalar(f"ccgr/{key}", float(value), smoothing_hint=False)
            for w in writers:
                w.write()
        if comm.is_main_process():
            with open(os.path.join(self.output, "rounds.json"), "w") as f:
                json.dump({str(r): m for r, m in self.metrics.items()}, f, indent=2)
        logger.info(f"CCGR: round {k}: {json.dumps(metrics)}")
