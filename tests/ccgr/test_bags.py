"""BagBuilder: built from MODEL.CCGR.*, a variant from a config clone, round-1 and seed-box bags of
one input, its options' errors."""

import unittest

import torch
from detectron2.structures import Boxes

from wsis_d2.ccgr import BagBuilder
from wsis_d2.ccgr.labels import bags_from_boxes, build_bags
from wsis_d2.testing import ccgr_config


BOXES = Boxes(
    torch.tensor(
        [
            [5.0, 5, 15, 15],
            [0, 0, 40, 20],
            [25, 5, 35, 15],
            [8, 8, 12, 12],
            [50, 0, 60, 10],
            [0, 0, 20, 20],
        ]
    )
)
OBJECTNESS = torch.tensor([0.5, 0.9, 0.6, 0.7, 0.99, 0.4])
# peaks of classes 0, 0 and 2; the image-level labels call class 2 absent
PEAKS = torch.tensor([[0, 10.0, 10.0, 1.0], [0, 30.0, 10.0, 0.9], [2, 55.0, 5.0, 0.8]])
LABELS = torch.tensor([1.0, 0.0, 0.0])


class TestBagBuilder(unittest.TestCase):
    def test_from_config_and_a_variant(self):
        cfg = ccgr_config()
        builder = BagBuilder(cfg)
        self.assertEqual(
            (builder.bag_size, builder.seg_weight, builder.seed_in_bag), (10, 0.1, True)
        )
        other = cfg.clone()
        other.MODEL.CCGR.SEED_IN_BAG = False
        other.MODEL.CCGR.BAG_SIZE = 3
        variant = BagBuilder(other)
        self.assertEqual((variant.bag_size, variant.seed_in_bag), (3, False))
        self.assertTrue(builder.seed_in_bag)

    def test_round_one_bags_of_present_classes(self):
        seg = torch.zeros(3, 20, 64)
        builder = BagBuilder(ccgr_config(BAG_SIZE=3))
        bags, labels, rows, peaks, boxes = builder(
            {"labels": LABELS}, BOXES, OBJECTNESS, PEAKS, seg
        )
        self.assertEqual(peaks.tolist(), PEAKS[:2].tolist())  # the absent class's peak is dropped
        expected = build_bags(BOXES.tensor, OBJECTNESS, PEAKS[:2], seg, 3, 0.1)
        for got, want in zip((bags, labels, rows), expected):
            self.assertTrue(torch.equal(got, want))
        self.assertIs(boxes, BOXES)

    def test_seed_box_bags(self):
        seeds = torch.tensor(
            [[0, 4.0, 4, 16, 16, 0.9], [0, 24, 4, 36, 16, 0.8], [2, 50, 0, 60, 10, 0.7]]
        )
        inp = {"labels": LABELS, "seed_boxes": seeds}
        bags, labels, rows, _, boxes = BagBuilder(ccgr_config(BAG_SIZE=3))(
            inp, BOXES, OBJECTNESS, PEAKS, None
        )
        # SEED_IN_BAG: the two seed boxes of the present class join the proposals, each the
        # first instance of its own bag
        self.assertEqual(len(boxes), 8)
        self.assertTrue(torch.equal(boxes.tensor[bags[:, 0]], seeds[rows, 1:5]))
        self.assertEqual(labels.tolist(), [0, 0])
        plain = BagBuilder(ccgr_config(BAG_SIZE=3, SEED_IN_BAG=False))
        bags, labels, rows, _, boxes = plain(inp, BOXES, OBJECTNESS, PEAKS, None)
        self.assertIs(boxes, BOXES)
        expected = bags_from_boxes(BOXES.tensor, seeds[:2, 1:5], seeds[:2, 0].long(), 3)
        for got, want in zip((bags, labels, rows), expected):
            self.assertTrue(torch.equal(got, want))
        with self.assertRaisesRegex(ValueError, "img.png has 2 seed boxes but 3 peaks"):
            plain(
                {"labels": LABELS, "seed_boxes": seeds[:2]},
                BOXES,
                OBJECTNESS,
                PEAKS,
                None,
                "img.png",
            )

    def test_bad_options_name_the_config_key(self):
        for key, value in (("BAG_SIZE", 0), ("BAG_SEG_WEIGHT", -0.1)):
            with self.assertRaisesRegex(ValueError, f"MODEL.CCGR.{key}"):
                BagBuilder(ccgr_config(**{key: value}))


if __name__ == "__main__":
    unittest.main()
