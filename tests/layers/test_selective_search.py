"""Selective search's hierarchical grouping and superpixel straddling: compiled op vs reference."""

import unittest

import torch

from wsis_d2.layers import (
    box_straddling,
    box_straddling_reference,
    compiled_ops_available,
    hierarchical_grouping,
    hierarchical_grouping_reference,
)


def _blocks(h, w, block, generator):
    """Labels of a grid of block x block tiles (every label used), randomly numbered."""
    rows, cols = -(-h // block), -(-w // block)
    perm = torch.randperm(rows * cols, generator=generator)
    ids = perm.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
    return torch.unique(ids, return_inverse=True)[1]


def _inputs(strategies=3, h=21, w=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([_blocks(h, w, 3 + s, g) for s in range(strategies)])
    colour = torch.randint(0, 25, (strategies, 3, h, w), generator=g, dtype=torch.uint8)
    texture = torch.randint(0, 80, (strategies, 3, h, w), generator=g, dtype=torch.uint8)
    weights = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]][:strategies],
        dtype=torch.float64,
    )
    return labels, colour, texture, weights


@unittest.skipUnless(compiled_ops_available(), "wsis_d2._C not built")
class TestHierarchicalGrouping(unittest.TestCase):
    def test_op_equals_reference(self):
        for seed in range(3):
            inputs = _inputs(seed=seed)
            boxes, info = hierarchical_grouping(*inputs)
            ref_boxes, ref_info = hierarchical_grouping_reference(*inputs)
            self.assertTrue(torch.equal(boxes, ref_boxes))
            self.assertTrue(torch.equal(info, ref_info))

    def test_hierarchy_structure(self):
        labels, colour, texture, weights = _inputs()
        boxes, info = hierarchical_grouping(labels, colour, texture, weights)
        h, w = labels.shape[1:]
        for s in range(labels.shape[0]):
            rows = info[:, 0] == s
            r = int(labels[s].max()) + 1
            # a connected grid merges into one region: R initial + R - 1 merged
            self.assertEqual(int(rows.sum()), 2 * r - 1)
            b = boxes[rows]
            self.assertEqual(b[-1].tolist(), [0, 0, w, h])
            self.assertTrue(bool((info[rows][:r, 2] == 0).all()))
            # an initial region's box is the tight box of its pixels
            ys, xs = torch.nonzero(labels[s] == 0, as_tuple=True)
            self.assertEqual(
                b[0].tolist(), [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            )
            # a merged region is never smaller than its parts: levels rise
            self.assertGreater(int(info[rows][-1, 2]), 0)

    def test_size_only_merges_smallest_first(self):
        # with s_size alone the two smallest neighbours merge first
        labels = torch.tensor([[0, 0, 0, 1, 2, 2]] * 2)[None]
        colour = torch.zeros(1, 3, 2, 6, dtype=torch.uint8)
        texture = torch.zeros(1, 3, 2, 6, dtype=torch.uint8)
        weights = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
        boxes, _ = hierarchical_grouping(labels, colour, texture, weights)
        self.assertEqual(boxes[3].tolist(), [3, 0, 6, 2])  # regions 1 (2 px) + 2 (4 px)

    def test_bad_inputs(self):
        labels, colour, texture, weights = _inputs(strategies=1)
        labels = labels.clone()
        labels[labels == 0] = 1  # label 0 unused
        for fn in (hierarchical_grouping, hierarchical_grouping_reference):
            with self.subTest(fn=fn.__name__), self.assertRaisesRegex((ValueError, RuntimeError), "unused"):
                fn(labels, colour, texture, weights)
        labels, colour, texture, weights = _inputs(strategies=1)
        with self.assertRaisesRegex(ValueError, "colour_bins"):
            hierarchical_grouping(labels, colour + 30, texture, weights)
        with self.assertRaisesRegex(ValueError, "weights"):
            hierarchical_grouping(labels, colour, texture, -weights)


@unittest.skipUnless(compiled_ops_available(), "wsis_d2._C not built")
class TestBoxStraddling(unittest.TestCase):
    def test_op_equals_reference(self):
        g = torch.Generator().manual_seed(1)
        labels = _blocks(30, 40, 4, g)
        boxes = torch.randint(-3, 43, (200, 4), generator=g)
        boxes[:, 2:] = boxes[:, :2] + torch.randint(0, 20, (200, 2), generator=g)
        got = box_straddling(labels, boxes)
        ref = box_straddling_reference(labels, boxes)
        torch.testing.assert_close(got, ref)

    def test_values(self):
        labels = torch.zeros(10, 10, dtype=torch.long)
        labels[2:6, 3:8] = 1
        boxes = torch.tensor([[3, 2, 8, 6], [3, 2, 6, 6], [0, 0, 10, 10], [4, 4, 4, 9], [0, 0, 5, 5]])
        s = box_straddling(labels, boxes)
        self.assertAlmostEqual(float(s[0]), 1.0)  # exactly segment 1
        # 12 of segment 1's 20 px inside: min(12, 8) = 8 px straddle the edge
        self.assertAlmostEqual(float(s[1]), 1 - 8 / 12)
        # segment 0: 19 of 80 px inside (min 19), segment 1: 6 of 20 (min 6): 25 of 25 px
        self.assertAlmostEqual(float(s[4]), 0.0, places=6)
        self.assertAlmostEqual(float(s[2]), 1.0)  # the whole image: nothing crosses its edge
        self.assertEqual(float(s[3]), 0.0)  # empty box


class TestSelectiveSearchBadInput(unittest.TestCase):
    def test_names_the_argument(self):
        labels = torch.zeros(4, 5, dtype=torch.int64)
        with self.assertRaisesRegex(ValueError, r"'boxes' must have shape \(\*, 4\), got \(2, 5\)"):
            box_straddling(labels, torch.zeros(2, 5, dtype=torch.int64))
        with self.assertRaisesRegex(ValueError, "'labels' must have 2 dimensions"):
            box_straddling(labels[None], torch.zeros(2, 4, dtype=torch.int64))
        with self.assertRaisesRegex(TypeError, "'weights' must be a torch.Tensor, got list"):
            hierarchical_grouping(
                labels[None], torch.zeros(1, 3, 4, 5, dtype=torch.uint8),
                torch.zeros(1, 3, 4, 5, dtype=torch.uint8), [[1.0, 1.0, 1.0, 1.0]],
            )


if __name__ == "__main__":
    unittest.main()
