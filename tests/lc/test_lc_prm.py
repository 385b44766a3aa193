"""Peak response maps: batched gradients, grouping, masks and proposal scores vs references; the
instance decoder PRMInstanceDecoder built from the config."""

import unittest

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsis_d2 import get_wsis_cfg
from wsis_d2.layers import find_peaks
from wsis_d2.lc.prm import (
    PRMInstanceDecoder,
    batched_peak_gradients,
    gradient_to_prm,
    group_peaks,
    prm_instance_masks,
    score_box_proposals,
    segment_image,
    segment_instance_masks,
    split_group_maps,
)


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 2, 3, padding=1),
    ).eval()


class TestBatchedGradients(unittest.TestCase):
    def setUp(self):
        self.net = _small_net()
        self.x = torch.randn(1, 3, 9, 11, requires_grad=True)
        out = self.net(self.x)  # (1, 2, 4, 5)
        self.idx = [(0, 1, 2), (1, 3, 4), (0, 0, 0)]
        self.values = torch.stack([out[0, c, y, x] for c, y, x in self.idx])

    def _loop(self):
        rows = []
        for p in range(len(self.idx)):
            (g,) = torch.autograd.grad(self.values[p], self.x, retain_graph=True)
            rows.append(g)
        return torch.stack(rows)

    def test_matches_one_backward_per_peak(self):
        ref = self._loop()
        got = batched_peak_gradients(self.values, self.x, retain_graph=True)
        self.assertEqual(tuple(got.shape), (3, 1, 3, 9, 11))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        chunked = batched_peak_gradients(self.values, self.x, max_batch=2, retain_graph=True)
        torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-6)

    def test_combined_vectors_are_sums(self):
        ref = self._loop()
        combine = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        got = batched_peak_gradients(self.values, self.x, combine, retain_graph=True)
        torch.testing.assert_close(got[0], ref[0] + ref[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)

    def test_no_peaks(self):
        got = batched_peak_gradients(self.values[:0], self.x)
        self.assertEqual(tuple(got.shape), (0, 1, 3, 9, 11))


class TestPRMMasks(unittest.TestCase):
    def test_gradient_to_prm_normalised_abs_sum(self):
        g = torch.zeros(2, 3, 5, 5)
        g[0, 0, 2, 2] = -3.0
        g[0, 1, 2, 2] = 1.0
        g[0, 2, 0, 0] = 2.0
        prm = gradient_to_prm(g, 0.0)
        self.assertEqual(float(prm[0, 2, 2]), 1.0)
        self.assertEqual(float(prm[0, 0, 0]), 0.5)
        self.assertEqual(float(prm[1].abs().sum()), 0.0)  # all-zero stays zero
        smooth = gradient_to_prm(g, 1.0)
        self.assertAlmostEqual(float(smooth[0].max()), 1.0, places=6)
        self.assertGreater(float(smooth[0, 2, 3]), 0.0)

    def test_component_holding_the_peak(self):
        prm = torch.zeros(1, 8, 10)
        prm[0, 1:4, 1:4] = 1.0  # blob A (mass 9)
        prm[0, 5:7, 6:9] = 0.8  # blob B (mass 4.8)
        prm[0, 0, 9] = 0.1  # below threshold
        m = prm_instance_masks(prm.repeat(2, 1, 1), torch.tensor([[7.5, 5.5], [0.5, 7.5]]), 0.5)
        expected_b = torch.zeros(8, 10, dtype=torch.bool)
        expected_b[5:7, 6:9] = True
        self.assertTrue(torch.equal(m[0], expected_b))
        # the second point lies in no component: the one with the largest mass (A) is taken
        expected_a = torch.zeros(8, 10, dtype=torch.bool)
        expected_a[1:4, 1:4] = True
        self.assertTrue(torch.equal(m[1], expected_a))

    def test_resized_to_output(self):
        prm = torch.zeros(1, 4, 4)
        prm[0, :2, :2] = 1.0
        m = prm_instance_masks(prm, torch.tensor([[0.5, 0.5]]), 0.5, out_size=(8, 12))
        self.assertEqual(tuple(m.shape), (1, 8, 12))
        self.assertTrue(bool(m[0, :3, :5].all()))
        self.assertFalse(bool(m[0, 5:, :].any()) or bool(m[0, :, 7:].any()))


class TestSegmentMasks(unittest.TestCase):
    def test_peak_components_match_whole_image_labelling(self):
        # the labelling inside the foreground's bounding box equals labelling the whole map
        from scipy import ndimage

        from wsis_d2.lc.prm import _peak_components

        rng = np.random.default_rng(3)
        fg = ndimage.gaussian_filter(rng.random((40, 24, 30)), (0, 1.5, 1.5)) > 0.56
        fg[0] = False  # an empty map
        weights = rng.random(fg.shape)
        px, py = rng.integers(0, 30, 40).tolist(), rng.integers(0, 24, 40).tolist()
        out = _peak_components(fg, weights, px, py)
        for i in range(40):
            labels, count = ndimage.label(fg[i], structure=np.ones((3, 3), bool))
            if count == 0:
                self.assertFalse(out[i].any())
                continue
            keep = labels[py[i], px[i]]
            if keep == 0:
                mass = ndimage.sum_labels(weights[i], labels, np.arange(1, count + 1))
                keep = int(np.argmax(mass)) + 1
            np.testing.assert_array_equal(out[i], labels == keep)
        self.assertGreater(int((fg[np.arange(40), py, px]).sum()), 5)  # both cases occur
        self.assertGreater(int((~fg[np.arange(40), py, px]).sum()), 5)

    def test_region_means_thresholded_and_peak_component(self):
        seg = torch.zeros(6, 8, dtype=torch.long)
        seg[:, 4:] = 1  # two regions: left and right halves
        seg[0:2, 0:2] = 2  # a small corner region
        prm = torch.zeros(2, 6, 8)
        prm[0, 2:4, 1:3] = 1.0  # inside region 0: mean 4/20 = 0.2
        prm[0, 0, 0] = 0.1  # region 2: mean 0.025
        prm[1, :, 5] = 0.5  # region 1: mean 3/24
        prm[1, 1, 1] = 1.0  # region 2: mean 0.25, the best one of map 1
        pts = torch.tensor([[1.5, 2.5], [6.5, 3.5]])
        m = segment_instance_masks(prm, pts, seg, 0.4)
        self.assertTrue(torch.equal(m[0], seg == 0))
        # map 1: region 1 (mean 0.125 = 0.5 of the best) and region 2 (the best) pass 0.4, but
        # they are not connected; the peak lies in region 1
        self.assertTrue(torch.equal(m[1], seg == 1))
        m = segment_instance_masks(prm, pts, seg, 0.6)
        # only region 2 passes for map 1; the peak lies outside: the component with most mass
        self.assertTrue(torch.equal(m[1], seg == 2))
        # nearest-neighbour resize to the output size
        big = segment_instance_masks(prm, pts, seg, 0.4, out_size=(12, 16))
        self.assertTrue(
            torch.equal(big[0], (seg == 0).repeat_interleave(2, 0).repeat_interleave(2, 1))
        )
        self.assertEqual(tuple(segment_instance_masks(prm[:0], pts[:0], seg, 0.5).shape), (0, 6, 8))
        with self.assertRaisesRegex(ValueError, "segments"):
            segment_instance_masks(prm, pts, seg[:5], 0.5)

    def test_segment_image_follows_flat_regions(self):
        img = torch.zeros(3, 20, 30)
        img[:, :, 15:] = 200.0
        img[0, 5:12, 3:9] = 255.0  # a red square on the dark half
        labels = segment_image(img, scale=100.0, sigma=0.0, min_size=5)
        self.assertEqual(tuple(labels.shape), (20, 30))
        self.assertEqual(labels.dtype, torch.int64)
        self.assertEqual(len(torch.unique(labels)), 3)
        self.assertEqual(len(torch.unique(labels[6:11, 4:8])), 1)
        self.assertNotEqual(int(labels[8, 5]), int(labels[0, 0]))
        self.assertNotEqual(int(labels[0, 0]), int(labels[0, 29]))
        with self.assertRaisesRegex(ValueError, "image"):
            segment_image(img[0])


class TestGrouping(unittest.TestCase):
    def test_groups_keep_their_distance(self):
        g = torch.Generator().manual_seed(1)
        pts = torch.rand(30, 2, generator=g) * 100
        for d in (10.0, 30.0):
            groups = group_peaks(pts, d)
            for k in groups.unique():
                sel = pts[groups == k]
                dist = torch.cdist(sel, sel) + torch.eye(sel.shape[0]) * 1e9
                self.assertTrue(bool((dist >= d).all()))
        self.assertEqual(group_peaks(pts, float("inf")).tolist(), list(range(30)))
        self.assertEqual(set(group_peaks(pts, 0.0).tolist()), {0})

    def test_same_location_never_shares(self):
        pts = torch.tensor([[4.0, 4.0], [4.0, 4.0], [20.0, 4.0]])
        self.assertEqual(group_peaks(pts, 0.0).tolist(), [0, 1, 0])

    def test_split_by_watershed(self):
        maps = torch.zeros(1, 10, 20)
        maps[0, 2:8, 2:8] = 1.0
        maps[0, 2:8, 12:18] = 0.5
        maps[0, 4:6, 8:12] = 0.1  # a weak bridge
        pts = torch.tensor([[5.0, 5.0], [15.0, 5.0]])
        out = split_group_maps(maps, pts, torch.tensor([0, 0]))
        self.assertEqual(float(out[0, 5, 15]), 0.0)
        self.assertEqual(float(out[1, 5, 5]), 0.0)
        self.assertEqual(float(out[0, 5, 5]), 1.0)
        self.assertEqual(float(out[1, 5, 15]), 0.5)
        torch.testing.assert_close(out.sum(0), maps[0])  # a partition of the group map

    def test_split_pooled_watershed(self):
        # odd sizes, three members: the pooled watershed still partitions the group map, each
        # member keeps its own peak, and stride 1 agrees away from the basin borders
        y, x = torch.meshgrid(torch.arange(21.0), torch.arange(33.0), indexing="ij")
        centres = [(5.0, 5.0, 1.0), (26.0, 6.0, 0.7), (15.0, 16.0, 0.4)]
        maps = sum(a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 18.0) for cx, cy, a in centres)
        maps = maps[None]
        pts = torch.tensor([[cx, cy] for cx, cy, _ in centres])
        groups = torch.zeros(3, dtype=torch.long)
        fine = split_group_maps(maps, pts, groups, stride=1)
        for stride in (2, 3):
            out = split_group_maps(maps, pts, groups, stride=stride)
            torch.testing.assert_close(out.sum(0), maps[0])
            self.assertEqual(int((out > 0).sum(0).max()), 1)
            for j, (cx, cy, _) in enumerate(centres):
                self.assertGreater(float(out[j, int(cy), int(cx)]), 0.0)
            # owners differ only in a band along the basin borders
            own_f, own_p = fine.argmax(0), out.argmax(0)
            self.assertLess(float((own_f != own_p).float().mean()), 0.1)

    def test_split_members_in_one_pooled_cell(self):
        maps = torch.zeros(1, 8, 8)
        maps[0, 4, 4] = 1.0
        maps[0, 5, 5] = 0.9
        pts = torch.tensor([[4.0, 4.0], [5.0, 5.0]])  # the same 2x2 cell
        out = split_group_maps(maps, pts, torch.tensor([0, 0]), stride=2)
        self.assertEqual(float(out[0, 4, 4]), 1.0)
        self.assertAlmostEqual(float(out[1, 5, 5]), 0.9, places=6)
        # single-member groups keep their whole map
        two = torch.stack([maps[0], 2 * maps[0]])
        out = split_group_maps(two, pts, torch.tensor([1, 0]))
        torch.testing.assert_close(out[0], two[1])
        torch.testing.assert_close(out[1], two[0])
        with self.assertRaisesRegex(ValueError, "stride"):
            split_group_maps(maps, pts, torch.tensor([0, 0]), stride=0)


