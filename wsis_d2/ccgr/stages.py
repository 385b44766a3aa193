"""
The dataset-level steps of a CCGR round, each a function of a trained model and a data loader:

- :func:`compute_cues`: the image-level classifier (``ImageLevelCounter`` with
  ``MODEL.LC.IMAGE_LABELS_ONLY``) -> peaks and pseudo semantic labels per image
  (:func:`wsis_d2.ccgr.labels.class_map_cues`);
- :func:`make_proposal_file`: a proposal generator over a dataset -> detectron2's proposal file;
- :func:`run_ccgr_inference`: ``CCGRNet`` over the training images -> pseudo instances (and what
  the ablations need).
"""

import logging
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..data.image_io import read_image_reduced
from ..data.proposals import save_proposal_file, score_to_logit
from .labels import class_map_cues
from ..utils.progress import progress

__all__ = [
    "compute_cues", "make_proposal_file", "proposals_of", "run_ccgr_inference", "cue_parameters"
]

logger = logging.getLogger(__name__)


def cue_parameters(cfg) -> Dict:
    """Keyword arguments of :func:`class_map_cues` from ``MODEL.CCGR`` and ``MODEL.SEGMENTS``."""
    c = cfg.MODEL.CCGR
    return {
        "peak_radius": c.PEAK_RADIUS,
        "peak_threshold": c.PEAK_RELATIVE_THRESHOLD,
        "peak_prominence": c.PEAK_PROMINENCE,
        "mode": c.CUE_MODE,
        "fg_threshold": c.FG_THRESHOLD,
        "bg_threshold": c.BG_THRESHOLD,
        "segment_scale": cfg.MODEL.SEGMENTS.SCALE,
        "segment_sigma": cfg.MODEL.SEGMENTS.SIGMA,
        "segment_min_size": cfg.MODEL.SEGMENTS.MIN_SIZE,
    }


@torch.no_grad()
def compute_cues(model, data_loader: Iterable[List[Dict]], params: Dict) -> Dict:
    """
    Peaks and pseudo semantic labels of every image of ``data_loader`` (test-time
    ``LCDatasetMapper`` inputs: "image", "labels", "height", "width", "image_id").

    Args:
        model: a trained ``ImageLevelCounter`` (its class maps M).
        params: keyword arguments of :func:`class_map_cues` (e.g. :func:`cue_parameters`).

    Returns:
        {image_id: (peaks (P, 4), sem_seg (height, width) uint8)}.
    """
    was_training = model.training
    model.eval()
    cues = {}
    try:
        for batch in progress(data_loader, "CCGR cues", unit="batch"):
            images = model.preprocess_image(batch)
            class_maps, _ = model.predict_maps(images.tensor)
            sizes = model.map_sizes(images.image_sizes, images.tensor.shape[-2:], class_maps.shape[-2:])
            for i, inp in enumerate(batch):
                if "labels" not in inp:
                    raise ValueError(f"compute_cues: input {inp.get('file_name', i)} has no 'labels'")
                h, w = images.image_sizes[i]
                mh, mw = sizes[i]
                maps = class_maps[i : i + 1, :, :mh, :mw]
                # the map cells cover ceil(h / stride) x ceil(w / stride) input pixels
                sy = images.tensor.shape[-2] / class_maps.shape[-2]
                sx = images.tensor.shape[-1] / class_maps.shape[-1]
                up = F.interpolate(
                    maps, size=(int(round(mh * sy)), int(round(mw * sx))), mode="bilinear",
                    align_corners=False,
                )[0, :, :h, :w]
                cues[inp["image_id"]] = class_map_cues(
                    up.cpu(),
                    torch.as_tensor(inp["labels"]).cpu(),
                    inp["image"].cpu(),
                    (int(inp.get("height", h)), int(inp.get("width", w))),
                    **params,
                )
    finally:
        model.train(was_training)
    return cues


