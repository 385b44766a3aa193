"""
Embedded synthetic data: determinism, ground-truth consistency, coverage, cache and registration.

Everything is generated under pytest's tmp_path (DETECTRON2_DATASETS is monkeypatched).
"""

import json
import multiprocessing
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import annotations_to_instances, read_image
from detectron2.structures import BoxMode

import wsis_d2  # noqa: F401  (registers the builtin splits)
from wsis_d2.data.datasets import builtin, synthetic
from wsis_d2.data.datasets.coco_counts import load_coco_counts_json
from wsis_d2.data.datasets.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticSpec,
    prepare_synthetic_split,
    render_synthetic_image,
    write_synthetic_split,
)

C = len(SYNTHETIC_CLASSES)
SMALL = dict(min_image_size=128, max_image_size=200)


def _tight_xyxy(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _check_record(record, masks_expected=None):
    """Ground-truth consistency of one loaded dataset dict (shared convention)."""
    h, w = record["height"], record["width"]
    anns = record["annotations"]
    assert len(anns) >= 1
    union = np.zeros((h, w), np.int32)
    counts = np.zeros(C, int)
    for k, ann in enumerate(anns):
        assert ann["bbox_mode"] == BoxMode.XYXY_ABS and ann["iscrowd"] == 0
        assert 0 <= ann["category_id"] < C
        rle = ann["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
        mask = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}) > 0
        assert mask.sum() > 0
        np.testing.assert_allclose(ann["bbox"], _tight_xyxy(mask))
        x, y = ann["point"]
        assert mask[int(y), int(x)], "point outside its mask"
        # the point is the mask pixel nearest to the centroid (the centroid's own pixel if inside)
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
        if mask[int(cy), int(cx)]:
            assert (int(x), int(y)) == (int(cx), int(cy))
        else:
            d2 = (ys - cy) ** 2 + (xs - cx) ** 2
            assert (int(y) - cy) ** 2 + (int(x) - cx) ** 2 == pytest.approx(d2.min())
        union += mask
        counts[ann["category_id"]] += 1
        if masks_expected is not None:
            np.testing.assert_array_equal(mask, masks_expected[k])
    assert union.max() <= 1, "instance masks overlap"
    assert record["class_counts"] == counts.tolist()


def test_render_is_deterministic_and_index_dependent():
    spec = SyntheticSpec(num_images=3, seed=7, **SMALL)
    a_img, a_inst = render_synthetic_image(spec, 2)
    b_img, b_inst = render_synthetic_image(spec, 2)
    np.testing.assert_array_equal(a_img, b_img)
    assert [d["category_id"] for d in a_inst] == [d["category_id"] for d in b_inst]
    for d, e in zip(a_inst, b_inst):
        np.testing.assert_array_equal(d["mask"], e["mask"])
    c_img, _ = render_synthetic_image(spec, 1)
    d_img, _ = render_synthetic_image(SyntheticSpec(num_images=3, seed=8, **SMALL), 2)
    for other in (c_img, d_img):
        assert other.shape != a_img.shape or not np.array_equal(other, a_img)


