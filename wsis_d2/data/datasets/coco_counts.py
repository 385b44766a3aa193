"""
User datasets in COCO instance format, loaded into the dataset dicts shared by wsis_d2.

Every image dict carries ``"class_counts"`` (number of non-crowd instances per contiguous class,
or the image's ``"image_counts"`` when it has no annotations: count-only data)
and every annotation one ``"point"`` (the annotation's own ``"point"`` field when present, else the
centre of a pixel inside its mask, else its box centre), so that the same file serves image-level
(LC/ILC), point (density) and mask (Mask R-CNN) supervision. Masks are returned as compressed RLE
(counts as str).

Points are ``[x, y]`` in detectron2's continuous pixel coordinates (pixel ``j`` covers
``[j, j + 1)``, so its centre is ``j + 0.5``; index masks with ``int(y), int(x)``), which keeps them
right under detectron2's resize and flip transforms.

The whole file is validated first; a malformed file raises ``ValueError`` naming the file, the entry
and the field.
"""

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from ..image_labels import MAX_COUNT

logger = logging.getLogger(__name__)

__all__ = [
    "load_coco_counts_json",
    "register_coco_counts_instances",
    "mask_to_rle",
    "point_in_mask",
    "point_in_rle",
]


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
    """
    Args:
        mask: (H, W) bool or uint8 array.

    Returns:
        compressed COCO RLE ``{"size": [H, W], "counts": str}`` (json-serialisable).
    """
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def point_in_mask(mask: np.ndarray) -> Optional[Tuple[int, int]]:
    """
    One representative pixel of an instance: the pixel holding the mask's centroid when it belongs
    to the mask, else the mask pixel nearest to the centroid (non-convex or occluded shapes).

    Args:
        mask: (H, W) bool array.

    Returns:
        ``(x, y)`` integer pixel indices with ``mask[y, x]`` true, or None for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    # the centroid from row / column sums: exact integer moments, the same float as the mean of
    # the pixel indices without listing them (a fruit in a 12-MP photograph holds millions)
    rows = np.count_nonzero(mask, axis=1)
    n = int(rows.sum())
    if n == 0:
        return None
    cols = np.count_nonzero(mask, axis=0)
    cy = int(np.dot(rows, np.arange(len(rows), dtype=np.int64))) / n
    cx = int(np.dot(cols, np.arange(len(cols), dtype=np.int64))) / n
    iy, ix = int(cy), int(cx)  # the pixel [iy, iy+1) x [ix, ix+1) containing the centroid
    if mask[iy, ix]:
        return ix, iy
    # nearest mask pixel, searched in the mask's bounding box (row-major order: same tie-break)
    (y0, y1), (x0, x1) = np.flatnonzero(rows)[[0, -1]], np.flatnonzero(cols)[[0, -1]]
    ys, xs = np.nonzero(mask[y0 : y1 + 1, x0 : x1 + 1])
    k = int(np.argmin((ys + y0 - cy) ** 2 + (xs + x0 - cx) ** 2))
    return int(xs[k]) + x0, int(ys[k]) + y0


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)


def _is_number_list(values) -> bool:
    """A list of :func:`_is_number` values; json's plain ints and floats checked at once."""
    if not isinstance(values, list):
        return False
    types = set(map(type, values))
    if types <= {int, float}:  # what json.load gives: one vectorised finiteness test
        return float not in types or bool(np.isfinite(np.asarray(values, np.float64)).all())
    return all(_is_number(v) for v in values)


class _Checker:
    """Builds ValueErrors that name the json file, the entry and the field."""

    def __init__(self, json_file: str):
        self.json_file = json_file

    def fail(self, where: str, msg: str):
        raise ValueError(f"{self.json_file}: {where}: {msg}")

    def field(self, entry: dict, key: str, where: str, check, expected: str):
        if key not in entry:
            self.fail(where, f"missing field {key!r}")
        value = entry[key]
        if not check(value):
            self.fail(where, f"field {key!r} must be {expected}, got {value!r:.80}")
        return value


