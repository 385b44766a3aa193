"""
Synthetic fluorescence-microscopy cell images with exact point annotations.

The generator follows the spirit of the VGG cells data (Lempitsky & Zisserman, NIPS 2010), which were
made with the SIMCEP simulator (Lehmussola et al., 2007): elliptic cell bodies with perturbed outlines
and internal texture, placed partly in clusters and allowed to overlap, imaged with blur, uneven
illumination, background autofluorescence and photon/read noise. Every cell is annotated by the exact
centre of its body, in continuous pixel coordinates (pixel ``j`` covers ``[j, j + 1)``).

Splits are generated on first use and cached under ``$DETECTRON2_DATASETS/wsis_cells/<split>/``:
``images/NNN.png`` (RGB, 8 bit) and ``points.json`` (the generic COCO-style point format read by
:func:`wsis_d2.data.datasets.point_datasets.load_point_json`). A split is written to a temporary
folder and renamed into place (atomic for concurrent readers), is a deterministic function of
:data:`GENERATOR_SPEC` and the split's seed, and is regenerated when the spec changes (its hash is
stored in ``spec.json``).
"""

import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Dict, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_SPEC",
    "SYNTHETIC_CELL_SPLITS",
    "render_cell_image",
    "generator_spec_hash",
    "prepare_synthetic_cells",
]

# Everything that changes the generated pixels or points; its hash invalidates the cache.
GENERATOR_SPEC: Dict = {
    "version": 1,
    "image_size": [256, 256],  # (H, W)
    "num_cells": [20, 300],  # inclusive range, uniform per image
    "radius": {"mean": 5.5, "std": 0.8, "min": 3.5, "max": 8.5},  # cell body semi-axis scale (px)
    "aspect": [0.7, 1.0],  # minor / major semi-axis
    "outline_harmonics": {"orders": [2, 3, 4], "max_amplitude": 0.08},
    "edge_softness": [0.05, 0.3],  # width of the body's edge, fraction of its radius
    "cluster_fraction": [0.0, 0.6],  # fraction of cells drawn around cluster centres
    "num_clusters": [1, 5],
    "cluster_std": [12.0, 30.0],  # px
    "min_separation": [0.55, 0.8],  # centre distance >= this * (r_i + r_j): partial overlap allowed
    "placement_tries": 30,
    "cell_brightness_log_std": 0.35,
    "texture": {"sigma": 1.2, "amplitude": [0.1, 0.35]},
    "cytoplasm": {"scale": 1.7, "brightness": [0.1, 0.35]},
    "blur_sigma": [0.6, 1.6],
    "illumination": {"sigma": 48.0, "amplitude": [0.15, 0.45], "gradient": [0.0, 0.3]},
    "background": [0.01, 0.06],
    "gain": [0.45, 0.8],
    "photons": [60.0, 300.0],  # photon count of a unit-intensity pixel (Poisson noise)
    "read_noise": [0.004, 0.02],
    "colour": {"body": [0.12, 0.38, 0.95], "cytoplasm": [0.05, 0.6, 0.25]},  # RGB weights
}

# split -> (number of images, seed). train_32 / train_64 / train_128 are prefixes of "train", so that
# the smaller training sets are nested as in the VGG protocol.
SYNTHETIC_CELL_SPLITS: Dict[str, Tuple[int, int]] = {
    "train": (128, 1001),
    "val": (32, 2002),
    # model selection on more images: 32 val images did not rank full-schedule U-Net variants as
    # the 100 test images did
    "val_200": (200, 5005),
    "test": (100, 3003),
    "mini": (6, 4004),
}


def generator_spec_hash(spec: Dict = None) -> str:
    """Short stable hash of a generator spec (default :data:`GENERATOR_SPEC`)."""
    spec = GENERATOR_SPEC if spec is None else spec
    blob = json.dumps(spec, sort_keys=True).encode("utf-8")
    return hashlib.sha1(blob).hexdigest()[:12]


def _uniform(rng: np.random.Generator, bounds) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-12)


