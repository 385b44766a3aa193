"""
PASCAL VOC in its standard on-disk layouts, as the dataset dicts shared by wsis_d2:

- counting splits (PASCAL VOC 2007 / 2012 detection annotations, ``Annotations/*.xml``): per-class
  counts of the XML objects, one box and one point (box centre) per object;
- instance-segmentation splits (VOC 2012 ``SegmentationObject`` / ``SegmentationClass`` palette
  PNGs): one RLE mask per instance, its class the majority class of its pixels, for mAP^r.

"difficult" objects (counting splits): following the official LC / ILC code (CountSeg, which
counts VOC 2007 objects with ``difficult == 0`` only, as the counting benchmark of Chattopadhyay et
al. CVPR 2017 that it reproduces), a difficult object is not counted. It stays in the dict as an
annotation with ``iscrowd=1`` and ``difficult=1`` (ignored by counts and by the instance
evaluator). ``count_difficult=True`` counts them (the official code does so for its VOC 2012
instance-segmentation training lists).

Registration never touches the disk; a missing or malformed file raises ``ValueError`` naming it.
"""

import logging
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, UnidentifiedImageError

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from .coco_counts import mask_to_rle, point_in_mask

__all__ = [
    "VOC_CLASSES",
    "load_voc_counting",
    "load_voc_instance_segmentation",
    "register_voc_counting",
    "register_voc_instance_segmentation",
    "register_all_voc_counting",
]

logger = logging.getLogger(__name__)

VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

# value of void / object-boundary pixels in the VOC segmentation PNGs
VOC_VOID = 255

# ==== Predefined splits ==========
# name -> (year directory under the root, image set file under ImageSets/, count difficult)
_PREDEFINED_SPLITS_VOC_COUNTING: Dict[str, Tuple[str, str, bool]] = {
    "voc_2007_count_train": ("VOC2007", "Main/train.txt", False),
    "voc_2007_count_val": ("VOC2007", "Main/val.txt", False),
    "voc_2007_count_trainval": ("VOC2007", "Main/trainval.txt", False),
    "voc_2007_count_test": ("VOC2007", "Main/test.txt", False),
    # training lists for ILC instance segmentation (counts of all objects, as the official code)
    "voc_2012_count_train": ("VOC2012", "Main/train.txt", True),
    "voc_2012_count_trainaug": ("VOC2012", "Segmentation/trainaug.txt", True),
}

# name -> (year directory under the root, image set file under ImageSets/)
_PREDEFINED_SPLITS_VOC_INSTANCE: Dict[str, Tuple[str, str]] = {
    "voc_2012_seg_train_instance": ("VOC2012", "Segmentation/train.txt"),
    "voc_2012_seg_val_instance": ("VOC2012", "Segmentation/val.txt"),
}


def _datasets_root(root: Optional[str]) -> str:
    if root is not None:
        return root
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def read_image_set(path: str) -> List[str]:
    """
    Image ids of a VOC ``ImageSets/*/<split>.txt`` file (first column of each non-empty line).

    Raises:
        ValueError: the file is missing or lists no image.
    """
    try:
        with PathManager.open(path, "r") as f:
            ids = [line.split()[0] for line in f if line.strip()]
    except OSError as e:
        raise ValueError(f"{path}: cannot read the image set file: {e}") from e
    if not ids:
        raise ValueError(f"{path}: the image set file lists no image")
    return ids


def _xml_field(node: ET.Element, path: str, xml_file: str, where: str) -> str:
    child = node.find(path)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{xml_file}: {where}: missing field <{path}>")
    return child.text.strip()


def _xml_number(node: ET.Element, path: str, xml_file: str, where: str) -> float:
    text = _xml_field(node, path, xml_file, where)
    try:
        return float(text)
    except ValueError as e:
        raise ValueError(f"{xml_file}: {where}: field <{path}> is not a number: {text!r}") from e


