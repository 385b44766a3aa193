"""
Dataset mapper for point-annotated density counting: reads the image, applies the augmentations to
image, points and ROI together, and drops points that leave the image.
"""

import copy
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Union

import cv2
import numpy as np
import torch
from PIL import UnidentifiedImageError

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..data.datasets.point_datasets import load_roi_mask
from ..data.mapper_registry import DATASET_MAPPER_REGISTRY

__all__ = [
    "DensityDatasetMapper",
    "Rot90Transform",
    "RandomRot90",
    "RandomEdgeCrop",
    "RandomChannelGain",
    "ElasticTransform",
    "RandomElasticDeform",
    "RandomGaussianBlur",
    "artificial_edges",
    "crop_edge_mask",
    "build_density_augmentation",
    "ImageCache",
]

logger = logging.getLogger(__name__)


class Rot90Transform(T.Transform):
    """Rotation by ``k`` quarter turns counter-clockwise (``np.rot90``) of an (h, w) image."""

    def __init__(self, k: int, height: int, width: int):
        super().__init__()
        self._set_attributes({"k": int(k) % 4, "height": height, "width": width})

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(P, 2) continuous x, y: one quarter turn maps (x, y) of a width-w image to (y, w - x)."""
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        h, w = self.height, self.width
        for _ in range(self.k):
            x, y = y, w - x
            h, w = w, h
        return np.stack([x, y], axis=1).astype(coords.dtype)

    def inverse(self) -> T.Transform:
        if self.k % 2:
            return Rot90Transform(4 - self.k, self.width, self.height)
        return Rot90Transform(4 - self.k, self.height, self.width)


class RandomRot90(T.Augmentation):
    """A random multiple of 90° (0, 90, 180, 270, uniformly)."""

    def get_transform(self, image):
        k = int(np.random.randint(4))
        if k == 0:
            return T.NoOpTransform()
        return Rot90Transform(k, image.shape[0], image.shape[1])


class RandomEdgeCrop(T.Augmentation):
    """
    detectron2's absolute RandomCrop whose offset along each axis is, with probability
    ``edge_prob``, snapped to one of the two image edges (either, uniformly): counting networks
    see the real image borders (cells cut by the border and labelled) as often as they need to.
    """

    def __init__(self, crop_size, edge_prob: float = 0.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        ch, cw = min(int(self.crop_size[0]), h), min(int(self.crop_size[1]), w)
        offsets = []
        for size, crop in ((h, ch), (w, cw)):
            if np.random.rand() < self.edge_prob:
                offsets.append(0 if np.random.rand() < 0.5 else size - crop)
            else:
                offsets.append(int(np.random.randint(size - crop + 1)))
        return T.CropTransform(offsets[1], offsets[0], cw, ch)


class ElasticTransform(T.Transform):
    """
    A smooth non-rigid warp: output pixel p shows the input at p + d(p), for a displacement field
    d = (dx, dy) given at the pixel centres. Points move with the image (the inverse map, solved
    by fixed-point iteration), so that every cell keeps its point and the count is unchanged.
    """

    def __init__(self, dx: np.ndarray, dy: np.ndarray):
        """
        Args:
            dx, dy: float32 (H, W) displacements in pixels, smooth (|∇d| < 1 for an invertible
                warp), zero at the image borders if nothing may enter from outside.
        """
        super().__init__()
        if dx.shape != dy.shape or dx.ndim != 2:
            raise ValueError(
                f"displacement fields must be two (H, W) arrays, got {dx.shape}, {dy.shape}"
            )
        self._set_attributes({"dx": dx.astype(np.float32), "dy": dy.astype(np.float32)})
        # sampling positions p + d(p), shared by the image and its segmentation (ROI)
        gy, gx = np.mgrid[0 : dx.shape[0], 0 : dx.shape[1]].astype(np.float32)
        self._map_x, self._map_y = gx + self.dx, gy + self.dy

    def _remap(self, img: np.ndarray, interp) -> np.ndarray:
        if img.shape[:2] != self.dx.shape:
            raise ValueError(f"image {img.shape[:2]} does not match the field {self.dx.shape}")
        out = cv2.remap(img, self._map_x, self._map_y, interp, borderMode=cv2.BORDER_REFLECT_101)
        return out.reshape(img.shape)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self._remap(img, cv2.INTER_LINEAR)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self._remap(segmentation, cv2.INTER_NEAREST)

    def _field_at(self, coords: np.ndarray) -> np.ndarray:
        """(P, 2) displacement at continuous positions (bilinear between pixel centres)."""
        h, w = self.dx.shape
        x = np.clip(coords[:, 0] - 0.5, 0, w - 1)
        y = np.clip(coords[:, 1] - 0.5, 0, h - 1)
        x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 2, 0))
        y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 2, 0))
        x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
        fx, fy = x - x0, y - y0
        out = []
        for f in (self.dx, self.dy):
            top = f[y0, x0] * (1 - fx) + f[y0, x1] * fx
            bottom = f[y1, x0] * (1 - fx) + f[y1, x1] * fx
            out.append(top * (1 - fy) + bottom * fy)
        return np.stack(out, axis=1)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(P, 2) x, y of the input -> the output position p with p + d(p) = input position."""
        if len(coords) == 0:
            return coords
        src = coords.astype(np.float64)
        p = src.copy()
        for _ in range(50):  # a contraction for |∇d| < 1; ~0.3 px closer per step for |∇d| ~ 0.3
            nxt = src - self._field_at(p)
            done = np.abs(nxt - p).max() < 1e-5
            p = nxt
            if done:
                break
        return p.astype(coords.dtype)