def _place_cells(rng: np.random.Generator, spec: Dict, num: int, height: int, width: int):
    """
    Draw cell centres and radii with clustering and bounded overlap.

    Returns:
        centres (P, 2) float64 (x, y) inside the image and radii (P,) float64, P <= num.
    """
    rad = spec["radius"]
    frac = _uniform(rng, spec["cluster_fraction"])
    num_clusters = int(rng.integers(spec["num_clusters"][0], spec["num_clusters"][1] + 1))
    cluster_xy = rng.uniform([0, 0], [width, height], size=(num_clusters, 2))
    cluster_std = rng.uniform(*spec["cluster_std"], size=num_clusters)
    separation = _uniform(rng, spec["min_separation"])

    centres = np.zeros((num, 2))
    radii = np.zeros(num)
    count = 0
    for _ in range(num):
        r = float(np.clip(rng.normal(rad["mean"], rad["std"]), rad["min"], rad["max"]))
        clustered = rng.uniform() < frac
        for _try in range(spec["placement_tries"]):
            if clustered:
                k = rng.integers(num_clusters)
                xy = cluster_xy[k] + rng.normal(0.0, cluster_std[k], size=2)
            else:
                xy = rng.uniform([0, 0], [width, height])
            if not (0.0 <= xy[0] < width and 0.0 <= xy[1] < height):
                continue
            if count:
                dist = np.hypot(*(centres[:count] - xy).T)
                if np.any(dist < separation * (radii[:count] + r)):
                    continue
            centres[count], radii[count] = xy, r
            count += 1
            break
    return centres[:count], radii[:count]


def render_cell_image(rng: np.random.Generator, spec: Dict = None):
    """
    Render one synthetic fluorescence image.

    Args:
        rng: the random generator (fully determines the output).
        spec: generator parameters; default :data:`GENERATOR_SPEC`.

    Returns:
        image: uint8 array (H, W, 3), RGB.
        points: float32 array (P, 2), the (x, y) centre of every cell body.
    """
    spec = GENERATOR_SPEC if spec is None else spec
    height, width = spec["image_size"]
    num = int(rng.integers(spec["num_cells"][0], spec["num_cells"][1] + 1))
    centres, radii = _place_cells(rng, spec, num, height, width)

    body = np.zeros((height, width))
    cyto = np.zeros((height, width))
    texture = _smooth_noise(rng, (height, width), spec["texture"]["sigma"])
    tex_amp = _uniform(rng, spec["texture"]["amplitude"])
    cyto_scale = spec["cytoplasm"]["scale"]
    cyto_gain = _uniform(rng, spec["cytoplasm"]["brightness"])
    orders = np.asarray(spec["outline_harmonics"]["orders"], dtype=np.float64)

    for (cx, cy), r in zip(centres, radii):
        aspect = _uniform(rng, spec["aspect"])
        a, b = r / np.sqrt(aspect), r * np.sqrt(aspect)  # same area as a disc of radius r
        theta = rng.uniform(0, np.pi)
        amps = rng.uniform(0, spec["outline_harmonics"]["max_amplitude"], size=len(orders))
        phases = rng.uniform(0, 2 * np.pi, size=len(orders))
        softness = _uniform(rng, spec["edge_softness"])
        brightness = float(np.exp(rng.normal(0.0, spec["cell_brightness_log_std"])))

        half = int(np.ceil(cyto_scale * a * 1.6 + 3))
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, width)
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, height)
        dx = (np.arange(x0, x1) + 0.5 - cx)[None, :]
        dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        phi = np.arctan2(v, u)
        outline = 1.0 + np.tensordot(
            amps, np.cos(orders[:, None, None] * phi[None] + phases[:, None, None]), axes=1
        )
        s = rho / outline
        # soft-edged body, brighter towards the centre, with a shared texture field
        inside = 1.0 / (1.0 + np.exp(-(1.0 - s) / softness))
        profile = 0.65 + 0.35 * np.clip(1.0 - s**2, 0.0, 1.0)
        patch_tex = 1.0 + tex_amp * texture[y0:y1, x0:x1]
        body[y0:y1, x0:x1] += brightness * inside * profile * patch_tex
        cyto[y0:y1, x0:x1] += brightness * np.exp(-((s / cyto_scale) ** 2))

    blur = _uniform(rng, spec["blur_sigma"])
    body = ndimage.gaussian_filter(body, blur)
    cyto = ndimage.gaussian_filter(cyto, blur * 2.0)

    ill = spec["illumination"]
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (xx - 0.5) * np.cos(direction) + (yy - 0.5) * np.sin(direction)
    field = (
        1.0
        + _uniform(rng, ill["amplitude"]) * _smooth_noise(rng, (height, width), ill["sigma"]) / 2
        + _uniform(rng, ill["gradient"]) * ramp
    )
    field = np.clip(field, 0.3, None)

    gain = _uniform(rng, spec["gain"])
    background = _uniform(rng, spec["background"]) * (
        1.0 + 0.3 * _smooth_noise(rng, (height, width), 8.0)
    )
    colour_body = np.asarray(spec["colour"]["body"])
    colour_cyto = np.asarray(spec["colour"]["cytoplasm"])
    signal = gain * (body[..., None] * colour_body + cyto_gain * cyto[..., None] * colour_cyto)
    clean = np.clip(signal * field[..., None] + background[..., None], 0.0, None)

    photons = _uniform(rng, spec["photons"])
    noisy = rng.poisson(clean * photons) / photons
    noisy = noisy + rng.normal(0.0, _uniform(rng, spec["read_noise"]), size=noisy.shape)
    image = np.clip(np.round(noisy * 255.0), 0, 255).astype(np.uint8)
    return image, centres.astype(np.float32)


