"""The evaluators' ground truth is loaded once per registration, not at every evaluation."""

import json
import time
import uuid

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from wsis_d2.data.datasets import register_coco_counts_instances
from wsis_d2.evaluation import CountingEvaluator, DensityEvaluator, InstanceAPEvaluator
from wsis_d2.evaluation import gt_cache
from wsis_d2.evaluation.gt_cache import cached_ground_truth, clear_ground_truth_cache


def _coco(num_objects):
    """One 8 x 8 image holding ``num_objects`` 2 x 2 squares of class "a"."""
    anns = [
        {"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [2 * k, 0, 2, 2],
         "segmentation": [[2 * k, 0, 2 * k + 2, 0, 2 * k + 2, 2, 2 * k, 2]]}
        for k in range(num_objects)
    ]
    return {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
            "annotations": anns, "categories": [{"id": 1, "name": "a"}]}


@pytest.fixture
def split(tmp_path):
    """A registered COCO split whose loads are counted; removed afterwards."""
    name = f"wsis_test_gt_cache_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "split.json"
    path.write_text(json.dumps(_coco(2)))
    register_coco_counts_instances(name, {}, str(path), str(tmp_path))
    loader = DatasetCatalog[name]
    loads = []
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: loads.append(1) or loader())
    clear_ground_truth_cache()
    yield name, path, loads
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    clear_ground_truth_cache()


def _evaluate_counts(name, counts):
    ev = CountingEvaluator(name, distributed=False, baseline_dataset=name)
    ev.reset()
    ev.process([{"image_id": 1}], [{"counts": torch.tensor([float(counts)])}])
    return ev.evaluate()


def _evaluate_instances(name):
    ev = InstanceAPEvaluator(name, distributed=False)
    ev.reset()
    inst = Instances((8, 8))
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :2, :2] = True
    inst.pred_masks, inst.scores = masks, torch.tensor([0.9])
    inst.pred_classes = torch.tensor([0])
    inst.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
    ev.process([{"image_id": 1, "height": 8, "width": 8}], [{"instances": inst}])
    return ev.evaluate()


def test_each_evaluation_reuses_the_loaded_split(split):
    name, _, loads = split
    # evaluators are built anew at every evaluation, as detectron2's trainer does
    for _ in range(3):
        assert _evaluate_counts(name, 1)["counting"]["MAE"] == 1.0
    assert len(loads) == 2  # the counts and the baseline's mean counts, once each
    for _ in range(2):
        ap = _evaluate_instances(name)["wsis_instance"]["mAP_r50"]
        assert ap == pytest.approx(50.0)  # one of the two squares found
    assert len(loads) == 3


def test_a_changed_split_is_loaded_again(split):
    name, path, loads = split
    assert _evaluate_counts(name, 2)["counting"]["MAE"] == 0.0
    n = len(loads)
    # the json rewritten under the same registration: a new stamp (size and time) reloads it
    time.sleep(0.01)
    path.write_text(json.dumps(_coco(3)))
    assert _evaluate_counts(name, 2)["counting"]["MAE"] == 1.0
    assert len(loads) > n
    n = len(loads)
    # registered again: a new loader
    loader = DatasetCatalog[name]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: loads.append(1) or loader())
    _evaluate_counts(name, 2)
    assert len(loads) > n


def test_cache_keeps_the_most_recent_entries(split, monkeypatch):
    name, _, loads = split
    monkeypatch.setattr(gt_cache, "MAX_ENTRIES", 2)
    calls = []
    for kind in ("a", "b", "a", "c", "b"):
        cached_ground_truth(kind, name, lambda kind=kind: calls.append(kind) or kind)
    # "a" was used again before "c" came, so "b" was the oldest: evicted, then computed again
    assert calls == ["a", "b", "c", "b"]
    assert cached_ground_truth("x", "wsis_no_such_split", lambda: 7) == 7  # not registered
    assert not any(key[1][0] == "wsis_no_such_split" for key in gt_cache._CACHE)


def test_density_evaluators_share_the_loaded_split():
    name = f"wsis_test_gt_cache_density_{uuid.uuid4().hex[:8]}"
    loads = []
    record = {"file_name": "a.png", "height": 4, "width": 4, "image_id": 0,
              "points": [[1.0, 1.0]], "point_classes": [0]}
    DatasetCatalog.register(name, lambda: loads.append(1) or [dict(record)])
    MetadataCatalog.get(name).set(thing_classes=["cell"], evaluator_type="density")
    try:
        for _ in range(3):
            ev = DensityEvaluator(name, distributed=False)
            ev.reset()
            ev.process([{"image_id": 0}], [{"density": torch.full((1, 4, 4), 2.0 / 16)}])
            assert ev.evaluate()["density"]["MAE"] == pytest.approx(1.0)
        assert len(loads) == 1
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        clear_ground_truth_cache()


def test_a_file_rewritten_during_the_load_is_not_kept(split):
    name, path, _ = split
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.01)
        path.write_text(json.dumps(_coco(len(calls) + 3)))  # another size: another stamp
        return len(calls)

    assert cached_ground_truth("k", name, compute) == 1
    assert cached_ground_truth("k", name, compute) == 2  # the first value was of neither file
    assert cached_ground_truth("k", name, lambda: 0) == 0  # nor was the second
