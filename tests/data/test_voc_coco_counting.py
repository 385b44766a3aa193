"""
The paper's datasets in their on-disk layouts, built as tiny fixtures: VOC 2007 counting (XML),
VOC 2012 instance segmentation (palette PNGs), COCO 2014 counting halves and COCO-VOC.
"""

import json
import os
import tempfile
import unittest
import xml.etree.ElementTree as ET

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

import wsis_d2  # noqa: F401  (registers the builtin splits)
from wsis_d2.testing import datasets_root
from wsis_d2.data.datasets.coco_counting import (
    coco_half_split,
    register_coco_counting,
    restrict_to_voc,
)
from wsis_d2.data.datasets.voc_counting import (
    VOC_CLASSES,
    register_voc_counting,
    register_voc_instance_segmentation,
)
from wsis_d2.lc.mapper import LCDatasetMapper, class_counts_of

# the standard VOC class order, written out independently of the code under test
VOC = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()


def _write_xml(path, width, height, objects, size=True):
    root = ET.Element("annotation")
    if size:
        s = ET.SubElement(root, "size")
        ET.SubElement(s, "width").text = str(width)
        ET.SubElement(s, "height").text = str(height)
        ET.SubElement(s, "depth").text = "3"
    for name, difficult, (x1, y1, x2, y2) in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = name
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "difficult").text = str(difficult)
        b = ET.SubElement(o, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ET.SubElement(b, k).text = str(v)
    ET.ElementTree(root).write(path)


def _palette_png(path, indices):
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    palette = np.random.RandomState(1).randint(0, 256, size=768).tolist()
    img.putpalette(palette)
    img.save(path)


class _TmpRoot(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = cls.tmp.name

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def _register_once(self, name, fn, *args, **kw):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        fn(name, *args, **kw)
        return name


class TestVOCCounting(_TmpRoot):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        d = os.path.join(cls.root, "VOC2007")
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            os.makedirs(os.path.join(d, sub))
        _write_xml(
            os.path.join(d, "Annotations", "000001.xml"),
            353,
            500,
            [
                ("dog", 0, (48, 240, 195, 371)),
                ("person", 0, (8, 12, 352, 498)),
                ("person", 1, (1, 1, 10, 10)),  # difficult
                ("dog", 0, (100, 100, 120, 130)),
            ],
        )
        _write_xml(os.path.join(d, "Annotations", "000002.xml"), 335, 500, [])
        _write_xml(
            os.path.join(d, "Annotations", "000004.xml"),
            500,
            406,
            [("car", 1, (13, 311, 84, 362)), ("tvmonitor", 0, (1, 1, 500, 406))],
        )
        with open(os.path.join(d, "ImageSets/Main/test.txt"), "w") as f:
            f.write("000001\n000002\n\n000004\n")
        with open(os.path.join(d, "ImageSets/Main/broken.txt"), "w") as f:
            f.write("000001\n000003\n")  # 000003 has no XML
        with open(os.path.join(d, "Annotations", "000005.xml"), "w") as f:
            f.write("<annotation><size><width>3</width>")  # truncated
        with open(os.path.join(d, "ImageSets/Main/malformed.txt"), "w") as f:
            f.write("000005\n")
        _write_xml(
            os.path.join(d, "Annotations", "000006.xml"), 10, 10, [("unicorn", 0, (1, 1, 2, 2))]
        )
        _write_xml(os.path.join(d, "Annotations", "000007.xml"), 10, 10, [], size=False)
        for i in (6, 7):
            with open(os.path.join(d, f"ImageSets/Main/only{i}.txt"), "w") as f:
                f.write(f"00000{i}\n")

    def test_counts_exclude_difficult(self):
        name = self._register_once(
            "_test_voc07_count", register_voc_counting, "VOC2007", "Main/test.txt", self.root
        )
        meta = MetadataCatalog.get(name)
        self.assertEqual(meta.thing_classes, VOC)
        self.assertEqual(meta.evaluator_type, "counting")
        dicts = DatasetCatalog.get(name)
        self.assertEqual([d["image_id"] for d in dicts], ["000001", "000002", "000004"])
        d1, d2, d4 = dicts
        self.assertEqual(d1["file_name"], os.path.join(self.root, "VOC2007/JPEGImages/000001.jpg"))
        self.assertEqual((d1["height"], d1["width"]), (500, 353))
        expected = [0] * 20
        expected[VOC.index("dog")] = 2
        expected[VOC.index("person")] = 1
        self.assertEqual(d1["class_counts"], expected)
        self.assertEqual(d2["class_counts"], [0] * 20)
        self.assertEqual(d2["annotations"], [])
        expected = [0] * 20
        expected[VOC.index("tvmonitor")] = 1
        self.assertEqual(d4["class_counts"], expected)  # the car is difficult
        a = d1["annotations"]
        self.assertEqual(len(a), 4)
        self.assertEqual([x["iscrowd"] for x in a], [0, 0, 1, 0])
        self.assertEqual([x["difficult"] for x in a], [0, 0, 1, 0])
        # 1-based inclusive VOC pixels -> continuous [x1 - 1, x2]
        np.testing.assert_allclose(a[0]["bbox"], [47, 239, 195, 371])
        np.testing.assert_allclose(a[0]["point"], [121, 305])
        self.assertEqual(a[0]["category_id"], VOC.index("dog"))

        # the mapper's counts agree: difficult objects are crowd-like, never counted
        self.assertEqual(class_counts_of(d1, 20).tolist(), d1["class_counts"])
        self.assertEqual(class_counts_of(d4, 20).tolist(), d4["class_counts"])

    def test_count_difficult_option(self):
        name = self._register_once(
            "_test_voc07_count_diff",
            register_voc_counting,
            "VOC2007",
            "Main/test.txt",
            self.root,
            count_difficult=True,
        )
        d1, _, d4 = DatasetCatalog.get(name)
        self.assertEqual(d1["class_counts"][VOC.index("person")], 2)
        self.assertEqual(d4["class_counts"][VOC.index("car")], 1)
        self.assertEqual([x["iscrowd"] for x in d1["annotations"]], [0, 0, 0, 0])

    def test_bad_files_raise_value_error_naming_them(self):
        cases = [
            ("Main/broken.txt", "000003.xml"),
            ("Main/malformed.txt", "000005.xml"),
            ("Main/only6.txt", r"000006\.xml.*unicorn"),
            ("Main/only7.txt", r"000007\.xml.*size"),
            ("Main/missing.txt", "missing.txt"),
        ]
        for image_set, pattern in cases:
            with self.subTest(image_set=image_set):
                name = self._register_once(
                    "_test_voc07_bad", register_voc_counting, "VOC2007", image_set, self.root
                )
                with self.assertRaisesRegex(ValueError, pattern):
                    DatasetCatalog.get(name)

    def test_registration_is_lazy_and_reads_env_root(self):
        # registering on a root that does not exist touches nothing
        name = self._register_once(
            "_test_voc07_nowhere",
            register_voc_counting,
            "VOC2007",
            "Main/test.txt",
            os.path.join(self.root, "does_not_exist"),
        )
        with self.assertRaisesRegex(ValueError, "does_not_exist"):
            DatasetCatalog.get(name)
        # the builtin split resolves $DETECTRON2_DATASETS when loaded
        for split in ("train", "val", "trainval", "test"):
            self.assertEqual(
                MetadataCatalog.get(f"voc_2007_count_{split}").evaluator_type, "counting"
            )
        with datasets_root(self.root):
            dicts = DatasetCatalog.get("voc_2007_count_test")
        self.assertEqual(len(dicts), 3)


class TestVOCInstanceSegmentation(_TmpRoot):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        d = os.path.join(cls.root, "VOC2012")
        for sub in (
            "JPEGImages",
            "SegmentationObject",
            "SegmentationClass",
            "ImageSets/Segmentation",
        ):
            os.makedirs(os.path.join(d, sub))
        h, w = 24, 32
        obj = np.zeros((h, w), np.uint8)
        cls_ = np.zeros((h, w), np.uint8)
        # instance 1: a person (15) with a void boundary ring
        obj[2:10, 2:12] = 255
        obj[3:9, 3:11] = 1
        cls_[2:10, 2:12] = 255
        cls_[3:9, 3:11] = 15
        # instance 2: mostly dog (12), a few pixels labelled cat (8) -> dog by majority
        obj[12:20, 4:14] = 2
        cls_[12:20, 4:14] = 12
        cls_[12:14, 4:6] = 8
        # instance 3: a second person, an L shape whose centroid is outside it
        obj[2:20, 20:23] = 3
        obj[17:20, 20:31] = 3
        cls_[obj == 3] = 15
        cls.obj, cls.cls = obj, cls_
        _palette_png(os.path.join(d, "SegmentationObject", "2007_000032.png"), obj)
        _palette_png(os.path.join(d, "SegmentationClass", "2007_000032.png"), cls_)
        # an image with only background
        _palette_png(os.path.join(d, "SegmentationObject", "2007_000039.png"), np.zeros((8, 9)))
        _palette_png(os.path.join(d, "SegmentationClass", "2007_000039.png"), np.zeros((8, 9)))
        with open(os.path.join(d, "ImageSets/Segmentation/val.txt"), "w") as f:
            f.write("2007_000032\n2007_000039\n")
        # broken fixtures: an RGB rendering, mismatched sizes, instance without class
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
            os.path.join(d, "SegmentationObject", "rgb.png")
        )
        _palette_png(os.path.join(d, "SegmentationClass", "rgb.png"), np.zeros((4, 4)))
        _palette_png(os.path.join(d, "SegmentationObject", "size.png"), np.zeros((4, 4)))
        _palette_png(os.path.join(d, "SegmentationClass", "size.png"), np.zeros((4, 5)))
        o = np.zeros((4, 4))
        o[1:3, 1:3] = 1
        _palette_png(os.path.join(d, "SegmentationObject", "nocls.png"), o)
        _palette_png(os.path.join(d, "SegmentationClass", "nocls.png"), np.zeros((4, 4)))
        for n in ("rgb", "size", "nocls", "gone"):
            with open(os.path.join(d, f"ImageSets/Segmentation/{n}.txt"), "w") as f:
                f.write(n + "\n")

    def test_instances_masks_classes_counts(self):
        name = self._register_once(
            "_test_voc12_seg",
            register_voc_instance_segmentation,
            "VOC2012",
            "Segmentation/val.txt",
            self.root,
        )
        self.assertEqual(MetadataCatalog.get(name).evaluator_type, "wsis_instance")
        d, empty = DatasetCatalog.get(name)
        self.assertEqual((d["height"], d["width"]), (24, 32))
        self.assertEqual(d["image_id"], "2007_000032")
        self.assertTrue(d["file_name"].endswith("VOC2012/JPEGImages/2007_000032.jpg"))
        anns = d["annotations"]
        self.assertEqual([a["category_id"] for a in anns], [14, 11, 14])  # person, dog, person
        for k, a in zip((1, 2, 3), anns):
            mask = mask_util.decode(
                {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
            )
            np.testing.assert_array_equal(mask.astype(bool), self.obj == k)
            x, y = a["point"]
            self.assertTrue(self.obj[int(y), int(x)] == k, f"point of instance {k} not inside")
            ys, xs = np.nonzero(self.obj == k)
            np.testing.assert_allclose(a["bbox"], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            self.assertEqual(a["iscrowd"], 0)
        expected = [0] * 20
        expected[VOC.index("person")] = 2
        expected[VOC.index("dog")] = 1
        self.assertEqual(d["class_counts"], expected)
        self.assertEqual(empty["annotations"], [])
        self.assertEqual(empty["class_counts"], [0] * 20)
        self.assertEqual((empty["height"], empty["width"]), (8, 9))

        # test-time mapping gives the masks as instances
        img_dir = os.path.join(self.root, "VOC2012/JPEGImages")
        Image.fromarray(np.full((24, 32, 3), 128, np.uint8)).save(
            os.path.join(img_dir, "2007_000032.jpg")
        )
        out = LCDatasetMapper(False, augmentations=[], num_classes=20)(d)
        np.testing.assert_array_equal(out["instances"].gt_masks.tensor[1].numpy(), self.obj == 2)
        self.assertEqual(out["counts"].tolist(), expected)

    def test_bad_pngs(self):
        for n, pattern in (
            ("rgb", r"SegmentationObject/rgb\.png.*mode"),
            ("size", r"size\.png"),
            ("nocls", r"nocls\.png.*instance 1"),
            ("gone", r"gone\.png"),
        ):
            with self.subTest(n=n):
                name = self._register_once(
                    "_test_voc12_bad",
                    register_voc_instance_segmentation,
                    "VOC2012",
                    f"Segmentation/{n}.txt",
                    self.root,
                )
                with self.assertRaisesRegex(ValueError, pattern):
                    DatasetCatalog.get(name)

    def test_builtin_names(self):
        for name in ("voc_2012_seg_val_instance", "voc_2012_seg_train_instance"):
            self.assertEqual(MetadataCatalog.get(name).evaluator_type, "wsis_instance")
            self.assertEqual(list(MetadataCatalog.get(name).thing_classes), VOC)
        self.assertEqual(list(VOC_CLASSES), VOC)


def _coco_json(path, images, annotations, categories=None):
    if categories is None:
        categories = [
            {"id": c["id"], "name": c["name"], "supercategory": "x"}
            for c in COCO_CATEGORIES
            if c["isthing"]
        ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


class TestCOCOCounting(_TmpRoot):
    # COCO category ids of the official json
    IDS = {
        "person": 1, "motorcycle": 4, "airplane": 5, "giraffe": 25, "couch": 63,
        "potted plant": 64, "dining table": 67, "tv": 72,
    }  # fmt: skip

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        ann_dir = os.path.join(cls.root, "coco", "annotations")
        os.makedirs(ann_dir)
        # val2014: image ids out of order; 40 has no annotation, 31 only a crowd one
        val_ids = [50, 12, 40, 31, 7, 66, 21]
        images = [
            {"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": 20, "width": 30}
            for i in val_ids
        ]
        anns = []

        def add(image_id, cat, iscrowd=0):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cls.IDS[cat],
                    "bbox": [2, 3, 5, 6],
                    "segmentation": [[2, 3, 7, 3, 7, 9, 2, 9]],
                    "area": 30,
                    "iscrowd": iscrowd,
                }
            )

        add(50, "person")
        add(50, "person")
        add(50, "giraffe")
        add(12, "airplane")
        add(31, "person", iscrowd=1)
        add(7, "motorcycle")
        add(7, "couch")
        add(7, "potted plant")
        add(7, "dining table")
        add(7, "tv")
        add(7, "tv")
        add(66, "giraffe")
        add(21, "person")
        add(21, "person", iscrowd=1)
        cls.val_json = os.path.join(ann_dir, "instances_val2014.json")
        _coco_json(cls.val_json, images, anns)
        # train2014: 2 images, one without annotations
        train_images = [
            {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 20, "width": 30}
            for i in (9, 3)
        ]
        train_anns = [dict(anns[0], id=1, image_id=9), dict(anns[3], id=2, image_id=9)]
        _coco_json(os.path.join(ann_dir, "instances_train2014.json"), train_images, train_anns)
        cls.bad_json = os.path.join(ann_dir, "few_categories.json")
        _coco_json(cls.bad_json, images[:1], [], [{"id": 1, "name": "person"}])

    def _load(self, half, voc, json_file="coco/annotations/instances_val2014.json"):
        name = self._register_once(
            f"_test_coco_{half}_{voc}",
            register_coco_counting,
            json_file,
            "coco/val2014",
            half,
            voc,
            self.root,
        )
        return name, DatasetCatalog.get(name)

    def test_val_test_halves(self):
        # annotated images (crowd-only 31 included, 40 excluded) sorted: 7 12 21 31 50 66
        _, val = self._load("val", False)
        _, test = self._load("test", False)
        self.assertEqual([d["image_id"] for d in val], [7, 12, 21])
        self.assertEqual([d["image_id"] for d in test], [31, 50, 66])
        self.assertTrue(val[0]["file_name"].endswith("coco/val2014/COCO_val2014_000000000007.jpg"))

    def test_counts_ignore_crowd(self):
        name, val = self._load("val", False)
        meta = MetadataCatalog.get(name)
        self.assertEqual(meta.evaluator_type, "counting")
        self.assertEqual(len(meta.thing_classes), 80)
        by_id = {d["image_id"]: d for d in val}
        person = meta.thing_classes.index("person")
        self.assertEqual(by_id[21]["class_counts"][person], 1)  # + 1 crowd, not counted
        self.assertEqual(sum(by_id[21]["class_counts"]), 1)
        _, test = self._load("test", False)
        by_id = {d["image_id"]: d for d in test}
        self.assertEqual(sum(by_id[31]["class_counts"]), 0)
        self.assertEqual(by_id[50]["class_counts"][person], 2)
        self.assertEqual(by_id[50]["class_counts"][meta.thing_classes.index("giraffe")], 1)

    def test_train_keeps_all_images(self):
        name = self._register_once(
            "_test_coco_train",
            register_coco_counting,
            "coco/annotations/instances_train2014.json",
            "coco/train2014",
            None,
            False,
            self.root,
        )
        dicts = DatasetCatalog.get(name)
        self.assertEqual(sorted(d["image_id"] for d in dicts), [3, 9])
        self.assertEqual(sum(next(d for d in dicts if d["image_id"] == 3)["class_counts"]), 0)

    def test_coco_voc_mapping(self):
        name, val = self._load("val", True)
        meta = MetadataCatalog.get(name)
        self.assertEqual(list(meta.thing_classes), VOC)
        self.assertEqual(meta.evaluator_type, "wsis_instance")
        by_id = {d["image_id"]: d for d in val}
        self.assertEqual([d["image_id"] for d in val], [7, 12, 21])  # same images as 80 classes
        expected = [0] * 20
        for n, c in (("motorbike", 1), ("sofa", 1), ("pottedplant", 1), ("diningtable", 1)):
            expected[VOC.index(n)] = c
        expected[VOC.index("tvmonitor")] = 2
        self.assertEqual(by_id[7]["class_counts"], expected)
        self.assertEqual(
            sorted(a["category_id"] for a in by_id[7]["annotations"]),
            sorted([13, 17, 15, 10, 19, 19]),
        )
        self.assertEqual(by_id[12]["class_counts"][VOC.index("aeroplane")], 1)
        self.assertEqual(len(by_id[21]["annotations"]), 2)  # the crowd person is kept ...
        self.assertEqual(by_id[21]["class_counts"][VOC.index("person")], 1)  # ... not counted
        _, test = self._load("test", True)
        by_id = {d["image_id"]: d for d in test}
        self.assertEqual([d["image_id"] for d in test], [31, 50, 66])
        self.assertEqual(by_id[66]["annotations"], [])  # giraffe dropped, image kept
        self.assertEqual(by_id[66]["class_counts"], [0] * 20)
        self.assertEqual(by_id[50]["class_counts"][VOC.index("person")], 2)
        self.assertEqual(sum(by_id[50]["class_counts"]), 2)

    def test_restrict_to_voc_renumbers_image_labels(self):
        coco = ["person", "giraffe", "couch"]  # contiguous 0, 1, 2 of an 80-class json
        d = {"file_name": "x.jpg", "annotations": [], "class_counts": [0, 0, 0],
             "image_labels": [2, 1, 0]}
        (out,) = restrict_to_voc([d], coco)
        # couch -> sofa, person -> person; the giraffe has no VOC class and is dropped
        self.assertEqual(out["image_labels"], sorted([VOC.index("sofa"), VOC.index("person")]))
        self.assertEqual(out["class_counts"], [0] * 20)

    def test_count_only_images_keep_their_counts(self):
        coco = ["person", "giraffe", "couch"]
        d = {"file_name": "y.jpg", "image_id": 1, "annotations": [], "class_counts": [3, 2, 1]}
        empty = {"file_name": "z.jpg", "image_id": 2, "annotations": [], "class_counts": [0, 0, 0]}
        self.assertEqual(coco_half_split([empty, d], "test"), [d])  # counted, so in the split
        (out,) = restrict_to_voc([d], coco)
        expected = [0] * 20
        expected[VOC.index("person")], expected[VOC.index("sofa")] = 3, 1
        self.assertEqual(out["class_counts"], expected)

    def test_wrong_categories_raise(self):
        with self.assertRaisesRegex(ValueError, "few_categories.json"):
            self._load(None, False, json_file="coco/annotations/few_categories.json")

    def test_builtin_names(self):
        for name, etype in (
            ("coco_2014_count_train", "counting"),
            ("coco_2014_count_val", "counting"),
            ("coco_2014_count_test", "counting"),
            ("coco_voc_2014_train", "wsis_instance"),
            ("coco_voc_2014_val", "wsis_instance"),
            ("coco_voc_2014_test", "wsis_instance"),
        ):
            self.assertIn(name, DatasetCatalog.list())
            self.assertEqual(MetadataCatalog.get(name).evaluator_type, etype)
        with datasets_root(self.root):
            test = DatasetCatalog.get("coco_2014_count_test")
        self.assertEqual([d["image_id"] for d in test], [31, 50, 66])


if __name__ == "__main__":
    unittest.main()
