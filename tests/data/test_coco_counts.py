"""
COCO-format user datasets: conversion to the shared dataset dicts, counts, points, validation.
"""

import copy
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from wsis_d2.data.datasets.coco_counts import (
    load_coco_counts_json,
    point_in_mask,
    point_in_rle,
    _compressed_rle_runs,
    _compressed_rle_runs_exact,
    register_coco_counts_instances,
)

H, W = 40, 60


def _ring_mask():
    yy, xx = np.mgrid[0:H, 0:W]
    r2 = (yy - 20.0) ** 2 + (xx - 30.0) ** 2
    return (r2 <= 12**2) & (r2 >= 7**2)


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def _uncompressed_rle(mask):
    """Column-major run lengths starting with zeros, as in COCO crowd annotations."""
    flat = mask.flatten(order="F").astype(int)
    runs, current, n = [], 0, 0
    for v in flat:
        if v == current:
            n += 1
        else:
            runs.append(n)
            current, n = v, 1
    runs.append(n)
    return {"size": [H, W], "counts": runs}


def _coco():
    block = np.zeros((H, W), bool)
    block[5:15, 40:52] = True
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "height": H, "width": W},
            {"id": 11, "file_name": "sub/b.png", "height": H, "width": W},  # no annotations
            {"id": 12, "file_name": "c.png", "height": H, "width": W},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],  # unsorted ids
        "annotations": [
            # square polygon covering pixels 2..11 x 4..13, no point: derived from the mask
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "iscrowd": 0,
                "bbox": [2, 4, 10, 10],
                "segmentation": [[2, 4, 12, 4, 12, 14, 2, 14]],
            },
            # ring as compressed RLE with its own point
            {
                "id": 2,
                "image_id": 10,
                "category_id": 3,
                "iscrowd": 0,
                "bbox": [18, 8, 25, 25],
                "segmentation": _rle(_ring_mask()),
                "point": [21.25, 20.0],
            },
            # ring again, no point, no bbox: both derived from the mask
            {"id": 3, "image_id": 12, "category_id": 3, "segmentation": _rle(_ring_mask())},
            # crowd region (uncompressed RLE): kept but not counted
            {
                "id": 4,
                "image_id": 12,
                "category_id": 7,
                "iscrowd": 1,
                "bbox": [40, 5, 12, 10],
                "segmentation": _uncompressed_rle(block),
            },
            # box only: the point is the box centre
            {"id": 5, "image_id": 12, "category_id": 7, "bbox": [10.0, 20.0, 8.0, 6.0]},
        ],
    }


def _rle5():
    return mask_util.encode(np.asfortranarray(np.eye(5, dtype=np.uint8)))["counts"].decode()


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_load_counts_points_boxes(tmp_path):
    name = "test_coco_counts_load"
    path = _write(tmp_path, _coco())
    try:
        dicts = load_coco_counts_json(path, "/imgs", dataset_name=name)
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["cat", "dog"]
        assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    finally:
        MetadataCatalog.remove(name)
    assert [d["image_id"] for d in dicts] == [10, 11, 12]
    assert [d["file_name"] for d in dicts] == ["/imgs/a.png", "/imgs/sub/b.png", "/imgs/c.png"]
    assert [d["class_counts"] for d in dicts] == [[1, 1], [0, 0], [1, 1]]
    assert dicts[1]["annotations"] == []

    square, ring = dicts[0]["annotations"]
    assert square["category_id"] == 1 and ring["category_id"] == 0
    assert square["bbox_mode"] == BoxMode.XYXY_ABS
    assert square["bbox"] == [2.0, 4.0, 12.0, 14.0]
    sq = mask_util.decode({"size": [H, W], "counts": square["segmentation"]["counts"].encode()})
    assert isinstance(square["segmentation"]["counts"], str)
    ys, xs = np.nonzero(sq)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 11, 4, 13)
    # centroid of pixels 2..11 x 4..13 is (6.5, 8.5): its pixel (6, 8), reported at the centre
    assert square["point"] == [6.5, 8.5]
    assert ring["point"] == [21.25, 20.0]  # given in the file: kept as is
    assert ring["bbox"] == [18.0, 8.0, 43.0, 33.0]

    ring2, crowd, box_only = dicts[2]["annotations"]
    # the ring's centroid (30, 20) is in the hole: the nearest ring pixel is 7 px away
    x, y = ring2["point"]
    assert _ring_mask()[int(y), int(x)]
    assert (int(x) - 30) ** 2 + (int(y) - 20) ** 2 == 49
    ring_ys, ring_xs = np.nonzero(_ring_mask())
    assert ring2["bbox"] == [ring_xs.min(), ring_ys.min(), ring_xs.max() + 1, ring_ys.max() + 1]
    assert crowd["iscrowd"] == 1 and crowd["category_id"] == 1
    decoded = mask_util.decode({"size": [H, W], "counts": crowd["segmentation"]["counts"].encode()})
    assert decoded[5:15, 40:52].all() and decoded.sum() == 120
    assert box_only["point"] == [14.0, 23.0] and "segmentation" not in box_only
    assert box_only["bbox"] == [10.0, 20.0, 18.0, 26.0]