def _read_rgb(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """(H, W, 3) RGB uint8 by OpenCV (EXIF orientation applied), the proposal stage's reader."""
    image = cv2.imread(file_name, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {file_name}")
    return np.ascontiguousarray(image[:, :, ::-1])


class _ProposalJob(torch.utils.data.Dataset):
    """Image i -> (index, boxes, scores, generator seconds); run in data-loader workers."""

    def __init__(
        self,
        dataset_dicts: List[Dict],
        generator: Callable[[np.ndarray], tuple],
        decode_short_side: int = 0,
    ):
        self.dicts = dataset_dicts
        self.generator = generator
        self.decode_short_side = int(decode_short_side)

    def __len__(self):
        return len(self.dicts)

    def __getitem__(self, i):
        d = self.dicts[i]
        rgb, scale = read_image_reduced(d["file_name"], "RGB", self.decode_short_side, _read_rgb)
        start = time.perf_counter()
        boxes, scores = self.generator(rgb)
        if scale is not None:  # decoded reduced: boxes back to the full image's pixels
            boxes = scale.inverse().apply_box(np.asarray(boxes, dtype=np.float64))
            boxes = boxes.astype(np.float32)
        return i, boxes, scores, time.perf_counter() - start


def proposals_of(
    dataset_dicts: List[Dict],
    generator: Callable[[np.ndarray], tuple],
    workers: int = 0,
    log_every: int = 200,
    decode_short_side: int = 0,
) -> Tuple[List[np.ndarray], List[np.ndarray], float]:
    """
    Run ``generator`` (RGB uint8 image -> (boxes XYXY, scores in [0, 1])) over the images.

    Args:
        workers: processes that run the generator in parallel, one image each at a time
            (a torch DataLoader's workers, one thread each); 0: in this process.
        decode_short_side: large JPEGs are decoded reduced for a generator that works at this
            shorter side (:func:`wsis_d2.data.image_io.read_image_reduced`; e.g. the
            ``min_size`` of :class:`SelectiveSearchProposals`), the boxes mapped back to the full
            image; 0: full decode.

    Returns:
        boxes: per image (R_i, 4) XYXY; logits: per image (R_i,) logit(score); seconds: wall time
        (image reading included).
    """
    n = len(dataset_dicts)
    boxes, logits = [None] * n, [None] * n
    loader = torch.utils.data.DataLoader(
        _ProposalJob(dataset_dicts, generator, decode_short_side),
        batch_size=None,
        num_workers=int(workers),
        collate_fn=lambda x: x,
    )
    start = time.perf_counter()
    for done, (i, b, s, _) in enumerate(progress(loader, "CCGR proposals", n, unit="image"), 1):
        boxes[i] = b
        logits[i] = score_to_logit(s)
        if log_every and done % log_every == 0:
            logger.info(f"proposals: {done} / {n} images, {time.perf_counter() - start:.1f} s")
    return boxes, logits, time.perf_counter() - start


def make_proposal_file(
    path: str,
    dataset_dicts: List[Dict],
    generator: Callable[[np.ndarray], tuple],
    workers: int = 0,
    log_every: int = 200,
    decode_short_side: int = 0,
) -> Dict[str, float]:
    """
    Run ``generator`` (RGB uint8 image -> (boxes XYXY, scores in [0, 1])) over the images and write
    detectron2's proposal file ``path`` (objectness logits = logit(score)); :func:`proposals_of`
    (``decode_short_side`` as there).

    Returns:
        {"images", "seconds" (wall time of the whole run, image reading included),
        "images_per_s", "boxes_per_image"}.
    """
    n = len(dataset_dicts)
    boxes, logits, seconds = proposals_of(
        dataset_dicts, generator, workers, log_every, decode_short_side
    )
    save_proposal_file(path, [d["image_id"] for d in dataset_dicts], boxes, logits)
    return {
        "images": n,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
        "boxes_per_image": float(np.mean([len(b) for b in boxes])) if n else 0.0,
    }


def run_ccgr_inference(model, data_loader: Iterable[List[Dict]]) -> Iterator[Tuple[Dict, Dict]]:
    """
    ``CCGRNet`` inference over ``data_loader``: yields (input, output) per image, the output moved
    to the CPU (see ``CCGRNet`` for its fields), one batch at a time so that the score maps of a
    whole dataset are never held at once.
    """
    was_training = model.training
    model.eval()
    try:
        for batch in progress(data_loader, "CCGR inference", unit="batch"):
            with torch.no_grad():
                results = model(batch)
            for inp, res in zip(batch, results):
                yield inp, _to_cpu(res)
    finally:
        model.train(was_training)


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if hasattr(x, "to"):
        return x.to("cpu")
    return x
