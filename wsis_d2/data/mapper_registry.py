"""
Registry of dataset mappers, so that a config chooses how dataset dicts become model inputs.
"""

import copy

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry

from .image_io import decode_short_side, read_dataset_image

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Registry for dataset mappers: callables turning one detectron2 dataset dict into one model input.

A registered object is called as ``obj(cfg, is_train)`` (``@configurable`` classes accept this) and
selected by ``cfg.INPUT.DATASET_MAPPER``; the empty string selects detectron2's ``DatasetMapper``
(:class:`ReducedDecodeDatasetMapper` with ``INPUT.REDUCED_DECODE``).
"""


@DATASET_MAPPER_REGISTRY.register()
class ReducedDecodeDatasetMapper(DatasetMapper):
    """
    detectron2's ``DatasetMapper`` (same inputs and outputs) with large JPEGs decoded at a reduced
    scale down to twice the largest input size (:func:`wsis_d2.data.image_io.read_image_reduced`):
    the stock Mask R-CNN of CCGR's IS branch and of the supervised bound on large photographs.
    Annotations, proposals and semantic labels stay in the dataset dict's (full image) frame.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, decode_short_side: int = 0, **kwargs):
        """
        Args:
            decode_short_side: the largest input shorter side (0: full decode, exactly
                ``DatasetMapper``).
            is_train, kwargs: as for ``DatasetMapper``.
        """
        super().__init__(is_train, **kwargs)
        self.decode_short_side = int(decode_short_side)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["decode_short_side"] = decode_short_side(cfg, is_train)
        return ret

    def __call__(self, dataset_dict):
        if self.decode_short_side <= 0:
            return super().__call__(dataset_dict)
        dataset_dict = copy.deepcopy(dataset_dict)
        image, scale = read_dataset_image(dataset_dict, self.image_format, self.decode_short_side)
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
            if scale is not None:
                sem_seg = scale.apply_segmentation(sem_seg)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        if scale is not None:  # annotations and proposals are in the full image's pixels
            transforms = T.TransformList([scale]) + transforms
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


def build_dataset_mapper(cfg, is_train: bool):
    """
    Build the mapper named by ``cfg.INPUT.DATASET_MAPPER`` ("" = detectron2's ``DatasetMapper``,
    as :class:`ReducedDecodeDatasetMapper` where ``INPUT.REDUCED_DECODE``).

    Args:
        cfg: a config with wsis_d2's keys (``add_wsis_config``).
        is_train: build the training (augmenting) or the test mapper.
    """
    name = cfg.INPUT.DATASET_MAPPER
    if not name:
        if cfg.INPUT.REDUCED_DECODE:
            return ReducedDecodeDatasetMapper(cfg, is_train)
        return DatasetMapper(cfg, is_train)
    if name not in DATASET_MAPPER_REGISTRY:
        raise ValueError(
            f"cfg.INPUT.DATASET_MAPPER={name!r} is not a registered mapper; "
            f"known: {sorted(k for k, _ in DATASET_MAPPER_REGISTRY)}"
        )
    return DATASET_MAPPER_REGISTRY.get(name)(cfg, is_train)
