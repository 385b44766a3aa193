"""
WSISTrainer's training data: count-only images (objects counted, not annotated) reach the models
trained on image-level targets and are kept from the instance models.
"""

import uuid

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from wsis_d2.engine import WSISTrainer
from wsis_d2.engine.defaults import train_data
from wsis_d2.evaluation.gt_cache import clear_ground_truth_cache
from wsis_d2.testing import get_config, tiny_lc_config


def _ann(cat, crowd=0):
    return {"category_id": cat, "iscrowd": crowd, "bbox": [1, 1, 9, 9], "bbox_mode": 0}


def _register(records):
    name = f"_test_defaults_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["a", "b"])
    return name


@pytest.fixture
def registered():
    names = []

    def register(records):
        names.append(_register(records))
        return names[-1]

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _records(folder=None):
    def rec(i, name, anns, counts, **extra):
        path = f"{name}.png" if folder is None else str(folder / f"{name}.png")
        if folder is not None:
            cv2.imwrite(path, np.full((24, 32, 3), 40 * i, np.uint8))
        return {"file_name": path, "image_id": i, "height": 24, "width": 32,
                "annotations": anns, "class_counts": counts, **extra}

    return [
        rec(0, "annotated", [_ann(0)], [1, 0]),
        rec(1, "count_only", [], [0, 4]),
        rec(2, "empty", [], [0, 0]),
        rec(3, "labels_only", [], [0, 0], image_labels=[1]),
        rec(4, "count_only_2", [], [0, 2]),
    ]


def _files(data):
    return [d["file_name"] for d in data["dataset"]]


def test_models_on_counts_keep_count_only_images(registered):
    cfg = tiny_lc_config(2, ["DATASETS.TRAIN", f"('{registered(_records())}',)"])
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert _files(train_data(cfg, True)) == ["annotated.png", "count_only.png", "count_only_2.png"]
    # image labels alone are examples for CCGR and LC's IMAGE_LABELS_ONLY without mosaics
    assert _files(train_data(cfg, True, labels_suffice=True)) == [
        "annotated.png", "count_only.png", "labels_only.png", "count_only_2.png"]
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # nothing filtered, as in detectron2
    assert len(train_data(cfg, True)["dataset"]) == 5
    assert train_data(cfg, True)["sampler"] is None  # TrainingSampler: detectron2's


def test_instance_models_leave_count_only_images_out(registered, caplog):
    # a model trained on instances would learn a count-only image as background
    name = registered(_records())
    cfg = get_config("Base-MaskRCNN-Synthetic.yaml", ["DATASETS.TRAIN", f"('{name}',)"], "cpu")
    assert _files(train_data(cfg, False)) == ["annotated.png"]  # detectron2's filter
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    assert _files(train_data(cfg, False)) == ["annotated.png", "empty.png", "labels_only.png"]
    assert "2 images have counted objects without annotations" in caplog.text


def test_repeat_factors_count_counted_classes(registered):
    # class a in 1 of 3 kept images, class b (counted only) in 2 of 3: threshold 1 repeats an
    # image by max over its classes of sqrt(1 / frequency)
    cfg = tiny_lc_config(2, ["DATASETS.TRAIN", f"('{registered(_records())}',)",
                             "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
                             "DATALOADER.REPEAT_THRESHOLD", "1.0"])
    sampler = train_data(cfg, True)["sampler"]
    factors = (sampler._int_part + sampler._frac_part).tolist()
    assert factors == pytest.approx([3**0.5, 1.5**0.5, 1.5**0.5])


def test_no_image_left_is_an_error(registered):
    name = registered([r for r in _records() if r["file_name"] == "empty.png"])
    cfg = tiny_lc_config(2, ["DATASETS.TRAIN", f"('{name}',)"])
    with pytest.raises(ValueError, match="no training image left"):
        train_data(cfg, True)


def test_lc_loader_delivers_count_only_images(registered, tmp_path):
    name = registered(_records(tmp_path))
    cfg = tiny_lc_config(2, ["DATASETS.TRAIN", f"('{name}',)", "SOLVER.IMS_PER_BATCH", "3",
                             "DATALOADER.NUM_WORKERS", "0", "INPUT.LC.MOSAIC_PROB", "0.0"])
    seen = {}
    for _, batch in zip(range(4), WSISTrainer.build_train_loader(cfg)):
        for inp in batch:
            seen[inp["file_name"].rsplit("/", 1)[-1]] = inp["counts"].tolist()
    assert seen == {"annotated.png": [1, 0], "count_only.png": [0, 4], "count_only_2.png": [0, 2]}


def test_test_loader_loads_its_split_once(registered, tmp_path):
    records, loads = _records(tmp_path), []
    name = registered(None)
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: loads.append(1) or [dict(r) for r in records])
    cfg = tiny_lc_config(2, ["DATALOADER.NUM_WORKERS", "0"])
    clear_ground_truth_cache()
    try:
        for _ in range(3):  # the trainer builds one at every evaluation
            seen = [inp["file_name"] for batch in WSISTrainer.build_test_loader(cfg, name)
                    for inp in batch]
            assert sorted(seen) == sorted(r["file_name"] for r in records)
        assert len(loads) == 1
    finally:
        clear_ground_truth_cache()
