"""
Point-annotated counting datasets in their published layouts, as detectron2 dataset dicts.

Every loader returns a list of dicts::

    {"file_name": str, "height": int, "width": int, "image_id": str | int,
     "points": float32 ndarray (P, 2) of (x, y) in continuous pixel coordinates (pixel j covers
               [j, j + 1), so the centre of pixel (row r, col c) is (c + 0.5, r + 0.5)),
     "point_classes": int64 ndarray (P,) in 0..C-1,
     "roi": optional, path of a mask file (.png / .npy / .mat with roi.mask) or a bool (H, W) array}

Defined behaviour for bad input (documented in datasets/README.md):

- a point outside ``[0, width] x [0, height]`` is dropped, with one warning per annotation file;
- an image without points is kept, with ``points`` of shape (0, 2) (count 0);
- an image or annotation file that is missing or unreadable raises ``ValueError`` naming it;
- with a region of interest (UCSD), points outside the ROI are dropped (in-ROI counting protocol).

Builtin splits are registered by :func:`register_all_density` (synthetic cells, VGG cells, UCSD,
Mall) with ``evaluator_type="density"``.
"""

import csv
import functools
import json
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from detectron2.data import DatasetCatalog, MetadataCatalog

from .cells import prepare_synthetic_cells

logger = logging.getLogger(__name__)

__all__ = [
    "load_vgg_cells",
    "vgg_cells_draw",
    "load_ucsd",
    "load_mall",
    "load_point_json",
    "load_point_csv",
    "load_synthetic_cells",
    "load_roi_mask",
    "register_point_dataset",
    "register_all_density",
]


# ---------------------------------------------------------------------------------------------
# helpers


def _image_size(file_name: str):
    """(height, width) read from the image header; ValueError naming the file if unreadable."""
    if not os.path.isfile(file_name):
        raise ValueError(f"Image file {file_name} does not exist")
    try:
        with Image.open(file_name) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"Cannot read image {file_name}: {e}") from e
    return height, width


def _load_mat(file_name: str) -> Dict:
    if not os.path.isfile(file_name):
        raise ValueError(f"Annotation file {file_name} does not exist")
    try:
        return scipy.io.loadmat(file_name)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"Cannot read MATLAB file {file_name}: {e}") from e


def _inside(points: np.ndarray, height: int, width: int, roi: Optional[np.ndarray] = None):
    """Bool mask (P,) of points inside the image (borders included) and, if given, the ROI."""
    keep = (
        (points[:, 0] >= 0)
        & (points[:, 0] <= width)
        & (points[:, 1] >= 0)
        & (points[:, 1] <= height)
    )
    if roi is not None and len(points):
        col = np.clip(np.floor(points[:, 0]).astype(np.int64), 0, width - 1)
        row = np.clip(np.floor(points[:, 1]).astype(np.int64), 0, height - 1)
        keep &= roi[row, col]
    return keep


