"""
Image-level counts and labels of dataset dicts: class_counts_of, image_labels_of, and the train
filter that keeps count-only images.
"""

import numpy as np
import pytest

from wsis_d2.data.image_labels import (
    class_counts_of,
    filter_images_without_objects,
    image_labels_of,
)


def _ann(cat, crowd=0):
    return {"category_id": cat, "iscrowd": crowd, "bbox": [0, 0, 2, 2], "bbox_mode": 0}


def test_class_counts_from_annotations_or_given():
    d = {"file_name": "a.jpg", "annotations": [_ann(1), _ann(1), _ann(0, crowd=1)]}
    assert class_counts_of(d, 3).tolist() == [0, 2, 0]
    d["class_counts"] = [0, 2, 0]
    assert class_counts_of(d, 3).tolist() == [0, 2, 0]
    d["class_counts"] = [1, 2, 0]  # the crowd region is not an object to count
    with pytest.raises(ValueError, match="a.jpg.*class 0 is 1 but the annotations hold 0"):
        class_counts_of(d, 3)


def test_count_only_image():
    # counted objects without annotations (a COCO image's "image_counts"): the counts stand
    d = {"file_name": "b.jpg", "annotations": [], "class_counts": [0, 0, 5]}
    assert class_counts_of(d, 3).tolist() == [0, 0, 5]
    assert image_labels_of(d, 3).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="b.jpg.*2 entries but the dataset has 3"):
        class_counts_of({**d, "class_counts": [0, 5]}, 3)
    # beyond 2**31 - 1 int64 may wrap to a negative count
    with pytest.raises(ValueError, match="b.jpg.*integers in 0..2147483647"):
        class_counts_of({**d, "class_counts": [0, 0, 2**63]}, 3)


def test_filter_keeps_count_only_images():
    dicts = [
        {"file_name": "annotated", "annotations": [_ann(0)], "class_counts": [1, 0]},
        {"file_name": "count_only", "annotations": [], "class_counts": [0, 3]},
        {"file_name": "empty", "annotations": [], "class_counts": [0, 0]},
        {"file_name": "crowd_only", "annotations": [_ann(1, crowd=1)], "class_counts": [0, 0]},
        {"file_name": "no_counts", "annotations": [_ann(1)]},
        {"file_name": "labels_only", "annotations": [], "image_labels": [1]},
    ]
    kept = [d["file_name"] for d in filter_images_without_objects(dicts)]
    # detectron2's filter keeps "annotated" and "no_counts"; count-only images are kept too
    assert kept == ["annotated", "count_only", "no_counts"]
