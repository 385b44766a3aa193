"""
Dataset mapper of CCGR's MIL + SS model (``CCGRNet``): the image, its image-level labels (never
its boxes or masks), its proposals (``DATASETS.PROPOSAL_FILES_*``, loaded into the dataset dicts
by detectron2 when ``MODEL.LOAD_PROPOSALS``) and the round's cues (``INPUT.CCGR.CUES_FILE``:
peaks and pseudo semantic labels per image id), all under the same resize / flip.
"""

import copy
import logging
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .files import load_cues
from ..data.image_io import decode_short_side, read_dataset_image
from ..data.proposals import check_proposals, load_proposal_file
from ..data.mapper_registry import DATASET_MAPPER_REGISTRY
from ..data.image_labels import image_labels_of, num_classes_of

__all__ = ["CCGRDatasetMapper"]

logger = logging.getLogger(__name__)


@DATASET_MAPPER_REGISTRY.register()
class CCGRDatasetMapper:
    """
    Dataset dict -> ``CCGRNet`` input::

        {"file_name", "image_id", "height", "width",
         "image": uint8 Tensor (3, H, W) in INPUT.FORMAT (after resize / flip),
         "labels": float32 Tensor (C,) image-level labels (the classes of class_counts / the
             annotations, and those of "image_labels"; nothing else of the annotations is kept),
         "proposals": Instances(proposal_boxes, objectness_logits) in input pixels (the first
             DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN / _TEST),
         "peaks": float32 Tensor (P, 4) rows (class, x, y, value) in input pixels  # with cues
         "seed_boxes": float32 Tensor (P, 6) rows (class, x1, y1, x2, y2, score), input pixels,
             row p the box of peak p  # with cues of a round k >= 2 (the IS branch's boxes)
         "sem_seg": int64 Tensor (H, W) pseudo labels (C = background, 255 ignored)  # with cues}
    """

    # image-level targets (counts / labels): WSISTrainer trains on count-only images too
    reads_counts = True
    # image-level labels are its whole supervision
    labels_suffice = True

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str = "BGR",
        num_classes: int,
        proposal_topk: int,
        cues: Optional[dict] = None,
        decode_short_side: int = 0,
    ):
        """
        Args:
            is_train: training (augmenting) or test mapping; neither keeps annotations.
            augmentations: applied to the image, proposals, peaks and label maps (no crops).
            image_format: as in ``detection_utils.read_image``.
            num_classes: C.
            proposal_topk: proposals kept per image (they are sorted by objectness).
            cues: a cues file's content (:func:`wsis_d2.ccgr.files.load_cues`); training
                needs it.
            decode_short_side: the largest input shorter side; large JPEGs are decoded at a
                reduced scale down to twice it (:func:`wsis_d2.data.image_io.read_image_reduced`,
                ``INPUT.REDUCED_DECODE``); 0: full decode.
        """
        if is_train and cues is None:
            raise ValueError(
                "CCGRDatasetMapper: training needs the round's cues (INPUT.CCGR.CUES_FILE)"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = int(num_classes)
        self.proposal_topk = int(proposal_topk)
        self.cues = cues
        self.decode_short_side = int(decode_short_side)
        logger.info(
            f"[CCGRDatasetMapper] {'training' if is_train else 'inference'}: {num_classes} "
            f"classes, {proposal_topk} proposals, cues: {'yes' if cues else 'no'}, "
            f"augmentations {augmentations}"
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if cfg.INPUT.CROP.ENABLED:
            raise ValueError("CCGRDatasetMapper does not support INPUT.CROP.ENABLED")
        if not cfg.MODEL.LOAD_PROPOSALS:
            raise ValueError("CCGRDatasetMapper needs MODEL.LOAD_PROPOSALS True (bags)")
        names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        files = cfg.DATASETS.PROPOSAL_FILES_TRAIN if is_train else cfg.DATASETS.PROPOSAL_FILES_TEST
        if len(files) != len(names):
            raise ValueError(
                f"DATASETS.PROPOSAL_FILES_{'TRAIN' if is_train else 'TEST'} ({len(files)} files) "
                f"must name one file per dataset of {list(names)}"
            )
        # detectron2's loader would stop with a KeyError: name the file and the image here
        for name, path in zip(names, files):
            check_proposals(path, load_proposal_file(path), DatasetCatalog.get(name))
        num_classes = num_classes_of(names) or cfg.MODEL.ROI_HEADS.NUM_CLASSES
        cues = load_cues(cfg.INPUT.CCGR.CUES_FILE) if cfg.INPUT.CCGR.CUES_FILE else None
        if cues is not None and cues["num_classes"] != num_classes:
            raise ValueError(
                f"{cfg.INPUT.CCGR.CUES_FILE}: cues of {cues['num_classes']} classes, the datasets "
                f"{list(names)} have {num_classes}"
            )
        topk = (
            cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN
            if is_train
            else cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST
        )
        return {
            "is_train": is_train,
            "augmentations": utils.build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": num_classes,
            "proposal_topk": topk,
            "cues": cues,
            "decode_short_side": decode_short_side(cfg, is_train),
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image_id = dataset_dict["image_id"]
        labels = image_labels_of(dataset_dict, self.num_classes)
        image, scale = read_dataset_image(dataset_dict, self.image_format, self.decode_short_side)
        full_shape = (dataset_dict["height"], dataset_dict["width"])
        sem_seg = None
        if self.cues is not None:
            if image_id not in self.cues["peaks"]:
                raise ValueError(f"cues file: no cues for image id {image_id!r} ({file_name})")
            sem_seg = np.asarray(Image.open(self.cues["sem_seg"][image_id]), dtype=np.uint8)
            if sem_seg.shape != full_shape:
                raise ValueError(
                    f"cues file: label map of image id {image_id!r} is {sem_seg.shape}, the image "
                    f"{file_name} is {full_shape}"
                )
            if scale is not None:
                sem_seg = scale.apply_segmentation(sem_seg)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        if scale is not None:  # proposals, peaks and seed boxes are in the full image's pixels
            transforms = T.TransformList([scale]) + transforms
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["labels"] = torch.as_tensor(labels, dtype=torch.float32)
        if "proposal_boxes" not in dataset_dict:
            raise ValueError(
                f"{file_name}: no proposals (set MODEL.LOAD_PROPOSALS and "
                "DATASETS.PROPOSAL_FILES_TRAIN / _TEST)"
            )
        utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if self.cues is not None:
            peaks = np.asarray(self.cues["peaks"][image_id], dtype=np.float32).reshape(-1, 4).copy()
            if len(peaks):
                peaks[:, 1:3] = transforms.apply_coords(peaks[:, 1:3].astype(np.float64))
            dataset_dict["peaks"] = torch.as_tensor(peaks)
            if "seed_boxes" in self.cues:
                # rounds k >= 2: the IS branch's boxes seed the bags (row p <-> peak p)
                seeds = self.cues["seed_boxes"].get(image_id)
                seeds = np.zeros((0, 6), np.float32) if seeds is None else seeds
                seeds = np.asarray(seeds, dtype=np.float32).reshape(-1, 6).copy()
                if len(seeds) != len(peaks):
                    raise ValueError(
                        f"cues file: image id {image_id!r} ({file_name}) has {len(seeds)} seed "
                        f"boxes but {len(peaks)} peaks (one per box)"
                    )
                if len(seeds):
                    seeds[:, 1:5] = transforms.apply_box(seeds[:, 1:5].astype(np.float64))
                dataset_dict["seed_boxes"] = torch.as_tensor(seeds)
            dataset_dict["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        for key in ("annotations", "class_counts", "image_labels", "sem_seg_file_name"):
            dataset_dict.pop(key, None)
        return dataset_dict
