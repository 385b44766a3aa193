"""
Embedded synthetic data: VOC-like scenes of textured shapes with complete ground truth.

Each image shows 1-3 object classes (shape families, colour and texture random so that only shape
tells classes apart) with 1-15 instances per class, skewed towards small counts, on a cluttered
background of smooth colour fields, grain, soft low-contrast blobs and lines that are not objects.
Instances are drawn in order, so later ones occlude earlier ones; masks are the visible parts, and
instances left with less than ``min_visible_fraction`` of their area are removed before anything is
painted (no unannotated object is ever visible).

Ground truth per image: per-class counts, one point per instance (the pixel holding the centroid of
its visible mask, or the visible pixel nearest to it), the tight box of the visible mask and the
mask itself as compressed RLE. Image ``i`` of a split depends only on ``(spec.seed, i)``
(:func:`render_synthetic_image`), so any image can be regenerated alone.

A split is written once under ``<root>/wsis_synthetic/<split>/`` (``images/``, one COCO json
``annotations.json`` with an extra "point" per annotation, and ``spec.json``) and reused while the
generator version and the split parameters are unchanged (:func:`prepare_synthetic_split`).

Run ``python -m wsis_d2.data.datasets.synthetic --help`` for the speed benchmark and a preview.
"""

import colorsys
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

from .coco_counts import mask_to_rle, point_in_mask

try:  # advisory lock so that concurrent processes do not generate the same split twice
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX; the atomic rename alone keeps it safe
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = [
    "SYNTHETIC_CLASSES",
    "GENERATOR_VERSION",
    "SyntheticSpec",
    "render_synthetic_image",
    "write_synthetic_split",
    "prepare_synthetic_split",
]

SYNTHETIC_CLASSES = (
    "disc",
    "rectangle",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
)
# Bump whenever rendering changes: cached splits with another version are regenerated.
GENERATOR_VERSION = 1