def _make_record(
    file_name: str,
    image_id,
    points,
    height: int,
    width: int,
    classes=None,
    source: str = "",
    dropped: Optional[List[int]] = None,
    roi=None,
    roi_mask: Optional[np.ndarray] = None,
) -> Dict:
    """
    Build one dataset dict, dropping points outside the image (and outside ``roi_mask``).

    Args:
        points: (P, 2) x, y. classes: (P,) ints or None (all 0).
        source: the annotation file, named in errors.
        dropped: a one-element list counting dropped points (for one warning per file).
        roi: what to store under "roi" (a path or an array); roi_mask: the bool (H, W) mask.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.size == 0:
        points = np.zeros((0, 2))
    if points.ndim != 2 or points.shape[1] < 2:
        raise ValueError(f"{source}: points of image {image_id} must be (P, 2) x, y")
    points = points[:, :2]
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{source}: non-finite point coordinates for image {image_id}")
    classes = (
        np.zeros(len(points), dtype=np.int64)
        if classes is None
        else np.asarray(classes, dtype=np.int64).reshape(-1)
    )
    if len(classes) != len(points):
        raise ValueError(f"{source}: {len(points)} points but {len(classes)} classes")
    keep = _inside(points, height, width)
    outside = int((~keep).sum())
    if roi_mask is not None:
        keep &= _inside(points, height, width, roi_mask)
    if dropped is not None:
        dropped[0] += outside
    record = {
        "file_name": file_name,
        "height": int(height),
        "width": int(width),
        "image_id": image_id,
        "points": points[keep].astype(np.float32),
        "point_classes": classes[keep],
    }
    if roi is not None:
        record["roi"] = roi
    return record


def _warn_dropped(dropped: List[int], source: str):
    if dropped[0]:
        logger.warning(f"{source}: dropped {dropped[0]} point(s) outside their image")


@functools.lru_cache(maxsize=16)
def _load_roi_cached(file_name: str) -> np.ndarray:
    ext = os.path.splitext(file_name)[1].lower()
    if ext == ".npy":
        if not os.path.isfile(file_name):
            raise ValueError(f"ROI file {file_name} does not exist")
        mask = np.load(file_name)
    elif ext == ".mat":
        mat = _load_mat(file_name)
        if "roi" not in mat:
            raise ValueError(f"ROI file {file_name} has no variable 'roi'")
        roi = mat["roi"]
        if roi.dtype.names is None or "mask" not in roi.dtype.names:
            raise ValueError(f"ROI file {file_name}: 'roi' has no field 'mask'")
        mask = roi["mask"].flat[0]
    else:
        _image_size(file_name)  # existence / readability check with a clear error
        mask = np.asarray(Image.open(file_name).convert("L"))
    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"ROI file {file_name}: mask must be 2-D, got shape {mask.shape}")
    return mask


def load_roi_mask(roi) -> np.ndarray:
    """
    Read a region of interest.

    Args:
        roi: a bool/0-1 array (H, W), or a file: ``.png`` (nonzero = inside), ``.npy``, or a MATLAB
            ``.mat`` holding a struct ``roi`` with a field ``mask`` (UCSD / Mall layout).

    Returns:
        bool ndarray (H, W). Files are cached (read once per process).
    """
    if isinstance(roi, np.ndarray):
        return roi.astype(bool)
    return _load_roi_cached(os.fspath(roi))


def _frames_loc(mat: Dict, file_name: str) -> List[np.ndarray]:
    """The ``frame{i}.loc`` arrays of a UCSD / Mall annotation file, as a list of (P, k) arrays."""
    if "frame" not in mat:
        raise ValueError(f"{file_name} has no variable 'frame'")
    frames = mat["frame"].reshape(-1)
    locs = []
    for i, frame in enumerate(frames):
        # each cell holds a 1x1 struct with a field "loc" (P x 2 or P x 3, 1-based x, y)
        rec = frame.flat[0] if frame.dtype == object else frame
        names = rec.dtype.names
        if names is None or "loc" not in names:
            raise ValueError(f"{file_name}: frame{{{i + 1}}} has no field 'loc'")
        loc = np.asarray(rec["loc"].flat[0] if rec["loc"].dtype == object else rec["loc"])
        loc = loc.astype(np.float64).reshape(-1, loc.shape[-1] if loc.size else 2)
        locs.append(loc)
    return locs


def _matlab_to_pixel(loc: np.ndarray) -> np.ndarray:
    """MATLAB's 1-based pixel-centre coordinates to continuous ones (centre of pixel 0 is 0.5)."""
    if loc.shape[1] < 2:
        raise ValueError(f"loc must have at least 2 columns, got shape {loc.shape}")
    return loc[:, :2] - 0.5


# ---------------------------------------------------------------------------------------------
# VGG cells


