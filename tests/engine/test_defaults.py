"""
WSISTrainer's training data: count-only images reach the models trained on counts.
"""

import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import wsis_d2.engine.defaults as defaults
from wsis_d2.engine import WSISTrainer
from wsis_d2.testing import get_config, tiny_lc_config


def _ann(cat):
    return {"category_id": cat, "iscrowd": 0, "bbox": [1, 1, 9, 9], "bbox_mode": 0}


@pytest.fixture
def dataset():
    name = f"_test_defaults_{uuid.uuid4().hex}"
    records = [
        {"file_name": "annotated.jpg", "image_id": 0, "height": 20, "width": 20,
         "annotations": [_ann(0)], "class_counts": [1, 0]},
        {"file_name": "count_only.jpg", "image_id": 1, "height": 20, "width": 20,
         "annotations": [], "class_counts": [0, 4]},
        {"file_name": "empty.jpg", "image_id": 2, "height": 20, "width": 20,
         "annotations": [], "class_counts": [0, 0]},
    ]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["a", "b"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _train_files(cfg, monkeypatch):
    """The file names the train loader would read (None: detectron2 builds the list)."""
    seen = {}

    def fake_loader(cfg, mapper, dataset=None):
        seen["dataset"] = dataset
        return None

    monkeypatch.setattr(defaults, "build_detection_train_loader", fake_loader)
    WSISTrainer.build_train_loader(cfg)
    return None if seen["dataset"] is None else [d["file_name"] for d in seen["dataset"]]


def test_count_only_images_train_lc(dataset, monkeypatch):
    cfg = tiny_lc_config(2, ["DATASETS.TRAIN", f"('{dataset}',)"])
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert _train_files(cfg, monkeypatch) == ["annotated.jpg", "count_only.jpg"]
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # then nothing is filtered, as in detectron2
    assert _train_files(cfg, monkeypatch) is None


def test_mask_rcnn_keeps_detectron2s_filter(dataset, monkeypatch):
    # a model trained on instances would learn a count-only image as background
    cfg = get_config("Base-MaskRCNN-Synthetic.yaml", ["DATASETS.TRAIN", f"('{dataset}',)"], "cpu")
    assert _train_files(cfg, monkeypatch) is None
