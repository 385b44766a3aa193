"""
Quality measures of CCGR's intermediate labels against the ground truth of a dataset: proposal
recall, the mIoU of pseudo semantic labels, and :class:`CCGRStageDiagnostics`, which follows the
objects through one round's steps (peaks, bags, MIL boxes, refined boxes, pseudo masks). (The
pseudo instances are scored like predictions, by :class:`InstanceAPEvaluator`.)
"""

from typing import Dict, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.structures import Boxes, pairwise_iou

from ..utils.checks import check_array, check_finite, check_number

__all__ = [
    "proposal_recall",
    "semantic_ground_truth",
    "instance_ground_truth",
    "SemanticConfusion",
    "CCGRStageDiagnostics",
]


def proposal_recall(
    gt_boxes: Sequence[np.ndarray], boxes: Sequence[np.ndarray], top: int, iou: float
) -> Optional[float]:
    """
    Fraction of the ground-truth boxes (XYXY) covered at IoU >= ``iou`` by one of the first
    ``top`` proposals of their image (None without ground truth).

    Args:
        gt_boxes: per image, (G_i, 4) ground-truth boxes. boxes: per image, (R_i, 4) proposals
            in rank order. top: proposals kept per image (>= 0). iou: threshold in [0, 1].
    """
    where = "proposal_recall"
    check_number("top", top, low=0, integer=True, where=where)
    check_number("iou", iou, 0.0, 1.0, where=where)
    if len(gt_boxes) != len(boxes):
        raise ValueError(
            f"{where}: 'gt_boxes' and 'boxes' must list the same images, got {len(gt_boxes)} and "
            f"{len(boxes)} entries"
        )
    for name, per_image in (("gt_boxes", gt_boxes), ("boxes", boxes)):
        for i, b in enumerate(per_image):
            b = np.asarray(b, dtype=np.float64)
            if b.size:
                check_array(f"{name}[{i}]", b, (None, 4), where)
                check_finite(f"{name}[{i}]", b, where)
    hit = total = 0
    for g, b in zip(gt_boxes, boxes):
        if len(g) == 0:
            continue
        total += len(g)
        if len(b) == 0:
            continue
        ious = pairwise_iou(
            Boxes(torch.as_tensor(np.asarray(g), dtype=torch.float64).reshape(-1, 4)),
            Boxes(torch.as_tensor(np.asarray(b[:top]), dtype=torch.float64).reshape(-1, 4)),
        )
        hit += int((ious.max(dim=1).values >= iou).sum())
    return hit / total if total else None


def _decode(segm, h: int, w: int) -> np.ndarray:
    if isinstance(segm, list):
        rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_util.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_util.decode(rle).astype(bool)


def _check_record(dataset_dict: Dict, where: str) -> None:
    """A dataset dict with positive integer 'height' and 'width' and segmented annotations."""
    if not isinstance(dataset_dict, dict):
        raise TypeError(
            f"{where}: 'dataset_dict' must be a dict, got {type(dataset_dict).__name__}"
        )
    name = dataset_dict.get("file_name", "?")
    for key in ("height", "width"):
        if key not in dataset_dict:
            raise ValueError(f"{where}: dataset dict of {name} has no field '{key}'")
        check_number(f"{key} of {name}", dataset_dict[key], low=1, integer=True, where=where)
    for k, ann in enumerate(dataset_dict.get("annotations", [])):
        for key in ("category_id", "segmentation"):
            if key not in ann and not (key == "segmentation" and ann.get("iscrowd", 0)):
                raise ValueError(f"{where}: {name}, annotation {k} has no field '{key}'")


def instance_ground_truth(dataset_dict: Dict):
    """
    The non-crowd instances of an annotated image with masks.

    Returns:
        classes (G,) int64, boxes (G, 4) float64 XYXY, masks (G, H, W) bool.
    """
    _check_record(dataset_dict, "instance_ground_truth")
    h, w = int(dataset_dict["height"]), int(dataset_dict["width"])
    anns = [
        a for a in dataset_dict.get("annotations", [])
        if not a.get("iscrowd", 0) and "segmentation" in a
    ]
    classes = np.array([a["category_id"] for a in anns], dtype=np.int64)
    masks = np.stack([_decode(a["segmentation"], h, w) for a in anns]) if anns else np.zeros(
        (0, h, w), bool
    )
    boxes = np.zeros((len(anns), 4), np.float64)
    for g, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            boxes[g] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return classes, boxes, masks