def load_vgg_cells(dirname: str, indices: Optional[Sequence[int]] = None) -> List[Dict]:
    """
    VGG synthetic cells (Lempitsky & Zisserman 2010): ``NNNcell.png`` and ``NNNdots.png`` where each
    red pixel (R >= 128 and R > G, B) of the dots image marks one cell (point at the pixel centre).

    Args:
        dirname: the folder holding the 200 image pairs.
        indices: the NNN numbers to load (default: all found, sorted).

    Returns:
        dataset dicts (see the module docstring).
    """
    pattern = re.compile(r"^(\d+)cell\.png$")
    found = {}
    if os.path.isdir(dirname):
        for name in os.listdir(dirname):
            m = pattern.match(name)
            if m:
                found[int(m.group(1))] = m.group(1)
    if not found:
        raise ValueError(f"No NNNcell.png images in {dirname}")
    if indices is None:
        indices = sorted(found)
    records = []
    for idx in indices:
        if idx not in found:
            raise ValueError(f"{dirname}: image {idx:03d}cell.png is missing")
        stem = found[idx]
        file_name = os.path.join(dirname, f"{stem}cell.png")
        dots_file = os.path.join(dirname, f"{stem}dots.png")
        height, width = _image_size(file_name)
        _image_size(dots_file)
        dots = np.asarray(Image.open(dots_file).convert("RGB")).astype(np.int32)
        if dots.shape[:2] != (height, width):
            raise ValueError(
                f"{dots_file} has size {dots.shape[:2]} but {file_name} has {(height, width)}"
            )
        red = (dots[..., 0] >= 128) & (dots[..., 0] > dots[..., 1]) & (dots[..., 0] > dots[..., 2])
        rows, cols = np.nonzero(red)
        points = np.stack([cols + 0.5, rows + 0.5], axis=1) if len(rows) else np.zeros((0, 2))
        records.append(_make_record(file_name, stem, points, height, width, source=dots_file))
    return records


VGG_CELLS_POOL = range(1, 101)
VGG_CELLS_TEST = range(101, 201)


def vgg_cells_draw(num_train: int, draw: int) -> List[int]:
    """
    The VGG-cells protocol's training images of one random draw: ``num_train`` of the pool images
    1–100 (the test set is 101–200), drawn without replacement by a generator seeded with ``draw``
    (the same on every machine), sorted.

    Args:
        num_train: N, 1..100. draw: the draw's index (>= 0), its seed.

    Returns:
        the N image numbers (NNN of ``NNNcell.png``).
    """
    if not 1 <= num_train <= len(VGG_CELLS_POOL):
        raise ValueError(f"num_train must be in [1, {len(VGG_CELLS_POOL)}], got {num_train}")
    if draw < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    rng = np.random.RandomState(draw)
    chosen = rng.choice(np.asarray(VGG_CELLS_POOL), size=num_train, replace=False)
    return sorted(int(i) for i in chosen)


# ---------------------------------------------------------------------------------------------
# UCSD pedestrians

UCSD_FRAMES_PER_VIDEO = 200
UCSD_NUM_VIDEOS = 10
# the standard protocol (Chan et al., CVPR 2008): frames 600-1399 train, the other 1200 test
UCSD_TRAIN_FRAMES = range(600, 1400)


