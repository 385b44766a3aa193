"""
LCDatasetMapper: image-level labels, counts and lower-count censoring, augmentations, grayscale,
unreadable files, inconsistent counts, empty images, test-time instances.
"""

import os
import tempfile
import unittest

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

import wsis_d2  # noqa: F401  (registers datasets and mappers)
from wsis_d2.testing import datasets_root
from wsis_d2 import add_wsis_config
from wsis_d2.data import build_dataset_mapper
from wsis_d2.lc.mapper import LCDatasetMapper, image_labels_of

H, W = 30, 40
META_NAME = "_test_lc_mapper_three_classes"


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode()}


def _ann(cat, mask=None, iscrowd=0, box=(1, 2, 11, 12)):
    a = {
        "bbox": list(map(float, box)),
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": cat,
        "iscrowd": iscrowd,
        "point": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2],
    }
    if mask is not None:
        a["segmentation"] = _rle(mask)
    return a


class TestLCDatasetMapper(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        rng = np.random.RandomState(0)
        cls.rgb = rng.randint(0, 256, size=(H, W, 3), dtype=np.uint8)
        cls.rgb_path = os.path.join(cls.tmp.name, "rgb.png")
        Image.fromarray(cls.rgb).save(cls.rgb_path)
        cls.gray = rng.randint(0, 256, size=(H, W), dtype=np.uint8)
        cls.gray_path = os.path.join(cls.tmp.name, "gray.png")
        Image.fromarray(cls.gray, mode="L").save(cls.gray_path)
        cls.corrupt_path = os.path.join(cls.tmp.name, "corrupt.jpg")
        with open(cls.corrupt_path, "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
        if META_NAME not in MetadataCatalog.list():
            MetadataCatalog.get(META_NAME).set(thing_classes=["a", "b", "c"])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def _mapper(self, is_train=True, lower_count=5, augs=None, num_classes=3):
        return LCDatasetMapper(
            is_train,
            augmentations=augs or [],
            image_format="BGR",
            num_classes=num_classes,
            lower_count=lower_count,
        )

    def _dict(self, **kw):
        d = {"file_name": self.rgb_path, "height": H, "width": W, "image_id": 7}
        d.update(kw)
        return d

    def test_labels_counts_and_lower_count(self):
        # t̃ = 5: 4 is exact, 5 and 9 are only known as ">= 5"
        d = self._dict(class_counts=[0, 4, 9])
        out = self._mapper(lower_count=5)(d)
        self.assertEqual(out["labels"].dtype, torch.float32)
        self.assertEqual(out["counts"].dtype, torch.long)
        self.assertEqual(out["count_ge"].dtype, torch.bool)
        self.assertEqual(out["labels"].tolist(), [0.0, 1.0, 1.0])
        self.assertEqual(out["counts"].tolist(), [0, 4, 5])
        self.assertEqual(out["count_ge"].tolist(), [False, False, True])
        out = self._mapper(lower_count=5)(self._dict(class_counts=[5, 1, 0]))
        self.assertEqual(out["counts"].tolist(), [5, 1, 0])
        self.assertEqual(out["count_ge"].tolist(), [True, False, False])
        self.assertEqual(out["labels"].tolist(), [1.0, 1.0, 0.0])
        # exact counts when lower-count supervision is off
        out = self._mapper(lower_count=None)(d)
        self.assertEqual(out["counts"].tolist(), [0, 4, 9])
        self.assertEqual(out["count_ge"].tolist(), [False, False, False])
        # the input dict is left alone
        self.assertEqual(d["class_counts"], [0, 4, 9])
        self.assertNotIn("image", d)

    def test_image_labels_without_instances(self):
        d = self._dict(class_counts=[0, 2, 0], image_labels=[0, 1])
        labels_only = LCDatasetMapper(True, augmentations=[], num_classes=3, lower_count=5,
                                      image_labels_only=True)
        out = labels_only(d)
        self.assertEqual(out["labels"].tolist(), [1.0, 1.0, 0.0])
        self.assertEqual(image_labels_of(d, 3).tolist(), [True, True, False])
        # a model that reads counts would learn count 0 for a present class: refused, named
        with self.assertRaisesRegex(ValueError, r"rgb\.png.*image_labels.*\[0\].*IMAGE_LABELS_ONLY"):
            self._mapper()(d)
        with self.assertRaisesRegex(ValueError, r"image_labels.*class 3"):
            image_labels_of(self._dict(class_counts=[0, 0, 0], image_labels=[3]), 3)

    def test_image_is_uint8_chw_in_bgr(self):
        out = self._mapper()(self._dict(class_counts=[1, 0, 0]))
        img = out["image"]
        self.assertEqual(img.dtype, torch.uint8)
        self.assertEqual(tuple(img.shape), (3, H, W))
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), self.rgb[:, :, ::-1])
        self.assertEqual((out["height"], out["width"], out["image_id"]), (H, W, 7))
        self.assertEqual(out["file_name"], self.rgb_path)
        self.assertNotIn("annotations", out)  # weak supervision: no instances in training

    def test_counts_from_annotations_ignore_crowd(self):
        anns = [_ann(2), _ann(2), _ann(0), _ann(0, iscrowd=1), _ann(1, iscrowd=1)]
        out = self._mapper(lower_count=None)(self._dict(annotations=anns))
        self.assertEqual(out["counts"].tolist(), [1, 0, 2])
        self.assertEqual(out["labels"].tolist(), [1.0, 0.0, 1.0])

    def test_inconsistent_counts_raise(self):
        d = self._dict(annotations=[_ann(2), _ann(2)], class_counts=[0, 0, 3])
        with self.assertRaisesRegex(ValueError, r"rgb\.png.*class 2"):
            self._mapper()(d)
        with self.assertRaisesRegex(ValueError, r"rgb\.png.*3 entries"):
            self._mapper(num_classes=4)(self._dict(class_counts=[0, 0, 3]))
        with self.assertRaisesRegex(ValueError, r"rgb\.png.*category_id 5"):
            self._mapper()(self._dict(annotations=[_ann(5)]))
        with self.assertRaisesRegex(ValueError, r"rgb\.png.*integers in 0\.\."):
            self._mapper()(self._dict(class_counts=[0, -1, 0]))

    def test_count_only_image(self):
        # counted but not annotated (a COCO image's "image_counts"): the counts are the targets
        out = self._mapper(lower_count=5)(self._dict(annotations=[], class_counts=[0, 7, 2]))
        self.assertEqual(out["labels"].tolist(), [0.0, 1.0, 1.0])
        self.assertEqual(out["counts"].tolist(), [0, 5, 2])
        self.assertEqual(out["count_ge"].tolist(), [False, True, False])

    def test_empty_image_all_zero_labels(self):
        for d in (
            self._dict(annotations=[], class_counts=[0, 0, 0]),
            self._dict(annotations=[]),
            self._dict(class_counts=[0, 0, 0]),
        ):
            out = self._mapper()(d)
            self.assertEqual(out["labels"].tolist(), [0.0, 0.0, 0.0])
            self.assertEqual(out["counts"].tolist(), [0, 0, 0])
            self.assertFalse(out["count_ge"].any())
        with self.assertRaisesRegex(ValueError, "rgb.png"):
            self._mapper()(self._dict())  # neither counts nor annotations

    def test_flip_and_resize_keep_counts(self):
        d = self._dict(class_counts=[3, 0, 6])
        ref = self._mapper()(d)
        flipped = self._mapper(augs=[T.RandomFlip(prob=1.0)])(d)
        np.testing.assert_array_equal(flipped["image"].numpy(), ref["image"].numpy()[:, :, ::-1])
        resized = self._mapper(augs=[T.ResizeShortestEdge(60, 1000)])(d)
        self.assertEqual(tuple(resized["image"].shape), (3, 60, 80))
        for out in (flipped, resized):
            for key in ("labels", "counts", "count_ge"):
                self.assertTrue(torch.equal(out[key], ref[key]), key)
            self.assertEqual((out["height"], out["width"]), (H, W))  # original size kept

    def test_grayscale_becomes_three_channels(self):
        d = self._dict(file_name=self.gray_path, class_counts=[1, 0, 0])
        for fmt in ("BGR", "RGB", "L"):
            mapper = LCDatasetMapper(
                True, augmentations=[], image_format=fmt, num_classes=3, lower_count=5
            )
            img = mapper(d)["image"]
            self.assertEqual(tuple(img.shape), (3, H, W), fmt)
            for c in range(3):
                np.testing.assert_array_equal(img[c].numpy(), self.gray)

    def test_unreadable_image_raises_value_error_naming_file(self):
        with self.assertRaisesRegex(ValueError, "corrupt.jpg"):
            self._mapper()(self._dict(file_name=self.corrupt_path, class_counts=[1, 0, 0]))
        missing = os.path.join(self.tmp.name, "missing.png")
        with self.assertRaisesRegex(ValueError, "missing.png"):
            self._mapper()(self._dict(file_name=missing, class_counts=[1, 0, 0]))
        with self.assertRaisesRegex(ValueError, "rgb.png"):  # wrong size in the dict
            self._mapper()(self._dict(height=H + 1, class_counts=[1, 0, 0]))

    def test_eval_mode_keeps_instances_and_exact_counts(self):
        m0 = np.zeros((H, W), bool)
        m0[2:10, 3:9] = True
        m1 = np.zeros((H, W), bool)
        m1[15:28, 20:37] = True
        crowd = np.zeros((H, W), bool)
        crowd[0:5, 30:40] = True
        anns = [
            _ann(1, m0, box=(3, 2, 9, 10)),
            _ann(2, m1, box=(20, 15, 37, 28)),
            _ann(0, crowd, iscrowd=1, box=(30, 0, 40, 5)),
        ]
        d = self._dict(annotations=anns, class_counts=[0, 1, 1])
        mapper = self._mapper(is_train=False, lower_count=None, augs=[T.RandomFlip(prob=1.0)])
        out = mapper(d)
        inst = out["instances"]
        self.assertEqual(inst.image_size, (H, W))
        self.assertEqual(inst.gt_classes.tolist(), [1, 2])
        masks = inst.gt_masks.tensor.numpy()
        np.testing.assert_array_equal(masks[0], m0[:, ::-1])
        np.testing.assert_array_equal(masks[1], m1[:, ::-1])
        # box of the flipped first mask: x in [W - 9, W - 3)
        np.testing.assert_allclose(inst.gt_boxes.tensor[0].numpy(), [W - 9, 2, W - 3, 10])
        self.assertEqual(out["counts"].tolist(), [0, 1, 1])

    def test_from_config(self):
        cfg = add_wsis_config(get_cfg())
        self.assertTrue(cfg.INPUT.LC.LOWER_COUNT_SUPERVISION)
        cfg.INPUT.DATASET_MAPPER = "LCDatasetMapper"
        cfg.DATASETS.TRAIN = (META_NAME,)
        cfg.DATASETS.TEST = ("_test_lc_mapper_no_metadata",)
        cfg.MODEL.LC.NUM_CLASSES = 4
        cfg.MODEL.LC.LOWER_COUNT = 3
        cfg.INPUT.MIN_SIZE_TRAIN = (60,)
        cfg.INPUT.MAX_SIZE_TRAIN = 1000
        cfg.INPUT.MIN_SIZE_TEST = 45
        cfg.INPUT.MAX_SIZE_TEST = 1000
        train = build_dataset_mapper(cfg, is_train=True)
        self.assertIsInstance(train, LCDatasetMapper)
        self.assertEqual(train.num_classes, 3)  # from thing_classes, not MODEL.LC.NUM_CLASSES
        out = train(self._dict(class_counts=[0, 3, 2]))
        self.assertEqual(tuple(out["image"].shape), (3, 60, 80))
        self.assertEqual(out["counts"].tolist(), [0, 3, 2])
        self.assertEqual(out["count_ge"].tolist(), [False, True, False])

        test = build_dataset_mapper(cfg, is_train=False)
        self.assertEqual(test.num_classes, 4)  # no thing_classes: MODEL.LC.NUM_CLASSES
        out = test(self._dict(class_counts=[0, 3, 2, 7]))
        self.assertEqual(tuple(out["image"].shape), (3, 45, 60))
        self.assertEqual(out["counts"].tolist(), [0, 3, 2, 7])  # never censored at test time

        cfg.INPUT.LC.LOWER_COUNT_SUPERVISION = False
        out = build_dataset_mapper(cfg, is_train=True)(self._dict(class_counts=[0, 3, 2]))
        self.assertEqual(out["counts"].tolist(), [0, 3, 2])
        self.assertFalse(out["count_ge"].any())

        cfg.INPUT.CROP.ENABLED = True
        with self.assertRaisesRegex(ValueError, "CROP"):
            build_dataset_mapper(cfg, is_train=True)

    def _colour_image(self, name, bgr):
        path = os.path.join(self.tmp.name, name)
        Image.fromarray(np.full((H, W, 3), bgr[::-1], np.uint8)).save(path)  # stored as RGB
        return path

    def test_mosaic_sums_tile_counts_censored_per_tile(self):
        colours = [(10, 20, 30), (200, 40, 90), (60, 160, 250), (120, 120, 0)]
        counts = [[3, 0, 0], [1, 0, 4], [0, 2, 0], [6, 0, 1]]
        dicts = [
            self._dict(file_name=self._colour_image(f"tile{i}.png", c), class_counts=n)
            for i, (c, n) in enumerate(zip(colours, counts))
        ]
        mapper = LCDatasetMapper(
            True,
            augmentations=[],
            image_format="BGR",
            num_classes=3,
            lower_count=5,
            mosaic_prob=1.0,
            mosaic_grid=2,
            mosaic_pool=dicts[1:],
        )
        np.random.seed(0)
        seen_ge = seen_exact_beyond = False
        for _ in range(20):
            out = mapper(dicts[0])
            image = out["image"].numpy().transpose(1, 2, 0)
            self.assertEqual(image.shape, (H, W, 3))  # the first image's size
            # which image fills each tile (constant colours), and the targets they imply
            tiles = [image[:15, :20], image[:15, 20:], image[15:, :20], image[15:, 20:]]
            used = []
            for tile in tiles:
                match = [i for i, c in enumerate(colours) if (tile == np.array(c)).all()]
                self.assertEqual(len(match), 1)
                used.append(match[0])
            self.assertIn(0, used)  # the input itself is one of the tiles
            tile_counts = np.array([counts[i] for i in used])
            ge = (tile_counts >= 5).any(axis=0)
            total = np.minimum(tile_counts, 5).sum(axis=0)
            self.assertEqual(out["counts"].tolist(), total.tolist())
            self.assertEqual(out["count_ge"].tolist(), ge.tolist())
            self.assertEqual(out["count_exact"].tolist(), (~ge).tolist())
            self.assertEqual(out["mosaic_tiles"], 4)
            self.assertEqual(out["labels"].tolist(), (total > 0).astype(float).tolist())
            seen_ge |= bool(ge[0])
            seen_exact_beyond |= bool((total[~ge] >= 5).any())
        self.assertTrue(seen_ge and seen_exact_beyond)

        # no mosaics at test time, and plain training inputs are never exact beyond t̃
        test = LCDatasetMapper(
            False, augmentations=[], num_classes=3, mosaic_prob=1.0, mosaic_pool=dicts
        )
        self.assertEqual(tuple(test(dicts[3])["image"].shape), (3, H, W))
        self.assertNotIn("count_exact", test(dicts[3]))
        plain = self._mapper(lower_count=5)(dicts[3])
        self.assertEqual(plain["count_exact"].tolist(), [False, False, False])
        self.assertEqual(plain["mosaic_tiles"], 1)

    def test_test_time_proposals(self):
        # precomputed proposals (MODEL.LOAD_PROPOSALS) reach LC's retrieval at test time, resized
        # with the image and cut to the top k; training inputs never carry them
        boxes = np.array([[0, 0, 20, 10], [4, 6, 40, 30], [1, 1, 2, 2]], dtype=np.float32)
        d = self._dict(
            class_counts=[1, 0, 0],
            proposal_boxes=boxes,
            proposal_objectness_logits=np.array([3.0, 2.0, 1.0], dtype=np.float32),
            proposal_bbox_mode=BoxMode.XYXY_ABS,
        )
        test = LCDatasetMapper(
            False, augmentations=[T.Resize((60, 80))], num_classes=3, proposal_topk=2
        )
        out = test(d)
        props = out["proposals"]
        self.assertEqual(len(props), 2)
        self.assertEqual(props.image_size, (60, 80))
        torch.testing.assert_close(props.proposal_boxes.tensor, torch.from_numpy(boxes[:2] * 2))
        self.assertNotIn("proposal_boxes", out)
        # off by default, and never at training time
        self.assertNotIn("proposals", LCDatasetMapper(False, augmentations=[], num_classes=3)(d))
        train = LCDatasetMapper(True, augmentations=[], num_classes=3, proposal_topk=2)
        self.assertNotIn("proposals", train(d))
        # from the config: only with MODEL.LOAD_PROPOSALS
        cfg = add_wsis_config(get_cfg())
        cfg.INPUT.DATASET_MAPPER = "LCDatasetMapper"
        cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = 1
        self.assertIsNone(build_dataset_mapper(cfg, is_train=False).proposal_topk)
        cfg.MODEL.LOAD_PROPOSALS = True
        self.assertEqual(build_dataset_mapper(cfg, is_train=False).proposal_topk, 1)

    def test_mosaic_bad_pool_is_named_when_built(self):
        bad = self._dict(file_name="/data/bad_counts.png", class_counts=[1, 2])
        with self.assertRaisesRegex(ValueError, "bad_counts.png.*class_counts"):
            LCDatasetMapper(
                True, augmentations=[], num_classes=3, mosaic_prob=0.5, mosaic_pool=[bad]
            )
        with self.assertRaisesRegex(ValueError, "mosaic_pool"):
            LCDatasetMapper(True, augmentations=[], num_classes=3, mosaic_prob=0.5)
        with self.assertRaisesRegex(ValueError, "MOSAIC_PROB"):
            LCDatasetMapper(True, augmentations=[], num_classes=3, mosaic_prob=1.5)
        with self.assertRaisesRegex(ValueError, "MOSAIC_GRID"):
            LCDatasetMapper(True, augmentations=[], num_classes=3, mosaic_grid=1)

    def test_synthetic_split_maps(self):
        with datasets_root(os.path.join(self.tmp.name, "data")):
            dicts = DatasetCatalog.get("wsis_synth_mini_val")
            cfg = add_wsis_config(get_cfg())
            cfg.DATASETS.TRAIN = ("wsis_synth_mini_val",)
            cfg.INPUT.DATASET_MAPPER = "LCDatasetMapper"
            cfg.INPUT.MIN_SIZE_TRAIN = (64,)
            mosaics = cfg.clone()
            mosaics.INPUT.LC.MOSAIC_PROB = 1.0
            mapper = build_dataset_mapper(mosaics, is_train=True)
            self.assertEqual(len(mapper.mosaic_pool), len(dicts))
            out = mapper(dicts[0])
            self.assertEqual(out["counts"].shape, (8,))
            # the input is one of the tiles: its censored counts are part of the sum
            own = np.minimum(np.asarray(dicts[0]["class_counts"]), cfg.MODEL.LC.LOWER_COUNT)
            self.assertTrue((out["counts"].numpy() >= own).all())
            mapper = build_dataset_mapper(cfg, is_train=True)
            self.assertEqual(mapper.num_classes, 8)
            for d in dicts:
                out = mapper(d)
                exact = np.asarray(d["class_counts"])
                t = cfg.MODEL.LC.LOWER_COUNT
                np.testing.assert_array_equal(out["counts"].numpy(), np.minimum(exact, t))
                np.testing.assert_array_equal(out["count_ge"].numpy(), exact >= t)
                np.testing.assert_array_equal(out["labels"].numpy(), exact > 0)


if __name__ == "__main__":
    unittest.main()