class RandomElasticDeform(T.Augmentation):
    """
    Random elastic deformation (Ronneberger et al. 2015, the U-Net paper's main augmentation for
    few training images): displacements drawn per control point on a grid of ``spacing`` pixels
    with standard deviation ``alpha`` pixels, interpolated bicubically to every pixel and tapered
    to zero over ``border`` pixels along the image borders (no content enters from outside).
    Touching cells move against each other, so the network sees new overlaps of the same cells.
    """

    def __init__(self, alpha: float, spacing: float, prob: float = 1.0, border: int = 8):
        super().__init__()
        if not (alpha >= 0 and spacing > 0 and 0.0 <= prob <= 1.0 and border >= 0):
            raise ValueError(
                "INPUT.DENSITY.ELASTIC needs ALPHA >= 0, SPACING > 0 and PROB in [0, 1], got "
                f"ALPHA {alpha}, SPACING {spacing}, PROB {prob}"
            )
        self._init(locals())

    def get_transform(self, image):
        if self.alpha == 0 or np.random.rand() >= self.prob:
            return T.NoOpTransform()
        h, w = image.shape[:2]
        gh = int(np.ceil(h / self.spacing)) + 1
        gw = int(np.ceil(w / self.spacing)) + 1
        fields = []
        for _ in range(2):
            grid = np.random.normal(0.0, self.alpha, size=(gh, gw)).astype(np.float32)
            fields.append(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC))
        if self.border > 0:

            def ramp(n):  # 0 -> 1 over `border` pixels from both ends
                r = np.clip((np.arange(n) + 0.5) / self.border, 0.0, 1.0)
                return np.minimum(r, r[::-1])

            taper = (ramp(h)[:, None] * ramp(w)[None, :]).astype(np.float32)
            fields = [f * taper for f in fields]
        return ElasticTransform(*fields)


def _as_uint8_like(result: np.ndarray, image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return np.clip(np.round(result), 0, 255).astype(np.uint8)
    return result.astype(image.dtype)


class RandomChannelGain(T.Augmentation):
    """
    An independent random gain per colour channel, uniform in [lo, hi] (clipped to 0..255 for
    uint8): the stains of a fluorescence image (nucleus, cytoplasm) vary in strength
    independently between preparations. Points and density targets are unchanged.
    """

    def __init__(self, lo: float, hi: float):
        super().__init__()
        if not 0.0 < lo <= hi:
            raise ValueError(f"channel gain range must satisfy 0 < lo <= hi, got {(lo, hi)}")
        self._init(locals())

    def get_transform(self, image):
        channels = image.shape[2] if image.ndim == 3 else 1
        gains = np.random.uniform(self.lo, self.hi, size=channels).astype(np.float32)
        return T.ColorTransform(
            lambda img: _as_uint8_like(img.astype(np.float32) * gains.reshape(1, 1, -1), img)
        )


class RandomGaussianBlur(T.Augmentation):
    """
    With probability ``prob``, a Gaussian blur with σ uniform in [lo, hi] pixels (out-of-focus
    and thicker preparations); points and density targets are unchanged.
    """

    def __init__(self, lo: float, hi: float, prob: float = 0.5):
        super().__init__()
        if not (0.0 < lo <= hi and 0.0 <= prob <= 1.0):
            raise ValueError(f"blur needs 0 < lo <= hi and prob in [0, 1], got {(lo, hi, prob)}")
        self._init(locals())

    def get_transform(self, image):
        if np.random.rand() >= self.prob:
            return T.NoOpTransform()
        sigma = float(np.random.uniform(self.lo, self.hi))

        def blur(img):
            out = cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigma)
            return _as_uint8_like(out.reshape(img.shape), img)

        return T.ColorTransform(blur)


