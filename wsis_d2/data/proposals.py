"""
Object proposals without MCG: a selective-search generator on the project's compiled ops, and the
detectron2 precomputed-proposal files that CCGR's bags (and ``DATASETS.PROPOSAL_FILES_*``) read.

**Generator** (:class:`SelectiveSearchProposals`). Selective search (Uijlings et al., IJCV 2013):
Felzenszwalb–Huttenlocher over-segmentations (:func:`wsis_d2.layers.graph_segment`) at several
scales k and in several colour spaces, each grouped hierarchically under several similarity
measures (:func:`wsis_d2.layers.hierarchical_grouping`); every region of every hierarchy gives a
box. The boxes are ranked by an objectness score, the superpixel straddling of Alexe et al.
(TPAMI 2012), SS(b) = 1 − Σ_s min(|s \\ b|, |s ∩ b|) / |b| averaged over the over-segmentations
(:func:`wsis_d2.layers.box_straddling`): a box that follows region boundaries scores near 1, one
that cuts through regions lower. Selective search itself ranks by hierarchy level times a random
number and has no score; CCGR's bag ranking (its Eq. 4) needs one, which MCG provides.

**Files** (:func:`save_proposal_file`, :func:`load_proposal_file`): a pickle with ``ids``
(image ids of the dataset, in its order), ``boxes`` (list of (B_i, 4) float32 arrays, XYXY_ABS in
the original image's pixels), ``objectness_logits`` (list of (B_i,) float32, each image's boxes
sorted by it, descending, as detectron2's ``transform_proposals`` keeps the first
``proposal_topk``) and ``bbox_mode`` — the format of detectron2's ``load_proposals_into_dataset``.
The generator's objectness logit is logit(SS(b)), so the score B_S in [0, 1] is its sigmoid.

**Converters** for proposals computed elsewhere: MCG / COB per-image ``.mat`` files
(:func:`load_mcg_mat`: ``boxes`` or ``bboxes`` 1-based [y1 x1 y2 x2] inclusive, ``scores``), the
Fast R-CNN selective-search ``.mat`` (all images in one file, same box convention, no scores) and
the Fast R-CNN / wetectron pickles (``indexes`` / ``ids``, ``boxes``, ``scores`` /
``objectness_logits``; :func:`load_proposal_file` reads them directly).
"""

import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.structures import BoxMode

from ..layers import graph_segment_scales
from ..layers.selective_search import (
    COLOUR_BINS,
    box_straddling,
    hierarchical_grouping,
)

__all__ = [
    "SelectiveSearchProposals",
    "save_proposal_file",
    "load_proposal_file",
    "check_proposals",
    "load_mcg_mat",
    "load_fast_rcnn_mat",
    "score_to_logit",
    "proposals_for_dataset",
]

logger = logging.getLogger(__name__)

# similarity weights (a_colour, a_texture, a_size, a_fill) by name (Uijlings et al., Sec. 3.2)
SIMILARITIES = {
    "CTSF": (1.0, 1.0, 1.0, 1.0),
    "TSF": (0.0, 1.0, 1.0, 1.0),
    "CSF": (1.0, 0.0, 1.0, 1.0),
    "F": (0.0, 0.0, 0.0, 1.0),
    "S": (0.0, 0.0, 1.0, 0.0),
}
_LOGIT_EPS = 1e-6