def test_point_in_mask():
    assert point_in_mask(np.zeros((4, 4), bool)) is None
    m = np.zeros((5, 7), bool)
    m[1, 5] = True
    assert point_in_mask(m) == (5, 1)
    # "C" shape: centroid falls in the opening, answer is the nearest mask pixel
    c = np.zeros((9, 9), bool)
    c[1, 1:8] = c[7, 1:8] = c[1:8, 1] = True
    x, y = point_in_mask(c)
    ys, xs = np.nonzero(c)
    d2 = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    assert c[y, x] and (y - ys.mean()) ** 2 + (x - xs.mean()) ** 2 == pytest.approx(d2.min())



def _point_by_listing(mask):
    """The definition, on the listed pixels: centroid pixel, else the nearest (first) mask pixel."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    if mask[int(cy), int(cx)]:
        return int(cx), int(cy)
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[k]), int(ys[k])


def test_point_in_mask_matches_listing_pixels():
    # rings, crescents and scattered blobs at random offsets, C- and Fortran-ordered (pycocotools)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:61, :83]
    off_centroid = 0
    for i in range(60):
        cy, cx, r = rng.uniform(10, 50), rng.uniform(10, 72), rng.uniform(3, 12)
        d = np.hypot(yy - cy, xx - cx)
        if i % 3 == 0:
            m = (d < r) & (d > r * rng.uniform(0.3, 0.8))
        elif i % 3 == 1:
            m = (d < r) & (np.hypot(yy - cy, xx - cx - r * 0.8) > r * 0.9)
        else:
            m = rng.random(yy.shape) < 0.02
        if not m.any():
            continue
        for arr in (m, np.asfortranarray(m), m.astype(np.uint8)):
            assert point_in_mask(arr) == _point_by_listing(m)
        ys, xs = np.nonzero(m)
        off_centroid += not m[int(ys.mean()), int(xs.mean())]
    assert off_centroid >= 20  # the nearest-pixel branch is exercised

MALFORMED = [
    ("no_images", lambda d: d.pop("images"), "'images'"),
    ("no_annotations", lambda d: d.pop("annotations"), "'annotations'"),
    ("no_categories", lambda d: d.pop("categories"), "'categories'"),
    ("unknown_image", lambda d: d["annotations"][0].update(image_id=99), "image_id"),
    ("unknown_category", lambda d: d["annotations"][1].update(category_id=5), "category_id"),
    ("bbox_len", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox"),
    ("bbox_negative", lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "bbox"),
    ("negative_height", lambda d: d["images"][0].update(height=-5), "height"),
    ("zero_width", lambda d: d["images"][2].update(width=0), "width"),
    ("segm_type", lambda d: d["annotations"][0].update(segmentation="abc"), "segmentation"),
    (
        "polygon_odd",
        lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5]]),
        "segmentation",
    ),
    (
        "rle_size",
        lambda d: d["annotations"][2]["segmentation"].update(size=[W, H]),
        "segmentation.size",
    ),
    (
        "rle_counts",
        lambda d: d["annotations"][2]["segmentation"].update(counts=3),
        "segmentation.counts",
    ),
    (
        "rle_counts_other_size",  # a 5 x 5 mask's string under the image's size
        lambda d: d["annotations"][2]["segmentation"].update(counts=_rle5()),
        "segmentation.counts",
    ),
    (
        "rle_counts_not_ascii",
        lambda d: d["annotations"][2]["segmentation"].update(counts="0\u00e9"),
        "segmentation.counts",
    ),
    (
        "rle_counts_truncated",  # last character says that more follow
        lambda d: d["annotations"][2]["segmentation"].update(counts="Q"),
        "segmentation.counts",
    ),
    (
        "empty_mask_no_box",  # wholly outside the image: no pixel, no box, so no point
        lambda d: d["annotations"][2].update(segmentation=[[W + 5, 0, W + 9, 0, W + 9, 4]]),
        "cannot derive a 'point'",
    ),
    ("fractional_height", lambda d: d["images"][0].update(height=40.5), "height"),
    ("dup_image", lambda d: d["images"][1].update(id=10), "duplicate image id"),
    ("dup_category", lambda d: d["categories"][1].update(id=7), "duplicate category id"),
    ("dup_annotation", lambda d: d["annotations"][1].update(id=1), "duplicate annotation id"),
    ("point_len", lambda d: d["annotations"][1].update(point=[1, 2, 3]), "point"),
    ("point_outside", lambda d: d["annotations"][1].update(point=[W + 1, 2]), "point"),
    ("iscrowd", lambda d: d["annotations"][0].update(iscrowd=2), "iscrowd"),
    ("no_geometry", lambda d: d["annotations"][4].pop("bbox"), "bbox"),
    ("file_name", lambda d: d["images"][0].pop("file_name"), "file_name"),
    ("category_name", lambda d: d["categories"][0].pop("name"), "name"),
    ("image_labels_type", lambda d: d["images"][1].update(image_labels="dog"), "image_labels"),
    ("image_labels_unknown", lambda d: d["images"][1].update(image_labels=[7, 5]),
     "image_labels"),
    ("image_counts_type", lambda d: d["images"][1].update(image_counts=[3]), "image_counts"),
    ("image_counts_key", lambda d: d["images"][1].update(image_counts={"dog": 2}),
     "image_counts"),
    ("image_counts_unknown", lambda d: d["images"][1].update(image_counts={"5": 2}),
     "unknown category id 5"),
    ("image_counts_negative", lambda d: d["images"][1].update(image_counts={"7": -1}),
     "image_counts"),
    ("image_counts_fraction", lambda d: d["images"][1].update(image_counts={"7": 1.5}),
     "image_counts"),
    ("image_counts_bool", lambda d: d["images"][1].update(image_counts={"7": True}),
     "image_counts"),
    ("image_counts_huge", lambda d: d["images"][1].update(image_counts={"7": 2**63}),
     "count in 0..2147483647"),
    ("image_counts_padded_key", lambda d: d["images"][1].update(image_counts={" 7": 1}),
     "has key ' 7'"),
    ("image_counts_zero_key", lambda d: d["images"][1].update(image_counts={"07": 1}),
     "has key '07'"),
    ("image_counts_vs_labels", lambda d: d["images"][1].update(image_counts={"7": 2, "3": 0},
                                                               image_labels=[3]),
     "'image_labels' names categories [3] that 'image_counts' count 0"),
    # image 10 has one dog and one cat annotated: counts must agree with them
    ("image_counts_disagree", lambda d: d["images"][0].update(image_counts={"7": 3, "3": 1}),
     "gives 3 for category 7 but the image's annotations hold 1"),
    ("image_counts_missing_class", lambda d: d["images"][0].update(image_counts={"7": 1}),
     "gives 0 for category 3"),
]


@pytest.mark.parametrize("case,mutate,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_json_names_file_and_field(tmp_path, case, mutate, field):
    data = copy.deepcopy(_coco())
    mutate(data)
    path = _write(tmp_path, data, f"{case}.json")
    with pytest.raises(ValueError) as e:
        load_coco_counts_json(path, "/imgs")
    assert path in str(e.value) and field in str(e.value), str(e.value)


def test_invalid_json_text(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        load_coco_counts_json(str(path), "/imgs")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="json object"):
        load_coco_counts_json(str(path), "/imgs")


def test_register_coco_counts_instances(tmp_path):
    path = _write(tmp_path, _coco())
    names = ["test_coco_counts_reg_a", "test_coco_counts_reg_b"]
    try:
        register_coco_counts_instances(names[0], {}, path, str(tmp_path))
        register_coco_counts_instances(names[1], {"evaluator_type": "counting"}, path, "/x")
        dicts = DatasetCatalog.get(names[0])
        assert len(dicts) == 3 and dicts[0]["file_name"] == str(tmp_path / "a.png")
        meta = MetadataCatalog.get(names[0])
        assert meta.evaluator_type == "wsis_instance"
        assert (meta.json_file, meta.image_root) == (path, str(tmp_path))
        assert meta.thing_classes == ["cat", "dog"]  # set by the loader
        assert MetadataCatalog.get(names[1]).evaluator_type == "counting"
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_image_level_labels_without_annotations(tmp_path):
    # image 11 has no annotation; its image_labels (category ids) say a dog and a cat are there
    data = copy.deepcopy(_coco())
    data["images"][1]["image_labels"] = [3, 7, 3]
    dicts = load_coco_counts_json(_write(tmp_path, data), str(tmp_path))
    by_id = {d["image_id"]: d for d in dicts}
    assert by_id[11]["image_labels"] == [0, 1]  # contiguous: dog (7) -> 1, cat (3) -> 0
    assert by_id[11]["class_counts"] == [0, 0] and by_id[11]["annotations"] == []
    assert "image_labels" not in by_id[10]


def test_image_counts_of_count_only_images(tmp_path):
    # image 11 has no annotation: its image_counts (json keys are strings) are its class counts;
    # image 10's agree with its annotations; image 12's crowd dog is not counted
    data = copy.deepcopy(_coco())
    data["images"][1]["image_counts"] = {"7": 4, "3": 0}
    data["images"][0]["image_counts"] = {"7": 1, "3": 1}
    data["images"][2]["image_counts"] = {7: 1, 3: 1.0}  # int keys and whole floats as well
    dicts = load_coco_counts_json(_write(tmp_path, data), str(tmp_path))
    assert [d["class_counts"] for d in dicts] == [[1, 1], [0, 4], [1, 1]]
    assert dicts[1]["annotations"] == []
    assert all(isinstance(c, int) for d in dicts for c in d["class_counts"])
    # a labelled class absent from image_counts is present but not counted
    data["images"][1]["image_labels"] = [3]
    data["images"][1]["image_counts"] = {"7": 4}
    dicts = load_coco_counts_json(_write(tmp_path, data), str(tmp_path))
    assert dicts[1]["class_counts"] == [0, 4] and dicts[1]["image_labels"] == [0]


def test_compressed_rle_runs_match_pycocotools():
    rng = np.random.default_rng(1)
    for shape, p in (((40, 60), 0.5), ((7, 3), 0.9), ((300, 200), 0.002), ((5, 5), 0.0)):
        mask = rng.random(shape) < p
        counts = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        flat = mask.flatten(order="F")
        edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        if flat[0]:
            runs = [0] + runs
        assert _compressed_rle_runs(counts).tolist() == runs
    assert _compressed_rle_runs(b"0\x7f") is None  # outside "0".."o"
    assert _compressed_rle_runs(b"Q") is None  # continuation bit on the last character
    assert _compressed_rle_runs(b"").tolist() == []
    assert _compressed_rle_runs(b"P" * 12 + b"1").tolist() == [2**60]  # 13 characters: exact
    assert _compressed_rle_runs(b"P" * 13 + b"1") is None  # 2^65 pixels: beyond any image
    # "O" is -1; from the fourth run on it is added to the run two before
    assert _compressed_rle_runs(b"000O") is None  # 0 + (-1): a negative run
    assert _compressed_rle_runs(b"010O").tolist() == [0, 1, 0, 0]
    assert _compressed_rle_runs(b"1O") is None  # a negative second run


def _encode_runs(runs):
    """pycocotools' rleToString in Python ints (any run length, no int64 limits)."""
    out = bytearray()
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as C's on a signed long
            more = x != -1 if c & 0x10 else x != 0
            out.append(48 + (c | 0x20 if more else c))
    return bytes(out)


