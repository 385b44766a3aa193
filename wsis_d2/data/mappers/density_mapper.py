"""
Dataset mapper for point-annotated density counting: reads the image, applies the augmentations to
image, points and ROI together, and drops points that leave the image.
"""

import copy
import logging
from typing import Dict, List, Union

import numpy as np
import torch
from PIL import UnidentifiedImageError

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..datasets.point_datasets import load_roi_mask
from .build import DATASET_MAPPER_REGISTRY

__all__ = ["DensityDatasetMapper", "Rot90Transform", "RandomRot90", "build_density_augmentation"]

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


def build_density_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """
    Training: optional ResizeShortestEdge (``INPUT.MIN_SIZE_TRAIN`` > 0), optional RandomCrop
    (``INPUT.CROP``), random flips (``INPUT.DENSITY.FLIPS``), optional random quarter turns
    (``INPUT.DENSITY.ROTATE_90``) and an optional random intensity gain (``INPUT.DENSITY.BRIGHTNESS``,
    one factor per image: the model has to count cells, not integrate brightness, since exposure
    and staining vary between images). Test: optional ResizeShortestEdge (``INPUT.MIN_SIZE_TEST`` > 0).
    A minimum size of 0 keeps the original size (density targets are built after resizing, so
    counts are unchanged).
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
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        for flip in cfg.INPUT.DENSITY.FLIPS:
            if flip not in ("horizontal", "vertical"):
                raise ValueError(f"INPUT.DENSITY.FLIPS: unknown flip {flip!r}")
            augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
        if cfg.INPUT.DENSITY.ROTATE_90:
            augs.append(RandomRot90())
        lo, hi = (float(v) for v in cfg.INPUT.DENSITY.BRIGHTNESS)
        if not 0.0 < lo <= hi:
            raise ValueError(
                f"INPUT.DENSITY.BRIGHTNESS must be (min, max) with 0 < min <= max, got {(lo, hi)}"
            )
        if (lo, hi) != (1.0, 1.0):
            augs.append(T.RandomBrightness(lo, hi))
    elif cfg.INPUT.MIN_SIZE_TEST > 0:
        augs.append(
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
        )
    return augs


@DATASET_MAPPER_REGISTRY.register()
class DensityDatasetMapper:
    """
    Map a point dataset dict (see ``wsis_d2.data.datasets.point_datasets``) to a model input::

        {..., "image": uint8 Tensor (C, H, W) in INPUT.FORMAT, "points": float32 Tensor (P, 2),
         "point_classes": int64 Tensor (P,), "roi": bool Tensor (H, W) (only if the dict has one)}

    Points are transformed with the image; those that leave it (crops) are dropped.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str = "BGR",
    ):
        """
        Args:
            is_train: kept for the detectron2 mapper interface (augmentations differ).
            augmentations: applied to image, points and ROI.
            image_format: as in ``detection_utils.read_image``.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        mode = "training" if is_train else "inference"
        logger.info(f"[DensityDatasetMapper] augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_density_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
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
            image = utils.read_image(file_name, format=self.image_format)
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
        return dataset_dict