class TestProposals(unittest.TestCase):
    def test_matches_brute_force(self):
        g = torch.Generator().manual_seed(2)
        prms = torch.rand(2, 12, 16, generator=g)
        bg = (torch.rand(2, 12, 16, generator=g) > 0.5).float()
        boxes = torch.tensor([[2.0, 1.0, 9.0, 7.0], [0.0, 0.0, 16.0, 12.0], [5.0, 4.0, 14.0, 11.0]])
        q = score_box_proposals(prms, bg, boxes, balance=2.0, penalty=0.5, contour_width=3)
        for p in range(2):
            r = prms[p].double().numpy()
            r = r / r.sum()
            b = bg[p].double().numpy()
            for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                inside = r[y1:y2, x1:x2].sum()
                area = (x2 - x1) * (y2 - y1) / (12 * 16)
                if not 2e-5 <= area < 0.85:
                    self.assertEqual(float(q[p, k]), float("-inf"))
                    continue
                outer = r[max(0, y1 - 1) : min(12, y2 + 1), max(0, x1 - 1) : min(16, x2 + 1)].sum()
                inner = r[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].sum()
                ref = 2.0 * inside + (outer - inner) - 0.5 * b[y1:y2, x1:x2].sum() / (12 * 16)
                self.assertAlmostEqual(float(q[p, k]), ref, places=5)
        self.assertEqual(float(q[0, 1]), float("-inf"))  # the whole image is too large


