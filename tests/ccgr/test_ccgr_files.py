"""Pseudo-label annotations of one image (wsis_d2.ccgr.files)."""

import unittest

import pycocotools.mask as mask_util
import torch
from detectron2.structures import Instances

from wsis_d2.ccgr.files import pseudo_label_annotations


class TestPseudoLabelAnnotations(unittest.TestCase):
    def test_empty_masks_give_no_annotation(self):
        masks = torch.zeros((3, 12, 16), dtype=torch.bool)
        masks[0, 2:5, 3:9] = True
        masks[2, 7:12, 0:4] = True  # mask 1 holds no pixel
        inst = Instances((12, 16), pred_masks=masks, pred_classes=torch.tensor([0, 1, 1]),
                         scores=torch.tensor([0.9, 0.8, 0.7]))
        d = {"image_id": "a", "height": 12, "width": 16}
        anns = pseudo_label_annotations(d, inst, [5, 9])
        self.assertEqual([a["category_id"] for a in anns], [5, 9])
        self.assertEqual([a["bbox"] for a in anns], [[3.0, 2.0, 6.0, 3.0], [0.0, 7.0, 4.0, 5.0]])
        self.assertAlmostEqual(anns[1]["score"], 0.7, places=6)
        rle = {"size": [12, 16], "counts": anns[0]["segmentation"]["counts"].encode()}
        self.assertEqual(int(mask_util.area(rle)), 18)


if __name__ == "__main__":
    unittest.main()
