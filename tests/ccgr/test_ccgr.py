"""CCGR's steps: round-1 cues, bags (Eq. 4), pseudo instances, connected-component variant."""

import unittest

import numpy as np
import torch
import torch.nn.functional as F

from wsis_d2.layers import IntegralImage
from wsis_d2.ccgr.labels import (
    bags_from_boxes,
    semantic_labels_from_instances,
    IGNORE,
    build_bags,
    class_map_cues,
    merge_plateau_peaks,
    component_instances,
    grabcut_masks,
    pseudo_instances,
    region_mean_scores,
)


class TestBuildBags(unittest.TestCase):
    def setUp(self):
        # two peaks of class 0 (at x 10 and x 30), one of class 1 (at x 30)
        self.peaks = torch.tensor([[0, 10.0, 10.0, 1.0], [0, 30.0, 10.0, 0.9], [1, 30.0, 12.0, 0.8]])
        self.boxes = torch.tensor(
            [
                [5.0, 5.0, 15.0, 15.0],  # 0: peak 0 only
                [0.0, 0.0, 40.0, 20.0],  # 1: both class-0 peaks: in no class-0 bag
                [25.0, 5.0, 35.0, 15.0],  # 2: peak 1 and the class-1 peak
                [8.0, 8.0, 12.0, 12.0],  # 3: peak 0
                [50.0, 0.0, 60.0, 10.0],  # 4: no peak
                [0.0, 0.0, 20.0, 20.0],  # 5: peak 0
            ]
        )
        self.seg = torch.zeros(2, 20, 64)

    def test_membership_and_order(self):
        scores = torch.tensor([0.5, 0.9, 0.6, 0.7, 0.99, 0.4])
        bags, labels, rows = build_bags(self.boxes, scores, self.peaks, self.seg, bag_size=3)
        self.assertEqual(labels.tolist(), [0, 0, 1])
        self.assertEqual(rows.tolist(), [0, 1, 2])
        # peak 0: boxes 3 (0.7), 0 (0.5), 5 (0.4), by R(B) = B_S − 0.1 (O = 0 everywhere)
        self.assertEqual(bags[0].tolist(), [3, 0, 5])
        self.assertEqual(bags[1].tolist(), [2, -1, -1])
        # the class-1 peak: box 2 and box 1 (class-0 peaks do not exclude it), by score
        self.assertEqual(bags[2].tolist(), [1, 2, -1])

    def test_segmentation_term_of_eq4(self):
        # O = 1 inside box 5 for class 0: its R rises by 0.1 · (fraction covered)
        seg = self.seg.clone()
        seg[0, 0:20, 0:20] = 1.0
        scores = torch.tensor([0.5, 0.9, 0.6, 0.47, 0.99, 0.4])
        bags, _, _ = build_bags(self.boxes, scores, self.peaks, seg, bag_size=3, seg_weight=0.1)
        # R: box 0 0.5, box 3 0.47, box 5 0.4 (all fully covered: no penalty)
        self.assertEqual(bags[0].tolist(), [0, 3, 5])
        bags, _, _ = build_bags(self.boxes, scores, self.peaks, self.seg, bag_size=3, seg_weight=1.0)
        self.assertEqual(bags[0].tolist(), [0, 3, 5])  # all equally penalised: same order
        seg2 = self.seg.clone()
        seg2[0, 8:12, 8:12] = 1.0  # only box 3 is object: R(3) = 0.47, R(0) = 0.5 − 1·0.84
        bags, _, _ = build_bags(self.boxes, scores, self.peaks, seg2, bag_size=3, seg_weight=1.0)
        self.assertEqual(bags[0].tolist()[0], 3)
        # the prebuilt integral image gives the same bags
        again, _, _ = build_bags(self.boxes, scores, self.peaks, None, 3, 1.0, IntegralImage(seg2[None]))
        self.assertEqual(again.tolist(), bags.tolist())

    def test_no_proposals_or_no_peaks(self):
        scores = torch.full((6,), 0.5)
        bags, labels, rows = build_bags(self.boxes, scores, self.peaks[:0], self.seg)
        self.assertEqual((bags.shape, labels.shape, rows.shape), ((0, 10), (0,), (0,)))
        bags, _, _ = build_bags(self.boxes[:0], scores[:0], self.peaks, self.seg)
        self.assertEqual(bags.shape, (0, 10))
        # a peak that every proposal shares with another peak of its class gets no bag
        bags, labels, rows = build_bags(self.boxes[1:2], scores[:1], self.peaks[:2], self.seg)
        self.assertEqual(bags.shape[0], 0)


