"""
Instance-segmentation evaluation of PRM (Zhou et al., CVPR 2018), LC/ILC (Cholakkal et al.,
CVPR 2019) and CCGR (AAAI 2020): mAP^r at mask IoU 0.25 / 0.5 / 0.75 and mAP^b at box IoU 0.5.

The protocol is the SDS / PASCAL VOC one (Hariharan et al., ECCV 2014):

* detections of one class are ranked by score over the whole evaluated set;
* within an image, going down the ranking, each detection is assigned to the ground truth (GT) of
  its class with the largest IoU (already matched GT included). If that IoU is >= the threshold and
  the GT is unmatched, the detection is a true positive and the GT becomes matched; if the GT is
  already matched (a duplicate) or the IoU is below the threshold, it is a false positive; if the GT
  is a crowd / "difficult" instance (``iscrowd=1``) and the IoU is >= the threshold, the detection
  is ignored (neither TP nor FP);
* per-class AP is the area under the monotone precision envelope (VOC2010+ all-point
  interpolation); the mean is over the classes with at least one non-crowd GT in the evaluated set.

The evaluated set is the set of images passed to :meth:`InstanceAPEvaluator.process`.
"""

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..utils.checks import check_array, check_finite, check_number
from ..data.datasets.metadata import thing_classes_of
from ..data.image_labels import is_count_only
from .gather import gather_predictions
from .gt_cache import cached_ground_truth

__all__ = [
    "InstanceAPEvaluator",
    "voc_ap",
    "match_detections",
    "average_precision",
    "pairwise_box_iou",
    "load_instance_ground_truth",
]

logger = logging.getLogger(__name__)