def score_to_logit(score: np.ndarray) -> np.ndarray:
    """logit(s) of scores in [0, 1] (clipped to [1e-6, 1 − 1e-6]), float32."""
    s = np.clip(np.asarray(score, dtype=np.float64), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return np.log(s / (1.0 - s)).astype(np.float32)


def _colour_space(image_rgb: np.ndarray, space: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 in ``space`` ("rgb", "hsv", "lab")."""
    if space == "rgb":
        return image_rgb
    if space == "hsv":
        return cv2.cvtColor(image_rgb, cv2.COLOR_RGB2HSV_FULL)
    if space == "lab":
        return cv2.cvtColor(image_rgb, cv2.COLOR_RGB2LAB)
    raise ValueError(f"colour space must be 'rgb', 'hsv' or 'lab', got {space!r}")


def _texture_bins(image: np.ndarray) -> np.ndarray:
    """
    (H, W, 3) uint8 -> (3, H, W) uint8 texture bins: per channel, Gaussian derivatives (σ = 1)
    give the gradient orientation in 8 sectors and its magnitude, relative to the channel's
    largest, in 10 bins; bin = orientation · 10 + magnitude (the 8 x 10 histogram of SS).
    """
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.0)
    gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.sqrt(gx * gx + gy * gy)
    angle = np.arctan2(gy, gx)  # (-π, π]
    sector = np.floor((angle + math.pi) * (8 / (2 * math.pi))).astype(np.int64) % 8
    top = magnitude.reshape(-1, 3).max(axis=0)
    level = np.minimum((magnitude / np.maximum(top, 1e-6) * 10).astype(np.int64), 9)
    return np.ascontiguousarray((sector * 10 + level).transpose(2, 0, 1).astype(np.uint8))


@dataclass
class SelectiveSearchProposals:
    """
    Selective-search proposals ranked by superpixel straddling (see the module docstring).

    Attributes:
        min_size: the image is resized so that its shorter side is this many pixels before
            segmenting (0: native size); boxes are returned in the original image's pixels.
        scales: the FH scales k of the over-segmentations (regions smaller than k pixels are
            merged, as in selective search).
        colour_spaces: of the over-segmentations and the colour histograms ("hsv", "lab", "rgb").
        similarities: names in ``SIMILARITIES`` of the grouping strategies run on every
            over-segmentation.
        sigma: Gaussian blur before segmenting (pixels).
        max_proposals: the best boxes kept per image (0: all).
        min_box_size: boxes narrower or lower than this (pixels of the segmented image) dropped.
    """

    min_size: int = 256
    scales: Sequence[float] = (50.0, 100.0, 200.0)
    colour_spaces: Sequence[str] = ("hsv", "lab")
    similarities: Sequence[str] = ("CTSF", "TSF")
    sigma: float = 0.8
    max_proposals: int = 2000
    min_box_size: int = 4
    _weights: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        unknown = [s for s in self.similarities if s not in SIMILARITIES]
        if not self.similarities or unknown:
            raise ValueError(f"similarities must name {sorted(SIMILARITIES)}, got {unknown}")
        for space in self.colour_spaces:
            _colour_space(np.zeros((1, 1, 3), np.uint8), space)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {list(self.scales)}")
        self._weights = torch.tensor(
            [SIMILARITIES[s] for s in self.similarities], dtype=torch.float64
        )

    def __call__(self, image_rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """
        Args:
            image_rgb: (H, W, 3) uint8 RGB image.

        Returns:
            boxes (B, 4) float32 XYXY_ABS in the image's pixels, sorted by score, descending;
            scores (B,) float32 superpixel straddling in [0, 1].
        """
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}"
            )
        h0, w0 = image_rgb.shape[:2]
        factor = 1.0
        image = image_rgb
        if self.min_size > 0:
            factor = self.min_size / min(h0, w0)
            h, w = max(1, round(h0 * factor)), max(1, round(w0 * factor))
            if (h, w) != (h0, w0):
                interp = cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA
                image = cv2.resize(image_rgb, (w, h), interpolation=interp)
        h, w = image.shape[:2]
        labels, colour, texture = [], [], []
        for space in self.colour_spaces:
            converted = np.ascontiguousarray(_colour_space(image, space))
            chw = torch.from_numpy(converted).permute(2, 0, 1).contiguous()
            cbin = (chw.to(torch.int64) * COLOUR_BINS // 256).to(torch.uint8)
            tbin = torch.from_numpy(_texture_bins(converted))
            # regions smaller than k pixels are merged, as in selective search
            for lab in graph_segment_scales(
                chw, [float(k) for k in self.scales], float(self.sigma), [int(k) for k in self.scales]
            ):
                labels.append(lab)
                colour.append(cbin)
                texture.append(tbin)
        n_seg, n_sim = len(labels), len(self.similarities)
        boxes, _ = hierarchical_grouping(
            torch.stack(labels).repeat_interleave(n_sim, 0),
            torch.stack(colour).repeat_interleave(n_sim, 0),
            torch.stack(texture).repeat_interleave(n_sim, 0),
            self._weights.repeat(n_seg, 1),
        )
        boxes = torch.unique(boxes, dim=0)
        wh = boxes[:, 2:] - boxes[:, :2]
        boxes = boxes[(wh >= self.min_box_size).all(dim=1)]
        scores = torch.stack([box_straddling(lab, boxes) for lab in labels]).mean(dim=0)
        order = torch.argsort(scores, descending=True, stable=True)
        if self.max_proposals > 0:
            order = order[: self.max_proposals]
        out = boxes[order].to(torch.float32).numpy()
        out[:, [0, 2]] *= w0 / w
        out[:, [1, 3]] *= h0 / h
        return out, scores[order].numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------------
# files


def save_proposal_file(
    path: str,
    ids: Sequence,
    boxes: Sequence[np.ndarray],
    objectness_logits: Sequence[np.ndarray],
) -> None:
    """
    Write detectron2's precomputed-proposal pickle (see the module docstring); each image's boxes
    are sorted by objectness, descending. Written to a temporary file and renamed, so an
    interrupted run leaves no partial file.
    """
    if not (len(ids) == len(boxes) == len(objectness_logits)):
        raise ValueError(
            f"{path}: {len(ids)} ids, {len(boxes)} box arrays, {len(objectness_logits)} logit "
            "arrays"
        )
    out_boxes, out_logits = [], []
    for image_id, b, s in zip(ids, boxes, objectness_logits):
        b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
        s = np.asarray(s, dtype=np.float32).reshape(-1)
        if b.shape[0] != s.shape[0]:
            raise ValueError(f"{path}: image {image_id!r} has {b.shape[0]} boxes, {len(s)} scores")
        order = np.argsort(-s, kind="stable")
        out_boxes.append(b[order])
        out_logits.append(s[order])
    data = {
        "ids": list(ids),
        "boxes": out_boxes,
        "objectness_logits": out_logits,
        "bbox_mode": BoxMode.XYXY_ABS,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    with open(part, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(part, path)


def load_proposal_file(path: str) -> Dict[str, list]:
    """
    Read a proposal pickle: this project's files, detectron2's, and the Fast R-CNN / wetectron
    ones (keys ``indexes`` -> ``ids``, ``scores`` -> ``objectness_logits`` renamed as detectron2
    does; a file without scores gets 0 logits; ``bbox_mode`` XYXY_ABS unless the file says).

    Returns:
        {"ids": list, "boxes": [(B_i, 4) float32 XYXY_ABS], "objectness_logits": [(B_i,)]}.

    Raises:
        ValueError naming the file if a key is missing or the lists do not line up.
    """
    if not os.path.isfile(path):
        raise ValueError(f"proposal file {path} does not exist")
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of proposals, got {type(data).__name__}")
    data = dict(data)
    for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):
        if old in data and new not in data:
            data[new] = data.pop(old)
    for key in ("ids", "boxes"):
        if key not in data:
            raise ValueError(f"{path}: no '{key}' in the proposal file (keys: {sorted(data)})")
    ids, boxes = list(data["ids"]), list(data["boxes"])
    logits = data.get("objectness_logits")
    logits = [np.zeros(len(b), np.float32) for b in boxes] if logits is None else list(logits)
    if not (len(ids) == len(boxes) == len(logits)):
        raise ValueError(
            f"{path}: {len(ids)} ids, {len(boxes)} box arrays and {len(logits)} objectness arrays"
        )
    mode = BoxMode(data.get("bbox_mode", BoxMode.XYXY_ABS))
    out_boxes, out_logits = [], []
    for image_id, b, s in zip(ids, boxes, logits):
        b = np.asarray(b, dtype=np.float32)
        s = np.asarray(s, dtype=np.float32).reshape(-1)
        if b.size == 0:
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"{path}: boxes of image {image_id!r} have shape {b.shape}, not (B, 4)")
        if s.shape[0] != b.shape[0]:
            raise ValueError(
                f"{path}: image {image_id!r} has {b.shape[0]} boxes but {s.shape[0]} objectness "
                "values"
            )
        if mode != BoxMode.XYXY_ABS:
            b = BoxMode.convert(b, mode, BoxMode.XYXY_ABS).astype(np.float32)
        out_boxes.append(b)
        out_logits.append(s)
    return {"ids": ids, "boxes": out_boxes, "objectness_logits": out_logits}


def check_proposals(path: str, proposals: Dict[str, list], dataset_dicts: List[dict]) -> None:
    """
    Check proposals against a dataset: every image has an entry, and every box lies inside its
    image (1 pixel of tolerance) with x1 <= x2, y1 <= y2, all finite.

    Raises:
        ValueError naming the file and the image id.
    """
    index = {image_id: i for i, image_id in enumerate(proposals["ids"])}
    for d in dataset_dicts:
        image_id = d["image_id"]
        if image_id not in index:
            raise ValueError(f"{path}: no proposals for image id {image_id!r} ({d['file_name']})")
        b = proposals["boxes"][index[image_id]]
        if b.size == 0:
            continue
        h, w = d["height"], d["width"]
        bad = (
            ~np.isfinite(b).all(axis=1)
            | (b[:, 0] < -1)
            | (b[:, 1] < -1)
            | (b[:, 2] > w + 1)
            | (b[:, 3] > h + 1)
            | (b[:, 2] < b[:, 0])
            | (b[:, 3] < b[:, 1])
        )
        if bad.any():
            k = int(np.nonzero(bad)[0][0])
            raise ValueError(
                f"{path}: image id {image_id!r} ({w}x{h}) has {int(bad.sum())} box(es) outside the "
                f"image or malformed, e.g. box {k}: {b[k].tolist()}"
            )


def _mat_boxes_yxyx1(boxes: np.ndarray, where: str) -> np.ndarray:
    """1-based inclusive [y1 x1 y2 x2] (MCG, Fast R-CNN selective search) -> XYXY_ABS."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4), np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes have shape {boxes.shape}, not (B, 4)")
    y1, x1, y2, x2 = boxes.T
    return np.stack([x1 - 1, y1 - 1, x2, y2], axis=1).astype(np.float32)


def load_mcg_mat(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """
    One MCG / COB per-image ``.mat``: ``boxes`` (or ``bboxes``) 1-based [y1 x1 y2 x2] inclusive
    and ``scores``. Returns (boxes (B, 4) float32 XYXY_ABS, scores (B,) float32), sorted by score.
    """
    import scipy.io

    data = scipy.io.loadmat(path)
    key = "boxes" if "boxes" in data else "bboxes" if "bboxes" in data else None
    if key is None or "scores" not in data:
        found = sorted(k for k in data if not k.startswith("__"))
        raise ValueError(f"{path}: an MCG .mat needs 'boxes' (or 'bboxes') and 'scores', got {found}")
    boxes = _mat_boxes_yxyx1(data[key], path)
    scores = np.asarray(data["scores"], dtype=np.float32).reshape(-1)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{path}: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    order = np.argsort(-scores, kind="stable")
    return boxes[order], scores[order]


def load_fast_rcnn_mat(path: str) -> Tuple[List[str], List[np.ndarray]]:
    """
    Fast R-CNN's selective-search ``.mat`` (e.g. ``voc_2007_trainval.mat``): ``images`` (names)
    and ``boxes`` (one 1-based [y1 x1 y2 x2] array per image; no scores). Returns (image names,
    [boxes (B_i, 4) float32 XYXY_ABS]).
    """
    import scipy.io

    data = scipy.io.loadmat(path)
    if "boxes" not in data or "images" not in data:
        found = sorted(k for k in data if not k.startswith("__"))
        raise ValueError(f"{path}: a Fast R-CNN .mat needs 'images' and 'boxes', got {found}")
    names = [str(np.asarray(n).reshape(-1)[0]) for n in np.asarray(data["images"]).reshape(-1)]
    arrays = np.asarray(data["boxes"], dtype=object).reshape(-1)
    if len(names) != len(arrays):
        raise ValueError(f"{path}: {len(names)} images but {len(arrays)} box arrays")
    return names, [_mat_boxes_yxyx1(b, f"{path}, image {n}") for n, b in zip(names, arrays)]


def proposals_for_dataset(
    proposals: Dict[str, list], dataset_dicts: List[dict], path: str = "proposals"
) -> Dict[object, Tuple[np.ndarray, np.ndarray]]:
    """{image_id: (boxes, objectness_logits)} for the images of a dataset, checked first."""
    check_proposals(path, proposals, dataset_dicts)
    index = {image_id: i for i, image_id in enumerate(proposals["ids"])}
    return {
        d["image_id"]: (
            proposals["boxes"][index[d["image_id"]]],
            proposals["objectness_logits"][index[d["image_id"]]],
        )
        for d in dataset_dicts
    }
