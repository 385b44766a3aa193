"""
Files of a CCGR round: the cues (peaks and pseudo semantic label maps per image id) that
``CCGRDatasetMapper`` reads, and the pseudo instance labels as a COCO instances json that
``register_coco_counts_instances`` (and so the Mask R-CNN of the IS branch) reads.
"""

import io
import json
import os
import pickle
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from detectron2.structures import Instances

__all__ = [
    "encode_label_map",
    "write_cues",
    "load_cues",
    "pseudo_label_annotations",
    "write_pseudo_label_json",
    "check_pseudo_label_json",
]


def encode_label_map(sem: torch.Tensor) -> bytes:
    """(H, W) uint8 label map -> the PNG file's bytes (as :func:`write_cues` writes it): a few KB
    instead of H x W bytes, what the processes of a distributed run send to the main process."""
    buffer = io.BytesIO()
    Image.fromarray(sem.cpu().numpy().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_cues(
    path: str,
    cues: Dict[object, Tuple[torch.Tensor, Union[torch.Tensor, bytes]]],
    num_classes: int,
    seed_boxes: Optional[Dict[object, torch.Tensor]] = None,
) -> None:
    """
    Write a round's cues: ``path`` (a pickle {"num_classes", "peaks": {image_id: (P, 4)
    float32}, "sem_seg": {image_id: PNG file name}[, "seed_boxes": {image_id: (P, 6) float32}]})
    and the label maps as PNG files in the folder ``path`` without its extension. Written under
    temporary names and renamed.

    Args:
        cues: {image_id: (peaks (P, 4) rows (class, x, y, value), sem_seg (H, W))}, original
            image pixels; sem_seg may also be its PNG bytes (:func:`encode_label_map`).
        seed_boxes: rounds k >= 2: {image_id: (P, 6) rows (class, x1, y1, x2, y2, score)}, the IS
            branch's boxes that seed the bags (:func:`wsis_d2.ccgr.labels.bags_from_boxes`);
            row p belongs to peak p of the same image (its centre), which guards the refinement.
    """
    folder = os.path.splitext(path)[0] + "_sem_seg"
    os.makedirs(folder, exist_ok=True)
    peaks, files, seeds = {}, {}, {}
    for n, (image_id, (pk, sem)) in enumerate(cues.items()):
        name = f"{n:07d}.png"
        part = os.path.join(folder, name + ".part")
        with open(part, "wb") as f:
            f.write(sem if isinstance(sem, bytes) else encode_label_map(sem))
        os.replace(part, os.path.join(folder, name))
        peaks[image_id] = pk.cpu().numpy().astype(np.float32).reshape(-1, 4)
        files[image_id] = name
        if seed_boxes is not None:
            sb = seed_boxes.get(image_id)
            sb = np.zeros((0, 6), np.float32) if sb is None else np.asarray(sb, np.float32)
            sb = sb.reshape(-1, 6)
            if len(sb) != len(peaks[image_id]):
                raise ValueError(
                    f"write_cues: image id {image_id!r} has {len(sb)} seed boxes but "
                    f"{len(peaks[image_id])} peaks (one per box)"
                )
            seeds[image_id] = sb
    data = {"num_classes": int(num_classes), "peaks": peaks, "sem_seg": files}
    if seed_boxes is not None:
        data["seed_boxes"] = seeds
    part = path + ".part"
    with open(part, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(part, path)


def load_cues(path: str) -> dict:
    """
    Read a cues file of :func:`write_cues`; the "sem_seg" entries become absolute paths.

    Raises:
        ValueError naming the file when it is missing or malformed.
    """
    if not os.path.isfile(path):
        raise ValueError(f"INPUT.CCGR.CUES_FILE: {path} does not exist")
    with open(path, "rb") as f:
        data = pickle.load(f)
    if not isinstance(data, dict) or not {"num_classes", "peaks", "sem_seg"} <= set(data):
        raise ValueError(f"{path}: not a CCGR cues file (keys num_classes, peaks, sem_seg)")
    folder = os.path.splitext(path)[0] + "_sem_seg"
    data["sem_seg"] = {k: os.path.join(folder, v) for k, v in data["sem_seg"].items()}
    return data


def pseudo_label_annotations(
    dataset_dict: dict, inst: Instances, dataset_id_of_class: Sequence[int]
) -> List[dict]:
    """
    The COCO annotations (without "id") of one image's pseudo instances: RLE masks, XYWH boxes,
    the score under "score". A few hundred bytes per instance instead of its (H, W) mask, which is
    what the processes of a distributed run send to the main process.

    Args:
        dataset_dict: the image's dataset dict ("image_id", "height", "width").
        inst: Instances at the image's original size (pred_masks (R, H, W), pred_classes, scores).
        dataset_id_of_class: COCO category id of each contiguous class.

    An instance whose mask holds no pixel gives no annotation.
    """
    d = dataset_dict
    if len(inst) == 0:
        return []
    if tuple(inst.image_size) != (int(d["height"]), int(d["width"])):
        raise ValueError(
            f"pseudo instances of image id {d['image_id']!r} are {tuple(inst.image_size)}, the "
            f"image is {(d['height'], d['width'])}"
        )
    masks = inst.pred_masks.cpu().numpy().astype(np.uint8)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    annotations = []
    for rle, c, s in zip(rles, inst.pred_classes.tolist(), inst.scores.tolist()):
        area = float(mask_util.area(rle))
        if area == 0:
            continue  # no pixel: nothing to learn, and no place for its point
        x, y, w, h = mask_util.toBbox(rle).tolist()
        annotations.append(
            {
                "image_id": d["image_id"],
                "category_id": int(dataset_id_of_class[c]),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "bbox": [x, y, w, h],
                "area": area,
                "iscrowd": 0,
                "score": float(s),
            }
        )
    return annotations


def write_pseudo_label_json(
    path: str,
    dataset_dicts: List[dict],
    instances: Dict[object, Union[Instances, List[dict]]],
    dataset_id_of_class: Sequence[int],
    class_names: Sequence[str],
) -> int:
    """
    Write pseudo instances as a COCO instances json (images of ``dataset_dicts`` with their ids,
    file names and sizes; annotations with RLE masks, XYWH boxes and the instance score under
    "score"; categories), readable by ``register_coco_counts_instances``. Images without pseudo
    instances stay in the file with no annotations.

    Args:
        instances: {image_id: Instances at the image's original size, or its annotations from
            :func:`pseudo_label_annotations`}.
        dataset_id_of_class: COCO category id of each contiguous class.

    Returns:
        the number of annotations written.
    """
    images, annotations = [], []
    for d in dataset_dicts:
        images.append(
            {
                "id": d["image_id"],
                "file_name": d["file_name"],
                "height": int(d["height"]),
                "width": int(d["width"]),
            }
        )
        inst = instances.get(d["image_id"])
        if inst is None:
            continue
        if isinstance(inst, Instances):
            inst = pseudo_label_annotations(d, inst, dataset_id_of_class)
        for a in inst:
            annotations.append({"id": len(annotations) + 1, **a})
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": int(i), "name": n} for i, n in zip(dataset_id_of_class, class_names)
        ],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    with open(part, "w") as f:
        json.dump(data, f)
    os.replace(part, path)
    return len(annotations)


def check_pseudo_label_json(
    path: str, dataset_dicts: List[dict], class_names: Sequence[str], round_name: str = ""
) -> int:
    """
    Check that a pseudo-label json (:func:`write_pseudo_label_json`) belongs to a dataset before
    a Mask R-CNN is trained on it: the same image ids with the same file names and sizes, the
    same class names, and at least one pseudo instance.

    Args:
        path: the json file.
        dataset_dicts: the dataset's records (``DatasetCatalog.get(name)``).
        class_names: the dataset's ``thing_classes``.
        round_name: named in the error of a file without instances (e.g. "round 2").

    Returns:
        the number of pseudo instances (annotations) in the file.

    Raises:
        ValueError: naming ``path`` and the first mismatch found.
    """
    where = f"pseudo-label json {path}"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: cannot be read as json ({e})") from e
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise ValueError(f"{where}: not a COCO instances json (needs images, annotations, categories)")
    names = [c.get("name") for c in sorted(data["categories"], key=lambda c: c.get("id", 0))]
    if names != list(class_names):
        raise ValueError(f"{where}: categories {names}, the dataset's classes are {list(class_names)}")
    images = {im.get("id"): im for im in data["images"]}
    if len(images) != len(dataset_dicts):
        raise ValueError(
            f"{where}: {len(images)} images, the dataset has {len(dataset_dicts)}: written for "
            "another dataset or split?"
        )
    for d in dataset_dicts:
        im = images.get(d["image_id"])
        if im is None:
            raise ValueError(f"{where}: image id {d['image_id']!r} ({d['file_name']}) is missing")
        if os.path.basename(str(im.get("file_name"))) != os.path.basename(d["file_name"]):
            raise ValueError(
                f"{where}: image id {d['image_id']!r} is {im.get('file_name')!r} there, "
                f"{d['file_name']!r} in the dataset"
            )
        if (im.get("height"), im.get("width")) != (int(d["height"]), int(d["width"])):
            raise ValueError(
                f"{where}: image id {d['image_id']!r} is {im.get('height')}x{im.get('width')} "
                f"there, {d['height']}x{d['width']} in the dataset"
            )
    count = len(data["annotations"])
    if count == 0:
        label = f"{round_name}: " if round_name else ""
        raise ValueError(
            f"{label}{where} holds no pseudo instance for any of its {len(images)} images, so "
            "there is nothing to train the IS branch on. Check the previous stage: its bags "
            "(peaks of the classifier or boxes of the IS branch above the score threshold) and "
            "the MIL scores; a classifier that never predicts a present class gives no peaks, an "
            "IS branch that scores no box above MODEL.CCGR.ROUNDS.IS_SCORE_THRESHOLD no seeds "
            "(MODEL.CCGR.ROUNDS.IS_SEED_EVERY_CLASS keeps each present class's best box)."
        )
    return count
