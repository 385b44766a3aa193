"""
Image-level labels and counts of a dataset dict (the shared convention of wsis_d2's datasets:
instances in "annotations", optional "image_labels" and "class_counts"), read by the LC and CCGR
mappers and CCGR's rounds.
"""

import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog

__all__ = [
    "add_image_labels",
    "class_counts_of",
    "filter_images_without_objects",
    "image_labels_of",
    "is_count_only",
    "num_classes_of",
]

# the largest object count accepted per (image, class)
MAX_COUNT = 2**31 - 1


def class_counts_of(dataset_dict: Dict, num_classes: int) -> np.ndarray:
    """
    Per-class object counts of one dataset dict.

    ``dataset_dict["class_counts"]`` is used when present; otherwise the non-crowd annotations
    are counted. When both are present they must agree, unless ``annotations`` is empty: an image
    whose objects are counted but not annotated (count-only data, e.g. a COCO image's
    ``image_counts``).

    Args:
        dataset_dict: a dict of the shared convention (``file_name``, optional ``class_counts``
            (C,) and ``annotations`` with ``category_id`` in 0..C-1 and ``iscrowd``).
        num_classes: C.

    Returns:
        (C,) int64 array of counts >= 0.

    Raises:
        ValueError (naming the file and the field or class) for counts of the wrong length,
        negative or non-integer counts, a category id outside 0..C-1, or ``class_counts`` that
        disagree with the annotations.
    """
    file_name = dataset_dict.get("file_name", "<no file_name>")
    from_annotations = None
    if "annotations" in dataset_dict:
        from_annotations = np.zeros(num_classes, dtype=np.int64)
        for i, ann in enumerate(dataset_dict["annotations"]):
            if ann.get("iscrowd", 0):
                continue
            cat = ann.get("category_id")
            if not isinstance(cat, (int, np.integer)) or not 0 <= cat < num_classes:
                raise ValueError(
                    f"{file_name}: annotations[{i}] has category_id {cat!r}, expected an int in "
                    f"0..{num_classes - 1}"
                )
            from_annotations[cat] += 1
    if "class_counts" not in dataset_dict:
        if from_annotations is None:
            raise ValueError(f"{file_name}: neither 'class_counts' nor 'annotations' is present")
        return from_annotations

    raw = np.asarray(dataset_dict["class_counts"]).reshape(-1)
    if raw.shape[0] != num_classes:
        raise ValueError(
            f"{file_name}: 'class_counts' has {raw.shape[0]} entries but the dataset has "
            f"{num_classes} classes"
        )
    if (
        raw.dtype.kind not in "iuf" or (raw < 0).any() or (raw != np.round(raw)).any()
        or (raw > MAX_COUNT).any()  # beyond it int64 wraps; no image holds that many
    ):
        raise ValueError(
            f"{file_name}: 'class_counts' must hold integers in 0..{MAX_COUNT}, got {raw.tolist()}"
        )
    counts = raw.astype(np.int64)
    if from_annotations is not None and len(dataset_dict["annotations"]) > 0:
        bad = np.nonzero(counts != from_annotations)[0]
        if len(bad):
            c = int(bad[0])
            raise ValueError(
                f"{file_name}: 'class_counts' of class {c} is {counts[c]} but the annotations "
                f"hold {from_annotations[c]} non-crowd instances of it"
            )
    return counts


def image_labels_of(dataset_dict: Dict, num_classes: int) -> np.ndarray:
    """
    Image-level labels l_c of one dataset dict: the classes with instances
    (:func:`class_counts_of` > 0) and those named by its optional ``"image_labels"`` (contiguous
    class ids of classes present without instances, e.g. from a COCO image's ``image_labels``).

    Returns:
        (C,) bool array.

    Raises:
        ValueError naming the file for a class id outside 0..C-1.
    """
    labels = class_counts_of(dataset_dict, num_classes) > 0
    return add_image_labels(dataset_dict, labels)


def add_image_labels(dataset_dict: Dict, labels: np.ndarray) -> np.ndarray:
    num_classes = labels.shape[0]
    for c in dataset_dict.get("image_labels", ()):
        if not 0 <= int(c) < num_classes:
            raise ValueError(
                f"{dataset_dict.get('file_name', '<no file_name>')}: 'image_labels' holds class "
                f"{c}, outside 0..{num_classes - 1}"
            )
        labels[int(c)] = True
    return labels


def num_classes_of(dataset_names: Sequence[str]) -> Optional[int]:
    """len(thing_classes) shared by the datasets' metadata; None when none of them has it."""
    found = {}
    for name in dataset_names:
        classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
        if classes is not None:
            found[name] = len(classes)
    if len(set(found.values())) > 1:
        raise ValueError(f"datasets disagree on the number of classes (thing_classes): {found}")
    return next(iter(found.values()), None)


def is_count_only(dataset_dict: Dict) -> bool:
    """True for an image whose objects are counted (positive ``class_counts``) but not annotated:
    it is neither a negative example nor scoreable by mAP."""
    return not dataset_dict.get("annotations") and bool(
        np.sum(dataset_dict.get("class_counts", 0)) > 0
    )


def filter_images_without_objects(
    dataset_dicts: List[Dict], labels_suffice: bool = False
) -> List[Dict]:
    """
    detectron2's ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` for models trained on image-level targets
    (LC, CCGR): drop the images without a non-crowd annotation, as detectron2 does, but keep those
    with a positive ``class_counts`` (count-only images, whose objects have no annotations) and,
    with ``labels_suffice`` (models that read image-level labels alone), those with
    ``image_labels``.

    Args:
        dataset_dicts: dicts of the shared convention.
        labels_suffice: also keep an image that only has ``image_labels``.

    Returns:
        the kept dicts, in order.
    """
    def has_objects(d: Dict) -> bool:
        if any(not a.get("iscrowd", 0) for a in d.get("annotations", ())):
            return True
        if labels_suffice and len(d.get("image_labels", ())) > 0:
            return True
        return bool(np.sum(d.get("class_counts", 0)) > 0)

    kept = [d for d in dataset_dicts if has_objects(d)]
    if len(kept) < len(dataset_dicts):
        logging.getLogger(__name__).info(
            f"Removed {len(dataset_dicts) - len(kept)} images without objects (neither a "
            "non-crowd annotation nor a positive class count"
            + (" nor image labels)." if labels_suffice else ").")
        )
    return kept
