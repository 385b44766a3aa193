"""
Quality measures of CCGR's intermediate labels against the ground truth of a dataset: proposal
recall and the mIoU of pseudo semantic labels. (The pseudo instances are scored like predictions,
by :class:`InstanceAPEvaluator`.)
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.structures import Boxes, pairwise_iou

__all__ = ["proposal_recall", "semantic_ground_truth", "SemanticConfusion"]


def proposal_recall(
    gt_boxes: Sequence[np.ndarray], boxes: Sequence[np.ndarray], top: int, iou: float
) -> Optional[float]:
    """
    Fraction of the ground-truth boxes (XYXY) covered at IoU >= ``iou`` by one of the first
    ``top`` proposals of their image (None without ground truth).
    """
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


def semantic_ground_truth(dataset_dict: Dict, num_classes: int) -> np.ndarray:
    """
    (H, W) uint8 class map of an instance-annotated image: the union of each class's instance
    masks (RLE or polygons), ``num_classes`` (background) elsewhere; later annotations win where
    masks overlap.
    """
    h, w = int(dataset_dict["height"]), int(dataset_dict["width"])
    out = np.full((h, w), num_classes, dtype=np.uint8)
    for ann in dataset_dict.get("annotations", []):
        segm = ann["segmentation"]
        if isinstance(segm, list):
            rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
        elif isinstance(segm["counts"], list):
            rle = mask_util.frPyObjects(segm, h, w)
        else:
            rle = segm
        out[mask_util.decode(rle).astype(bool)] = ann["category_id"]
    return out


class SemanticConfusion:
    """
    Accumulated confusion of label maps against ground-truth maps over K classes (object classes
    and background); predicted pixels equal to ``ignore`` are left out and counted apart.
    """

    def __init__(self, num_labels: int, ignore: int = 255):
        self.k = int(num_labels)
        self.ignore = int(ignore)
        self.matrix = np.zeros((self.k, self.k), dtype=np.int64)
        self.ignored = 0
        self.total = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """pred, gt: (H, W) integer maps of the same size."""
        if pred.shape != gt.shape:
            raise ValueError(f"label map {pred.shape} and ground truth {gt.shape} differ in size")
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