def artificial_edges(transforms, height: int, width: int) -> Dict[str, bool]:
    """
    Which borders of the augmented image are crop cuts through the original image (``True``)
    rather than the original image's own borders, following crops, flips, quarter turns and
    resizes of ``transforms`` (a detectron2 TransformList) of an image of ``height`` x ``width``.
    """
    e = {"top": False, "bottom": False, "left": False, "right": False}
    h, w = height, width
    for t in transforms.transforms:
        if isinstance(t, T.CropTransform):
            e["left"] = e["left"] or t.x0 > 0
            e["top"] = e["top"] or t.y0 > 0
            e["right"] = e["right"] or t.x0 + t.w < w
            e["bottom"] = e["bottom"] or t.y0 + t.h < h
            h, w = t.h, t.w
        elif isinstance(t, T.HFlipTransform):
            e["left"], e["right"] = e["right"], e["left"]
        elif isinstance(t, T.VFlipTransform):
            e["top"], e["bottom"] = e["bottom"], e["top"]
        elif isinstance(t, Rot90Transform):
            for _ in range(t.k):  # counter-clockwise: (x, y) -> (y, w - x)
                e = {"top": e["right"], "left": e["top"], "bottom": e["left"], "right": e["bottom"]}
                h, w = w, h
        elif isinstance(t, T.ResizeTransform):
            h, w = t.new_h, t.new_w
    return e


def crop_edge_mask(edges: Dict[str, bool], height: int, width: int, margin: int) -> np.ndarray:
    """(height, width) bool: False within ``margin`` pixels of the artificial ``edges``."""
    mask = np.ones((height, width), dtype=bool)
    if margin > 0:
        if edges["top"]:
            mask[:margin] = False
        if edges["bottom"]:
            mask[height - margin :] = False
        if edges["left"]:
            mask[:, :margin] = False
        if edges["right"]:
            mask[:, width - margin :] = False
    return mask


def _gain_range(values, field: str):
    """(min, max) of a random gain from ``INPUT.DENSITY.<field>``, checked: 0 < min <= max."""
    lo, hi = (float(v) for v in values)
    if not 0.0 < lo <= hi:
        raise ValueError(
            f"INPUT.DENSITY.{field} must be (min, max) with 0 < min <= max, got {(lo, hi)}"
        )
    return lo, hi


