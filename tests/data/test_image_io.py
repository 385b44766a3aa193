"""
wsis_d2.data.image_io: reduced JPEG decoding and the LC / CCGR mappers that use it (frames of
annotations, proposals, peaks and label maps kept in the full image's pixels).
"""

import os
import tempfile
import unittest

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from wsis_d2 import add_wsis_config
from detectron2.data import DatasetMapper

from wsis_d2.ccgr.mapper import CCGRDatasetMapper
from wsis_d2.ccgr.stages import proposals_of
from wsis_d2.data import build_dataset_mapper
from wsis_d2.data.mapper_registry import ReducedDecodeDatasetMapper
from wsis_d2.data.image_io import decode_short_side, read_image_reduced
from wsis_d2.lc.mapper import LCDatasetMapper

H, W = 240, 320  # the "photograph"
SHORT = 30  # the model's input shorter side: 240 >= 4 * 30, so decoded at 1/4 (60 x 80)


def _smooth_image():
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 23), 128 + 100 * np.cos(y / 17), x / W * 255], -1)
    return rgb.clip(0, 255).astype(np.uint8)


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode()}


def _square_annotation(category_id):
    """One object of class ``category_id``: the square [80, 240) x [40, 200) with its mask."""
    mask = np.zeros((H, W), bool)
    mask[40:200, 80:240] = True
    return {
        "bbox": [80.0, 40.0, 240.0, 200.0],
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": _rle(mask),
    }