def parse_voc_xml(xml_file: str, count_difficult: bool = False) -> Dict:
    """
    One VOC detection annotation file.

    Args:
        xml_file: path of ``Annotations/<id>.xml``.
        count_difficult: count objects marked ``<difficult>1</difficult>`` (else they become
            ``iscrowd=1`` annotations that no count includes).

    Returns:
        ``{"height", "width", "annotations": [{"bbox" (XYXY_ABS, continuous coordinates),
        "bbox_mode", "category_id", "point" (box centre), "iscrowd", "difficult"}],
        "class_counts": [int] * 20}``.
    """
    try:
        with PathManager.open(xml_file, "r") as f:
            tree = ET.parse(f)
    except OSError as e:
        raise ValueError(f"{xml_file}: cannot read the annotation file: {e}") from e
    except ET.ParseError as e:
        raise ValueError(f"{xml_file}: malformed XML: {e}") from e
    root = tree.getroot()
    size = root.find("size")
    if size is None:
        raise ValueError(f"{xml_file}: missing field <size>")
    width = int(_xml_number(size, "width", xml_file, "<size>"))
    height = int(_xml_number(size, "height", xml_file, "<size>"))
    if width <= 0 or height <= 0:
        raise ValueError(f"{xml_file}: <size> must be positive, got {width}x{height}")

    annotations = []
    counts = [0] * len(VOC_CLASSES)
    for i, obj in enumerate(root.findall("object")):
        where = f"object {i}"
        name = _xml_field(obj, "name", xml_file, where).lower()
        if name not in VOC_CLASSES:
            raise ValueError(f"{xml_file}: {where}: unknown class <name> {name!r}")
        difficult_node = obj.find("difficult")
        difficult = 0
        if difficult_node is not None and difficult_node.text and difficult_node.text.strip():
            difficult = int(_xml_number(obj, "difficult", xml_file, where))
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{xml_file}: {where}: missing field <bndbox>")
        x1, y1, x2, y2 = (
            _xml_number(box, k, xml_file, f"{where} <bndbox>")
            for k in ("xmin", "ymin", "xmax", "ymax")
        )
        if x2 < x1 or y2 < y1:
            raise ValueError(f"{xml_file}: {where}: <bndbox> has xmax < xmin or ymax < ymin")
        # VOC boxes are 1-based inclusive pixel indices; [x1 - 1, x2] is the continuous extent
        bbox = [x1 - 1.0, y1 - 1.0, x2, y2]
        category_id = VOC_CLASSES.index(name)
        ignored = bool(difficult) and not count_difficult
        if not ignored:
            counts[category_id] += 1
        annotations.append(
            {
                "bbox": bbox,
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": category_id,
                "point": [(bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0],
                "iscrowd": int(ignored),
                "difficult": int(difficult),
            }
        )
    return {"height": height, "width": width, "annotations": annotations, "class_counts": counts}


def load_voc_counting(dirname: str, image_set: str, count_difficult: bool = False) -> List[Dict]:
    """
    A VOC counting split: the images of ``ImageSets/<image_set>`` with counts from their XML.

    Args:
        dirname: the year directory, e.g. "datasets/VOC2007" (holding ``JPEGImages``,
            ``Annotations`` and ``ImageSets``).
        image_set: image set file under ``ImageSets``, e.g. "Main/test.txt".
        count_difficult: see :func:`parse_voc_xml`.

    Returns:
        list of dataset dicts ``{"file_name", "height", "width", "image_id" (the VOC id str),
        "annotations", "class_counts"}`` in image set order.
    """
    ids = read_image_set(os.path.join(dirname, "ImageSets", image_set))
    dicts = []
    for image_id in ids:
        record = parse_voc_xml(
            os.path.join(dirname, "Annotations", image_id + ".xml"), count_difficult
        )
        record["file_name"] = os.path.join(dirname, "JPEGImages", image_id + ".jpg")
        record["image_id"] = image_id
        dicts.append(record)
    logger.info(f"Loaded {len(dicts)} images from {dirname} ImageSets/{image_set}")
    return dicts


def read_index_png(path: str) -> np.ndarray:
    """
    A VOC segmentation PNG as its (H, W) uint8 palette indices.

    Raises:
        ValueError: missing / unreadable file, or a PNG that is not palette / grey (e.g. an RGB
            rendering of the colour map, whose indices are lost).
    """
    try:
        with PathManager.open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read the segmentation PNG: {e}") from e
    if img.mode not in ("P", "L"):
        raise ValueError(
            f"{path}: segmentation PNGs must be palette ('P') or grey ('L') images of class / "
            f"instance indices, got mode {img.mode!r}"
        )
    return np.asarray(img, dtype=np.uint8)


def instances_from_voc_pngs(
    object_png: np.ndarray, class_png: np.ndarray, where: str
) -> List[Dict]:
    """
    Instances of one image from its VOC ``SegmentationObject`` and ``SegmentationClass`` maps.

    Instance k is the set of pixels equal to k in ``object_png`` (0 = background and 255 = void /
    boundary are no instance); its class is the most frequent class (1..20) of those pixels in
    ``class_png`` (ties: the smaller class index).

    Args:
        object_png: (H, W) uint8 instance indices.
        class_png: (H, W) uint8 class indices (0 background, 1..20, 255 void).
        where: the file named in errors.

    Returns:
        list of annotations ``{"bbox" (XYXY_ABS), "bbox_mode", "category_id" (0..19),
        "segmentation" (RLE, str counts), "point", "iscrowd": 0, "instance_id"}`` by instance id.
    """
    if object_png.shape != class_png.shape:
        raise ValueError(
            f"{where}: SegmentationObject is {object_png.shape} but SegmentationClass is "
            f"{class_png.shape}"
        )
    annotations = []
    for k in np.unique(object_png):
        if k == 0 or k == VOC_VOID:
            continue
        mask = object_png == k
        classes = class_png[mask]
        classes = classes[(classes >= 1) & (classes <= len(VOC_CLASSES))]
        if classes.size == 0:
            raise ValueError(f"{where}: instance {k} has no pixel of an object class (1..20)")
        category_id = int(np.bincount(classes, minlength=len(VOC_CLASSES) + 1).argmax()) - 1
        rle = mask_to_rle(mask)
        x, y, w, h = mask_util.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
        px, py = point_in_mask(mask)
        annotations.append(
            {
                "bbox": [float(x), float(y), float(x + w), float(y + h)],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": category_id,
                "segmentation": rle,
                "point": [px + 0.5, py + 0.5],
                "iscrowd": 0,
                "instance_id": int(k),
            }
        )
    return annotations


def load_voc_instance_segmentation(dirname: str, image_set: str) -> List[Dict]:
    """
    A VOC 2012 instance-segmentation split from ``SegmentationObject`` + ``SegmentationClass``.

    Args:
        dirname: the year directory, e.g. "datasets/VOC2012".
        image_set: image set file under ``ImageSets``, e.g. "Segmentation/val.txt".

    Returns:
        list of dataset dicts ``{"file_name", "height", "width", "image_id", "annotations"
        (see :func:`instances_from_voc_pngs`), "class_counts"}``; image size from the PNGs.
    """
    ids = read_image_set(os.path.join(dirname, "ImageSets", image_set))
    dicts = []
    for image_id in ids:
        obj_file = os.path.join(dirname, "SegmentationObject", image_id + ".png")
        object_png = read_index_png(obj_file)
        class_png = read_index_png(os.path.join(dirname, "SegmentationClass", image_id + ".png"))
        annotations = instances_from_voc_pngs(object_png, class_png, obj_file)
        counts = [0] * len(VOC_CLASSES)
        for a in annotations:
            counts[a["category_id"]] += 1
        dicts.append(
            {
                "file_name": os.path.join(dirname, "JPEGImages", image_id + ".jpg"),
                "height": int(object_png.shape[0]),
                "width": int(object_png.shape[1]),
                "image_id": image_id,
                "annotations": annotations,
                "class_counts": counts,
            }
        )
    logger.info(f"Loaded {len(dicts)} images from {dirname} ImageSets/{image_set}")
    return dicts


def _year_dir(root: Optional[str], year_dir: str) -> str:
    return os.path.join(_datasets_root(root), year_dir)


def register_voc_counting(
    name: str,
    year_dir: str,
    image_set: str,
    root: Optional[str] = None,
    count_difficult: bool = False,
) -> None:
    """
    Register a VOC counting split (evaluator_type "counting").

    Args:
        name: dataset name.
        year_dir: e.g. "VOC2007", under ``root``.
        image_set: image set file under ``ImageSets``, e.g. "Main/test.txt".
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` (default "datasets") when the
            split is loaded.
        count_difficult: see :func:`parse_voc_xml`.
    """
    DatasetCatalog.register(
        name,
        lambda root=root, y=year_dir, s=image_set, d=count_difficult: load_voc_counting(
            _year_dir(root, y), s, d
        ),
    )
    MetadataCatalog.get(name).set(
        thing_classes=list(VOC_CLASSES),
        evaluator_type="counting",
        year=int(year_dir[-4:]) if year_dir[-4:].isdigit() else year_dir,
        image_set=image_set,
        count_difficult=count_difficult,
    )


def register_voc_instance_segmentation(
    name: str, year_dir: str, image_set: str, root: Optional[str] = None
) -> None:
    """
    Register a VOC instance-segmentation split (evaluator_type "wsis_instance").

    Args:
        name: dataset name.
        year_dir: e.g. "VOC2012", under ``root``.
        image_set: image set file under ``ImageSets``, e.g. "Segmentation/val.txt".
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` when the split is loaded.
    """
    DatasetCatalog.register(
        name,
        lambda root=root, y=year_dir, s=image_set: load_voc_instance_segmentation(
            _year_dir(root, y), s
        ),
    )
    MetadataCatalog.get(name).set(
        thing_classes=list(VOC_CLASSES),
        evaluator_type="wsis_instance",
        year=int(year_dir[-4:]) if year_dir[-4:].isdigit() else year_dir,
        image_set=image_set,
    )


def register_all_voc_counting(root: Optional[str] = None) -> None:
    """
    Register the predefined VOC splits (see ``datasets/README.md``).

    Args:
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` (default "datasets") each time a
            split is loaded rather than once now.
    """
    for name, (year_dir, image_set, count_difficult) in _PREDEFINED_SPLITS_VOC_COUNTING.items():
        register_voc_counting(name, year_dir, image_set, root, count_difficult)
    for name, (year_dir, image_set) in _PREDEFINED_SPLITS_VOC_INSTANCE.items():
        register_voc_instance_segmentation(name, year_dir, image_set, root)
