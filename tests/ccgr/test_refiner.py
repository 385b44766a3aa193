"""ContextGapRefiner: built from MODEL.CCGR.*, a variant from a config clone, the op it calls, its
options' errors."""

import unittest

import torch

from wsis_d2.ccgr import ContextGapRefiner
from wsis_d2.layers import IntegralImage, refine_context_gap
from wsis_d2.testing import ccgr_config


def _scene():
    """S (3, 60, 80): class 1 high in [30, 55] x [20, 40], class 2 in [5, 15] x [5, 15]; a MIL box
    on the left part of the class-1 object and one on the class-2 object; their peaks."""
    g = torch.Generator().manual_seed(0)
    s = torch.full((3, 60, 80), 0.1)
    s[1, 20:40, 30:55] = 0.9
    s[2, 5:15, 5:15] = 0.8
    s += 0.02 * torch.rand(s.shape, generator=g)
    boxes = torch.tensor([[32.0, 24.0, 40.0, 36.0], [6.0, 6.0, 12.0, 12.0]])
    classes = torch.tensor([1, 2])
    peaks = torch.tensor([[1, 36.0, 30.0, 1.0], [2, 9.0, 9.0, 1.0]])
    return s, boxes, classes, peaks, torch.tensor([0, 1])


class TestContextGapRefiner(unittest.TestCase):
    def test_from_config_and_a_variant(self):
        cfg = ccgr_config()
        refiner = ContextGapRefiner(cfg)
        self.assertEqual(
            (refiner.steps, refiner.lr, refiner.context_scale, refiner.min_box_size),
            (200, 0.5, 1.5, 4.0),
        )
        self.assertTrue(refiner.grow_only and refiner.search)
        self.assertEqual(refiner.snapshots, ())
        other = cfg.clone()
        other.MODEL.CCGR.REFINE_GROW_ONLY = False
        other.MODEL.CCGR.REFINE_STEPS = 20
        variant = ContextGapRefiner(other, snapshots=(0, 10))
        self.assertEqual((variant.grow_only, variant.search, variant.steps), (False, True, 20))
        self.assertEqual(variant.snapshots, (0, 10))
        self.assertTrue(refiner.grow_only)  # the first one is not changed

    def test_calls_the_op_on_the_classes_with_boxes(self):
        s, boxes, classes, peaks, own = _scene()
        for grow_only in (True, False):
            cfg = ccgr_config(REFINE_STEPS=30, REFINE_GROW_ONLY=grow_only)
            refined, snaps = ContextGapRefiner(cfg, snapshots=(0, 30))(
                s, boxes, classes, peaks, own
            )
            # the op on the integral images of classes 1 and 2 only (local classes 0 and 1)
            local_peaks = peaks.clone()
            local_peaks[:, 0] -= 1
            expected, expected_snaps, _ = refine_context_gap(
                IntegralImage(s[None, 1:]),
                boxes,
                classes - 1,
                local_peaks,
                own,
                steps=30,
                lr=0.5,
                context_scale=1.5,
                min_size=4.0,
                snapshots=(0, 30),
                grow_only=grow_only,
                search=True,
            )
            self.assertTrue(torch.equal(refined, expected))
            self.assertEqual(sorted(snaps), [0, 30])
            self.assertTrue(torch.equal(snaps[30], expected_snaps[30]))
            if grow_only:  # Eq. 2–3 projected onto the boxes holding the MIL box
                self.assertTrue(bool((refined[:, :2] <= boxes[:, :2]).all()))
                self.assertTrue(bool((refined[:, 2:] >= boxes[:, 2:]).all()))
        # the part box grows to the object [30, 55] x [20, 40]
        self.assertLess(abs(float(refined[0, 2]) - 55.0), 2.0)

    def test_no_boxes(self):
        s = torch.rand(3, 10, 10)
        empty = torch.zeros(0, 4)
        refined, snaps = ContextGapRefiner(ccgr_config(), snapshots=(0, 5))(
            s,
            empty,
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.long),
        )
        self.assertEqual(tuple(refined.shape), (0, 4))
        self.assertEqual(sorted(snaps), [0, 5])

    def test_bad_options_name_the_config_key(self):
        for key, value in (
            ("REFINE_STEPS", -1),
            ("REFINE_LR", 0.0),
            ("CONTEXT_SCALE", 0.5),
            ("MIN_BOX_SIZE", -1.0),
        ):
            with self.assertRaisesRegex(ValueError, f"MODEL.CCGR.{key}"):
                ContextGapRefiner(ccgr_config(**{key: value}))
        with self.assertRaisesRegex(ValueError, "snapshots.*REFINE_STEPS"):
            ContextGapRefiner(ccgr_config(), snapshots=(0, 201))


if __name__ == "__main__":
    unittest.main()