def build_density_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """
    Training: optional ResizeShortestEdge (``INPUT.MIN_SIZE_TRAIN`` > 0), optional RandomCrop
    (``INPUT.CROP``; :class:`RandomEdgeCrop` with ``INPUT.DENSITY.CROP_EDGE_PROB`` > 0), random
    flips (``INPUT.DENSITY.FLIPS``), optional random quarter turns (``INPUT.DENSITY.ROTATE_90``), an
    optional elastic deformation (``INPUT.DENSITY.ELASTIC``, :class:`RandomElasticDeform`),
    an optional random intensity gain (``INPUT.DENSITY.BRIGHTNESS``, one factor per image: the
    model has to count cells, not integrate brightness, since exposure and staining vary between
    images), optional random gains per colour channel (``INPUT.DENSITY.CHANNEL_GAIN``) and an
    optional random Gaussian blur (``INPUT.DENSITY.BLUR_PROB``, ``BLUR_SIGMA``). Test: optional
    ResizeShortestEdge (``INPUT.MIN_SIZE_TEST`` > 0). A minimum size of 0 keeps the original size
    (density targets are built after resizing, so counts are unchanged).
    """
    augs: List[T.Augmentation] = []
    if is_train:
        min_size = tuple(cfg.INPUT.MIN_SIZE_TRAIN)
        if min_size and min(min_size) > 0:
            augs.append(
                T.ResizeShortestEdge(
                    min_size, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
                )
            )
        if cfg.INPUT.CROP.ENABLED:
            edge_prob = float(cfg.INPUT.DENSITY.CROP_EDGE_PROB)
            if not 0.0 <= edge_prob <= 1.0:
                raise ValueError(f"INPUT.DENSITY.CROP_EDGE_PROB must be in [0, 1], got {edge_prob}")
            if edge_prob > 0:
                if cfg.INPUT.CROP.TYPE != "absolute":
                    raise ValueError("INPUT.DENSITY.CROP_EDGE_PROB needs INPUT.CROP.TYPE absolute")
                augs.append(RandomEdgeCrop(cfg.INPUT.CROP.SIZE, edge_prob))
            else:
                augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        for flip in cfg.INPUT.DENSITY.FLIPS:
            if flip not in ("horizontal", "vertical"):
                raise ValueError(f"INPUT.DENSITY.FLIPS: unknown flip {flip!r}")
            augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
        if cfg.INPUT.DENSITY.ROTATE_90:
            augs.append(RandomRot90())
        elastic = cfg.INPUT.DENSITY.ELASTIC
        if elastic.PROB > 0:
            augs.append(
                RandomElasticDeform(
                    float(elastic.ALPHA), float(elastic.SPACING), float(elastic.PROB)
                )
            )
        lo, hi = _gain_range(cfg.INPUT.DENSITY.BRIGHTNESS, "BRIGHTNESS")
        if (lo, hi) != (1.0, 1.0):
            augs.append(T.RandomBrightness(lo, hi))
        lo, hi = _gain_range(cfg.INPUT.DENSITY.CHANNEL_GAIN, "CHANNEL_GAIN")
        if (lo, hi) != (1.0, 1.0):
            augs.append(RandomChannelGain(lo, hi))
        blur_prob = float(cfg.INPUT.DENSITY.BLUR_PROB)
        if blur_prob > 0:
            lo, hi = (float(v) for v in cfg.INPUT.DENSITY.BLUR_SIGMA)
            if not (0.0 < lo <= hi and blur_prob <= 1.0):
                raise ValueError(
                    "INPUT.DENSITY.BLUR_SIGMA must be (min, max) with 0 < min <= max and "
                    f"BLUR_PROB in [0, 1], got {(lo, hi)}, {blur_prob}"
                )
            augs.append(RandomGaussianBlur(lo, hi, blur_prob))
    elif cfg.INPUT.MIN_SIZE_TEST > 0:
        augs.append(
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
        )
    return augs