def _split_is_current(split_dir: str, spec_hash: str) -> bool:
    spec_file = os.path.join(split_dir, "spec.json")
    if not (os.path.isfile(spec_file) and os.path.isfile(os.path.join(split_dir, "points.json"))):
        return False
    try:
        with open(spec_file) as f:
            return json.load(f).get("spec_hash") == spec_hash
    except (OSError, ValueError):
        return False


def _write_split(out_dir: str, split: str, num_images: int, seed: int, spec: Dict, spec_hash: str):
    os.makedirs(os.path.join(out_dir, "images"))
    images, annotations = [], []
    for idx in range(num_images):
        # one generator per image: image idx does not depend on the split size
        rng = np.random.default_rng([seed, idx])
        image, points = render_cell_image(rng, spec)
        file_name = f"{idx:03d}.png"
        Image.fromarray(image).save(os.path.join(out_dir, "images", file_name))
        images.append(
            {"id": idx, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]}
        )
        for x, y in points.tolist():
            annotations.append(
                {"id": len(annotations), "image_id": idx, "category_id": 1, "point": [x, y]}
            )
    coco = {
        "info": {"description": f"wsis_d2 synthetic fluorescence cells, split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cell"}],
    }
    with open(os.path.join(out_dir, "points.json"), "w") as f:
        json.dump(coco, f)
    with open(os.path.join(out_dir, "spec.json"), "w") as f:
        json.dump(
            {
                "spec_hash": spec_hash,
                "split": split,
                "seed": seed,
                "num_images": num_images,
                "spec": spec,
            },
            f,
            indent=1,
        )


def prepare_synthetic_cells(
    root: str, split: str, *, num_images: int = None, seed: int = None, spec: Dict = None
) -> Tuple[str, str]:
    """
    Make sure that a synthetic cells split exists under ``root/wsis_cells/<split>`` and is current.

    Args:
        root: the datasets root (``$DETECTRON2_DATASETS``).
        split: a key of :data:`SYNTHETIC_CELL_SPLITS`, or any name if ``num_images`` and ``seed``
            are given.
        num_images, seed: override the split table (tests use tiny splits).
        spec: generator parameters; default :data:`GENERATOR_SPEC`.

    Returns:
        (image_root, json_file) for :func:`load_point_json`.
    """
    spec = GENERATOR_SPEC if spec is None else spec
    if num_images is None or seed is None:
        if split not in SYNTHETIC_CELL_SPLITS:
            raise ValueError(
                f"Unknown synthetic cells split {split!r}; known: {sorted(SYNTHETIC_CELL_SPLITS)}"
            )
        default_n, default_seed = SYNTHETIC_CELL_SPLITS[split]
        num_images = default_n if num_images is None else num_images
        seed = default_seed if seed is None else seed
    spec_hash = generator_spec_hash({"generator": spec, "num_images": num_images, "seed": seed})

    base = os.path.join(root, "wsis_cells")
    split_dir = os.path.join(base, split)
    if not _split_is_current(split_dir, spec_hash):
        os.makedirs(base, exist_ok=True)
        tmp_dir = os.path.join(base, f".tmp-{split}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        logger.info(f"Generating synthetic cells split {split!r} ({num_images} images) ...")
        _write_split(tmp_dir, split, num_images, seed, spec, spec_hash)

        stale = None
        if os.path.exists(split_dir) and not _split_is_current(split_dir, spec_hash):
            stale = os.path.join(base, f".old-{split}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(split_dir, stale)
            except OSError:
                stale = None  # another process moved it first
        try:
            os.rename(tmp_dir, split_dir)
        except OSError:
            # another process installed the split concurrently; keep theirs if it is current
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if not _split_is_current(split_dir, spec_hash):
                raise ValueError(
                    f"Could not install synthetic cells split at {split_dir}: the folder exists "
                    "and holds another generator spec; remove it and retry"
                )
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return os.path.join(split_dir, "images"), os.path.join(split_dir, "points.json")