# detectron2.evaluation.pascal_voc_evaluation.voc_ap has this definition but builds the envelope in
# a Python loop: 100 ms vs 1 ms at 10⁵ detections (tools/benchmark_eval_helpers.py)
def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """
    Area under the monotone precision envelope (PASCAL VOC 2010+ "all-point" AP):

        AP = sum_k (r_k - r_{k-1}) * max_{k' >= k} p_{k'},   r_0 = 0

    Args:
        recall: (D,) recall after each ranked detection: in [0, 1], non-decreasing.
        precision: (D,) precision after each ranked detection, in [0, 1].

    Returns:
        AP in [0, 1]; 0 for D = 0.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    check_array("recall", recall, ndim=1, where="voc_ap")
    if recall.shape != precision.shape:
        raise ValueError(
            f"voc_ap: 'recall' and 'precision' must have the same shape, got {recall.shape} and "
            f"{precision.shape}"
        )
    for name, values in (("recall", recall), ("precision", precision)):
        check_finite(name, values, "voc_ap")
        outside = (values < 0) | (values > 1)
        if outside.any():
            k = int(np.argmax(outside))
            raise ValueError(f"voc_ap: '{name}' must lie in [0, 1], got {float(values[k])} at {k}")
    drops = np.diff(recall) < 0
    if drops.any():
        k = int(np.argmax(drops))
        raise ValueError(
            f"voc_ap: 'recall' must be non-decreasing (recall after each ranked detection), got "
            f"{float(recall[k])} then {float(recall[k + 1])} at {k}, {k + 1}"
        )
    if recall.size == 0:
        return 0.0
    # envelope: precision at rank k becomes the best precision at any rank k' >= k
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_steps * envelope))


# detectron2.structures.pairwise_iou has this definition, but its Boxes are float32: IoU off by up to
# 2e-6 (tools/benchmark_eval_helpers.py), enough to move a match across a threshold
def pairwise_box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """
    IoU between axis-aligned boxes in continuous XYXY_ABS coordinates (area = (x2-x1)*(y2-y1)).

    Args:
        boxes1: (D, 4) boxes.
        boxes2: (G, 4) boxes.

    Returns:
        (D, G) float64 IoU; 0 where the union is empty.
    """
    a, b = np.asarray(boxes1, dtype=np.float64), np.asarray(boxes2, dtype=np.float64)
    for name, boxes in (("boxes1", a), ("boxes2", b)):
        if boxes.size:  # an empty list stands for no boxes
            check_array(name, boxes, (None, 4), "pairwise_box_iou")
            check_finite(name, boxes, "pairwise_box_iou")
    a, b = a.reshape(-1, 4), b.reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_detections(ious: np.ndarray, gt_ignore: np.ndarray, iou_threshold: float) -> np.ndarray:
    """
    SDS / VOC greedy matching of one image's detections of one class.

    Args:
        ious: (D, G) IoU between detections (rows, already sorted by descending score) and GT.
        gt_ignore: (G,) bool, True for crowd / difficult GT.
        iou_threshold: a detection needs IoU >= this with its best GT to match it.

    Returns:
        (D,) int8 labels: 1 true positive, 0 false positive, -1 ignored (best GT is a crowd).
    """
    where = "match_detections"
    check_number("iou_threshold", iou_threshold, 0.0, 1.0, where=where)
    ious = np.asarray(ious, dtype=np.float64)
    check_array("ious", ious, ndim=2, where=where)
    check_finite("ious", ious, where)
    if ((ious < 0) | (ious > 1)).any():
        raise ValueError(f"{where}: 'ious' must lie in [0, 1], got {ious.min()}..{ious.max()}")
    num_dets, num_gt = ious.shape
    if np.asarray(gt_ignore).size != num_gt:
        raise ValueError(
            f"{where}: 'gt_ignore' must have G = {num_gt} entries (columns of ious), got shape "
            f"{np.asarray(gt_ignore).shape}"
        )
    labels = np.zeros(num_dets, dtype=np.int8)
    if num_dets == 0 or num_gt == 0:
        return labels
    gt_ignore = np.asarray(gt_ignore, dtype=bool).reshape(num_gt)
    best_gt = ious.argmax(axis=1)
    best_iou = ious[np.arange(num_dets), best_gt]
    matched = np.zeros(num_gt, dtype=bool)
    for d in range(num_dets):
        g = best_gt[d]
        if best_iou[d] < iou_threshold:
            continue  # false positive
        if gt_ignore[g]:
            labels[d] = -1
        elif not matched[g]:
            matched[g] = True
            labels[d] = 1
    return labels


def average_precision(scores: np.ndarray, labels: np.ndarray, num_positives: int) -> float:
    """
    Rank all detections of one class and integrate precision over recall with :func:`voc_ap`.

    Args:
        scores: (D,) detection scores, in a fixed order used to break ties (stable sort).
        labels: (D,) labels from :func:`match_detections` (1 TP, 0 FP, -1 ignored).
        num_positives: number of non-crowd GT instances of the class.

    Returns:
        AP in [0, 1]; NaN if ``num_positives == 0``.
    """
    where = "average_precision"
    check_number("num_positives", int(num_positives) if isinstance(num_positives, np.integer)
                 else num_positives, low=0, integer=True, where=where)  # fmt: skip
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    check_array("scores", scores, ndim=1, where=where)
    check_array("labels", labels, scores.shape, where=where)
    # a NaN score has no rank: sorted last or first by chance, it would decide the AP
    check_finite("scores", scores, where)
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError(f"{where}: 'labels' must be -1, 0 or 1, got {np.unique(labels)}")
    if (labels == 1).sum() > num_positives:
        raise ValueError(
            f"{where}: {(labels == 1).sum()} true positives in 'labels' but num_positives is "
            f"{num_positives} (recall above 1)"
        )
    if num_positives == 0:
        return float("nan")
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(labels[order] == 1)
    fp = np.cumsum(labels[order] == 0)
    recall = tp / float(num_positives)
    precision = tp / np.maximum(tp + fp, 1)
    return voc_ap(recall, precision)


def _rle_from_annotation(segm, height: int, width: int, where: str) -> dict:
    """Convert a polygon / uncompressed RLE / compressed RLE to one compressed RLE dict."""
    if isinstance(segm, list):
        if len(segm) == 0:
            raise ValueError(f"{where}: empty polygon list in field 'segmentation'")
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if isinstance(segm["counts"], list):
            rle = mask_util.frPyObjects(segm, *segm["size"])
        else:
            counts = segm["counts"]
            rle = {
                "size": list(segm["size"]),
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
    else:
        raise ValueError(
            f"{where}: field 'segmentation' must be a polygon list or an RLE dict, "
            f"got {type(segm).__name__}"
        )
    if [int(s) for s in rle["size"]] != [height, width]:
        raise ValueError(
            f"{where}: 'segmentation' has size {list(rle['size'])} but the image is "
            f"{[height, width]} (height, width)"
        )
    return rle


def load_instance_ground_truth(
    dataset_name: str, skip_count_only: bool = False
) -> Dict[object, dict]:
    """
    Read the GT instances of a registered dataset (shared dataset-dict convention).

    Args:
        dataset_name: a name registered in DatasetCatalog whose metadata has ``thing_classes``.
        skip_count_only: leave out the images whose objects are counted but not annotated
            (:func:`wsis_d2.data.image_labels.is_count_only`) instead of raising ValueError.

    Returns:
        {image_id: {"file_name", "height", "width", "index" (position in the dataset),
        "classes" (G,) int64, "boxes" (G, 4) float64 XYXY_ABS, "rles" list of G RLE dicts,
        "crowd" (G,) bool}}.
    """
    num_classes = len(thing_classes_of(dataset_name))
    gt = {}
    for index, record in enumerate(DatasetCatalog.get(dataset_name)):
        where = f"dataset '{dataset_name}', file {record.get('file_name', '?')}"
        for field in ("image_id", "height", "width"):
            if field not in record:
                raise ValueError(f"{where}: missing field '{field}'")
        height, width = int(record["height"]), int(record["width"])
        classes, boxes, rles, crowd = [], [], [], []
        for k, ann in enumerate(record.get("annotations", [])):
            ann_where = f"{where}, annotation {k}"
            cls = int(ann["category_id"])
            if not 0 <= cls < num_classes:
                raise ValueError(f"{ann_where}: 'category_id' {cls} outside [0, {num_classes - 1}]")
            if "segmentation" not in ann:
                raise ValueError(f"{ann_where}: missing field 'segmentation' (needed for mAP^r)")
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            classes.append(cls)
            boxes.append(box)
            rles.append(_rle_from_annotation(ann["segmentation"], height, width, ann_where))
            crowd.append(bool(ann.get("iscrowd", 0)))
        counted = int(np.sum(record.get("class_counts", 0)))
        if skip_count_only and is_count_only(record):
            continue
        if counted > len(crowd) - sum(crowd):
            # count-only image (e.g. a COCO image's "image_counts"): its objects would score as
            # false positives
            raise ValueError(
                f"{where}: 'class_counts' counts {counted} objects but the image has "
                f"{len(crowd) - sum(crowd)} non-crowd annotations; mAP needs every object's mask "
                "(score counts alone with metadata evaluator_type 'counting')"
            )
        if record["image_id"] in gt:
            raise ValueError(f"{where}: duplicate 'image_id' {record['image_id']!r}")
        gt[record["image_id"]] = {
            "file_name": record.get("file_name", "?"),
            "height": height,
            "width": width,
            "index": index,
            "classes": np.asarray(classes, dtype=np.int64),
            "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            "rles": rles,
            "crowd": np.asarray(crowd, dtype=bool),
        }
    return gt


def _threshold_name(iou: float) -> str:
    return str(int(round(iou * 100)))


class InstanceAPEvaluator(DatasetEvaluator):
    """
    mAP^r (mask IoU) and mAP^b (box IoU) of predicted instances, SDS / PASCAL VOC protocol (see the
    module docstring). Results, in percent, under the task "wsis_instance": "mAP_r25", "mAP_r50",
    "mAP_r75", "mAP_b50" and per class "AP_r25/<class>", ..., "AP_b50/<class>" (only classes with
    GT in the evaluated set).
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        iou_thresholds: Sequence[float] = (0.25, 0.5, 0.75),
        *,
        box_iou_thresholds: Sequence[float] = (0.5,),
        skip_count_only: bool = False,
    ):
        """
        Args:
            dataset_name: registered dataset; GT is read from ``DatasetCatalog.get(dataset_name)``.
            distributed: gather predictions from all ranks; only the main process returns results.
            output_dir: if given, per-class APs are written to ``output_dir/instance_ap.json``.
            iou_thresholds: mask IoU thresholds of mAP^r.
            box_iou_thresholds: box IoU thresholds of mAP^b.
            skip_count_only: the dataset's count-only images are not scored (their inputs must
                not be processed); otherwise such an image is an error.
        """
        for t in list(iou_thresholds) + list(box_iou_thresholds):
            if not 0.0 < float(t) <= 1.0:
                raise ValueError(f"IoU thresholds must lie in (0, 1], got {t}")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._mask_thresholds = tuple(float(t) for t in iou_thresholds)
        self._box_thresholds = tuple(float(t) for t in box_iou_thresholds)
        self._skip_count_only = bool(skip_count_only)
        self._class_names = thing_classes_of(dataset_name)
        self._gt = None  # loaded lazily, on the main process only
        self.reset()

    def reset(self):
        self._predictions = []
        self._warned_missing = False

    def process(self, inputs, outputs):
        """
        Args:
            inputs: list of dataset dicts, each with "image_id".
            outputs: list of dicts; ``outputs[i]["instances"]`` is an Instances with
                pred_masks (R, H, W) bool / float (thresholded at 0.5) at image resolution,
                scores (R,), pred_classes (R,) and optionally pred_boxes (R, 4) XYXY_ABS (derived
                from the masks when missing).
        """
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                if not self._warned_missing:
                    logger.warning(
                        "InstanceAPEvaluator: a model output has no 'instances'; such outputs are "
                        "skipped and their images left out of the evaluated set."
                    )
                    self._warned_missing = True
                continue
            if "image_id" not in inp:
                raise ValueError(
                    f"InstanceAPEvaluator: input {inp.get('file_name', '?')} has no field "
                    "'image_id'"
                )
            self._predictions.append(self._encode(inp, out["instances"].to("cpu")))

    @staticmethod
    def _encode(inp: dict, instances) -> dict:
        where = f"prediction for image_id {inp['image_id']!r} ({inp.get('file_name', '?')})"
        for field in ("pred_masks", "scores", "pred_classes"):
            if not instances.has(field):
                raise ValueError(f"{where}: instances have no field '{field}'")
        masks = instances.pred_masks
        if masks.dim() != 3:
            raise ValueError(f"{where}: 'pred_masks' must be (R, H, W), got {tuple(masks.shape)}")
        if masks.dtype != torch.bool:
            masks = masks >= 0.5
        num, height, width = masks.shape
        scores = instances.scores.numpy().astype(np.float64).reshape(-1)
        if scores.shape != (num,):
            raise ValueError(
                f"{where}: 'scores' must be ({num},) like pred_masks, got {scores.shape}"
            )
        if not np.isfinite(scores).all():
            # NaN scores would sort arbitrarily and could pass as a perfect ranking
            bad = scores[~np.isfinite(scores)][0]
            raise ValueError(f"{where}: 'scores' must be finite, got {bad}")
        if num > 0:
            fortran = np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))
            rles = mask_util.encode(fortran)
        else:
            rles = []
        if instances.has("pred_boxes"):
            boxes = instances.pred_boxes.tensor.numpy().astype(np.float64).reshape(-1, 4)
        elif num > 0:
            boxes = BoxMode.convert(mask_util.toBbox(rles), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        else:
            boxes = np.zeros((0, 4), dtype=np.float64)
        return {
            "image_id": inp["image_id"],
            "size": (int(height), int(width)),
            "scores": scores,
            "classes": instances.pred_classes.numpy().astype(np.int64).reshape(-1),
            "boxes": boxes,
            "rles": rles,
        }

    def evaluate(self):
        predictions = gather_predictions(self._predictions, self._distributed)
        if predictions is None:  # not the main process
            return {}
        if len(predictions) == 0:
            logger.warning("InstanceAPEvaluator: no predictions were processed.")
            return {}
        if self._gt is None:
            self._gt = cached_ground_truth(
                f"instances(skip_count_only={self._skip_count_only})",
                self._dataset_name,
                lambda: load_instance_ground_truth(self._dataset_name, self._skip_count_only),
            )
        ap_table, num_gt = self._compute_ap(predictions)
        results = self._summarize(ap_table)
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "instance_ap.json")
            with PathManager.open(path, "w") as f:
                json.dump(
                    {
                        "results": results,
                        "num_gt": {n: int(k) for n, k in zip(self._class_names, num_gt)},
                    },
                    f,
                    indent=2,
                )
        return OrderedDict({"wsis_instance": results})

    def _metric_names(self) -> List[str]:
        return [f"r{_threshold_name(t)}" for t in self._mask_thresholds] + [
            f"b{_threshold_name(t)}" for t in self._box_thresholds
        ]

    def _compute_ap(self, predictions: List[dict]):
        """
        Returns:
            ap: {metric name: (C,) AP in [0, 1], NaN for classes without GT};
            num_gt: (C,) number of non-crowd GT per class in the evaluated set.
        """
        num_classes = len(self._class_names)
        # one prediction per image, in dataset order: results do not depend on the number of
        # ranks nor on the order in which images were processed
        unique = {}
        for p in predictions:
            if p["image_id"] not in self._gt:
                raise ValueError(
                    f"InstanceAPEvaluator: image_id {p['image_id']!r} is not in dataset "
                    f"'{self._dataset_name}'"
                )
            unique.setdefault(p["image_id"], p)
        if len(unique) < len(predictions):
            logger.warning(
                f"InstanceAPEvaluator: {len(predictions) - len(unique)} duplicate image(s) "
                "were evaluated once."
            )
        ordered = sorted(unique.values(), key=lambda p: self._gt[p["image_id"]]["index"])

        metrics = [("r", t) for t in self._mask_thresholds] + [
            ("b", t) for t in self._box_thresholds
        ]
        scores = [[[] for _ in range(num_classes)] for _ in metrics]
        labels = [[[] for _ in range(num_classes)] for _ in metrics]
        num_gt = np.zeros(num_classes, dtype=np.int64)
        for pred in ordered:
            gt = self._gt[pred["image_id"]]
            if pred["size"] != (gt["height"], gt["width"]):
                raise ValueError(
                    f"InstanceAPEvaluator: 'pred_masks' of image_id {pred['image_id']!r} "
                    f"({gt['file_name']}) are {pred['size']} but the image is "
                    f"{(gt['height'], gt['width'])} (height, width)"
                )
            num_gt += np.bincount(gt["classes"][~gt["crowd"]], minlength=num_classes)
            for c in np.unique(pred["classes"]):
                if not 0 <= c < num_classes:
                    raise ValueError(
                        f"InstanceAPEvaluator: 'pred_classes' of image_id {pred['image_id']!r} "
                        f"contains {c}, outside [0, {num_classes - 1}]"
                    )
                det = np.nonzero(pred["classes"] == c)[0]
                det = det[np.argsort(-pred["scores"][det], kind="stable")]
                gt_idx = np.nonzero(gt["classes"] == c)[0]
                mask_iou = self._mask_iou(
                    [pred["rles"][i] for i in det], [gt["rles"][i] for i in gt_idx]
                )
                box_iou = pairwise_box_iou(pred["boxes"][det], gt["boxes"][gt_idx])
                crowd = gt["crowd"][gt_idx]
                for m, (kind, thresh) in enumerate(metrics):
                    ious = mask_iou if kind == "r" else box_iou
                    labels[m][c].append(match_detections(ious, crowd, thresh))
                    scores[m][c].append(pred["scores"][det])

        ap = {}
        for m, name in enumerate(self._metric_names()):
            ap[name] = np.array(
                [
                    average_precision(
                        np.concatenate(scores[m][c]) if scores[m][c] else np.zeros(0),
                        np.concatenate(labels[m][c]) if labels[m][c] else np.zeros(0),
                        int(num_gt[c]),
                    )
                    for c in range(num_classes)
                ]
            )
        return ap, num_gt

    @staticmethod
    def _mask_iou(dt_rles: list, gt_rles: list) -> np.ndarray:
        if len(dt_rles) == 0 or len(gt_rles) == 0:
            return np.zeros((len(dt_rles), len(gt_rles)), dtype=np.float64)
        # plain IoU for crowd GT as well (VOC "difficult" semantics), hence iscrowd all 0
        ious = mask_util.iou(dt_rles, gt_rles, [0] * len(gt_rles))
        return np.asarray(ious, dtype=np.float64).reshape(len(dt_rles), len(gt_rles))

    def _summarize(self, ap: Dict[str, np.ndarray]) -> dict:
        results = OrderedDict()
        has_gt = ~np.isnan(next(iter(ap.values())))
        if not has_gt.any():
            logger.warning(
                f"InstanceAPEvaluator: no non-crowd GT instance in the evaluated images of "
                f"'{self._dataset_name}'; mAP is NaN."
            )
        for name, values in ap.items():
            results[f"mAP_{name}"] = (
                float(np.mean(values[has_gt]) * 100) if has_gt.any() else float("nan")
            )
        for name, values in ap.items():
            for c in np.nonzero(has_gt)[0]:
                results[f"AP_{name}/{self._class_names[c]}"] = float(values[c] * 100)
        logger.info(
            "Instance segmentation (SDS/VOC protocol) on '{}':\n{}".format(
                self._dataset_name,
                create_small_table({k: v for k, v in results.items() if k.startswith("mAP")}),
            )
        )
        return results