def test_compressed_rle_runs_equal_the_definition():
    rng = np.random.default_rng(3)
    assert _compressed_rle_runs(_encode_runs([0, 5, 3, 2**40])).tolist() == [0, 5, 3, 2**40]
    for _ in range(3000):  # random strings: valid, malformed, long values
        n = int(rng.integers(0, 25))
        p_more = rng.uniform(0, 1)
        s = bytes(int(48 + (rng.integers(32, 64) if rng.random() < p_more else rng.integers(0, 32)))
                  for _ in range(n))
        exact = _compressed_rle_runs_exact(s)
        if exact is not None and max(exact, default=0) >= 2**62:
            exact = None  # beyond any image: refused
        got = _compressed_rle_runs(s)
        assert (None if got is None else got.tolist()) == exact, s
    # a value padded with zero groups past 12 characters: 1, as pycocotools reads it
    assert _compressed_rle_runs(b"0Q" + b"P" * 11 + b"0").tolist() == [0, 1]
    # differences whose int64 sum would wrap to 12 (true sum 2^64 + 12): refused, not accepted
    wrapping = _encode_runs([12, 2**58, 2**58] + [2**59] * 31)
    runs = _compressed_rle_runs(wrapping)
    assert runs is not None and sum(runs.tolist()) == 2**64 + 12


