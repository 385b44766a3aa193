"""
COCO 2014 counting splits of LC / ILC (Cholakkal et al., CVPR 2019) and of the counting benchmark
of Chattopadhyay et al. (CVPR 2017), plus COCO-VOC (COCO restricted to the 20 VOC classes).

- train: every image of ``train2014``;
- val / test: the images of ``val2014`` with at least one annotation, sorted by image id, split
  in two halves; val = the first ``n // 2``, test = the rest (the official CountSeg code takes
  ``int(40137 / 2)`` as the boundary of its 40,137 annotated val2014 images);
- counts are non-crowd instances per class (crowd annotations stay in the dicts, ``iscrowd=1``).

COCO-VOC keeps the COCO annotations of the 20 classes in :data:`COCO_TO_VOC` under their VOC
names and ids (VOC order), drops the others, and recounts; its val / test halves are the same
images as those of the 80-class splits (images without a VOC object are kept, with counts 0).

Registration never touches the disk; files are read by ``load_coco_counts_json`` when a split is
loaded.
"""

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_coco_instances_meta

from ..image_labels import is_count_only
from .coco_counts import load_coco_counts_json
from .voc_counting import VOC_CLASSES

__all__ = [
    "COCO_TO_VOC",
    "coco_half_split",
    "restrict_to_voc",
    "load_coco_counting",
    "register_coco_counting",
    "register_all_coco_counting",
]

logger = logging.getLogger(__name__)

# COCO class name -> VOC class name, for the 20 COCO classes that are VOC classes
COCO_TO_VOC: Dict[str, str] = {
    "airplane": "aeroplane",
    "bicycle": "bicycle",
    "bird": "bird",
    "boat": "boat",
    "bottle": "bottle",
    "bus": "bus",
    "car": "car",
    "cat": "cat",
    "chair": "chair",
    "cow": "cow",
    "dining table": "diningtable",
    "dog": "dog",
    "horse": "horse",
    "motorcycle": "motorbike",
    "person": "person",
    "potted plant": "pottedplant",
    "sheep": "sheep",
    "couch": "sofa",
    "train": "train",
    "tv": "tvmonitor",
}

# ==== Predefined splits ==========
_TRAIN2014 = ("coco/annotations/instances_train2014.json", "coco/train2014")
_VAL2014 = ("coco/annotations/instances_val2014.json", "coco/val2014")
# name -> ((json file, image dir) under the root, half of the annotated images or None, VOC)
_PREDEFINED_SPLITS_COCO_COUNTING: Dict[str, Tuple[Tuple[str, str], Optional[str], bool]] = {
    "coco_2014_count_train": (_TRAIN2014, None, False),
    "coco_2014_count_val": (_VAL2014, "val", False),
    "coco_2014_count_test": (_VAL2014, "test", False),
    "coco_voc_2014_train": (_TRAIN2014, None, True),
    "coco_voc_2014_val": (_VAL2014, "val", True),
    "coco_voc_2014_test": (_VAL2014, "test", True),
}


def coco_half_split(dicts: Sequence[Dict], half: str) -> List[Dict]:
    """
    One half of a COCO split for counting: the images with at least one annotation (crowd ones
    included) or, without annotations, a positive count (``image_counts``), sorted by image id;
    "val" = the first ``n // 2``, "test" = the others.

    Args:
        dicts: dataset dicts with "image_id" and "annotations".
        half: "val" or "test".

    Returns:
        the selected dicts (the same objects), sorted by image id.
    """
    if half not in ("val", "test"):
        raise ValueError(f"coco_half_split: half must be 'val' or 'test', got {half!r}")
    pool = sorted(
        (d for d in dicts if d.get("annotations") or is_count_only(d)), key=lambda d: d["image_id"]
    )
    k = len(pool) // 2
    return pool[:k] if half == "val" else pool[k:]


def restrict_to_voc(dicts: List[Dict], coco_classes: Sequence[str]) -> List[Dict]:
    """
    COCO-VOC: keep the annotations of the 20 VOC classes (:data:`COCO_TO_VOC`), renumbered to
    VOC order (:data:`VOC_CLASSES`), and recount ``class_counts`` (non-crowd; a count-only image's
    counts are mapped). Modifies and
    returns ``dicts``; every image is kept.

    Args:
        dicts: dataset dicts whose ``category_id`` index ``coco_classes``.
        coco_classes: the class names of those ids.

    Returns:
        the dicts, with 20-class ``category_id`` and ``class_counts``.
    """
    to_voc = {
        i: VOC_CLASSES.index(COCO_TO_VOC[n]) for i, n in enumerate(coco_classes) if n in COCO_TO_VOC
    }
    for d in dicts:
        annotations = []
        counts = [0] * len(VOC_CLASSES)
        if is_count_only(d):  # no annotations to recount: map the counts themselves
            for i, n in enumerate(d["class_counts"]):
                if i in to_voc:
                    counts[to_voc[i]] += int(n)
        for a in d.get("annotations", []):
            if a["category_id"] not in to_voc:
                continue
            a["category_id"] = to_voc[a["category_id"]]
            if not a.get("iscrowd", 0):
                counts[a["category_id"]] += 1
            annotations.append(a)
        d["annotations"] = annotations
        d["class_counts"] = counts
        if "image_labels" in d:
            d["image_labels"] = sorted({to_voc[c] for c in d["image_labels"] if c in to_voc})
    return dicts