def _segmentation_to_rle(segm, height: int, width: int, chk: _Checker, where: str) -> dict:
    """Polygons / uncompressed RLE / compressed RLE -> compressed RLE with str counts."""
    if isinstance(segm, list):
        if not all(map(_is_number_list, segm)):
            chk.fail(
                where,
                "field 'segmentation' is a list but not a list of polygons " "(lists of numbers)",
            )
        # like detectron2, ignore malformed pieces (an odd number of coordinates or < 3 points)
        # but not a wholly malformed mask
        polygons = [[float(v) for v in p] for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            chk.fail(
                where,
                "field 'segmentation' has no polygon with at least 3 points and an even number "
                "of coordinates",
            )
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict):
        size = segm.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size))):
            chk.fail(where, f"field 'segmentation.size' must be [height, width], got {size!r}")
        if list(size) != [height, width]:
            chk.fail(
                where,
                f"field 'segmentation.size' {list(size)} differs from the image size "
                f"[{height}, {width}]",
            )
        counts = segm.get("counts")
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                chk.fail(
                    where,
                    "field 'segmentation.counts' (uncompressed RLE) must be "
                    "non-negative ints summing to height * width",
                )
            rle = mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, (str, bytes)):
            encoded = counts.encode("utf-8") if isinstance(counts, str) else bytes(counts)
            # a non-ASCII byte is outside "0".."o"
            if _sized_rle_runs(encoded, height, width) is None:
                chk.fail(
                    where,
                    "field 'segmentation.counts' (compressed RLE) is not a valid encoding of "
                    f"non-negative runs summing to height * width = {height * width}",
                )
            rle = {"size": [height, width], "counts": encoded}
        else:
            chk.fail(
                where,
                "field 'segmentation.counts' must be a str (compressed RLE) or a "
                f"list of ints (uncompressed RLE), got {type(counts).__name__}",
            )
    else:
        chk.fail(
            where,
            "field 'segmentation' of unknown type "
            f"{type(segm).__name__} (expected polygons or an RLE dict)",
        )
    counts = rle["counts"]
    return {
        "size": [height, width],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


# a run of this many pixels or more is beyond any image (and int64 sums of such runs could wrap)
_MAX_RUN = 1 << 62


def _compressed_rle_runs_exact(counts: bytes) -> Optional[List[int]]:
    """
    The definition of :func:`_compressed_rle_runs`, one character at a time in Python ints: the
    decoder of the strings the vectorised one leaves (values of more than 12 characters, sums
    that could leave int64), and its reference in the tests.
    """
    runs: List[int] = []
    value, shift = 0, 0
    for ch in counts:
        c = ch - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift  # sign extension of the last 5-bit group
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value, shift = 0, 0
    return runs if shift == 0 else None


def _compressed_rle_runs(counts: bytes) -> Optional[np.ndarray]:
    """
    The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``: 5 bits per
    character from "0" on, bit 0x20 = more characters follow, the last one sign-extended, and
    runs from the fourth on stored as the difference to the run two before), or None when the
    string is malformed (a character outside "0".."o", a truncated value, a negative run, a run of
    2^62 pixels or more): pycocotools itself decodes such a string without complaint, into
    undefined memory.

    Returns:
        (R,) int64 runs, background first; vectorised (a COCO split holds ~10^6 masks).
    """
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ((c < 0) | (c >= 64)).any():
        return None
    last = (c & 0x20) == 0  # the last character of a value
    if not last[-1]:
        return None
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() <= 12:  # at most 60 bits: int64 holds each value
        pos = np.arange(c.size) - np.repeat(starts, lengths)  # 5-bit group within its value
        values = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
        values -= np.where(c[ends] & 0x10, np.int64(1) << (5 * lengths), 0)  # sign extension
        if int(np.abs(values).max()) * values.size < _MAX_RUN:  # no partial sum can wrap
            runs = values.copy()
            # run i >= 3 is stored as the difference to run i - 2: sums of odd and even runs
            runs[1::2] = np.cumsum(values[1::2])
            runs[2::2] = np.cumsum(values[2::2])
            return None if (runs < 0).any() else runs
    exact = _compressed_rle_runs_exact(counts)  # padded or huge values: Python ints
    if exact is None or max(exact) >= _MAX_RUN:
        return None
    return np.asarray(exact, dtype=np.int64)


def _sized_rle_runs(counts: bytes, height: int, width: int) -> Optional[np.ndarray]:
    """The runs of a compressed RLE of a ``height`` x ``width`` mask, or None when malformed or
    of another size (summed in Python ints: no int64 wrap)."""
    runs = _compressed_rle_runs(counts)
    return runs if runs is not None and sum(runs.tolist()) == height * width else None


def point_in_rle(rle: dict) -> Optional[Tuple[int, int]]:
    """
    :func:`point_in_mask` of a compressed RLE's mask, from its runs without decoding the image:
    the exact integer moments of each foreground run (a COCO split holds ~10^6 masks, decoding
    each to its full image cost most of the loading time).

    Args:
        rle: a compressed RLE ``{"size": [H, W], "counts": bytes or str}`` (pycocotools' or
            :func:`mask_to_rle`'s).

    Returns:
        ``(x, y)`` integer pixel indices inside the mask, or None for an empty mask.
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("utf-8")  # a non-ASCII character is then outside "0".."o"
    if not isinstance(counts, bytes):
        raise ValueError(
            f"point_in_rle: 'counts' must be a compressed RLE (bytes or str), got "
            f"{type(counts).__name__}"
        )
    runs = _sized_rle_runs(counts, height, width)
    if runs is None:
        raise ValueError(
            f"point_in_rle: 'counts' is not a compressed RLE of a {height} x {width} mask"
        )
    rle = {"size": [height, width], "counts": counts}
    ends = np.cumsum(runs)
    fg_end, fg_len = ends[1::2], runs[1::2]  # foreground runs: odd positions, column-major
    fg_start = fg_end - fg_len
    n = int(fg_len.sum())
    if n == 0:
        return None

    def below(k):  # sum of floor(i / H) over the flat indices i < k: the column index's sum
        q, r = np.divmod(k, height)
        return height * q * (q - 1) // 2 + q * r

    sum_col = int((below(fg_end) - below(fg_start)).sum())
    sum_index = int(((fg_end * (fg_end - 1) - fg_start * (fg_start - 1)) // 2).sum())
    sum_row = sum_index - height * sum_col  # i = H * column + row
    cy, cx = sum_row / n, sum_col / n  # as point_in_mask: exact integers, one rounding
    iy, ix = int(cy), int(cx)
    # the run holding flat index ix * H + iy is foreground when its position is odd
    if int(np.searchsorted(ends, ix * height + iy, side="right")) % 2 == 1:
        return ix, iy
    # rare (a ring, a crescent): the nearest-pixel search on the decoded mask
    return point_in_mask(mask_util.decode(rle).astype(bool))


def _parse_categories(data: dict, chk: _Checker) -> Tuple[List[int], List[str]]:
    cats = data["categories"]
    if not isinstance(cats, list) or not cats:
        chk.fail("'categories'", "must be a non-empty list")
    seen = {}
    for i, cat in enumerate(cats):
        where = f"categories[{i}]"
        if not isinstance(cat, dict):
            chk.fail(where, "must be a dict")
        cid = chk.field(cat, "id", where, _is_int, "an int")
        name = chk.field(cat, "name", where, lambda v: isinstance(v, str), "a str")
        if cid in seen:
            chk.fail(where, f"duplicate category id {cid}")
        seen[cid] = name
    ids = sorted(seen)
    return ids, [seen[c] for c in ids]


def _parse_images(data: dict, chk: _Checker) -> Dict[Any, dict]:
    imgs = data["images"]
    if not isinstance(imgs, list):
        chk.fail("'images'", "must be a list")
    out = {}
    for i, img in enumerate(imgs):
        where = f"images[{i}]"
        if not isinstance(img, dict):
            chk.fail(where, "must be a dict")
        iid = chk.field(
            img, "id", where, lambda v: _is_int(v) or isinstance(v, str), "an int or a str"
        )
        where = f"images[{i}] (id={iid!r})"
        chk.field(img, "file_name", where, lambda v: isinstance(v, str) and v, "a non-empty str")
        for key in ("height", "width"):
            size = chk.field(
                img, key, where, lambda v: _is_number(v) and v > 0 and v == int(v),
                "a positive whole number",
            )
            if not _is_int(size):  # 480.0, as some exporters write: detectron2 takes it too
                img = {**img, key: int(size)}
        if iid in out:
            chk.fail(where, f"duplicate image id {iid!r}")
        out[iid] = img
    return out


def _parse_annotation(
    ann, i: int, images: Dict[Any, dict], cat_to_contiguous: Dict[int, int], chk: _Checker
) -> Tuple[Any, dict]:
    """Validate one json annotation; return (image_id, annotation dict of the shared convention)."""
    where = f"annotations[{i}]"
    if not isinstance(ann, dict):
        chk.fail(where, "must be a dict")
    if "id" in ann:
        where = f"annotations[{i}] (id={ann['id']!r})"
    image_id = chk.field(
        ann, "image_id", where, lambda v: _is_int(v) or isinstance(v, str), "an int or a str"
    )
    if image_id not in images:
        chk.fail(where, f"field 'image_id' refers to unknown image id {image_id!r}")
    cat_id = chk.field(ann, "category_id", where, _is_int, "an int")
    if cat_id not in cat_to_contiguous:
        chk.fail(where, f"field 'category_id' refers to unknown category id {cat_id}")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or isinstance(iscrowd, float):
        chk.fail(where, f"field 'iscrowd' must be 0 or 1, got {iscrowd!r}")
    height, width = images[image_id]["height"], images[image_id]["width"]

    if not any(k in ann for k in ("bbox", "segmentation", "point")):
        chk.fail(where, "needs at least one of the fields 'bbox', 'segmentation', 'point'")
    out = {"category_id": cat_to_contiguous[cat_id], "iscrowd": int(iscrowd)}

    rle = None  # bytes counts, for pycocotools
    if "segmentation" in ann and ann["segmentation"] != []:  # [] next to a box: box-only export
        out["segmentation"] = _segmentation_to_rle(ann["segmentation"], height, width, chk, where)
        rle = _bytes_rle(out["segmentation"])
    if "bbox" in ann:
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            n = len(bbox) if isinstance(bbox, (list, tuple)) else type(bbox).__name__
            chk.fail(where, f"field 'bbox' must be [x, y, w, h] (4 numbers), got {n}")
        if not all(_is_number(v) for v in bbox):
            chk.fail(where, f"field 'bbox' must hold finite numbers, got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            chk.fail(where, f"field 'bbox' has a negative width or height: {bbox!r}")
        xywh = [float(v) for v in bbox]
    elif rle is not None and mask_util.area(rle) > 0:  # toBbox: zeros when empty
        xywh = [float(v) for v in mask_util.toBbox(rle)]
    else:
        xywh = None
    if xywh is not None:
        # BoxMode.convert's arithmetic (float32, as it converts a list) without its tensors
        x, y, w, h = np.asarray(xywh, dtype=np.float32)
        out["bbox"] = [float(x), float(y), float(x + w), float(y + h)]
        out["bbox_mode"] = BoxMode.XYXY_ABS

    if "point" in ann:
        point = ann["point"]
        if not (
            isinstance(point, (list, tuple))
            and len(point) == 2
            and all(_is_number(v) for v in point)
        ):
            chk.fail(where, f"field 'point' must be [x, y] (2 numbers), got {point!r:.80}")
        if not (0 <= point[0] <= width and 0 <= point[1] <= height):
            chk.fail(where, f"field 'point' {list(point)} lies outside the {width}x{height} image")
        out["point"] = [float(point[0]), float(point[1])]
    else:
        xy = None
        if rle is not None:
            xy = point_in_rle(rle)
            if xy is not None:  # centre of that pixel, continuous coordinates
                xy = (xy[0] + 0.5, xy[1] + 0.5)
        if xy is None and xywh is not None:
            x, y, w, h = xywh
            xy = (min(max(x + w / 2, 0.0), width - 1.0), min(max(y + h / 2, 0.0), height - 1.0))
        if xy is None:
            chk.fail(where, "cannot derive a 'point': the mask is empty and there is no 'bbox'")
        out["point"] = [float(xy[0]), float(xy[1])]
    return image_id, out


def _image_counts(
    raw, counts: List[int], anns: List[dict], cat_to_contiguous: Dict[int, int], chk, where: str
) -> List[int]:
    """
    The per-class counts of an image's ``"image_counts"`` ({category id: count}, ids as ints or
    as the strings json keys are; absent classes count 0).

    An image without annotations takes them as they are (count-only data: LC's supervision); an
    image with annotations must hold exactly that many non-crowd instances of each class.
    """
    if not isinstance(raw, dict):
        chk.fail(
            where, f"field 'image_counts' must be an object {{category id: count}}, got {raw!r:.80}"
        )
    given = [0] * len(counts)
    for key, value in raw.items():
        cat = key if _is_int(key) else None
        if isinstance(key, str) and key.isdigit() and str(int(key)) == key:  # "7", not "07"
            cat = int(key)
        if cat is None:
            chk.fail(where, f"field 'image_counts' has key {key!r}, expected a category id")
        if cat not in cat_to_contiguous:
            chk.fail(where, f"field 'image_counts' holds unknown category id {cat}")
        if not (_is_number(value) and 0 <= value <= MAX_COUNT and value == int(value)):
            chk.fail(
                where,
                f"field 'image_counts' of category {cat} must be a count in 0..{MAX_COUNT}, got "
                f"{value!r:.80}",
            )
        given[cat_to_contiguous[cat]] = int(value)
    if anns:
        contiguous_to_cat = {c: k for k, c in cat_to_contiguous.items()}
        for c, (n_given, n_annotated) in enumerate(zip(given, counts)):
            if n_given != n_annotated:
                chk.fail(
                    where,
                    f"field 'image_counts' gives {n_given} for category {contiguous_to_cat[c]} but "
                    f"the image's annotations hold {n_annotated} non-crowd instances of it (an "
                    "image with annotations must have all its counted objects annotated)",
                )
    return given


def _bytes_rle(rle: dict) -> dict:
    counts = rle["counts"]
    return {
        "size": rle["size"],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def load_coco_counts_json(
    json_file: str, image_root: str, dataset_name: Optional[str] = None
) -> List[dict]:
    """
    Load a COCO-format instance json into the dataset dicts shared by wsis_d2.

    Args:
        json_file: path of the COCO json ("images", "annotations", "categories"; annotations may
            carry an extra "point": [x, y] in pixel coordinates; an image may carry
            "image_labels": [category id, ...], classes present without any annotation: image-level
            labels for CCGR and the image-level classifier, which read nothing else of it; and
            "image_counts": {category id: count}, the counts of an image without annotations,
            e.g. count-only training images for LC).
        image_root: directory that the images' "file_name" are relative to.
        dataset_name: when given, sets ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``
            in the dataset's metadata.

    Returns:
        list of dicts ``{"file_name", "height", "width", "image_id", "class_counts": [int] * C,
        "annotations": [{"bbox" (XYXY_ABS), "bbox_mode", "category_id" in 0..C-1,
        "segmentation" (RLE, counts str), "point": [x, y], "iscrowd"}]}``, one per image in file
        order, images without annotations included. Category ids are made contiguous in the order
        of the json ids. Crowd annotations are kept (``iscrowd=1``) but not counted; an image's
        "image_counts" give its ``class_counts`` (with annotations they must agree). Annotations
        with neither "bbox" nor "segmentation" (point-only data) have neither key. An image with
        "image_labels" gets ``"image_labels"``: their contiguous ids (see
        :func:`wsis_d2.data.image_labels.image_labels_of`).
    """
    chk = _Checker(json_file)
    data = _load_json(json_file)
    if not isinstance(data, dict):
        chk.fail("top level", f"must be a json object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            chk.fail("top level", f"missing field {key!r}")
    if not isinstance(data["annotations"], list):
        chk.fail("'annotations'", "must be a list")

    cat_ids, thing_classes = _parse_categories(data, chk)
    cat_to_contiguous = {c: i for i, c in enumerate(cat_ids)}
    images = _parse_images(data, chk)

    per_image: Dict[Any, List[dict]] = {iid: [] for iid in images}
    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        image_id, out = _parse_annotation(ann, i, images, cat_to_contiguous, chk)
        if "id" in ann:
            if ann["id"] in ann_ids:
                chk.fail(f"annotations[{i}]", f"duplicate annotation id {ann['id']!r}")
            ann_ids.add(ann["id"])
        per_image[image_id].append(out)

    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        meta.thing_classes = thing_classes
        meta.thing_dataset_id_to_contiguous_id = cat_to_contiguous

    num_classes = len(cat_ids)
    dataset_dicts = []
    for position, (iid, img) in enumerate(images.items()):
        where = f"images[{position}] (id={iid!r})"
        anns = per_image[iid]
        counts = [0] * num_classes
        for a in anns:
            if not a["iscrowd"]:
                counts[a["category_id"]] += 1
        if "image_counts" in img:
            counts = _image_counts(img["image_counts"], counts, anns, cat_to_contiguous, chk, where)
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": img["height"],
            "width": img["width"],
            "image_id": iid,
            "annotations": anns,
            "class_counts": counts,
        }
        if "image_labels" in img:
            labels = img["image_labels"]
            if not isinstance(labels, list) or not all(_is_int(c) for c in labels):
                chk.fail(
                    where,
                    f"field 'image_labels' must be a list of category ids, got {labels!r:.80}",
                )
            unknown = [c for c in labels if c not in cat_to_contiguous]
            if unknown:
                chk.fail(where, f"field 'image_labels' holds unknown category ids {unknown}")
            record["image_labels"] = sorted({cat_to_contiguous[c] for c in labels})
            # a labelled class absent from image_counts is present but uncounted; counted 0, wrong
            given = img.get("image_counts") or {}
            zero = [c for c in labels if given.get(str(c), given.get(c)) == 0]
            if zero:
                chk.fail(
                    where, f"'image_labels' names categories {zero} that 'image_counts' count 0"
                )
        dataset_dicts.append(record)
    logger.info(
        f"Loaded {len(dataset_dicts)} images and {len(data['annotations'])} annotations "
        f"({num_classes} classes) from {json_file}"
    )
    return dataset_dicts


def register_coco_counts_instances(
    name: str, metadata: Dict[str, Any], json_file: str, image_root: str
) -> None:
    """
    Register a COCO-format user dataset (see :func:`load_coco_counts_json`) under ``name``.
    When ``json_file`` exists, its categories fill ``thing_classes`` and
    ``thing_dataset_id_to_contiguous_id`` now (the json is read once), so that tools and
    evaluators that read the metadata before loading the split find them; otherwise loading the
    split fills them.

    Args:
        name: dataset name, e.g. "my_cells_train".
        metadata: extra metadata; ``evaluator_type`` defaults to "wsis_instance".
        json_file: path of the COCO json.
        image_root: directory holding the images.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty str, got {name!r}")
    DatasetCatalog.register(
        name,
        lambda json_file=json_file, image_root=image_root, name=name: load_coco_counts_json(
            json_file, image_root, name
        ),
    )
    MetadataCatalog.get(name).set(
        **{"evaluator_type": "wsis_instance", **metadata},
        json_file=json_file,
        image_root=image_root,
    )
    if PathManager.isfile(json_file):
        cat_ids, thing_classes = _read_categories(json_file)
        given = metadata.get("thing_classes")
        if given is not None and list(given) != thing_classes:
            raise ValueError(
                f"dataset {name!r}: metadata 'thing_classes' {list(given)} differ from the "
                f"categories of {json_file}: {thing_classes}"
            )
        MetadataCatalog.get(name).set(
            thing_classes=thing_classes,
            thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(cat_ids)},
        )


def _load_json(json_file: str):
    """The parsed json file (ValueError naming the file when it is not valid json)."""
    with PathManager.open(json_file, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file}: not a valid json file: {e}") from e


def _read_categories(json_file: str) -> Tuple[List[int], List[str]]:
    """The sorted category ids and their names of a COCO json (ValueError naming the file)."""
    chk = _Checker(json_file)
    data = _load_json(json_file)
    if not isinstance(data, dict) or "categories" not in data:
        chk.fail("top level", "missing field 'categories'")
    return _parse_categories(data, chk)