def load_ucsd(root: str, split: str = "train", use_roi: bool = True) -> List[Dict]:
    """
    UCSD pedestrians (vidf1_33). Layout of ``root`` (the two archives unpacked side by side)::

        ucsdpeds/vidf/vidf1_33_00N.y/vidf1_33_00N_fFFF.png   N = 0..9, FFF = 001..200
        vidf-cvpr/vidf1_33_00N_frame_full.mat               frame{FFF}.loc = [x y (z)], 1-based
        vidf-cvpr/vidf1_33_roi_mainwalkway.mat              roi.mask

    Args:
        root: the folder described above.
        split: "train" (frames 600-1399 of the 2000), "test" (the other 1200) or "all".
        use_roi: attach the walkway ROI (``"roi"`` = the .mat path) and drop points outside it.

    Returns:
        dataset dicts; ``image_id`` is the global frame index 0..1999.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"UCSD split must be train/test/all, got {split!r}")
    ann_dir = os.path.join(root, "vidf-cvpr")
    roi_file = os.path.join(ann_dir, "vidf1_33_roi_mainwalkway.mat")
    roi_mask = load_roi_mask(roi_file) if use_roi else None
    records = []
    for video in range(UCSD_NUM_VIDEOS):
        first = video * UCSD_FRAMES_PER_VIDEO
        wanted = [
            f
            for f in range(UCSD_FRAMES_PER_VIDEO)
            if split == "all" or ((first + f in UCSD_TRAIN_FRAMES) == (split == "train"))
        ]
        if not wanted:
            continue
        name = f"vidf1_33_{video:03d}"
        ann_file = os.path.join(ann_dir, f"{name}_frame_full.mat")
        locs = _frames_loc(_load_mat(ann_file), ann_file)
        if len(locs) < UCSD_FRAMES_PER_VIDEO:
            raise ValueError(f"{ann_file}: {len(locs)} frames, expected {UCSD_FRAMES_PER_VIDEO}")
        dropped = [0]
        for f in wanted:
            file_name = os.path.join(
                root, "ucsdpeds", "vidf", f"{name}.y", f"{name}_f{f + 1:03d}.png"
            )
            height, width = _image_size(file_name)
            if roi_mask is not None and roi_mask.shape != (height, width):
                raise ValueError(f"{roi_file}: ROI shape {roi_mask.shape} != frame {file_name}")
            records.append(
                _make_record(
                    file_name,
                    first + f,
                    _matlab_to_pixel(locs[f]),
                    height,
                    width,
                    source=ann_file,
                    dropped=dropped,
                    roi=roi_file if use_roi else None,
                    roi_mask=roi_mask,
                )
            )
        _warn_dropped(dropped, ann_file)
    return records


# ---------------------------------------------------------------------------------------------
# Mall

MALL_NUM_FRAMES = 2000
MALL_NUM_TRAIN = (
    800  # the standard protocol (Chen et al., BMVC 2012): first 800 train, last 1200 test
)


def load_mall(root: str, split: str = "train", use_roi: bool = False) -> List[Dict]:
    """
    Mall dataset. Layout of ``root`` (the archive unpacked)::

        mall_dataset/frames/seq_NNNNNN.jpg     NNNNNN = 000001..002000
        mall_dataset/mall_gt.mat               frame{i}.loc = [x y], 1-based; count (2000 x 1)
        mall_dataset/perspective_roi.mat       roi.mask (optional, used with use_roi)

    Args:
        split: "train" (first 800 frames), "test" (last 1200) or "all".
        use_roi: attach ``perspective_roi.mat``'s mask and drop points outside it.

    Returns:
        dataset dicts; ``image_id`` is the frame index 0..1999. Where ``count`` disagrees with the
        number of points, the points win (one warning).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"Mall split must be train/test/all, got {split!r}")
    base = os.path.join(root, "mall_dataset")
    gt_file = os.path.join(base, "mall_gt.mat")
    mat = _load_mat(gt_file)
    locs = _frames_loc(mat, gt_file)
    counts = np.asarray(mat["count"]).reshape(-1) if "count" in mat else None
    roi_file = os.path.join(base, "perspective_roi.mat")
    roi_mask = load_roi_mask(roi_file) if use_roi else None
    frames = {
        "train": range(min(MALL_NUM_TRAIN, len(locs))),
        "test": range(MALL_NUM_TRAIN, len(locs)),
        "all": range(len(locs)),
    }[split]
    records, dropped, mismatched = [], [0], 0
    for i in frames:
        file_name = os.path.join(base, "frames", f"seq_{i + 1:06d}.jpg")
        height, width = _image_size(file_name)
        if counts is not None and i < len(counts) and int(counts[i]) != len(locs[i]):
            mismatched += 1
        records.append(
            _make_record(
                file_name,
                i,
                _matlab_to_pixel(locs[i]),
                height,
                width,
                source=gt_file,
                dropped=dropped,
                roi=roi_file if use_roi else None,
                roi_mask=roi_mask,
            )
        )
    _warn_dropped(dropped, gt_file)
    if mismatched:
        logger.warning(
            f"{gt_file}: 'count' differs from the number of points in {mismatched} frames"
        )
    return records


# ---------------------------------------------------------------------------------------------
# generic point formats