def test_split_files_are_identical_across_runs(tmp_path):
    spec = SyntheticSpec(num_images=4, seed=3, **SMALL)
    for d in ("a", "b"):
        write_synthetic_split(spec, str(tmp_path / d))
    names = sorted(os.listdir(tmp_path / "a" / "images"))
    assert names == sorted(os.listdir(tmp_path / "b" / "images")) and len(names) == 4
    for rel in [os.path.join("images", n) for n in names] + ["annotations.json"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_written_split_matches_single_image_rendering(tmp_path):
    """Any image regenerated alone equals the split's file (PNG: lossless) and its annotations."""
    spec = SyntheticSpec(num_images=6, seed=11, image_format="png", **SMALL)
    json_file = write_synthetic_split(spec, str(tmp_path))
    dicts = load_coco_counts_json(json_file, str(tmp_path / "images"))
    assert [d["image_id"] for d in dicts] == list(range(1, 7))
    for index in (0, 5, 3):
        image, instances = render_synthetic_image(spec, index)
        record = dicts[index]
        on_disk = read_image(record["file_name"], format="RGB")
        np.testing.assert_array_equal(on_disk, image)
        assert (record["height"], record["width"]) == image.shape[:2]
        assert [a["category_id"] for a in record["annotations"]] == [
            d["category_id"] for d in instances
        ]
        _check_record(record, [d["mask"] for d in instances])


def test_ground_truth_consistency_and_coverage():
    """Over a small split: all classes appear, counts >= 5 are frequent, GT is self-consistent."""
    spec = SyntheticSpec(num_images=48, seed=123)
    images_per_class = np.zeros(C, int)
    with_count_ge5, num_classes_seen = 0, []
    for index in range(spec.num_images):
        image, instances = render_synthetic_image(spec, index)
        h, w = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert 128 <= h <= 320 and 128 <= w <= 320
        record = {"height": h, "width": w, "annotations": []}
        for inst in instances:
            ann = synthetic._instance_annotation(inst["mask"])
            x, y, bw, bh = ann["bbox"]
            # truncated or occluded objects can only be smaller than the drawn diameter
            assert max(bw, bh) <= spec.max_object_size + 3
            ann["bbox"] = [x, y, x + bw, y + bh]
            ann.update(bbox_mode=BoxMode.XYXY_ABS, category_id=inst["category_id"])
            record["annotations"].append(ann)
        counts = np.bincount([d["category_id"] for d in instances], minlength=C)
        record["class_counts"] = counts.tolist()
        _check_record(record)
        assert counts.max() <= spec.max_instances_per_class
        num_classes_seen.append(int((counts > 0).sum()))
        images_per_class += counts > 0
        with_count_ge5 += int(counts.max() >= 5)
    assert images_per_class.min() >= 1, images_per_class
    assert set(num_classes_seen) <= {1, 2, 3} and len(set(num_classes_seen)) >= 2
    assert with_count_ge5 / spec.num_images >= 0.15


def test_spec_validation_and_digest():
    with pytest.raises(ValueError, match="image_format"):
        SyntheticSpec(num_images=1, seed=0, image_format="bmp")
    with pytest.raises(ValueError, match="min_image_size"):
        SyntheticSpec(num_images=1, seed=0, min_image_size=400)
    a = SyntheticSpec(num_images=4, seed=0)
    assert a.digest() == SyntheticSpec(num_images=4, seed=0).digest()
    assert a.digest() != SyntheticSpec(num_images=5, seed=0).digest()
    assert a.digest() != SyntheticSpec(num_images=4, seed=0, min_visible_fraction=0.5).digest()


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    root = str(tmp_path)
    spec = SyntheticSpec(num_images=3, seed=5, **SMALL)
    json_file, image_root = prepare_synthetic_split(root, "s", spec)
    assert json_file == os.path.join(root, "wsis_synthetic", "s", "annotations.json")
    assert len(os.listdir(image_root)) == 3
    first = json.load(open(json_file))

    calls = []
    real_write = synthetic.write_synthetic_split

    def counting_write(spec, out_dir):
        calls.append(spec)
        return real_write(spec, out_dir)

    monkeypatch.setattr(synthetic, "write_synthetic_split", counting_write)
    assert prepare_synthetic_split(root, "s", spec) == (json_file, image_root)
    assert calls == []  # reused

    # other parameters -> regenerated in place
    spec2 = SyntheticSpec(num_images=2, seed=6, **SMALL)
    prepare_synthetic_split(root, "s", spec2)
    assert calls == [spec2] and len(os.listdir(image_root)) == 2
    assert json.load(open(json_file))["images"] != first["images"]
    stored = json.load(open(os.path.join(root, "wsis_synthetic", "s", "spec.json")))
    assert stored["digest"] == spec2.digest() and stored["seed"] == 6

    # another generator version -> regenerated
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    prepare_synthetic_split(root, "s", spec2)
    assert len(calls) == 2

    # an unreadable spec file -> regenerated
    with open(os.path.join(root, "wsis_synthetic", "s", "spec.json"), "w") as f:
        f.write("{broken")
    prepare_synthetic_split(root, "s", spec2)
    assert len(calls) == 3
    prepare_synthetic_split(root, "s", spec2)
    assert len(calls) == 3
    # no temporary or stale directories are left behind
    assert sorted(
        p for p in os.listdir(tmp_path / "wsis_synthetic") if not p.endswith(".lock")
    ) == ["s"]


def _prepare_in_child(root, queue):
    spec = SyntheticSpec(num_images=6, seed=9, **SMALL)
    queue.put(prepare_synthetic_split(root, "race", spec))


def test_concurrent_generation_is_safe(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [queue.get(timeout=5) for _ in procs]
    assert results[0] == results[1]
    dicts = load_coco_counts_json(*results[0])
    assert len(dicts) == 6 and all(os.path.isfile(d["file_name"]) for d in dicts)
    left = [p for p in os.listdir(tmp_path / "wsis_synthetic") if not p.endswith(".lock")]
    assert left == ["race"]


def test_install_tolerates_a_concurrent_writer(tmp_path):
    """A finished copy never clobbers a current split; a stale split is replaced, not merged."""
    spec = SyntheticSpec(num_images=1, seed=2, **SMALL)
    stale_spec = SyntheticSpec(num_images=2, seed=3, **SMALL)
    for d, s in (("t1", spec), ("t2", spec), ("t3", stale_spec)):
        write_synthetic_split(s, str(tmp_path / d))
        with open(tmp_path / d / "spec.json", "w") as f:
            json.dump({"digest": s.digest()}, f)
    target = str(tmp_path / "split")
    synthetic._install(str(tmp_path / "t1"), target, spec)
    inode = os.stat(target).st_ino
    synthetic._install(str(tmp_path / "t2"), target, spec)  # e.g. a writer without working locks
    assert os.stat(target).st_ino == inode and os.path.isdir(tmp_path / "t2")
    assert synthetic._split_is_current(target, spec)

    synthetic._install(str(tmp_path / "t3"), target, stale_spec)
    assert synthetic._split_is_current(target, stale_spec)
    assert len(os.listdir(os.path.join(target, "images"))) == 2
    assert sorted(os.listdir(tmp_path)) == ["split", "t2"]  # the replaced copy is removed


def test_builtin_registration():
    tables = builtin._PREDEFINED_SPLITS_SYNTHETIC
    expected = {
        "wsis_synth_train": 800,
        "wsis_synth_val": 200,
        "wsis_synth_test": 200,
        "wsis_synth_mini_train": 16,
        "wsis_synth_mini_val": 8,
        "wsis_synth_train_4k": 4000,
    }
    assert {k: v[1].num_images for k, v in tables.items()} == expected
    assert len({v[1].seed for v in tables.values()}) == len(tables)
    assert len({v[0] for v in tables.values()}) == len(tables)
    registered = set(DatasetCatalog.list())
    for name in expected:
        assert name in registered
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(SYNTHETIC_CLASSES)
        assert meta.evaluator_type == "wsis_instance"
        assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(C)}


def test_registered_split_generates_under_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    meta = MetadataCatalog.get("wsis_synth_mini_val")
    # reading json_file generates the split (COCOEvaluator may be built before the loader)
    json_file = meta.json_file
    assert json_file == str(tmp_path / "wsis_synthetic" / "mini_val" / "annotations.json")
    assert os.path.isfile(json_file)
    dicts = DatasetCatalog.get("wsis_synth_mini_val")
    assert len(dicts) == 8
    coco = json.load(open(json_file))
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == list(
        SYNTHETIC_CLASSES
    )
    assert all("point" in a and a["iscrowd"] == 0 for a in coco["annotations"])
    for record in dicts[:3]:
        assert record["file_name"].startswith(meta.image_root)
        image = read_image(record["file_name"], format="BGR")
        assert image.shape == (record["height"], record["width"], 3)
        _check_record(record)
        # usable by detectron2's stock mapper helpers (bitmask format for RLE)
        inst = annotations_to_instances(
            record["annotations"], image.shape[:2], mask_format="bitmask"
        )
        assert inst.gt_masks.tensor.shape == (len(record["annotations"]),) + image.shape[:2]
        assert inst.gt_classes.tolist() == [a["category_id"] for a in record["annotations"]]
    # JPEG at quality 95 stays close to the rendered pixels
    rendered, _ = render_synthetic_image(
        builtin._PREDEFINED_SPLITS_SYNTHETIC["wsis_synth_mini_val"][1], 0
    )
    on_disk = cv2.imread(dicts[0]["file_name"])[:, :, ::-1].astype(np.float32)
    assert np.abs(on_disk - rendered).mean() < 4.0


def test_coco_evaluator_scores_ground_truth_as_perfect(tmp_path, monkeypatch):
    """metadata json_file + id mapping work with detectron2's COCOEvaluator out of the box."""
    import torch
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    name = "wsis_synth_mini_val"
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), use_fast_impl=False)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        h, w = record["height"], record["width"]
        anns = record["annotations"]
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
        masks = [
            mask_util.decode({"size": [h, w], "counts": a["segmentation"]["counts"].encode()})
            for a in anns
        ]
        inst.pred_masks = torch.from_numpy(np.stack(masks)).bool()
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
