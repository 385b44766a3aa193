"""
The evaluation helpers wsis_d2 keeps beside detectron2's (instance_ap.voc_ap, pairwise_box_iou;
why in their comments) have detectron2's definitions: equal results on random inputs.
"""

import unittest

import numpy as np
import torch

from detectron2.evaluation.pascal_voc_evaluation import voc_ap as d2_voc_ap
from detectron2.structures import Boxes, pairwise_iou

from wsis_d2.evaluation.instance_ap import pairwise_box_iou, voc_ap


class TestSameDefinitions(unittest.TestCase):
    def test_voc_ap_is_detectron2_all_point_ap(self):
        rng = np.random.default_rng(0)
        for num in (1, 7, 300):
            labels = rng.random(num) < 0.4
            tp, fp = np.cumsum(labels), np.cumsum(~labels)
            recall = tp / (tp[-1] + rng.integers(0, 5) + 1)
            precision = tp / np.maximum(tp + fp, 1)
            self.assertAlmostEqual(voc_ap(recall, precision), d2_voc_ap(recall, precision), 12)

    def test_box_iou_is_detectron2_pairwise_iou(self):
        rng = np.random.default_rng(1)
        xy = rng.uniform(0, 100, (40, 2))
        a = np.concatenate([xy, xy + rng.uniform(0, 40, (40, 2))], axis=1)
        b = a[rng.permutation(40)[:9]] + rng.uniform(-5, 5, (9, 4))
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2])
        theirs = pairwise_iou(Boxes(torch.from_numpy(a)), Boxes(torch.from_numpy(b))).numpy()
        ours = pairwise_box_iou(a, b)
        self.assertGreater(ours.max(), 0.5)  # overlapping pairs exist
        np.testing.assert_allclose(ours, theirs, atol=1e-5)  # theirs is float32


if __name__ == "__main__":
    unittest.main()