def load_point_json(json_file: str, image_root: str) -> List[Dict]:
    """
    COCO-style point annotations: one point per annotation::

        {"images": [{"id", "file_name", "height"?, "width"?}],
         "annotations": [{"image_id", "point": [x, y], "category_id"?}],
         "categories": [{"id", "name"}]}

    Coordinates are continuous pixel coordinates. Category ids map to contiguous classes 0..C-1 in
    increasing id order; annotations without ``category_id`` get the first category. ``height`` /
    ``width`` are read from the image when absent.

    Args:
        json_file: the annotation file. image_root: folder that ``file_name`` is relative to.

    Returns:
        dataset dicts; ``image_id`` is the json image id.
    """
    if not os.path.isfile(json_file):
        raise ValueError(f"Annotation file {json_file} does not exist")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read point annotations {json_file}: {e}") from e
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{json_file} has no {key!r} list")
    cat_ids = sorted(c["id"] for c in data.get("categories", [])) or [1]
    cat_map = {cid: i for i, cid in enumerate(cat_ids)}

    per_image: Dict = {img["id"]: ([], []) for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("image_id") not in per_image:
            raise ValueError(
                f"{json_file}: annotation {ann.get('id')} refers to unknown image "
                f"{ann.get('image_id')!r}"
            )
        point = ann.get("point")
        if point is None or len(point) < 2:
            raise ValueError(f"{json_file}: annotation {ann.get('id')} has no 'point': [x, y]")
        cid = ann.get("category_id", cat_ids[0])
        if cid not in cat_map:
            raise ValueError(f"{json_file}: annotation {ann.get('id')} has unknown category {cid}")
        per_image[ann["image_id"]][0].append(point[:2])
        per_image[ann["image_id"]][1].append(cat_map[cid])

    records, dropped = [], [0]
    for img in data["images"]:
        file_name = os.path.join(image_root, img["file_name"])
        if "height" in img and "width" in img:
            if not os.path.isfile(file_name):
                raise ValueError(f"Image file {file_name} (listed in {json_file}) does not exist")
            height, width = img["height"], img["width"]
        else:
            height, width = _image_size(file_name)
        pts, cls = per_image[img["id"]]
        records.append(
            _make_record(
                file_name,
                img["id"],
                np.asarray(pts, dtype=np.float64).reshape(-1, 2),
                height,
                width,
                classes=cls,
                source=json_file,
                dropped=dropped,
            )
        )
    _warn_dropped(dropped, json_file)
    return records


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_point_csv(
    csv_file: str, image_root: str, class_names: Optional[Sequence[str]] = None
) -> List[Dict]:
    """
    Points in a CSV file with rows ``image,x,y[,class]`` (an optional header row is skipped).

    A row ``image,,`` (empty x and y) lists an image without points. ``class`` is either an integer
    in 0..C-1 or a name: names map to ``class_names`` (default: the sorted distinct names). Images
    are kept in order of first appearance.

    Args:
        csv_file: the annotation file. image_root: folder that ``image`` is relative to.
        class_names: the class of every name (needed to fix an order, or to validate names).

    Returns:
        dataset dicts; ``image_id`` is the ``image`` column.
    """
    if not os.path.isfile(csv_file):
        raise ValueError(f"Annotation file {csv_file} does not exist")
    with open(csv_file, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if rows and len(rows[0]) >= 3 and not _is_number(rows[0][1]) and rows[0][1].strip():
        rows = rows[1:]  # header
    per_image: Dict[str, list] = {}
    raw_classes = []
    for line, row in enumerate(rows, 1):
        row = [cell.strip() for cell in row]
        if len(row) < 3:
            raise ValueError(f"{csv_file}: row {line} must be image,x,y[,class], got {row}")
        entries = per_image.setdefault(row[0], [])
        if row[1] == "" and row[2] == "":
            continue
        if not (_is_number(row[1]) and _is_number(row[2])):
            raise ValueError(f"{csv_file}: row {line} has non-numeric x, y: {row[1:3]}")
        cls = row[3] if len(row) > 3 and row[3] != "" else "0"
        raw_classes.append(cls)
        entries.append((float(row[1]), float(row[2]), cls))

    all_int = all(re.fullmatch(r"\d+", c) for c in raw_classes)
    if class_names is not None:
        lookup = {name: i for i, name in enumerate(class_names)}
    elif all_int:
        lookup = None
    else:
        lookup = {name: i for i, name in enumerate(sorted(set(raw_classes)))}

    records, dropped = [], [0]
    for image, entries in per_image.items():
        file_name = os.path.join(image_root, image)
        height, width = _image_size(file_name)
        classes = []
        for _x, _y, cls in entries:
            if lookup is None:
                classes.append(int(cls))
            elif cls in lookup:
                classes.append(lookup[cls])
            elif re.fullmatch(r"\d+", cls) and int(cls) < len(lookup):
                classes.append(int(cls))
            else:
                raise ValueError(f"{csv_file}: unknown class {cls!r} for image {image}")
        points = np.asarray([(x, y) for x, y, _ in entries], dtype=np.float64).reshape(-1, 2)
        records.append(
            _make_record(
                file_name, image, points, height, width, classes, source=csv_file, dropped=dropped
            )
        )
    _warn_dropped(dropped, csv_file)
    return records


# ---------------------------------------------------------------------------------------------
# synthetic cells and registration


def load_synthetic_cells(root: str, split: str, first_n: Optional[int] = None) -> List[Dict]:
    """
    The synthetic fluorescence cells (:mod:`wsis_d2.data.datasets.cells`), generated on first use.

    Args:
        root: the datasets root. split: "train", "val", "test" or "mini".
        first_n: keep the first ``first_n`` images (nested training subsets).
    """
    image_root, json_file = prepare_synthetic_cells(root, split)
    records = load_point_json(json_file, image_root)
    return records if first_n is None else records[:first_n]


def register_point_dataset(name: str, loader: Callable[[], List[Dict]], **metadata):
    """
    Register a point-annotated dataset for density counting.

    Args:
        name: the dataset name. loader: a function returning the dataset dicts.
        metadata: extra metadata; ``evaluator_type`` defaults to "density" and ``thing_classes``
            to ["object"].
    """
    DatasetCatalog.register(name, loader)
    metadata.setdefault("evaluator_type", "density")
    metadata.setdefault("thing_classes", ["object"])
    MetadataCatalog.get(name).set(**metadata)


# name -> (loader(root), metadata)
_SYNTHETIC_CELLS = {
    "wsis_cells_train_32": ("train", 32),
    "wsis_cells_train_64": ("train", 64),
    "wsis_cells_train_128": ("train", 128),
    "wsis_cells_val": ("val", None),
    "wsis_cells_val_200": ("val_200", None),
    "wsis_cells_test": ("test", None),
    "wsis_cells_mini": ("mini", None),
}
# VGG protocol: training subsets are taken from images 1-100, the test set is images 101-200
_VGG_CELLS = {
    "vgg_cells_train_32": range(1, 33),
    "vgg_cells_train_64": range(1, 65),
    "vgg_cells_train_100": VGG_CELLS_POOL,
    "vgg_cells_test": VGG_CELLS_TEST,
}


def _datasets_root(root: Optional[str]) -> str:
    if root is not None:
        return root
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_all_density(root: Optional[str] = None):
    """
    Register the builtin density-counting splits (``evaluator_type="density"``).

    Names: ``wsis_cells_{train_32,train_64,train_128,val,val_200,test,mini}`` (synthetic,
    generated on first use under ``<root>/wsis_cells``),
    ``vgg_cells_{train_32,train_64,train_100,test}`` (``<root>/vgg_cells``),
    ``ucsd_{train,test}`` (``<root>/ucsd``), ``mall_{train,test}`` (``<root>/mall``). Names
    already registered are left alone.

    Args:
        root: the datasets root; None reads ``$DETECTRON2_DATASETS`` (default "datasets") each
            time a split is loaded.
    """

    def sub(name: str) -> str:
        return os.path.join(_datasets_root(root), name)

    tables = []  # (name, loader, thing_classes)
    for name, (split, first_n) in _SYNTHETIC_CELLS.items():
        tables.append(
            (
                name,
                lambda s=split, n=first_n: load_synthetic_cells(_datasets_root(root), s, n),
                ["cell"],
            )
        )
    for name, indices in _VGG_CELLS.items():
        tables.append((name, lambda i=indices: load_vgg_cells(sub("vgg_cells"), i), ["cell"]))
    for split in ("train", "test"):
        tables.append((f"ucsd_{split}", lambda s=split: load_ucsd(sub("ucsd"), s), ["pedestrian"]))
        tables.append((f"mall_{split}", lambda s=split: load_mall(sub("mall"), s), ["person"]))
    registered = set(DatasetCatalog.list())
    for name, loader, classes in tables:
        if name not in registered:
            register_point_dataset(name, loader, thing_classes=classes)