_SUBPIXEL_BITS = 4  # cv2 drawing with 1/16 pixel vertex precision
_SUBPIXEL = 1 << _SUBPIXEL_BITS


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """
    Parameters of one split; together with :data:`GENERATOR_VERSION` they determine every byte.

    Attributes:
        num_images: number of images.
        seed: split seed; image ``i`` is drawn from the seed sequence ``(seed, i)``.
        min_image_size, max_image_size: image height and width are drawn independently in this
            range (pixels).
        min_object_size, max_object_size: bounds of the object diameter (pixels); within them the
            diameter scales with the shorter image side (9%-28% of it).
        max_instances_per_class: largest count of one class in an image.
        max_classes_per_image: at most this many classes appear in one image.
        min_visible_fraction: instances whose visible area is below this fraction of their full
            area (occlusion, image border) are removed.
        image_format: "jpg" (quality 95) or "png".
    """

    num_images: int
    seed: int
    min_image_size: int = 128
    max_image_size: int = 320
    min_object_size: int = 12
    max_object_size: int = 60
    max_instances_per_class: int = 15
    max_classes_per_image: int = 3
    min_visible_fraction: float = 0.4
    image_format: str = "jpg"

    def __post_init__(self):
        def need(ok, field, what):
            if not ok:
                raise ValueError(
                    f"SyntheticSpec.{field} must be {what}, got {getattr(self, field)!r}"
                )

        need(self.num_images >= 0, "num_images", ">= 0")
        need(
            8 <= self.min_image_size <= self.max_image_size,
            "min_image_size",
            "in [8, max_image_size]",
        )
        need(
            4 <= self.min_object_size <= self.max_object_size,
            "min_object_size",
            "in [4, max_object_size]",
        )
        need(self.max_instances_per_class >= 1, "max_instances_per_class", ">= 1")
        need(
            1 <= self.max_classes_per_image <= len(SYNTHETIC_CLASSES),
            "max_classes_per_image",
            f"in [1, {len(SYNTHETIC_CLASSES)}]",
        )
        need(0.0 <= self.min_visible_fraction < 1.0, "min_visible_fraction", "in [0, 1)")
        need(self.image_format in ("jpg", "png"), "image_format", "'jpg' or 'png'")

    def to_dict(self) -> dict:
        return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}

    def digest(self) -> str:
        """Hash of the generator version and all parameters (the cache key)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# shapes


def _fill_polygon(canvas: np.ndarray, pts: np.ndarray, value: int) -> None:
    pts = np.round(pts * _SUBPIXEL).astype(np.int32)
    cv2.fillPoly(canvas, [pts], value, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)


def _fill_ellipse(canvas, center, axes, angle_deg: float, value: int) -> None:
    c = (int(round(center[0] * _SUBPIXEL)), int(round(center[1] * _SUBPIXEL)))
    a = (max(int(round(axes[0] * _SUBPIXEL)), 1), max(int(round(axes[1] * _SUBPIXEL)), 1))
    cv2.ellipse(canvas, c, a, angle_deg, 0, 360, value, -1, cv2.LINE_8, _SUBPIXEL_BITS)


def _rotate(pts: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _shape_mask(cls: int, diameter: float, rng: np.random.Generator) -> np.ndarray:
    """
    Draw one object of class ``cls`` centred in a square patch.

    Args:
        cls: index into SYNTHETIC_CLASSES.
        diameter: diameter of the shape's bounding circle, pixels.

    Returns:
        (P, P) uint8 mask in {0, 1}, P = ceil(diameter) + 3.
    """
    size = int(math.ceil(diameter)) + 3
    canvas = np.zeros((size, size), np.uint8)
    ctr = np.array([size / 2.0, size / 2.0])
    r = diameter / 2.0
    theta = rng.uniform(0.0, 2.0 * math.pi)
    name = SYNTHETIC_CLASSES[cls]
    if name == "disc":
        _fill_ellipse(canvas, ctr, (r, r * rng.uniform(0.65, 1.0)), math.degrees(theta), 1)
    elif name == "ring":
        axes = np.array([r, r * rng.uniform(0.8, 1.0)])
        _fill_ellipse(canvas, ctr, axes, math.degrees(theta), 1)
        _fill_ellipse(canvas, ctr, axes * rng.uniform(0.45, 0.6), math.degrees(theta), 0)
    elif name == "crescent":
        _fill_ellipse(canvas, ctr, (r, r), 0.0, 1)
        offset = r * rng.uniform(0.45, 0.65) * np.array([math.cos(theta), math.sin(theta)])
        r_cut = r * rng.uniform(0.7, 0.85)
        _fill_ellipse(canvas, ctr + offset, (r_cut, r_cut), 0.0, 0)
    else:
        if name == "rectangle":
            aspect = rng.uniform(0.45, 0.9)
            w = diameter / math.sqrt(1.0 + aspect * aspect)
            h = aspect * w
            pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2.0
        elif name == "triangle":
            ang = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-12.0, 12.0, 3))
            rad = r * rng.uniform(0.9, 1.0, 3)
            pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        elif name == "star":
            ang = np.arange(10) * (math.pi / 5.0)
            rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
            pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        elif name == "cross":
            a = r * rng.uniform(0.22, 0.32)  # half width of the arms
            b = r * 0.97
            pts = np.array(
                [
                    [-a, -b],
                    [a, -b],
                    [a, -a],
                    [b, -a],
                    [b, a],
                    [a, a],
                    [a, b],
                    [-a, b],
                    [-a, a],
                    [-b, a],
                    [-b, -a],
                    [-a, -a],
                ]
            )
        elif name == "hexagon":
            ang = np.arange(6) * (math.pi / 3.0)
            pts = np.stack([r * np.cos(ang), r * rng.uniform(0.88, 1.0) * np.sin(ang)], 1)
        else:  # pragma: no cover - SYNTHETIC_CLASSES and this function go together
            raise ValueError(f"unknown synthetic class {name!r}")
        _fill_polygon(canvas, _rotate(pts, theta) + ctr, 1)
    return canvas


# ------------------------------------------------------------------------------------------------
# appearance


def _random_color(rng: np.random.Generator, sat=(0.35, 1.0), val=(0.3, 1.0)) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb, np.float32) * 255.0


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 clutter: colour field + grain + soft blobs + faint lines."""
    base = _random_color(rng, sat=(0.05, 0.6), val=(0.25, 0.85))
    gh, gw = rng.integers(2, 6, size=2)
    # mostly brightness changes with a little hue drift, like natural backgrounds
    shade = rng.uniform(-40.0, 40.0, size=(gh, gw, 1)) + rng.uniform(-15.0, 15.0, size=(gh, gw, 3))
    field = (base + shade).astype(np.float32)
    img = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
    grain = rng.uniform(-1.0, 1.0, size=(max(h // 6, 2), max(w // 6, 2), 1)).astype(np.float32)
    img += cv2.resize(grain, (w, h), interpolation=cv2.INTER_LINEAR)[..., None] * rng.uniform(
        4.0, 14.0
    )

    # blobs: irregular polygons, blurred to soft edges and kept low contrast
    s = min(h, w)
    layer = np.zeros((h, w, 3), np.float32)
    for _ in range(int(rng.integers(4, 13))):
        n = int(rng.integers(5, 10))
        ang = np.sort(rng.uniform(0.0, 2.0 * math.pi, n))
        rad = s * rng.uniform(0.04, 0.2) * rng.uniform(0.5, 1.0, n)
        ctr = rng.uniform(0.0, 1.0, 2) * (w, h)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1) + ctr
        color = rng.uniform(20.0, 40.0) * rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0, 3)
        pts = np.round(pts * _SUBPIXEL).astype(np.int32)
        cv2.fillPoly(layer, [pts], color.tolist(), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    img += cv2.GaussianBlur(layer, (0, 0), 1.5 + 0.03 * s)

    # faint straight and bent lines (drawn on an offset layer: cv2 draws absolute values)
    layer[:] = 0.0
    for _ in range(int(rng.integers(2, 9))):
        n = int(rng.integers(2, 6))
        pts = np.cumsum(rng.normal(0.0, 0.25 * s, size=(n, 2)), 0) + rng.uniform(0, 1, 2) * (w, h)
        color = (rng.uniform(15.0, 35.0) * rng.choice([-1.0, 1.0]) * np.ones(3)).tolist()
        cv2.polylines(
            layer,
            [np.round(pts).astype(np.int32)],
            False,
            color,
            int(rng.integers(1, 4)),
            cv2.LINE_AA,
        )
    img += layer
    return img


def _texture(ph: int, pw: int, color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(ph, pw, 3) float32 object appearance around ``color``: flat, stripes, gradient, speckle."""
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return np.broadcast_to(color, (ph, pw, 3)).astype(np.float32)
    if kind == 3:
        spots = rng.uniform(-45.0, 45.0, size=(3, 3, 3)).astype(np.float32)
        return color + cv2.resize(spots, (pw, ph), interpolation=cv2.INTER_LINEAR)
    other = np.clip(color + rng.choice([-1.0, 1.0]) * rng.uniform(50.0, 90.0), 0.0, 255.0)
    phi = rng.uniform(0.0, math.pi)
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    t = xx * math.cos(phi) + yy * math.sin(phi)
    if kind == 1:
        period = rng.uniform(3.5, 9.0)
        sel = (np.sin(t * (2.0 * math.pi / period) + rng.uniform(0, 2 * math.pi)) > 0)[..., None]
        return np.where(sel, color, other).astype(np.float32)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return (color + t[..., None] * (other - color)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# scene layout


def _sample_counts(spec: SyntheticSpec, rng: np.random.Generator) -> Dict[int, int]:
    """Class -> requested count: 1-3 classes, counts skewed small with a tail up to the maximum."""
    k = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    k = min(k, spec.max_classes_per_image)
    classes = rng.choice(len(SYNTHETIC_CLASSES), size=k, replace=False)
    counts = {}
    for c in classes:
        u = rng.uniform()
        if u < 0.55:
            n = 1 if rng.uniform() < 0.65 else 2
        elif u < 0.75:
            n = int(rng.integers(3, 5))
        else:
            n = 4 + int(rng.geometric(0.22))
        counts[int(c)] = max(1, min(n, spec.max_instances_per_class))
    return counts


def _place(patch: np.ndarray, h: int, w: int, rng, occupied: np.ndarray, inside: bool):
    """
    Pick a top-left corner for ``patch`` that covers little of the already placed objects.

    Args:
        inside: keep the patch inside the image (when it fits) and accept the best try whatever
            its overlap; used for the last instance, which nothing occludes, so that every image
            has at least one object.

    Returns:
        (x0, y0), possibly partly outside the image (truncated objects), or None if every try
        overlapped too much.
    """
    ph, pw = patch.shape
    area = float(patch.sum())
    if area == 0:
        return None
    best, best_frac = None, math.inf
    for _ in range(10):
        if inside:
            x0 = int(rng.integers(0, max(w - pw, 0) + 1))
            y0 = int(rng.integers(0, max(h - ph, 0) + 1))
        else:
            x0 = int(rng.integers(0, w)) - pw // 2
            y0 = int(rng.integers(0, h)) - ph // 2
        ys, xs, pys, pxs = _clip(x0, y0, pw, ph, w, h)
        frac = float((occupied[ys, xs] & (patch[pys, pxs] > 0)).sum()) / area
        if frac < best_frac:
            best, best_frac = (x0, y0), frac
        if frac <= 0.25:
            break
    return best if inside or best_frac <= 0.5 else None


def _clip(x0: int, y0: int, pw: int, ph: int, w: int, h: int):
    """Slices of the image and of a patch at (x0, y0) for their intersection."""
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + pw, w), min(y0 + ph, h)
    ix1, iy1 = max(ix1, ix0), max(iy1, iy0)
    return (
        slice(iy0, iy1),
        slice(ix0, ix1),
        slice(iy0 - y0, iy1 - y0),
        slice(ix0 - x0, ix1 - x0),
    )


def render_synthetic_image(spec: SyntheticSpec, index: int) -> Tuple[np.ndarray, List[dict]]:
    """
    Render image ``index`` of a split; depends only on ``(spec, index)``.

    Args:
        spec: split parameters.
        index: image index in ``[0, spec.num_images)`` (any non-negative int works).

    Returns:
        image: (H, W, 3) uint8 RGB.
        instances: in drawing order, ``{"category_id": int in 0..C-1, "mask": (H, W) bool}`` for
            each visible instance; masks are disjoint and non-empty.
    """
    if index < 0:
        raise ValueError(f"synthetic image index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index]))
    h = int(rng.integers(spec.min_image_size, spec.max_image_size + 1))
    w = int(rng.integers(spec.min_image_size, spec.max_image_size + 1))
    counts = _sample_counts(spec, rng)
    order = np.concatenate([np.full(n, c) for c, n in counts.items()])
    rng.shuffle(order)

    # object diameters: scaled with the image, shrunk when many objects must fit
    s = min(h, w)
    hi = float(min(spec.max_object_size, 0.28 * s))
    lo = float(min(max(spec.min_object_size, 0.09 * s), hi))
    fill = 0.4 * len(order) * (0.5 * (lo + hi)) ** 2 / (0.35 * h * w)
    if fill > 1.0:
        lo, hi = (max(spec.min_object_size, v / math.sqrt(fill)) for v in (lo, hi))

    occupied = np.zeros((h, w), bool)
    placed = []  # (class, patch, x0, y0)
    for k, c in enumerate(order):
        patch = _shape_mask(int(c), math.exp(rng.uniform(math.log(lo), math.log(hi))), rng)
        pos = _place(patch, h, w, rng, occupied, inside=k == len(order) - 1)
        if pos is None:
            continue
        ys, xs, pys, pxs = _clip(pos[0], pos[1], patch.shape[1], patch.shape[0], w, h)
        occupied[ys, xs] |= patch[pys, pxs] > 0
        placed.append((int(c), patch, pos[0], pos[1]))

    # occlusion: later instances win; drop the hardly visible ones, then recompute visibility
    # (removing an instance only uncovers others, so one pass of removal suffices)
    def owners(items):
        owner = np.full((h, w), -1, np.int32)
        for i, (_, patch, x0, y0) in enumerate(items):
            ys, xs, pys, pxs = _clip(x0, y0, patch.shape[1], patch.shape[0], w, h)
            owner[ys, xs][patch[pys, pxs] > 0] = i
        return owner

    owner = owners(placed)
    visible_area = np.bincount(owner.ravel() + 1, minlength=len(placed) + 1)[1:]
    keep = [
        item
        for item, vis in zip(placed, visible_area)
        if vis >= max(spec.min_visible_fraction * float(item[1].sum()), 6.0)
    ]
    owner = owners(keep)

    # paint: background, then each instance's texture on its visible pixels
    img = _background(h, w, rng)
    instances = []
    for i, (c, patch, x0, y0) in enumerate(keep):
        ys, xs, pys, pxs = _clip(x0, y0, patch.shape[1], patch.shape[0], w, h)
        vis = owner[ys, xs] == i
        region = img[ys, xs]
        bg_mean = region[vis].mean(0)
        # enough contrast with the background under the object, whatever the random colour
        color, best = None, -1.0
        for _ in range(4):
            cand = _random_color(rng)
            dist = float(np.linalg.norm(cand - bg_mean))
            if dist > best:
                color, best = cand, dist
            if dist >= 80.0:
                break
        tex = _texture(vis.shape[0], vis.shape[1], color, rng)
        region[vis] = tex[vis]
        mask = np.zeros((h, w), bool)
        mask[ys, xs] = vis
        instances.append({"category_id": c, "mask": mask})

    img = cv2.GaussianBlur(img, (3, 3), 0.6)  # soft edges, like a camera
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(2.0, 7.0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), instances


# ------------------------------------------------------------------------------------------------
# split files and cache


def _instance_annotation(mask: np.ndarray) -> dict:
    """
    COCO fields of one instance mask (H, W) bool: segmentation (RLE), bbox (XYWH, tight), area and
    point ``[x, y]``: the centre of the pixel chosen by :func:`point_in_mask`, in continuous
    coordinates (pixel ``j`` covers ``[j, j + 1)``; index the mask with ``int(y), int(x)``).
    """
    rle = mask_to_rle(mask)
    x, y = point_in_mask(mask)
    bbox = mask_util.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    return {
        "segmentation": rle,
        "bbox": [float(v) for v in bbox],
        "area": float(mask.sum()),
        "point": [x + 0.5, y + 0.5],  # centre of the pixel, continuous coordinates
        "iscrowd": 0,
    }


def write_synthetic_split(spec: SyntheticSpec, out_dir: str) -> str:
    """
    Render all images of a split into ``out_dir/images/`` and write ``out_dir/annotations.json``
    (COCO format; image ids ``index + 1``, category ids ``class + 1``, extra "point" [x, y]).

    Returns:
        path of the json file.
    """
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    if spec.image_format == "jpg":
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]
    else:
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]
    for index in range(spec.num_images):
        image, instances = render_synthetic_image(spec, index)
        image_id = index + 1
        file_name = f"{image_id:06d}{ext}"
        ok, buf = cv2.imencode(ext, image[:, :, ::-1], params)
        if not ok:  # pragma: no cover - cv2 failure
            raise RuntimeError(f"cv2 could not encode {file_name}")
        buf.tofile(os.path.join(image_dir, file_name))
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": image.shape[0],
                "width": image.shape[1],
            }
        )
        for inst in instances:
            ann = _instance_annotation(inst["mask"])
            ann.update(
                id=len(annotations) + 1, image_id=image_id, category_id=inst["category_id"] + 1
            )
            annotations.append(ann)
    data = {
        "info": {"description": "wsis_d2 synthetic shapes", **spec.to_dict()},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SYNTHETIC_CLASSES)
        ],
    }
    json_file = os.path.join(out_dir, "annotations.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file


def _split_is_current(split_dir: str, spec: SyntheticSpec) -> bool:
    try:
        with open(os.path.join(split_dir, "spec.json")) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return False
    return stored.get("digest") == spec.digest() and os.path.isfile(
        os.path.join(split_dir, "annotations.json")
    )


@contextlib.contextmanager
def _exclusive(lock_file: str):
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_synthetic_split(root: str, split: str, spec: SyntheticSpec) -> Tuple[str, str]:
    """
    Make sure ``<root>/wsis_synthetic/<split>/`` holds the split described by ``spec``,
    generating it if it is missing or was made by another generator version / other parameters.

    Safe with concurrent callers: the split is written to a temporary directory next to it and
    moved into place with an atomic rename (an advisory lock also avoids duplicate work).

    Returns:
        (json_file, image_root)
    """
    base = os.path.join(root, "wsis_synthetic")
    target = os.path.join(base, split)
    paths = (os.path.join(target, "annotations.json"), os.path.join(target, "images"))
    if _split_is_current(target, spec):
        return paths
    os.makedirs(base, exist_ok=True)
    with _exclusive(os.path.join(base, f".{split}.lock")):
        if _split_is_current(target, spec):  # another process made it while we waited
            return paths
        logger.info(f"Generating synthetic split {split!r} ({spec.num_images} images) in {target}")
        start = time.perf_counter()
        tmp = os.path.join(base, f".{split}.tmp-{uuid.uuid4().hex[:12]}")
        os.makedirs(tmp)  # unlike mkdtemp, honours the umask: caches are often shared
        try:
            write_synthetic_split(spec, tmp)
            with open(os.path.join(tmp, "spec.json"), "w") as f:
                json.dump({"digest": spec.digest(), **spec.to_dict()}, f, indent=1)
            _install(tmp, target, spec)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info(
            f"Generated {spec.num_images} images in {time.perf_counter() - start:.1f}s ({target})"
        )
    return paths


def _install(tmp: str, target: str, spec: SyntheticSpec) -> None:
    """
    Atomically replace ``target`` (absent or stale) by the finished directory ``tmp``; leave a
    current ``target`` alone (the caller deletes ``tmp``).
    """
    if _split_is_current(target, spec):
        return
    if os.path.isdir(target):
        stale = f"{target}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, stale)
        except FileNotFoundError:  # someone else moved it first
            stale = None
    else:
        stale = None
    try:
        os.rename(tmp, target)
    except OSError:
        # a concurrent writer (without working locks) installed its copy first
        if not _split_is_current(target, spec):
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# benchmark and preview


def _preview(spec: SyntheticSpec, indices, path: str) -> None:
    tiles = []
    for index in indices:
        image, instances = render_synthetic_image(spec, index)
        over = image.astype(np.float32)
        for k, inst in enumerate(instances):
            color = np.array(colorsys.hsv_to_rgb((k * 0.618) % 1.0, 1.0, 1.0)) * 255.0
            over[inst["mask"]] = 0.5 * over[inst["mask"]] + 0.5 * color
        over = np.ascontiguousarray(over.astype(np.uint8))
        for inst in instances:
            x, y = point_in_mask(inst["mask"])
            cv2.circle(over, (x, y), 2, (255, 255, 255), -1)
            name = SYNTHETIC_CLASSES[inst["category_id"]][:4]
            cv2.putText(over, name, (x + 3, y), cv2.FONT_HERSHEY_PLAIN, 0.7, (255, 255, 255), 1)
        pair = np.zeros((320, 640 + 4, 3), np.uint8)
        pair[: image.shape[0], : image.shape[1]] = image
        pair[: over.shape[0], 324 : 324 + over.shape[1]] = over
        tiles.append(pair)
    cv2.imwrite(path, np.concatenate(tiles, 0)[:, :, ::-1])


def _main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", type=int, default=200, help="images to render and encode")
    parser.add_argument("--size", type=int, default=256, help="fixed image size for the benchmark")
    parser.add_argument("--preview", default="", help="write a PNG of a few images + masks here")
    parser.add_argument("--stats", type=int, default=0, help="count statistics over N images")
    args = parser.parse_args(argv)

    if args.benchmark:
        spec = SyntheticSpec(
            args.benchmark, seed=0, min_image_size=args.size, max_image_size=args.size
        )
        start = time.perf_counter()
        for i in range(spec.num_images):
            image, instances = render_synthetic_image(spec, i)
            for inst in instances:
                _instance_annotation(inst["mask"])
            cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        dt = time.perf_counter() - start
        print(
            f"rendered+annotated+encoded {spec.num_images} images of {args.size}px in {dt:.2f}s "
            f"= {spec.num_images / dt:.1f} images/s (one process)"
        )
    if args.stats:
        spec = SyntheticSpec(args.stats, seed=1)
        per_class, ge5, total = np.zeros(len(SYNTHETIC_CLASSES), int), 0, []
        for i in range(spec.num_images):
            _, instances = render_synthetic_image(spec, i)
            cnt = np.bincount(
                [d["category_id"] for d in instances], minlength=len(SYNTHETIC_CLASSES)
            )
            per_class += cnt > 0
            ge5 += int(cnt.max() >= 5)
            total.append(int(cnt.sum()))
        print(
            f"images with a class count >= 5: {ge5 / spec.num_images:.1%}; instances/image: "
            f"mean {np.mean(total):.2f} max {max(total)}; images per class: {per_class.tolist()}"
        )
    if args.preview:
        _preview(SyntheticSpec(8, seed=2019), range(6), args.preview)
        print(f"wrote {args.preview}")


if __name__ == "__main__":
    _main()