def test_rle_whose_runs_overflow_is_refused(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 3, "width": 4}],
            "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": {
                "size": [3, 4],
                "counts": _encode_runs([12, 2**58, 2**58] + [2**59] * 31).decode()}}]}
    with pytest.raises(ValueError, match=r"annotations\[0\].*summing to height \* width = 12"):
        load_coco_counts_json(_write(tmp_path, data), str(tmp_path))


def _rle_of(mask):
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_point_in_rle_matches_point_in_mask():
    # the point from the runs' moments equals the decoded mask's, also for masks whose runs wrap
    # from one column to the next (touching the top and bottom rows) and off-centroid shapes
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:47, :71]
    off_centroid = 0
    masks = [np.ones((5, 4), bool), np.pad(np.ones((1, 1), bool), ((3, 2), (0, 6)))]
    for i in range(90):
        cy, cx, r = rng.uniform(0, 47), rng.uniform(0, 71), rng.uniform(2, 30)
        d = np.hypot(yy - cy, xx - cx)
        kind = i % 4
        if kind == 0:
            m = (d < r) & (d > r * rng.uniform(0.3, 0.8))  # rings: centroid in the hole
        elif kind == 1:
            m = (d < r) & (np.hypot(yy - cy, xx - cx - r * 0.8) > r * 0.9)  # crescents
        elif kind == 2:
            m = rng.random(yy.shape) < rng.uniform(0.01, 0.9)  # scattered pixels
        else:
            m = np.abs(yy - cy) < r  # full-height bands: runs across columns
        masks.append(m)
    for m in masks:
        assert point_in_rle(_rle_of(m)) == point_in_mask(m)
        if m.any():
            ys, xs = np.nonzero(m)
            off_centroid += not m[int(ys.mean()), int(xs.mean())]
    assert point_in_rle(_rle_of(np.zeros((6, 9), bool))) is None
    assert off_centroid >= 10  # the decoded nearest-pixel branch is exercised
    # str counts (mask_to_rle's) as bytes; malformed or uncompressed counts are refused
    m = masks[5]
    rle = _rle_of(m)
    assert point_in_rle({"size": rle["size"], "counts": rle["counts"].decode()}) == point_in_mask(m)
    with pytest.raises(ValueError, match="not a compressed RLE of a 3 x 3 mask"):
        point_in_rle({"size": [3, 3], "counts": b"Q"})
    with pytest.raises(ValueError, match="not a compressed RLE of a 3 x 3 mask"):
        point_in_rle({"size": [3, 3], "counts": b"8"})  # 8 pixels, not 9
    with pytest.raises(ValueError, match=r"\(bytes or str\), got list"):
        point_in_rle({"size": [3, 3], "counts": [0, 9]})