def _load_with_classes(json_file: str, image_root: str) -> Tuple[List[Dict], List[str]]:
    """``load_coco_counts_json`` plus the json's class names (read through a scratch metadata
    entry, since the loader reports them only via MetadataCatalog)."""
    scratch = f"__wsis_coco_counting_scratch__{json_file}"
    if scratch in MetadataCatalog.list():
        MetadataCatalog.remove(scratch)
    try:
        dicts = load_coco_counts_json(json_file, image_root, scratch)
        classes = list(MetadataCatalog.get(scratch).thing_classes)
    finally:
        if scratch in MetadataCatalog.list():
            MetadataCatalog.remove(scratch)
    return dicts, classes


def load_coco_counting(
    json_file: str,
    image_root: str,
    half: Optional[str] = None,
    voc: bool = False,
    expected_classes: Optional[Sequence[str]] = None,
) -> List[Dict]:
    """
    Load a COCO counting split.

    Args:
        json_file: COCO instances json (e.g. ``instances_val2014.json``).
        image_root: its image directory.
        half: None (all images), "val" or "test" (see :func:`coco_half_split`).
        voc: restrict to the 20 VOC classes (see :func:`restrict_to_voc`).
        expected_classes: (80-class splits) the class names the json must define, in json id
            order; a json with other categories raises ``ValueError`` naming it.

    Returns:
        dataset dicts of the shared convention with "class_counts".
    """
    dicts, classes = _load_with_classes(json_file, image_root)
    if expected_classes is not None and list(classes) != list(expected_classes):
        diff = sorted(set(classes) ^ set(expected_classes))[:5]
        raise ValueError(
            f"{json_file}: 'categories' define {len(classes)} classes that differ from the "
            f"{len(expected_classes)} expected COCO classes (e.g. {diff}, or their order)"
        )
    if half is not None:
        dicts = coco_half_split(dicts, half)
    if voc:
        missing = sorted(set(COCO_TO_VOC) - set(classes))
        if missing:
            logger.warning(f"{json_file}: no category for the VOC classes {missing}")
        dicts = restrict_to_voc(dicts, classes)
    return dicts


def register_coco_counting(
    name: str,
    json_file: str,
    image_root: str,
    half: Optional[str] = None,
    voc: bool = False,
    root: Optional[str] = None,
) -> None:
    """
    Register a COCO counting split: evaluator_type "counting" for the 80 classes,
    "wsis_instance" for COCO-VOC (masks of the 20 VOC classes, mAP^r and counts).

    Args:
        name: dataset name.
        json_file, image_root: paths, relative to ``root`` unless absolute.
        half: None, "val" or "test" (see :func:`coco_half_split`).
        voc: COCO-VOC (20 VOC classes) instead of the 80 COCO classes.
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` (default "datasets") when the
            split is loaded.
    """
    coco_meta = _get_coco_instances_meta()
    expected = None if voc else coco_meta["thing_classes"]

    def load(json_file=json_file, image_root=image_root, half=half, voc=voc, root=root):
        base = root if root is not None else os.getenv("DETECTRON2_DATASETS", "datasets")
        base = os.path.expanduser(base)
        return load_coco_counting(
            os.path.join(base, json_file), os.path.join(base, image_root), half, voc, expected
        )

    DatasetCatalog.register(name, load)
    meta = MetadataCatalog.get(name)
    if voc:
        meta.set(thing_classes=list(VOC_CLASSES), evaluator_type="wsis_instance")
    else:
        meta.set(
            thing_classes=list(coco_meta["thing_classes"]),
            thing_dataset_id_to_contiguous_id=dict(coco_meta["thing_dataset_id_to_contiguous_id"]),
            thing_colors=list(coco_meta["thing_colors"]),
            evaluator_type="counting",
        )
    meta.set(split_half=half if half is not None else "all")


def register_all_coco_counting(root: Optional[str] = None) -> None:
    """
    Register the predefined COCO 2014 counting and COCO-VOC splits (``datasets/README.md``).

    Args:
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` (default "datasets") each time a
            split is loaded rather than once now.
    """
    for name, ((json_file, image_root), half, voc) in _PREDEFINED_SPLITS_COCO_COUNTING.items():
        register_coco_counting(name, json_file, image_root, half, voc, root)
