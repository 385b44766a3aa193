"""
Dataset mapper for image-level (lower-count) supervision of LC / ILC (Cholakkal et al., CVPR 2019):
reads the image, resizes / flips it, and turns the dataset dict's per-class counts into the
model's targets "labels", "counts" and "count_ge".
"""

import copy
import logging
from typing import Dict, List, Optional, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import UnidentifiedImageError

from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..data.image_io import decode_short_side, read_dataset_image
from ..data.image_labels import add_image_labels, class_counts_of, image_labels_of, num_classes_of
from ..data.mapper_registry import DATASET_MAPPER_REGISTRY

__all__ = ["LCDatasetMapper", "image_level_targets", "class_counts_of", "image_labels_of"]

logger = logging.getLogger(__name__)


def image_level_targets(
    counts: np.ndarray, lower_count: Optional[int]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Image-level targets of LC / ILC from exact per-class counts t_c.

    Image-level labels are l_c = 1[t_c > 0]. Lower-count supervision with threshold t̃ keeps the
    exact count for t_c < t̃ (the set S) and only "t_c >= t̃" beyond (the set S̃), encoded as
    counts[c] = t̃ and count_ge[c] = True.

    Args:
        counts: (C,) int exact counts t_c >= 0.
        lower_count: t̃ (>= 1), or None for exact counts everywhere.

    Returns:
        labels (C,) float32 0/1, counts (C,) int64, count_ge (C,) bool.
    """
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.long).reshape(-1)
    labels = (counts > 0).to(torch.float32)
    if lower_count is None:
        return labels, counts, torch.zeros_like(counts, dtype=torch.bool)
    count_ge = counts >= lower_count
    return labels, torch.where(count_ge, torch.full_like(counts, lower_count), counts), count_ge


@DATASET_MAPPER_REGISTRY.register()
class LCDatasetMapper:
    """
    Map a dataset dict of the shared convention to an LC / ILC model input::

        {"file_name", "image_id", "height", "width",
         "image": uint8 Tensor (3, H, W) in INPUT.FORMAT (after resize / flip),
         "labels": float32 Tensor (C,) image-level labels 0/1,
         "counts": int64 Tensor (C,) counts (t̃ where only ">= t̃" is known),
         "count_ge": bool Tensor (C,) True where the count is only known to be >= t̃,
         "count_exact": bool Tensor (C,) True where the count is exact also when >= t̃,
         "mosaic_tiles": int, g² for a mosaic, else 1 (training only),
         "instances": Instances at (H, W) with gt_boxes, gt_classes (+ gt_masks)  # eval only}

    Counts come from ``class_counts`` (else the non-crowd annotations) and are unchanged by
    resizing and flipping. Images without objects are kept (all labels 0). Lower-count censoring
    (``INPUT.LC.LOWER_COUNT_SUPERVISION``, t̃ = ``MODEL.LC.LOWER_COUNT``) applies in training
    only; at test time counts are exact and count_ge is all False.

    Mosaics (training only, ``mosaic_prob`` > 0): the augmented image is cut into a g × g grid
    and every tile is filled with a training image (this one and g² − 1 random ones from the
    pool), augmented and resized into it. Each tile's counts are censored at t̃ on their own,
    as an annotator of lower counts would give them, and then summed: "counts" is the sum (a lower
    bound where "count_ge"), and "count_exact" marks the classes whose tiles are all exact, whose
    sum is then an exact count even when it reaches t̃; "mosaic_tiles" = g² lets the model
    weigh the mosaic's count error like one image's. The objects of a tile are g times smaller
    than in its own image, like the objects of the crowded images, whose counts lower-count
    supervision never states exactly.
    """

    # image-level targets (counts / labels): WSISTrainer trains on count-only images too
    reads_counts = True

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str = "BGR",
        num_classes: int,
        lower_count: Optional[int] = None,
        mask_format: str = "bitmask",
        mosaic_prob: float = 0.0,
        mosaic_grid: int = 2,
        mosaic_pool: Optional[List[Dict]] = None,
        image_labels_only: bool = False,
        proposal_topk: Optional[int] = None,
        decode_short_side: int = 0,
    ):
        """
        Args:
            is_train: training (no annotations kept, censoring on) or test mapping.
            augmentations: applied to the image (and, at test time, to the annotations); they
                must not crop, since counts are image-level.
            image_format: as in ``detection_utils.read_image``; the result always has 3
                channels.
            num_classes: C.
            lower_count: t̃ for lower-count censoring of training counts; None = exact counts.
            mask_format: "bitmask" or "polygon", for the test-time "instances".
            mosaic_prob: probability that a training input is a mosaic (see the class docstring).
            mosaic_grid: g, tiles per side of a mosaic (>= 2).
            mosaic_pool: dataset dicts the other tiles are drawn from (the training set);
                required when ``mosaic_prob`` > 0 and ``is_train``.
            image_labels_only: the model reads the labels alone (MODEL.LC.IMAGE_LABELS_ONLY), so
                training images may name present classes without instances
                (``"image_labels"``); other models need their counts, and such a training image
                is a ValueError naming it (at test time the labels are simply added).
            proposal_topk: at test time, the precomputed proposals of a dataset dict
                (``MODEL.LOAD_PROPOSALS``, ``DATASETS.PROPOSAL_FILES_TEST``) become its
                "proposals" (the first ``proposal_topk``, transformed with the image) for LC's
                instance retrieval; None: proposals are not read.
            decode_short_side: the largest input shorter side; large JPEGs are decoded at a
                reduced scale down to twice it (:func:`wsis_d2.data.image_io.read_image_reduced`,
                ``INPUT.REDUCED_DECODE``); 0: full decode.
        """
        if num_classes < 1:
            raise ValueError(f"LCDatasetMapper: num_classes must be >= 1, got {num_classes}")
        if lower_count is not None and lower_count < 1:
            raise ValueError(f"LCDatasetMapper: lower_count (t̃) must be >= 1, got {lower_count}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = int(num_classes)
        self.lower_count = None if lower_count is None else int(lower_count)
        self.mask_format = mask_format
        self.image_labels_only = bool(image_labels_only)
        self.proposal_topk = None if is_train or proposal_topk is None else int(proposal_topk)
        self.decode_short_side = int(decode_short_side)
        if not 0.0 <= mosaic_prob <= 1.0:
            raise ValueError(f"INPUT.LC.MOSAIC_PROB must be in [0, 1], got {mosaic_prob}")
        if mosaic_grid < 2:
            raise ValueError(f"INPUT.LC.MOSAIC_GRID must be >= 2, got {mosaic_grid}")
        self.mosaic_prob = float(mosaic_prob) if is_train else 0.0
        self.mosaic_grid = int(mosaic_grid)
        self.mosaic_pool: List[Dict] = []
        if self.mosaic_prob > 0:
            if not mosaic_pool:
                raise ValueError("LCDatasetMapper: mosaics need a non-empty mosaic_pool")
            # only what a tile needs; the counts are checked here, so that a bad dict is named
            # when the mapper is built and not in a data-loader worker
            for d in mosaic_pool:
                slim = {k: d[k] for k in ("file_name", "height", "width") if k in d}
                slim["class_counts"] = class_counts_of(d, self.num_classes)
                if (image_labels_of(d, self.num_classes) & (slim["class_counts"] == 0)).any():
                    raise ValueError(
                        f"{d.get('file_name', '<no file_name>')}: 'image_labels' names classes "
                        "without instances, and mosaics (INPUT.LC.MOSAIC_PROB > 0) need counts"
                    )
                self.mosaic_pool.append(slim)
        mode = "training" if is_train else "inference"
        logger.info(
            f"[LCDatasetMapper] {mode}: {num_classes} classes, lower count t̃={self.lower_count}, "
            f"augmentations {augmentations}"
            + (
                f", {self.mosaic_grid}x{self.mosaic_grid} mosaics with probability "
                f"{self.mosaic_prob} from {len(self.mosaic_pool)} images"
                if self.mosaic_prob > 0
                else ""
            )
        )

    @property
    def labels_suffice(self) -> bool:
        """Whether an image with image labels and no counts is a training example."""
        return self.image_labels_only and self.mosaic_prob == 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if cfg.INPUT.CROP.ENABLED:
            raise ValueError(
                "LCDatasetMapper does not support INPUT.CROP.ENABLED: a crop changes the "
                "image-level counts"
            )
        names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        num_classes = num_classes_of(names)
        if num_classes is None:
            num_classes = cfg.MODEL.LC.NUM_CLASSES
        elif num_classes != cfg.MODEL.LC.NUM_CLASSES:
            logger.warning(
                f"[LCDatasetMapper] datasets {list(names)} have {num_classes} classes but "
                f"MODEL.LC.NUM_CLASSES is {cfg.MODEL.LC.NUM_CLASSES}; using {num_classes}"
            )
        censor = is_train and cfg.INPUT.LC.LOWER_COUNT_SUPERVISION
        mosaic_prob = cfg.INPUT.LC.MOSAIC_PROB if is_train else 0.0
        pool = None
        if mosaic_prob > 0:
            pool = [d for name in names for d in DatasetCatalog.get(name)]
        return {
            "is_train": is_train,
            "augmentations": utils.build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": num_classes,
            "lower_count": cfg.MODEL.LC.LOWER_COUNT if censor else None,
            "mask_format": cfg.INPUT.MASK_FORMAT,
            "mosaic_prob": mosaic_prob,
            "mosaic_grid": cfg.INPUT.LC.MOSAIC_GRID,
            "mosaic_pool": pool,
            "image_labels_only": cfg.MODEL.LC.IMAGE_LABELS_ONLY,
            "proposal_topk": (
                cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST if cfg.MODEL.LOAD_PROPOSALS else None
            ),
            "decode_short_side": decode_short_side(cfg, is_train),
        }

    def _read_image(self, dataset_dict: Dict) -> Tuple[np.ndarray, Optional[T.ScaleTransform]]:
        """The image (H', W', 3) and, where it was decoded reduced, the ScaleTransform from the
        dataset dict's frame to it (:func:`read_dataset_image`, which checks the size)."""
        file_name = dataset_dict["file_name"]
        try:
            image, scale = read_dataset_image(
                dataset_dict, self.image_format, self.decode_short_side
            )
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            # PIL raises OSError subclasses for missing / truncated / unidentified files and
            # SyntaxError for some broken headers
            raise ValueError(f"Cannot read image {file_name}: {e}") from e
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[2] == 1:  # e.g. INPUT.FORMAT "L": the model expects 3 channels
            image = np.repeat(image, 3, axis=2)
        return image, scale

    def _mosaic(self, image: np.ndarray, counts: np.ndarray):
        """
        Tile ``image`` (H, W, 3), already augmented, with g² images: itself and g² − 1 random
        images of the pool, each augmented and resized into its tile (tiles in random order).

        Returns:
            the (H, W, 3) mosaic and its targets (labels, counts, count_ge, count_exact) of
            :func:`image_level_targets` summed over the tiles.
        """
        g = self.mosaic_grid
        height, width = image.shape[:2]
        ys = np.linspace(0, height, g + 1).round().astype(int)
        xs = np.linspace(0, width, g + 1).round().astype(int)
        canvas = np.empty_like(image)
        slots = np.random.permutation(g * g)
        partners = np.random.randint(len(self.mosaic_pool), size=g * g - 1)
        total = torch.zeros(self.num_classes, dtype=torch.long)
        count_ge = torch.zeros(self.num_classes, dtype=torch.bool)
        for k, slot in enumerate(slots):
            if k == 0:
                tile, tile_counts = image, counts
            else:
                d = self.mosaic_pool[int(partners[k - 1])]
                aug_input = T.AugInput(self._read_image(d)[0])
                self.augmentations(aug_input)
                tile, tile_counts = aug_input.image, d["class_counts"]
            r, c = divmod(int(slot), g)
            size = (int(xs[c + 1] - xs[c]), int(ys[r + 1] - ys[r]))  # (w, h) for cv2
            resized = cv2.resize(tile, size, interpolation=cv2.INTER_AREA)
            canvas[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = resized.reshape(size[1], size[0], -1)
            _, tile_t, tile_ge = image_level_targets(tile_counts, self.lower_count)
            total += tile_t
            count_ge |= tile_ge
        return canvas, ((total > 0).to(torch.float32), total, count_ge, ~count_ge)

    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict: one dataset dict (not modified).

        Returns:
            the model input described in the class docstring.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        counts = class_counts_of(dataset_dict, self.num_classes)
        label_only = add_image_labels(dataset_dict, counts > 0) & (counts == 0)
        refuse = not self.image_labels_only or self.mosaic_prob > 0
        if label_only.any() and self.is_train and refuse:
            what = (
                "mosaics (INPUT.LC.MOSAIC_PROB > 0) need counts" if self.image_labels_only
                else "this model needs counts; train with MODEL.LC.IMAGE_LABELS_ONLY True to use "
                "image-level labels alone"
            )
            raise ValueError(
                f"{dataset_dict.get('file_name', '<no file_name>')}: 'image_labels' names classes "
                f"{np.nonzero(label_only)[0].tolist()} without instances, and {what}"
            )
        image, scale = self._read_image(dataset_dict)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        if scale is not None:  # annotations and proposals are in the full image's pixels
            transforms = T.TransformList([scale]) + transforms
        image = aug_input.image
        image_shape = image.shape[:2]

        g = self.mosaic_grid
        mosaic = self.mosaic_prob > 0 and min(image_shape) >= g
        mosaic = mosaic and np.random.rand() < self.mosaic_prob
        if mosaic:
            image, targets = self._mosaic(image, counts)
        else:
            targets = image_level_targets(counts, self.lower_count)
            # counts >= t̃ of a single image are exact only without censoring
            targets = targets + (torch.full_like(targets[2], self.lower_count is None),)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        labels, counts_t, count_ge, count_exact = targets
        if label_only.any():
            labels = torch.maximum(labels, torch.as_tensor(label_only, dtype=labels.dtype))
        dataset_dict["labels"] = labels
        dataset_dict["counts"] = counts_t
        dataset_dict["count_ge"] = count_ge
        if self.is_train:
            dataset_dict["count_exact"] = count_exact
            dataset_dict["mosaic_tiles"] = g * g if mosaic else 1

        if self.proposal_topk is not None and "proposal_boxes" in dataset_dict:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        annos = dataset_dict.pop("annotations", None)
        dataset_dict.pop("class_counts", None)
        dataset_dict.pop("image_labels", None)
        if not self.is_train and annos is not None:
            annos = [
                utils.transform_instance_annotations(copy.deepcopy(a), transforms, image_shape)
                for a in annos
                if not a.get("iscrowd", 0) and "bbox" in a
            ]
            with_masks = [a for a in annos if "segmentation" in a]
            if with_masks and len(with_masks) != len(annos):
                # annotations_to_instances needs all or none of them to have masks
                annos = [{k: v for k, v in a.items() if k != "segmentation"} for a in annos]
            dataset_dict["instances"] = utils.annotations_to_instances(
                annos, image_shape, mask_format=self.mask_format
            )
        return dataset_dict