def _np_iou(a, b):
    """IoU of XYXY boxes a (4,) and b (4,) in NumPy float64."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class TestBagsFromBoxes(unittest.TestCase):
    def test_top_k_by_iou_against_numpy(self):
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(40, 2, generator=g) * 80
        wh = torch.rand(40, 2, generator=g) * 40 + 4
        proposals = torch.cat([xy, xy + wh], dim=1)
        proposals[7] = proposals[3]  # an exact tie: the lower row first
        seeds = torch.tensor([[10.0, 10, 50, 60], [60, 5, 100, 40], [300, 300, 310, 310]])
        bags, labels, rows = bags_from_boxes(proposals, seeds, torch.tensor([2, 0, 1]), 5)
        # the third box overlaps no proposal: no bag
        self.assertEqual(rows.tolist(), [0, 1])
        self.assertEqual(labels.tolist(), [2, 0])
        self.assertEqual(tuple(bags.shape), (2, 5))
        for bag, row in zip(bags.tolist(), rows.tolist()):
            ious = [_np_iou(seeds[row], p) for p in proposals.tolist()]
            expected = sorted(range(len(ious)), key=lambda i: (-ious[i], i))[:5]
            expected = [i if ious[i] > 0 else -1 for i in expected]
            self.assertEqual(bag, expected)

    def test_padding_and_empty(self):
        proposals = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110]])
        bags, labels, rows = bags_from_boxes(proposals, torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([4]), 4)
        self.assertEqual(bags.tolist(), [[0, -1, -1, -1]])
        self.assertEqual(labels.tolist(), [4])
        bags, labels, rows = bags_from_boxes(proposals, torch.zeros(0, 4), torch.zeros(0), 4)
        self.assertEqual(tuple(bags.shape), (0, 4))


class TestSemanticLabelsFromInstances(unittest.TestCase):
    def test_union_background_and_overlaps(self):
        masks = torch.zeros(3, 6, 8, dtype=torch.bool)
        masks[0, 0:3, 0:3] = True  # class 1
        masks[1, 2:5, 2:6] = True  # class 1, overlaps mask 0 at (2, 2): same class, kept
        masks[2, 4:6, 5:8] = True  # class 0, overlaps mask 1 at (4, 5): ignored
        labels = semantic_labels_from_instances(masks, torch.tensor([1, 1, 0]), num_classes=3)
        self.assertEqual(labels.dtype, torch.uint8)
        expected = torch.full((6, 8), 3, dtype=torch.uint8)
        expected[masks[0] | masks[1]] = 1
        expected[masks[2]] = 0
        expected[4, 5] = 255
        self.assertTrue(torch.equal(labels, expected))
        later_wins = semantic_labels_from_instances(
            masks, torch.tensor([1, 1, 0]), 3, ignore_overlaps=False
        )
        self.assertEqual(int(later_wins[4, 5]), 0)
        empty = semantic_labels_from_instances(torch.zeros(0, 6, 8, dtype=torch.bool), torch.zeros(0), 3)
        self.assertTrue(bool((empty == 3).all()))
        with self.assertRaisesRegex(ValueError, "classes"):
            semantic_labels_from_instances(masks, torch.tensor([1, 1, 3]), 3)


class TestClassMapCues(unittest.TestCase):
    def test_peaks_and_labels(self):
        ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")

        def bump(y, x, height):
            return height * torch.exp(-((ys - y) ** 2 + (xs - x) ** 2) / 8)

        maps = torch.zeros(3, 20, 30)
        # class 0: one strong peak, one weak one (< 0.5 · max: no bag)
        maps[0] = bump(5, 5, 2.0) + bump(15, 20, 0.5)
        maps[1] = bump(10, 25, 4.0)  # class 1 is absent: no peaks, no labels
        labels = torch.tensor([1.0, 0.0, 0.0])
        peaks, sem = class_map_cues(maps, labels, None, (40, 60), mode="pixels",
                                    peak_threshold=0.5, fg_threshold=0.4, bg_threshold=0.15)
        self.assertEqual(peaks.shape, (1, 4))
        self.assertEqual(peaks[0, :3].tolist(), [0.0, 11.0, 11.0])  # (5 + 0.5) · 2 px
        self.assertEqual(sem.shape, (40, 60))
        self.assertTrue(bool((sem[8:14, 8:14] == 0).all()))  # M̄ >= 0.78 near the peak: class 0
        self.assertEqual(int(sem[38, 10]), 3)  # background
        self.assertEqual(int(sem[30, 40]), IGNORE)  # M̄ = 0.25 at the weak peak: uncertain

    def test_plateaus_give_one_peak(self):
        # a coarse map upsampled bilinearly (align_corners False, as compute_cues does) is flat
        # for half a cell along the borders: its corner maximum becomes a 4 x 4 block of ties
        coarse = torch.tensor([[[[5.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]]])
        up = F.interpolate(coarse, size=(24, 24), mode="bilinear", align_corners=False)[0]
        # second class: two separate equal maxima must stay two peaks; a ridge of 3 ties is one
        second = torch.zeros(24, 24)
        second[3, 4] = second[15, 18] = 2.0
        second[20, 5:8] = 2.0
        maps = torch.stack([up[0], second])
        peaks, _ = class_map_cues(maps, torch.tensor([1.0, 1.0]), None, (24, 24), mode="pixels",
                                  peak_threshold=0.5)
        by_class = {c: peaks[peaks[:, 0] == c, 1:].tolist() for c in (0, 1)}
        # class 0: the corner block (rows and columns 0..3) once, at the member nearest its
        # centre; the 3.0 cell (row 1, last column) gives a 2 x 4 block of ties at 2.8125 (rows
        # 11-12 between two cell centres, the last 4 columns flat): once too
        self.assertEqual(len(by_class[0]), 2)
        self.assertEqual(by_class[0][0], [1.5, 1.5, 5.0])
        self.assertAlmostEqual(by_class[0][1][2], 2.8125, places=5)
        self.assertTrue(11 <= by_class[0][1][1] - 0.5 <= 12 and 20 <= by_class[0][1][0] - 0.5)
        self.assertEqual(sorted(p[:2] for p in by_class[1]),
                         [[4.5, 3.5], [6.5, 20.5], [18.5, 15.5]])

        merged = merge_plateau_peaks(torch.tensor([[0, 0], [0, 1], [1, 1], [5, 5]]),
                                     torch.tensor([2.0, 2.0, 2.0, 1.0]), (8, 8))
        self.assertEqual(merged, [(0, 1, 2.0), (5, 5, 1.0)])
        # radius 0: every pixel is a local maximum, touching pixels differ: nothing is merged
        unmerged = merge_plateau_peaks(torch.tensor([[0, 0], [0, 1], [5, 5]]),
                                       torch.tensor([2.0, 3.0, 1.0]), (8, 8), radius=0)
        self.assertEqual(unmerged, [(0, 1, 3.0), (0, 0, 2.0), (5, 5, 1.0)])
        self.assertEqual(merge_plateau_peaks(torch.zeros(0, 2, dtype=torch.long),
                                             torch.zeros(0), (8, 8)), [])

    def test_prominence_merges_part_peaks_keeps_objects(self):
        ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")

        def bump(y, x, height, spread=8.0):
            return height * torch.exp(-((ys - y) ** 2 + (xs - x) ** 2) / spread)

        # one large object with two local maxima on a shallow saddle (its parts), and a second
        # object of the same class, separated from it by a deep valley
        # (saddle 0.85 between maxima 1.04 and 0.99: a dynamic of 0.14 of the range)
        m = bump(15, 12, 1.0, 30) + bump(15, 22, 0.95, 30) + bump(30, 48, 0.9)
        labels = torch.tensor([1.0])
        plain, _ = class_map_cues(m[None], labels, None, (40, 60), mode="pixels")
        self.assertEqual(len(plain), 3)
        peaks, _ = class_map_cues(m[None], labels, None, (40, 60), mode="pixels",
                                  peak_prominence=0.2)
        self.assertEqual(peaks[:, 1:3].tolist(), [[12.5, 15.5], [48.5, 30.5]])
        # a prominence below the saddle keeps the three; above every valley, the maximum only
        low, _ = class_map_cues(m[None], labels, None, (40, 60), mode="pixels",
                                peak_prominence=0.1)
        self.assertEqual(len(low), 3)
        top, _ = class_map_cues(m[None], labels, None, (40, 60), mode="pixels",
                                peak_prominence=0.99)
        self.assertEqual(top[:, 1:3].tolist(), [[12.5, 15.5]])

    def test_regions_follow_the_image(self):
        image = torch.zeros(3, 20, 30)
        image[:, 4:14, 4:14] = 200.0  # a bright square object
        maps = torch.zeros(2, 20, 30)
        maps[1, 6:10, 6:10] = 1.0  # the class map covers part of it
        peaks, sem = class_map_cues(maps, torch.tensor([0.0, 1.0]), image, (20, 30),
                                    mode="regions", fg_threshold=0.1, bg_threshold=0.05,
                                    segment_scale=50, segment_sigma=0.0, segment_min_size=5)
        # averaged over the square's region the whole square is class 1
        self.assertTrue(bool((sem[4:14, 4:14] == 1).all()))
        self.assertEqual(int(sem[17, 25]), 2)
        with self.assertRaisesRegex(ValueError, "needs the image"):
            class_map_cues(maps, torch.tensor([0.0, 1.0]), None, (20, 30), mode="regions")

    def test_image_without_objects_is_background(self):
        _, sem = class_map_cues(torch.rand(2, 5, 5), torch.zeros(2), None, (5, 5), mode="pixels")
        self.assertTrue(bool((sem == 2).all()))


def _ring_image(noise_seed=0):
    """(3, 64, 64) image: a red ring (radii 8 and 16, centre 32, 32) on a grey-green noisy
    background, its (64, 64) bool mask, and the box of the ring."""
    rng = np.random.default_rng(noise_seed)
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    r = np.hypot(xx - 32, yy - 32)
    ring = (r <= 16) & (r >= 8)
    img = np.empty((64, 64, 3))
    img[...] = (90.0, 120.0, 100.0)
    img[ring] = (40.0, 40.0, 210.0)
    img += rng.normal(0, 6, img.shape)
    return torch.tensor(img).permute(2, 0, 1).float(), torch.tensor(ring), torch.tensor([[16.0, 16.0, 48.0, 48.0]])


def _iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


class TestGrabCutMasks(unittest.TestCase):
    def test_recovers_hole_and_outline_from_a_blob(self):
        image, ring, box = _ring_image()
        # a score-map-like blob: the filled disc of radius 18 inside the box (hole and bleed)
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        blob = torch.tensor(np.hypot(xx - 32, yy - 32) <= 18) & _box_mask(box[0], 64, 64)
        self.assertLess(_iou(blob, ring), 0.75)
        out = grabcut_masks(image, box, blob[None], iterations=3)
        self.assertEqual(out.shape, (1, 64, 64))
        self.assertEqual(out.dtype, torch.bool)
        self.assertGreater(_iou(out[0], ring), 0.9)
        self.assertFalse(bool(out[0, 32, 32]))  # the hole is background again
        self.assertFalse(bool((out[0] & ~_box_mask(box[0], 64, 64)).any()))  # inside the box

    def test_channel_order_does_not_matter_and_input_is_kept(self):
        image, ring, box = _ring_image(1)
        blob = _box_mask(torch.tensor([20.0, 20.0, 44.0, 44.0]), 64, 64)
        before = blob.clone()
        a = grabcut_masks(image, box, blob[None])
        b = grabcut_masks(image.flip(0), box, blob[None])
        self.assertTrue(torch.equal(blob, before))
        self.assertGreater(_iou(a[0], b[0]), 0.95)
        # deterministic: OpenCV's global RNG does not leak in
        import cv2

        cv2.setRNGSeed(12345)
        cv2.randu(np.zeros((8, 8)), 0, 1)
        self.assertTrue(torch.equal(grabcut_masks(image, box, blob[None]), a))

    def test_degenerate_boxes_keep_their_masks(self):
        image, _, _ = _ring_image()
        masks = torch.zeros(3, 64, 64, dtype=torch.bool)
        masks[0, 10, 10] = True  # one pixel: too few to model the foreground
        masks[1, 60:64, 60:64] = True  # box covering the whole image: no background ring
        boxes = torch.tensor([[9.0, 9.0, 12.0, 12.0], [0.0, 0.0, 64.0, 64.0], [70.0, 70.0, 80.0, 80.0]])
        out = grabcut_masks(image, boxes, masks)
        self.assertTrue(torch.equal(out, masks))
        none = grabcut_masks(image, torch.zeros(0, 4), torch.zeros(0, 64, 64, dtype=torch.bool))
        self.assertEqual(none.shape, (0, 64, 64))

    def test_bad_shapes(self):
        image, ring, box = _ring_image()
        with self.assertRaisesRegex(ValueError, "image must be"):
            grabcut_masks(image[:2], box, ring[None])
        with self.assertRaisesRegex(ValueError, "do not match"):
            grabcut_masks(image, box, ring[None, :32])
        with self.assertRaisesRegex(ValueError, "iterations"):
            grabcut_masks(image, box, ring[None], iterations=0)


def _box_mask(box, height, width):
    ys = torch.arange(height)[:, None] + 0.5
    xs = torch.arange(width)[None, :] + 0.5
    x1, y1, x2, y2 = box.tolist()
    return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)


class TestPseudoInstances(unittest.TestCase):
    def test_masks_nms_and_ownership(self):
        s = torch.zeros(2, 30, 40)
        s[0, 5:15, 5:15] = 0.9
        s[0, 10:20, 12:25] = 0.8
        boxes = torch.tensor([[5.0, 5.0, 15.0, 15.0], [12.0, 10.0, 25.0, 20.0], [5.0, 5.0, 15.5, 15.0]])
        classes = torch.tensor([0, 0, 0])
        scores = torch.tensor([0.5, 0.9, 0.3])
        inst = pseudo_instances(s, boxes, classes, scores, mask_threshold=0.5, nms_threshold=0.5)
        # box 2 duplicates box 0 (IoU 0.95 > 0.5) and scores lower: dropped
        self.assertEqual(len(inst), 2)
        torch.testing.assert_close(inst.scores, torch.tensor([0.9, 0.5]))
        # the better-scored instance owns the shared pixels
        self.assertTrue(bool(inst.pred_masks[0, 12, 13]))
        self.assertFalse(bool(inst.pred_masks[1, 12, 13]))
        self.assertFalse(bool((inst.pred_masks[0] & inst.pred_masks[1]).any()))
        # boxes stay the given (refined) boxes
        self.assertEqual(inst.pred_boxes.tensor[1].tolist(), [5.0, 5.0, 15.0, 15.0])

    def test_fallback_threshold_and_empty(self):
        s = torch.zeros(1, 10, 10)
        s[0, 2:6, 2:6] = 0.3  # nothing >= 0.5: half the box's best instead
        inst = pseudo_instances(s, torch.tensor([[1.0, 1.0, 8.0, 8.0]]), torch.tensor([0]),
                                torch.tensor([1.0]))
        self.assertEqual(int(inst.pred_masks[0].sum()), 16)
        none = pseudo_instances(s, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        self.assertEqual(len(none), 0)

    def test_region_means_against_numpy(self):
        rng = np.random.default_rng(2)
        scores = rng.random((3, 9, 11))
        regions = rng.integers(0, 7, (9, 11))
        regions[regions == 4] = 5  # a label without pixels
        got = region_mean_scores(torch.tensor(scores), torch.tensor(regions))
        expected = np.empty_like(scores)
        for r in np.unique(regions):
            expected[:, regions == r] = scores[:, regions == r].mean(axis=1, keepdims=True)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0)
        with self.assertRaisesRegex(ValueError, "differ in size"):
            region_mean_scores(torch.tensor(scores), torch.zeros(9, 10, dtype=torch.long))

    def test_components(self):
        s = torch.zeros(3, 12, 12)
        s[2] = 0.5  # background
        s[0, 1:4, 1:4] = 0.9
        s[0, 7:10, 7:10] = 0.8
        s[1, 7:10, 1:3] = 0.9  # class 1 is not in the labels: ignored
        inst = component_instances(s, torch.tensor([1.0, 0.0]))
        self.assertEqual(len(inst), 2)
        self.assertEqual(inst.pred_classes.tolist(), [0, 0])
        self.assertEqual([round(v, 4) for v in inst.scores.tolist()], [0.9, 0.8])
        self.assertEqual(inst.pred_boxes.tensor[0].tolist(), [1.0, 1.0, 4.0, 4.0])


if __name__ == "__main__":
    unittest.main()