def test_lenient_where_detectron2_is(tmp_path):
    data = copy.deepcopy(_coco())
    # a box-only export writes "segmentation": [] next to the box
    data["annotations"][4]["segmentation"] = []
    # a malformed piece (odd number of coordinates) beside a good one is dropped, as detectron2 does
    data["annotations"][0]["segmentation"].append([1, 2, 3, 4, 5])
    # a mask wholly outside the image, with a box: the point from the box, not a box at (0, 0)
    data["annotations"].append(
        {"id": 6, "image_id": 11, "category_id": 3, "bbox": [50.0, 30.0, 4.0, 2.0],
         "segmentation": [[W + 5, 0, W + 9, 0, W + 9, 4]]}
    )
    data["images"][1].update(height=float(H), width=float(W))  # as some exporters write
    dicts = load_coco_counts_json(_write(tmp_path, data), "/imgs")
    square = dicts[0]["annotations"][0]
    assert square["bbox"] == [2.0, 4.0, 12.0, 14.0] and square["point"] == [6.5, 8.5]
    box_only = dicts[2]["annotations"][2]
    assert "segmentation" not in box_only and box_only["point"] == [14.0, 23.0]
    assert dicts[2]["class_counts"] == [1, 1]
    outside = dicts[1]["annotations"][0]
    assert outside["bbox"] == [50.0, 30.0, 54.0, 32.0] and outside["point"] == [52.0, 31.0]
    assert (dicts[1]["height"], dicts[1]["width"]) == (H, W)
    assert all(type(d[k]) is int for d in dicts for k in ("height", "width"))
