"""
Files of a CCGR round: the cues (peaks and pseudo semantic label maps per image id) that
``CCGRDatasetMapper`` reads, and the pseudo instance labels as a COCO instances json that
``register_coco_counts_instances`` (and so the Mask R-CNN of the IS branch) reads.
"""

import json
import os
import pickle
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from detectron2.structures import Instances

__all__ = ["write_cues", "load_cues", "write_pseudo_label_json"]


def write_cues(
    path: str, cues: Dict[object, Tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> None:
    """
    Write a round's cues: ``path`` (a pickle {"num_classes", "peaks": {image_id: (P, 4)
    float32}, "sem_seg": {image_id: PNG file name}}) and the label maps as PNG files in the folder
    ``path`` without its extension. Written under temporary names and renamed.
    """
    folder = os.path.splitext(path)[0] + "_sem_seg"
    os.makedirs(folder, exist_ok=True)
    peaks, files = {}, {}
    for n, (image_id, (pk, sem)) in enumerate(cues.items()):
        name = f"{n:07d}.png"
        part = os.path.join(folder, name + ".part")
        Image.fromarray(sem.cpu().numpy().astype(np.uint8)).save(part, format="PNG")
        os.replace(part, os.path.join(folder, name))
        peaks[image_id] = pk.cpu().numpy().astype(np.float32).reshape(-1, 4)
        files[image_id] = name
    data = {"num_classes": int(num_classes), "peaks": peaks, "sem_seg": files}
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
        raise ValueError(f"MODEL.CCGR.CUES_FILE: {path} does not exist")
    with open(path, "rb") as f:
        data = pickle.load(f)
    if not isinstance(data, dict) or not {"num_classes", "peaks", "sem_seg"} <= set(data):
        raise ValueError(f"{path}: not a CCGR cues file (keys num_classes, peaks, sem_seg)")
    folder = os.path.splitext(path)[0] + "_sem_seg"
    data["sem_seg"] = {k: os.path.join(folder, v) for k, v in data["sem_seg"].items()}
    return data


def write_pseudo_label_json(
    path: str,
    dataset_dicts: List[dict],
    instances: Dict[object, Instances],
    dataset_id_of_class: Sequence[int],
    class_names: Sequence[str],
) -> int:
    """
    Write pseudo instances as a COCO instances json (images of ``dataset_dicts`` with their ids,
    file names and sizes; annotations with RLE masks, XYWH boxes and the instance score under
    "score"; categories), readable by ``register_coco_counts_instances``. Images without pseudo
    instances stay in the file with no annotations.

    Args:
        instances: {image_id: Instances at the image's original size}.
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
        if inst is None or len(inst) == 0:
            continue
        if tuple(inst.image_size) != (int(d["height"]), int(d["width"])):
            raise ValueError(
                f"pseudo instances of image id {d['image_id']!r} are {tuple(inst.image_size)}, the "
                f"image is {(d['height'], d['width'])}"
            )
        masks = inst.pred_masks.cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for rle, c, s in zip(rles, inst.pred_classes.tolist(), inst.scores.tolist()):
            x, y, w, h = mask_util.toBbox(rle).tolist()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": d["image_id"],
                    "category_id": int(dataset_id_of_class[c]),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "bbox": [x, y, w, h],
                    "area": float(mask_util.area(rle)),
                    "iscrowd": 0,
                    "score": float(s),
                }
            )
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