class TestReadImageReduced(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.jpg = os.path.join(cls.tmp.name, "photo.jpg")
        Image.fromarray(_smooth_image()).save(cls.jpg, quality=95)
        cls.png = os.path.join(cls.tmp.name, "photo.png")
        Image.fromarray(_smooth_image()).save(cls.png)
        # the same pixels stored landscape with EXIF orientation 6 (shown turned by 90 degrees)
        cls.turned = os.path.join(cls.tmp.name, "turned.jpg")
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(_smooth_image()).save(cls.turned, quality=95, exif=exif)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_reduced_jpeg_is_close_to_full_decode_resized(self):
        full = utils.read_image(self.jpg, format="BGR")
        image, scale = read_image_reduced(self.jpg, "BGR", SHORT)
        self.assertEqual(image.shape, (H // 4, W // 4, 3))
        self.assertEqual((scale.h, scale.w, scale.new_h, scale.new_w), (H, W, H // 4, W // 4))
        resized = T.ResizeTransform(H, W, H // 4, W // 4).apply_image(full)
        diff = np.abs(image.astype(np.float32) - resized.astype(np.float32))
        self.assertLess(diff.mean(), 4.0)

    def test_full_decode_where_no_reduction_applies(self):
        full = utils.read_image(self.jpg, format="BGR")
        for path, short in ((self.jpg, 0), (self.jpg, H // 4 + 1), (self.png, SHORT)):
            image, scale = read_image_reduced(path, "BGR", short)
            self.assertIsNone(scale)
            np.testing.assert_array_equal(image, utils.read_image(path, format="BGR"))
        # 240 < 4 * 61: a 1/2 decode would keep less than twice the input's resolution
        self.assertEqual(read_image_reduced(self.jpg, "BGR", 61)[0].shape, full.shape)

    def test_read_full_decodes_the_unreduced_images(self):
        calls = []

        def reader(path, format):
            calls.append((path, format))
            return np.zeros((2, 2, 3), np.uint8)

        for path, short in ((self.png, SHORT), (self.jpg, 0), (self.jpg, H // 4 + 1)):
            image, scale = read_image_reduced(path, "RGB", short, reader)
            self.assertIsNone(scale)
            self.assertEqual(image.shape, (2, 2, 3))
        self.assertEqual(calls, [(self.png, "RGB"), (self.jpg, "RGB"), (self.jpg, "RGB")])
        image, scale = read_image_reduced(self.jpg, "RGB", SHORT, reader)
        self.assertEqual(image.shape, (H // 4, W // 4, 3))  # reduced: the reader is not used
        self.assertEqual(len(calls), 3)

    def test_proposals_of_a_reduced_jpeg_are_in_the_full_frame(self):
        seen = []

        def generator(rgb):
            # one box: the bright square of the test image, found in the image it is given
            seen.append(rgb.shape)
            ys, xs = np.nonzero(rgb[:, :, 0] > 200)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            return np.array([box], np.float32), np.array([0.9], np.float32)

        path = os.path.join(self.tmp.name, "square.jpg")
        rgb = np.full((H, W, 3), 40, np.uint8)
        rgb[40:200, 80:240] = 250
        Image.fromarray(rgb).save(path, quality=95)
        dicts = [{"file_name": path, "image_id": 1, "height": H, "width": W}]
        full, _, _ = proposals_of(dicts, generator)
        reduced, logits, _ = proposals_of(dicts, generator, decode_short_side=SHORT)
        self.assertEqual(seen, [(H, W, 3), (H // 4, W // 4, 3)])
        np.testing.assert_allclose(full[0], [[80, 40, 240, 200]], atol=1)
        np.testing.assert_allclose(reduced[0], full[0], atol=4)  # one decoded pixel: 4
        self.assertEqual(reduced[0].dtype, np.float32)
        # a PNG is read by the stage's own reader (OpenCV), as before
        png = os.path.join(self.tmp.name, "square.png")
        Image.fromarray(rgb).save(png)
        (boxes,), _, _ = proposals_of([dict(dicts[0], file_name=png)], generator, 0, 0, SHORT)
        self.assertEqual(seen[-1], (H, W, 3))
        np.testing.assert_array_equal(boxes, [[80, 40, 240, 200]])

    def test_exif_orientation_gives_the_turned_full_frame(self):
        full = utils.read_image(self.turned, format="RGB")
        self.assertEqual(full.shape[:2], (W, H))
        image, scale = read_image_reduced(self.turned, "RGB", SHORT)
        self.assertEqual(image.shape[:2], (W // 4, H // 4))
        self.assertEqual((scale.h, scale.w), (W, H))

    def test_exif_turn_of_a_nearly_square_photo(self):
        # 1602 x 1601 stored, shown turned: reduced, both sides round up alike (a square)
        path = os.path.join(self.tmp.name, "square.jpg")
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", (1602, 1601), (200, 30, 30)).save(path, quality=90, exif=exif)
        image, scale = read_image_reduced(path, "BGR", 100)
        self.assertEqual(image.shape[0], image.shape[1])
        self.assertLess(image.shape[0], 1601)
        self.assertEqual((scale.h, scale.w), (1602, 1601))  # the displayed full frame

    def test_decode_short_side_of_a_config(self):
        cfg = add_wsis_config(get_cfg())
        cfg.INPUT.MIN_SIZE_TRAIN = (112, 208, 160)
        cfg.INPUT.MIN_SIZE_TEST = 160
        self.assertEqual(decode_short_side(cfg, True), 208)
        self.assertEqual(decode_short_side(cfg, False), 160)
        cfg.INPUT.MIN_SIZE_TEST = 0  # the image's own size
        self.assertEqual(decode_short_side(cfg, False), 0)
        cfg.INPUT.REDUCED_DECODE = False
        self.assertEqual(decode_short_side(cfg, True), 0)

    def _photo_dict(self, proposal_box, **fields):
        """The JPEG's dataset dict (image id 1) with one proposal (XYXY, full-image pixels)."""
        d = {
            "file_name": self.jpg,
            "height": H,
            "width": W,
            "image_id": 1,
            "proposal_boxes": np.array([proposal_box]),
            "proposal_objectness_logits": np.zeros(1, np.float32),
            "proposal_bbox_mode": BoxMode.XYXY_ABS,
        }
        d.update(fields)
        return d

    def _lc_test_input(self, decode):
        ann = _square_annotation(1)
        d = self._photo_dict([0.0, 0.0, 160.0, 120.0], annotations=[ann])
        mapper = LCDatasetMapper(
            False,
            augmentations=[T.ResizeShortestEdge(SHORT, 1000)],
            num_classes=2,
            proposal_topk=5,
            decode_short_side=decode,
        )
        return mapper(d)

    def test_lc_mapper_keeps_annotations_in_frame(self):
        full, reduced = self._lc_test_input(0), self._lc_test_input(SHORT)
        self.assertEqual(reduced["image"].shape, full["image"].shape)
        self.assertEqual(tuple(full["image"].shape), (3, SHORT, 40))
        torch.testing.assert_close(
            reduced["instances"].gt_boxes.tensor, full["instances"].gt_boxes.tensor
        )
        torch.testing.assert_close(
            reduced["proposals"].proposal_boxes.tensor, torch.tensor([[0.0, 0.0, 20.0, 15.0]])
        )
        a, b = reduced["instances"].gt_masks.tensor, full["instances"].gt_masks.tensor
        self.assertGreater((a & b).sum() / (a | b).sum(), 0.9)
        self.assertEqual(reduced["counts"].tolist(), [0, 1])

    def _ccgr_train_input(self, decode):
        label_map = np.full((H, W), 2, np.uint8)  # C = 2: background
        label_map[40:200, 80:240] = 1
        path = os.path.join(self.tmp.name, "cue.png")
        Image.fromarray(label_map).save(path)
        cues = {
            "num_classes": 2,
            "peaks": {1: np.array([[1, 160.0, 120.0, 0.9]], np.float32)},
            "sem_seg": {1: path},
        }
        d = self._photo_dict([80.0, 40.0, 240.0, 200.0], class_counts=[0, 1])
        mapper = CCGRDatasetMapper(
            True,
            augmentations=[T.ResizeShortestEdge(SHORT, 1000)],
            num_classes=2,
            proposal_topk=5,
            cues=cues,
            decode_short_side=decode,
        )
        return mapper(d)

    def test_ccgr_mapper_keeps_proposals_peaks_and_label_maps_in_frame(self):
        full, reduced = self._ccgr_train_input(0), self._ccgr_train_input(SHORT)
        self.assertEqual(reduced["image"].shape, full["image"].shape)
        torch.testing.assert_close(
            reduced["proposals"].proposal_boxes.tensor, torch.tensor([[10.0, 5.0, 30.0, 25.0]])
        )
        torch.testing.assert_close(reduced["peaks"], torch.tensor([[1.0, 20.0, 15.0, 0.9]]))
        torch.testing.assert_close(full["peaks"], reduced["peaks"])
        self.assertEqual(reduced["sem_seg"].shape, full["sem_seg"].shape)
        agree = (reduced["sem_seg"] == full["sem_seg"]).float().mean()
        self.assertGreater(agree.item(), 0.95)

    def _mask_rcnn_input(self, mapper_class, reduced, path=None):
        ann = _square_annotation(0)
        d = {
            "file_name": path or self.jpg,
            "height": H,
            "width": W,
            "image_id": 1,
            "annotations": [ann],
        }
        cfg = add_wsis_config(get_cfg())
        cfg.MODEL.MASK_ON = True
        cfg.INPUT.MASK_FORMAT = "bitmask"
        cfg.INPUT.MIN_SIZE_TRAIN = (SHORT,)
        cfg.INPUT.RANDOM_FLIP = "none"
        cfg.INPUT.REDUCED_DECODE = reduced
        mapper = mapper_class(cfg, True)
        return mapper, mapper(d)

    def test_stock_mapper_reduced_keeps_annotations_in_frame(self):
        _, full = self._mask_rcnn_input(DatasetMapper, False)
        mapper, reduced = self._mask_rcnn_input(ReducedDecodeDatasetMapper, True)
        self.assertEqual(mapper.decode_short_side, SHORT)
        self.assertEqual(reduced["image"].shape, full["image"].shape)
        self.assertEqual(tuple(full["image"].shape), (3, SHORT, 40))
        torch.testing.assert_close(
            reduced["instances"].gt_boxes.tensor, full["instances"].gt_boxes.tensor
        )
        a, b = reduced["instances"].gt_masks.tensor, full["instances"].gt_masks.tensor
        self.assertGreater((a & b).sum() / (a | b).sum(), 0.9)
        # a PNG (no DCT scaling) or the switch off: exactly DatasetMapper's input
        _, png_full = self._mask_rcnn_input(DatasetMapper, False, self.png)
        _, png = self._mask_rcnn_input(ReducedDecodeDatasetMapper, True, self.png)
        torch.testing.assert_close(png["image"], png_full["image"], rtol=0, atol=0)
        off, off_out = self._mask_rcnn_input(ReducedDecodeDatasetMapper, False)
        self.assertEqual(off.decode_short_side, 0)
        torch.testing.assert_close(off_out["image"], full["image"], rtol=0, atol=0)

    def test_build_dataset_mapper_default(self):
        cfg = add_wsis_config(get_cfg())
        self.assertIsInstance(build_dataset_mapper(cfg, True), ReducedDecodeDatasetMapper)
        cfg.INPUT.REDUCED_DECODE = False
        self.assertIs(type(build_dataset_mapper(cfg, True)), DatasetMapper)


if __name__ == "__main__":
    unittest.main()
