import unittest

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Boxes, Instances

from wsis_d2.evaluation import (
    CCGRStageDiagnostics,
    SemanticConfusion,
    instance_ground_truth,
    proposal_recall,
    semantic_ground_truth,
)


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _image():
    """Two objects of class 0 (squares) and one of class 1, on a 40 x 60 image."""
    masks = np.zeros((3, 40, 60), bool)
    masks[0, 5:15, 5:15] = True
    masks[1, 5:15, 30:50] = True
    masks[2, 25:35, 10:20] = True
    anns = [{"category_id": c, "segmentation": _rle(m), "iscrowd": 0}
            for c, m in zip((0, 0, 1), masks)]
    return {"height": 40, "width": 60, "annotations": anns}, masks


class TestCCGRStageDiagnostics(unittest.TestCase):
    def test_ground_truth(self):
        d, masks = _image()
        classes, boxes, gt = instance_ground_truth(d)
        self.assertEqual(classes.tolist(), [0, 0, 1])
        self.assertEqual(boxes[1].tolist(), [30, 5, 50, 15])
        np.testing.assert_array_equal(gt, masks)

    def test_figures_by_hand(self):
        d, masks = _image()
        # bags: two on object 0 (a part box and its whole box), one on object 1, one of class 1
        # off every object; object 2 (class 1) has no bag
        ccgr = {
            "classes": torch.tensor([0, 0, 0, 1]),
            "peaks": torch.tensor([[0, 7.5, 7.5], [0, 12.5, 12.5], [0, 40.5, 10.5],
                                   [1, 55.5, 35.5]]),
            "bag_boxes": torch.tensor([
                [[5, 5, 10, 10], [5, 5, 15, 15]],    # holds the whole box: recall
                [[10, 10, 15, 15], [0, 0, 60, 40]],  # no box of IoU >= 0.5
                [[30, 5, 50, 15], [30, 5, 40, 15]],
                [[50, 30, 60, 40], [50, 30, 60, 40]],
            ], dtype=torch.float32),
            "mil_boxes": torch.tensor([[5, 5, 10, 10], [10, 10, 15, 15], [30, 5, 50, 15],
                                       [50, 30, 60, 40]], dtype=torch.float32),
            "refined_boxes": torch.tensor([[5, 5, 15, 15], [10, 10, 15, 15], [30, 5, 50, 15],
                                           [50, 30, 60, 40]], dtype=torch.float32),
        }
        inst = Instances((40, 60))
        pm = np.zeros((2, 40, 60), bool)
        pm[0, 5:15, 5:10] = True  # half of object 0
        pm[1, 5:15, 30:50] = True  # object 1 exactly
        inst.pred_masks = torch.as_tensor(pm)
        inst.pred_classes = torch.tensor([0, 0])
        inst.pred_boxes = Boxes(torch.zeros(2, 4))
        diag = CCGRStageDiagnostics()
        diag.process(d, {"instances": inst, "ccgr": ccgr})
        s = diag.summary()
        self.assertEqual(s["objects_per_image"], 3)
        self.assertEqual(s["bags_per_image"], 4)
        self.assertEqual(s["pseudo_per_image"], 2)
        self.assertAlmostEqual(s["objects_with_bag"], 200 / 3)
        self.assertEqual(s["bags_per_found_object"], 1.5)
        self.assertEqual(s["bags_off_object"], 25.0)
        self.assertAlmostEqual(s["bag_recall50"], 200 / 3)
        # MIL IoU: 0.25, 0.25, 1 -> mean 0.5; refined: 1, 0.25, 1
        self.assertAlmostEqual(s["mil_iou"], 50.0)
        self.assertAlmostEqual(s["mil_hit50"], 100 / 3)
        self.assertAlmostEqual(s["refined_iou"], 75.0)
        self.assertAlmostEqual(s["refined_hit50"], 200 / 3)
        # best mask IoU per object: 0.5, 1, 0 (no class-1 mask)
        self.assertAlmostEqual(s["pseudo_mask_iou"], 50.0)
        self.assertAlmostEqual(s["pseudo_recall50"], 200 / 3)

    def test_without_ground_truth_or_bags(self):
        inst = Instances((10, 10))
        inst.pred_masks = torch.zeros(0, 10, 10, dtype=torch.bool)
        inst.pred_classes = torch.zeros(0, dtype=torch.long)
        diag = CCGRStageDiagnostics()
        diag.process({"height": 10, "width": 10}, {"instances": inst})
        s = diag.summary()
        self.assertEqual((s["objects_per_image"], s["bags_per_image"]), (0, 0))
        self.assertTrue(np.isnan(s["bag_recall50"]))


class TestPseudoLabelBadInputs(unittest.TestCase):
    def test_proposal_recall(self):
        gt = [np.array([[0, 0, 10, 10]])]
        self.assertEqual(proposal_recall(gt, [np.array([[0, 0, 10, 10]])], 5, 0.5), 1.0)
        with self.assertRaisesRegex(ValueError, r"'iou' must lie in \[0.0, 1.0\], got 1.5"):
            proposal_recall(gt, gt, 5, 1.5)
        with self.assertRaisesRegex(TypeError, "'top' must be an integer"):
            proposal_recall(gt, gt, 2.5, 0.5)
        with self.assertRaisesRegex(ValueError, "same images, got 1 and 2 entries"):
            proposal_recall(gt, gt * 2, 5, 0.5)
        with self.assertRaisesRegex(ValueError, r"'boxes\[0\]' must have shape \(\*, 4\)"):
            proposal_recall(gt, [np.zeros((3, 5))], 5, 0.5)

    def test_ground_truth_maps(self):
        d, _ = _image()
        self.assertEqual(semantic_ground_truth(d, 2).shape, (40, 60))
        with self.assertRaisesRegex(ValueError, r"'num_classes' must lie in \[1, 254\], got 0"):
            semantic_ground_truth(d, 0)
        no_height = {k: v for k, v in d.items() if k != "height"}
        for fn in (instance_ground_truth, lambda r: semantic_ground_truth(r, 2)):
            with self.assertRaisesRegex(ValueError, "has no field 'height'"):
                fn(no_height)
        bad = dict(d, annotations=[{"category_id": 0, "iscrowd": 0}])
        with self.assertRaisesRegex(ValueError, "annotation 0 has no field 'segmentation'"):
            instance_ground_truth(bad)
        with self.assertRaisesRegex(TypeError, "'width of .*' must be an integer"):
            instance_ground_truth(dict(d, width=60.5))

    def test_semantic_confusion(self):
        conf = SemanticConfusion(3)
        conf.add(np.array([[0, 255]]), np.array([[0, 2]]))
        with self.assertRaisesRegex(
            ValueError, r"'pred' must hold labels in 0..2 or ignore 255, got 0..7"
        ):
            conf.add(np.array([[0, 7]]), np.array([[0, 2]]))
        with self.assertRaisesRegex(TypeError, "'gt' must have an integer dtype, got float64"):
            conf.add(np.array([[0, 1]]), np.array([[0.0, 2.0]]))
        with self.assertRaisesRegex(ValueError, "'pred' .* and ground truth 'gt' .* differ"):
            conf.add(np.zeros((1, 2), np.int64), np.zeros((2, 2), np.int64))
        with self.assertRaisesRegex(ValueError, r"'num_labels' must lie in \[1, inf\], got 0"):
            SemanticConfusion(0)


if __name__ == "__main__":
    unittest.main()