class TestPRMInstanceDecoder(unittest.TestCase):
    """The instance decoder: built from MODEL.LC.PRM / MODEL.SEGMENTS, instances from peaks."""

    def test_built_from_config(self):
        values = {
            "MODEL.LC.PRM.ENABLED": ("False", "enabled", False),
            "MODEL.LC.PRM.SMOOTH_SIGMA": ("1.5", "smooth_sigma", 1.5),
            "MODEL.LC.PRM.MASK_THRESHOLD": ("0.45", "mask_threshold", 0.45),
            "MODEL.LC.PRM.MASK_MODE": ("segments", "mask_mode", "segments"),
            "MODEL.SEGMENTS.SCALE": ("300.0", "segment_scale", 300.0),
            "MODEL.SEGMENTS.SIGMA": ("0.5", "segment_sigma", 0.5),
            "MODEL.SEGMENTS.MIN_SIZE": ("7", "segment_min_size", 7),
            "MODEL.LC.PRM.MAX_BATCH": ("4", "max_batch", 4),
            "MODEL.LC.PRM.GROUP_DISTANCE": ("12.0", "group_distance", 12.0),
            "MODEL.LC.PRM.PEAK_PROMINENCE": ("0.1", "peak_prominence", 0.1),
            "MODEL.LC.PRM.DENSITY_WEIGHT": ("0.5", "density_weight", 0.5),
            "MODEL.LC.PRM.EXTRA_PEAKS": ("3", "extra_peaks", 3),
            "MODEL.LC.PRM.EXTRA_SCORE_FACTOR": ("0.25", "extra_score_factor", 0.25),
            "MODEL.LC.PRM.PROPOSAL_BALANCE": ("2.0", "proposal_balance", 2.0),
            "MODEL.LC.PRM.PROPOSAL_BG_PENALTY": ("3.0", "proposal_bg_penalty", 3.0),
            "MODEL.LC.PRM.PROPOSAL_BG_THRESHOLD": ("0.8", "proposal_bg_threshold", 0.8),
            "MODEL.LC.PRM.PROPOSAL_CONTOUR_WIDTH": ("3", "proposal_contour_width", 3),
        }
        opts = [x for key, (text, _, _) in values.items() for x in (key, text)]
        cfg = get_wsis_cfg(opts=opts)
        decoder = PRMInstanceDecoder(cfg)
        for key, (_, attr, value) in values.items():
            self.assertEqual(getattr(decoder, attr), value, key)
        self.assertEqual(list(decoder.state_dict()), [])  # checkpoints are the model's alone

    def test_variant_from_cfg_clone(self):
        cfg = get_wsis_cfg()
        decoder = PRMInstanceDecoder(cfg)
        variant_cfg = cfg.clone()
        variant_cfg.merge_from_list(["MODEL.LC.PRM.MASK_MODE", "segments"])
        variant = PRMInstanceDecoder(variant_cfg)
        self.assertEqual((decoder.mask_mode, variant.mask_mode), ("threshold", "segments"))
        self.assertEqual(cfg.MODEL.LC.PRM.MASK_MODE, "threshold")
        others = {k: v for k, v in vars(decoder).items() if not k.startswith("_")}
        self.assertEqual(
            {k: v for k, v in vars(variant).items() if k in others and k != "mask_mode"},
            {k: v for k, v in others.items() if k != "mask_mode"},
        )

    def test_bad_options_name_the_key(self):
        for key, value in (
            ("MODEL.LC.PRM.PEAK_PROMINENCE", "1.0"),
            ("MODEL.LC.PRM.MASK_THRESHOLD", "0.0"),
            ("MODEL.LC.PRM.MASK_MODE", "blobs"),
            ("MODEL.SEGMENTS.SCALE", "0.0"),
            ("MODEL.SEGMENTS.SIGMA", "-1.0"),
            ("MODEL.SEGMENTS.MIN_SIZE", "0"),
            ("MODEL.LC.PRM.EXTRA_PEAKS", "-1"),
            ("MODEL.LC.PRM.EXTRA_SCORE_FACTOR", "0.0"),
            ("MODEL.LC.PRM.EXTRA_SCORE_FACTOR", "1.5"),
        ):
            name = key.replace("MODEL.SEGMENTS.", "")
            with self.subTest(key=key), self.assertRaisesRegex(ValueError, name):
                PRMInstanceDecoder(get_wsis_cfg(opts=[key, value]))

    def test_instances_from_the_peaks_of_a_small_net(self):
        # masks of the per-peak gradients (one backward each), scores σ(s_c)·σ(M^c_p)·e^{−β|1−ν|}
        net = _small_net()
        x = torch.randn(1, 3, 16, 20, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        image = torch.randint(0, 256, (3, 16, 20), dtype=torch.uint8)
        maps = net(x)  # (1, 2, 8, 10)
        peaks = torch.tensor([[0, 0, 2, 3], [0, 1, 5, 7], [0, 0, 6, 1]])
        points = (peaks[:, [3, 2]].float() + 0.5) * 2.0
        density = torch.rand(2, 8, 10, generator=torch.Generator().manual_seed(2)) * 0.1
        probs = torch.tensor([0.9, 0.6])
        decoder = PRMInstanceDecoder(smooth_sigma=1.0, mask_threshold=0.3, density_weight=0.5)
        out = decoder(x, maps, peaks, points, image, density, probs, (32, 40))
        self.assertIsNone(x.grad)  # the PRMs are taken with autograd.grad: no .grad left behind
        grads = [torch.autograd.grad(net(x)[0, c, y, xx], x)[0] for _, c, y, xx in peaks.tolist()]
        prms = gradient_to_prm(torch.cat(grads), 1.0)
        masks = prm_instance_masks(prms, points, 0.3, (32, 40))
        kept = masks.flatten(1).any(dim=1)
        self.assertTrue(bool(kept.all()))
        self.assertEqual(out.image_size, (32, 40))
        self.assertTrue(torch.equal(out.pred_masks, masks))
        self.assertEqual(out.pred_classes.tolist(), [0, 1, 0])
        frac = F.interpolate(masks[:, None].float(), size=(8, 10), mode="area")[:, 0]
        nu = (frac * density[peaks[:, 1]]).sum(dim=(1, 2))
        values = maps.detach()[0, peaks[:, 1], peaks[:, 2], peaks[:, 3]]
        expected = probs[peaks[:, 1]] * torch.sigmoid(values) * torch.exp(-0.5 * (1 - nu).abs())
        torch.testing.assert_close(out.scores, expected)
        # the decoder's own choice of peaks: the first counts[c] by value, by class
        found = find_peaks(maps.detach(), 1, None)
        keep = decoder.retained_peaks(maps, found.indices, torch.tensor([1.0, 0.0]), (8, 10))
        self.assertEqual(keep[:, 1].tolist(), [0])
        self.assertEqual(float(maps.detach()[0, 0, keep[0, 2], keep[0, 3]]), float(found.values[0]))


if __name__ == "__main__":
    unittest.main()