class ImageCache:
    """
    Least-recently-used cache of decoded images, bounded in bytes. Point-counting training sets are
    small (32 cell images, a few thousand low-resolution video frames) and are read once per crop:
    decoding the PNG took ~15 % of a U-Net training step on a 2-core CPU. Entries are keyed by file
    name, size and modification time (a rewritten file is read again) and stored read-only, so an
    augmentation that wrote into its input would raise instead of corrupting the cache. Each
    data-loader worker process holds its own cache.
    """

    def __init__(self, max_bytes: int):
        """
        Args:
            max_bytes: total size of the cached arrays; images larger than this are not cached.
        """
        if max_bytes < 0:
            raise ValueError(f"ImageCache needs max_bytes >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: "OrderedDict[tuple, np.ndarray]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _key(file_name: str, image_format: str) -> Optional[tuple]:
        try:
            st = os.stat(file_name)
        except OSError:
            return None  # the reader reports the error
        return (file_name, image_format, st.st_size, st.st_mtime_ns)

    def read(self, file_name: str, image_format: str) -> np.ndarray:
        """
        ``detection_utils.read_image(file_name, image_format)``, decoded once while it fits.

        Returns:
            (H, W, C) uint8 array, read-only when it comes from (or went into) the cache.
        """
        key = self._key(file_name, image_format) if self.max_bytes > 0 else None
        if key is not None and key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        image = utils.read_image(file_name, format=image_format)
        self.misses += 1
        if key is None or image.nbytes > self.max_bytes:
            return image
        image = np.ascontiguousarray(image)
        image.flags.writeable = False
        self._items[key] = image
        self.bytes += image.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes
        return image


@DATASET_MAPPER_REGISTRY.register()
class DensityDatasetMapper:
    """
    Map a point dataset dict (see ``wsis_d2.data.datasets.point_datasets``) to a model input::

        {..., "image": uint8 Tensor (C, H, W) in INPUT.FORMAT, "points": float32 Tensor (P, 2),
         "point_classes": int64 Tensor (P,), "roi": bool Tensor (H, W) (only if the dict has one)}

    Points are transformed with the image; those that leave it (crops) are dropped. With
    ``crop_edge_margin`` > 0 (training), the dict also gets "loss_mask": bool Tensor (H, W), False
    within that many pixels of the borders that are crop cuts (see :func:`artificial_edges`).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str = "BGR",
        crop_edge_margin: int = 0,
        image_cache_mb: float = 0.0,
    ):
        """
        Args:
            is_train: kept for the detectron2 mapper interface (augmentations differ).
            augmentations: applied to image, points and ROI.
            image_format: as in ``detection_utils.read_image``.
            crop_edge_margin: width of the loss mask along crop cuts (training only; 0 = none).
            image_cache_mb: keep up to this many MiB of decoded images in memory (per process,
                see :class:`ImageCache`; 0 = read every time).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.crop_edge_margin = int(crop_edge_margin) if is_train else 0
        if image_cache_mb < 0:
            raise ValueError(f"INPUT.DENSITY.IMAGE_CACHE_MB must be >= 0, got {image_cache_mb}")
        self.image_cache = ImageCache(int(image_cache_mb * 2**20))
        mode = "training" if is_train else "inference"
        logger.info(f"[DensityDatasetMapper] augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        margin = int(cfg.INPUT.DENSITY.CROP_EDGE_MARGIN)
        if margin < 0:
            raise ValueError(f"INPUT.DENSITY.CROP_EDGE_MARGIN must be >= 0, got {margin}")
        return {
            "is_train": is_train,
            "augmentations": build_density_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "crop_edge_margin": margin,
            # the training set is read once per crop; test images once per evaluation
            "image_cache_mb": float(cfg.INPUT.DENSITY.IMAGE_CACHE_MB) if is_train else 0.0,
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict: one point dataset dict.

        Returns:
            a copy with "image", "points", "point_classes" (and "roi") as tensors.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        try:
            image = self.image_cache.read(file_name, self.image_format)
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"Cannot read image {file_name}: {e}") from e
        utils.check_image_size(dataset_dict, image)

        points = np.asarray(dataset_dict.get("points", np.zeros((0, 2))), dtype=np.float64)
        points = points.reshape(-1, 2)
        classes = dataset_dict.get("point_classes")
        classes = (
            np.zeros(len(points), dtype=np.int64)
            if classes is None
            else np.asarray(classes, dtype=np.int64).reshape(-1)
        )
        if len(classes) != len(points):
            raise ValueError(f"{file_name}: {len(points)} points but {len(classes)} point_classes")
        roi = dataset_dict.get("roi")
        roi = None if roi is None else load_roi_mask(roi).astype(np.uint8)
        if roi is not None and roi.shape != image.shape[:2]:
            raise ValueError(f"{file_name}: ROI shape {roi.shape} != image {image.shape[:2]}")

        orig_size = image.shape[:2]
        aug_input = T.AugInput(image, sem_seg=roi)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        height, width = image.shape[:2]
        if len(points):
            points = transforms.apply_coords(points.copy())
        keep = (
            (points[:, 0] >= 0)
            & (points[:, 0] <= width)
            & (points[:, 1] >= 0)
            & (points[:, 1] <= height)
        )
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["points"] = torch.as_tensor(points[keep], dtype=torch.float32).reshape(-1, 2)
        dataset_dict["point_classes"] = torch.as_tensor(classes[keep], dtype=torch.long)
        if roi is not None:
            dataset_dict["roi"] = torch.as_tensor(aug_input.sem_seg.astype(bool))
        if self.crop_edge_margin > 0:
            edges = artificial_edges(transforms, *orig_size)
            dataset_dict["loss_mask"] = torch.as_tensor(
                crop_edge_mask(edges, height, width, self.crop_edge_margin)
            )
        return dataset_dict