def semantic_ground_truth(dataset_dict: Dict, num_classes: int) -> np.ndarray:
    """
    (H, W) uint8 class map of an instance-annotated image: the union of each class's instance
    masks (RLE or polygons), ``num_classes`` (background) elsewhere; later annotations win where
    masks overlap.
    """
    _check_record(dataset_dict, "semantic_ground_truth")
    check_number("num_classes", num_classes, 1, 254, integer=True, where="semantic_ground_truth")
    h, w = int(dataset_dict["height"]), int(dataset_dict["width"])
    out = np.full((h, w), num_classes, dtype=np.uint8)
    for ann in dataset_dict.get("annotations", []):
        out[_decode(ann["segmentation"], h, w)] = ann["category_id"]
    return out


class SemanticConfusion:
    """
    Accumulated confusion of label maps against ground-truth maps over K classes (object classes
    and background); predicted pixels equal to ``ignore`` are left out and counted apart.
    """

    def __init__(self, num_labels: int, ignore: int = 255):
        check_number("num_labels", num_labels, low=1, integer=True, where="SemanticConfusion")
        check_number("ignore", ignore, integer=True, where="SemanticConfusion")
        self.k = int(num_labels)
        self.ignore = int(ignore)
        self.matrix = np.zeros((self.k, self.k), dtype=np.int64)
        self.ignored = 0
        self.total = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """pred, gt: (H, W) integer maps of the same size, labels in 0..K-1 (pred also ignore)."""
        where = "SemanticConfusion.add"
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(
                f"{where}: label map 'pred' {pred.shape} and ground truth 'gt' {gt.shape} differ "
                "in size"
            )
        for name, m in (("pred", pred), ("gt", gt)):
            if not np.issubdtype(m.dtype, np.integer):
                raise TypeError(f"{where}: '{name}' must have an integer dtype, got {m.dtype}")
        labelled = pred[pred != self.ignore]
        for name, m in (("pred", labelled), ("gt", gt)):
            if m.size and (m.min() < 0 or m.max() >= self.k):
                raise ValueError(
                    f"{where}: '{name}' must hold labels in 0..{self.k - 1}"
                    + (f" or ignore {self.ignore}" if name == "pred" else "")
                    + f", got {m.min()}..{m.max()}"
                )
        keep = pred != self.ignore
        self.total += pred.size
        self.ignored += int((~keep).sum())
        idx = gt[keep].astype(np.int64) * self.k + pred[keep].astype(np.int64)
        self.matrix += np.bincount(idx, minlength=self.k * self.k).reshape(self.k, self.k)

    def summary(self) -> Dict[str, float]:
        """{"mIoU": mean IoU in percent over the labels present in the ground truth or the
        predictions, "pixel_acc": accuracy of the labelled pixels, "labelled": fraction of pixels
        not ignored} (percent)."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        valid = union > 0
        miou = float((tp[valid] / union[valid]).mean() * 100) if valid.any() else float("nan")
        labelled = self.matrix.sum()
        return {
            "mIoU": miou,
            "pixel_acc": float(tp.sum() / labelled * 100) if labelled else float("nan"),
            "labelled": float(100.0 * (self.total - self.ignored) / max(1, self.total)),
        }


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of XYXY boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return pairwise_iou(
        Boxes(torch.as_tensor(a, dtype=torch.float64).reshape(-1, 4)),
        Boxes(torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4)),
    ).numpy()


class CCGRStageDiagnostics:
    """
    Follows the ground-truth objects of training images through one CCGR round (the outputs of
    ``CCGRNet`` inference with its "ccgr" field), to tell which step loses them. Per bag, its
    object is the ground-truth instance of the bag's class whose mask holds the bag's peak (for
    seed boxes of rounds >= 2, the peak is the seed box's centre); a bag whose peak lies on no
    object of its class is "off object".

    Figures (:meth:`summary`, percentages except the per-image and per-object counts):

    - ``objects_per_image``, ``bags_per_image``, ``pseudo_per_image``;
    - ``objects_with_bag``: objects that have at least one bag; ``bags_per_found_object``: the
      bags of an object that has one (> 1: the object is split into parts);
      ``bags_off_object``;
    - ``bag_recall50``: bags on an object holding a box of IoU >= 0.5 with it;
    - ``mil_iou`` / ``refined_iou``: mean box IoU of the MIL box / the refined box with the
      bag's object (bags on an object); ``mil_hit50`` / ``refined_hit50``: IoU >= 0.5;
    - ``pseudo_mask_iou``: mean over all objects of the best mask IoU of a pseudo instance of
      its class (0 without one); ``pseudo_recall50``: objects whose best is >= 0.5.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._n = dict(images=0, objects=0, bags=0, pseudo=0, found=0, bags_on=0, off=0,
                       recall=0, mil_hit=0, ref_hit=0, pseudo_hit=0)  # fmt: skip
        self._sum = dict(mil=0.0, ref=0.0, mask=0.0)

    def process(self, dataset_dict: Dict, output: Dict) -> None:
        """
        Args:
            dataset_dict: the image's dataset dict with its ground-truth annotations.
            output: ``CCGRNet`` inference output of the image ("instances" and "ccgr", CPU).
        """
        classes, gt_boxes, gt_masks = instance_ground_truth(dataset_dict)
        h, w = gt_masks.shape[1:] if len(gt_masks) else (dataset_dict["height"],
                                                           dataset_dict["width"])
        n = self._n
        n["images"] += 1
        n["objects"] += len(classes)
        inst = output["instances"]
        n["pseudo"] += len(inst)
        ccgr = output.get("ccgr")
        if ccgr is not None and len(ccgr["classes"]):
            bag_cls = ccgr["classes"].numpy()
            peaks = ccgr["peaks"].numpy()
            n["bags"] += len(bag_cls)
            owner = np.full(len(bag_cls), -1)
            for b, (c, x, y) in enumerate(zip(bag_cls, peaks[:, 1], peaks[:, 2])):
                xi, yi = min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)
                on = np.nonzero((classes == c) & gt_masks[:, yi, xi])[0] if len(classes) else []
                if len(on):
                    owner[b] = on[0]
            on = owner >= 0
            n["off"] += int((~on).sum())
            n["bags_on"] += int(on.sum())
            n["found"] += len(set(owner[on].tolist()))
            mil = ccgr["mil_boxes"].numpy()
            ref = ccgr["refined_boxes"].numpy()
            bag_boxes = ccgr["bag_boxes"].numpy() if "bag_boxes" in ccgr else None
            for b in np.nonzero(on)[0]:
                g = gt_boxes[owner[b] : owner[b] + 1]
                iou_m, iou_r = _box_iou(mil[b : b + 1], g)[0, 0], _box_iou(ref[b : b + 1], g)[0, 0]
                self._sum["mil"] += float(iou_m)
                self._sum["ref"] += float(iou_r)
                n["mil_hit"] += int(iou_m >= 0.5)
                n["ref_hit"] += int(iou_r >= 0.5)
                if bag_boxes is not None:
                    n["recall"] += int(_box_iou(bag_boxes[b], g).max(initial=0.0) >= 0.5)
        if len(classes):
            best = np.zeros(len(classes))
            if len(inst):
                pm = inst.pred_masks.numpy().astype(bool).reshape(len(inst), -1)
                pc = inst.pred_classes.numpy()
                gm = gt_masks.reshape(len(classes), -1)
                inter = gm.astype(np.float64) @ pm.T.astype(np.float64)
                union = gm.sum(1)[:, None] + pm.sum(1)[None, :] - inter
                iou = np.where(classes[:, None] == pc[None, :], inter / np.maximum(union, 1), 0)
                best = iou.max(axis=1)
            self._sum["mask"] += float(best.sum())
            n["pseudo_hit"] += int((best >= 0.5).sum())

    def merge(self, other: "CCGRStageDiagnostics") -> None:
        """Add ``other``'s counts (another process's share of the images) to these."""
        for key, value in other._n.items():
            self._n[key] += value
        for key, value in other._sum.items():
            self._sum[key] += value

    def summary(self) -> Dict[str, float]:
        n, s = self._n, self._sum
        pct = lambda a, b: 100.0 * a / b if b else float("nan")  # noqa: E731
        out = {
            "objects_per_image": n["objects"] / max(1, n["images"]),
            "bags_per_image": n["bags"] / max(1, n["images"]),
            "pseudo_per_image": n["pseudo"] / max(1, n["images"]),
            "objects_with_bag": pct(n["found"], n["objects"]),
            "bags_per_found_object": n["bags_on"] / n["found"] if n["found"] else float("nan"),
            "bags_off_object": pct(n["off"], n["bags"]),
            "bag_recall50": pct(n["recall"], n["bags_on"]),
            "mil_iou": pct(s["mil"], n["bags_on"]),
            "mil_hit50": pct(n["mil_hit"], n["bags_on"]),
            "refined_iou": pct(s["ref"], n["bags_on"]),
            "refined_hit50": pct(n["ref_hit"], n["bags_on"]),
            "pseudo_mask_iou": pct(s["mask"], n["objects"]),
            "pseudo_recall50": pct(n["pseudo_hit"], n["objects"]),
        }
        return {k: float(v) for k, v in out.items()}
