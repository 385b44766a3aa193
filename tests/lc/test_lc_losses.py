"""LC / ILC losses and the hard spatial guidance against hand-computed / independent values; the
loss component LCLoss built from the config."""

import math
import unittest

import numpy as np
import torch
from detectron2.utils.events import EventStorage

from wsis_d2 import get_wsis_cfg
from wsis_d2.layers import find_peaks, kth_peak_value
from wsis_d2.lc.losses import (
    LCLoss,
    estimate_counts,
    hard_spatial_guidance,
    lc_class_loss,
    lc_count_loss,
    lc_ranking_loss,
    lc_spatial_loss,
)


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


class TestClassLoss(unittest.TestCase):
    def test_hand_computed(self):
        scores = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]])
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        s, y = scores.numpy().astype(np.float64), labels.numpy()
        per_image = -(y * _log_sigmoid(s) + (1 - y) * _log_sigmoid(-s)).mean(axis=1)
        self.assertAlmostEqual(float(lc_class_loss(scores, labels)), per_image.mean(), places=6)
        # one value by hand: image 0, class 0: -log σ(2) = log(1 + e^-2)
        self.assertAlmostEqual(-_log_sigmoid(2.0), math.log(1 + math.exp(-2.0)), places=12)


class TestCounts(unittest.TestCase):
    def test_sum_and_mean_respect_valid_region(self):
        density = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
        valid = torch.zeros(2, 1, 2, 3)
        valid[0] = 1.0
        valid[1, 0, :1, :2] = 1.0  # image 1 covers only the top-left 1x2 cells: values 6, 7
        paper = estimate_counts(density, valid, "paper")
        official = estimate_counts(density, valid, "official")
        self.assertEqual(paper[:, 0].tolist(), [15.0, 13.0])
        self.assertEqual(official[:, 0].tolist(), [2.5, 6.5])
        self.assertEqual(estimate_counts(density, None, "paper")[:, 0].tolist(), [15.0, 51.0])

    def test_unknown_mode(self):
        with self.assertRaisesRegex(ValueError, "COUNT_MODE"):
            estimate_counts(torch.zeros(1, 1, 2, 2), None, "bogus")


class TestGuidance(unittest.TestCase):
    def test_marks_the_t_highest_peaks_only(self):
        m = torch.tensor(
            [
                [0.0, 0.0, 0.0, 0.0, 0.0],
                [0.0, 5.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 3.0, 0.0],
                [0.0, 4.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 1.0],
            ]
        )
        maps = torch.stack([m, m, -m - 1.0])[None]  # (1, 3, 5, 5)
        peaks = torch.zeros_like(maps, dtype=torch.bool)
        for y, x in ((1, 1), (2, 3), (3, 1), (4, 4)):
            peaks[0, 0, y, x] = peaks[0, 1, y, x] = True
        peaks[0, 2, 0, 0] = True  # the maximum (-1) of the negated map
        kth = torch.tensor([[4.0, 5.0, -1.0]])  # h_c: 2nd, 1st, 1st highest peak
        select = torch.tensor([[True, False, True]])
        b = hard_spatial_guidance(maps, peaks, kth, select)
        expected = torch.zeros_like(maps)
        expected[0, 0, 1, 1] = expected[0, 0, 3, 1] = 1.0  # two highest peaks of class 0
        expected[0, 2, 0, 0] = 1.0  # h < 0: only the peak pixel, not the zero background
        self.assertTrue(torch.equal(b, expected))
        self.assertFalse(b.requires_grad)

    def test_no_peak_gives_no_guidance(self):
        maps = torch.randn(1, 1, 4, 4)
        peaks = torch.zeros_like(maps, dtype=torch.bool)
        b = hard_spatial_guidance(
            maps, peaks, torch.tensor([[float("inf")]]), torch.tensor([[True]])
        )
        self.assertEqual(float(b.sum()), 0.0)


class TestSpatialLoss(unittest.TestCase):
    def setUp(self):
        g = torch.Generator().manual_seed(0)
        self.density = torch.randn(2, 3, 4, 5, generator=g)
        self.guidance = torch.zeros(2, 3, 4, 5)
        self.guidance[0, 0, 1, 1] = self.guidance[0, 0, 2, 3] = 1.0
        self.guidance[0, 1, 0, 4] = 1.0
        self.guidance[1, 2, 3, 0] = 1.0
        self.positive = torch.tensor([[True, True, False], [False, False, True]])
        self.negative = torch.tensor([[False, False, True], [True, False, False]])
        self.valid = torch.ones(2, 1, 4, 5)
        self.valid[1, :, :, 4:] = 0.0  # image 1 is 4x4

    def _reference(self, mode):
        d = self.density.double().numpy()
        b = self.guidance.numpy()
        v = self.valid.numpy()
        pos, neg = self.positive.numpy(), self.negative.numpy()
        if mode == "official":
            sel = (b > 0) & pos[:, :, None, None] & (v > 0)
            lp = -_log_sigmoid(d[sel]).mean()
            nsel = neg[:, :, None, None] & (v > 0)
            ln = -_log_sigmoid(-d[nsel]).mean()
            return lp, ln
        lp = ln = 0.0
        for n in range(2):
            s = [c for c in range(3) if pos[n, c]]
            s0 = [c for c in range(3) if neg[n, c]]
            area = v[n, 0].sum()
            if s:
                lp += sum(
                    -(b[n, c] * v[n, 0] * _log_sigmoid(d[n, c])).sum() / (b[n, c] * v[n, 0]).sum()
                    for c in s
                ) / len(s)
            if s0:
                ln += sum(-(v[n, 0] * _log_sigmoid(-d[n, c])).sum() / area for c in s0) / len(s0)
        return lp / 2, ln / 2

    def test_paper_mode_matches_reference(self):
        lp, ln = lc_spatial_loss(
            self.density, self.guidance, self.positive, self.negative, self.valid, "paper"
        )
        rp, rn = self._reference("paper")
        self.assertAlmostEqual(float(lp), rp, places=5)
        self.assertAlmostEqual(float(ln), rn, places=5)

    def test_official_mode_matches_bce_with_logits(self):
        lp, ln = lc_spatial_loss(
            self.density, self.guidance, self.positive, self.negative, self.valid, "official"
        )
        rp, rn = self._reference("official")
        self.assertAlmostEqual(float(lp), rp, places=5)
        self.assertAlmostEqual(float(ln), rn, places=5)
        # and the same through torch's BCEWithLogitsLoss on the selected entries
        sel = (self.guidance > 0) & self.positive[:, :, None, None]
        bce = torch.nn.BCEWithLogitsLoss()(self.density[sel], torch.ones(int(sel.sum())))
        self.assertAlmostEqual(float(lp), float(bce), places=5)

    def test_modes_differ_in_normalisation(self):
        lp_paper, _ = lc_spatial_loss(
            self.density, self.guidance, self.positive, self.negative, self.valid, "paper"
        )
        lp_off, _ = lc_spatial_loss(
            self.density, self.guidance, self.positive, self.negative, self.valid, "official"
        )
        self.assertNotAlmostEqual(float(lp_paper), float(lp_off), places=3)

    def test_single_pixel_by_hand(self):
        d = torch.tensor([[[[0.0, 2.0]]]])  # (1, 1, 1, 2)
        b = torch.tensor([[[[0.0, 1.0]]]])
        t, f = torch.tensor([[True]]), torch.tensor([[False]])
        lp, ln = lc_spatial_loss(d, b, t, f, None, "paper")
        self.assertAlmostEqual(float(lp), math.log(1 + math.exp(-2.0)), places=6)
        self.assertEqual(float(ln), 0.0)
        lp, ln = lc_spatial_loss(d, b, f, t, None, "paper")  # absent: (log 2 + log(1 + e^2)) / 2
        self.assertEqual(float(lp), 0.0)
        self.assertAlmostEqual(
            float(ln), (math.log(2.0) + math.log(1 + math.exp(2.0))) / 2, places=6
        )

    def test_gradient_flows_to_density_only_where_supervised(self):
        d = self.density.clone().requires_grad_(True)
        lp, ln = lc_spatial_loss(d, self.guidance, self.positive, self.negative, self.valid)
        (lp + ln).backward()
        g = d.grad
        # class 1 of image 1 is neither in S nor in S0; padding of image 1 gets nothing
        self.assertEqual(float(g[1, 1].abs().sum()), 0.0)
        self.assertEqual(float(g[1, :, :, 4].abs().sum()), 0.0)
        # present class: only guidance pixels
        others = g[0, 0].clone()
        others[1, 1] = others[2, 3] = 0.0
        self.assertEqual(float(others.abs().sum()), 0.0)
        self.assertNotEqual(float(g[0, 0, 1, 1]), 0.0)


class TestCountAndRankingLoss(unittest.TestCase):
    def test_count_loss_by_hand(self):
        t_hat = torch.tensor([[1.5, 0.2, 7.0], [3.0, -1.0, 2.0]])
        t = torch.tensor([[2, 0, 5], [3, 0, 0]])
        select = torch.tensor([[True, True, False], [False, True, True]])
        # image 0: ((−0.5)² + 0.2²) / 2 = 0.145; image 1: ((−1)² + 2²) / 2 = 2.5
        self.assertAlmostEqual(float(lc_count_loss(t_hat, t, select)), (0.145 + 2.5) / 2, places=6)
        none = torch.zeros_like(select)
        self.assertEqual(float(lc_count_loss(t_hat, t, none)), 0.0)
        # per-image weights (a mosaic of 4 images: 1/4)
        w = torch.tensor([1.0, 0.25])
        self.assertAlmostEqual(
            float(lc_count_loss(t_hat, t, select, weights=w)), (0.145 + 2.5 / 4) / 2, places=6
        )

    def test_ranking_loss_by_hand(self):
        t_hat = torch.tensor([[3.0, 6.0, 0.0], [4.5, 0.0, 0.0]])
        select = torch.tensor([[True, True, False], [True, False, False]])
        # t̃ = 5: image 0: (2 + 0) / 2 = 1; image 1: 0.5
        self.assertAlmostEqual(float(lc_ranking_loss(t_hat, 5, select)), 0.75, places=6)
        t_hat.requires_grad_(True)
        lc_ranking_loss(t_hat, 5, select).backward()
        # d/dt̂ of max(0, t̃ − t̂)/|S̃|/N: −1/2/2 where active, 0 where t̂ >= t̃ or not selected
        self.assertEqual(t_hat.grad.tolist(), [[-0.25, 0.0, 0.0], [-0.5, 0.0, 0.0]])

    def test_ranking_loss_with_per_class_bounds(self):
        # mosaics: a lower bound 8 (tiles ">= 5" and 3) instead of t̃ = 5
        t_hat = torch.tensor([[6.0, 6.0], [4.0, 9.0]])
        select = torch.tensor([[True, True], [True, True]])
        bounds = torch.tensor([[8, 5], [5, 8]])
        # image 0: (2 + 0) / 2 = 1; image 1: (1 + 0) / 2 = 0.5
        self.assertAlmostEqual(float(lc_ranking_loss(t_hat, bounds, select)), 0.75, places=6)
        same = torch.full((2, 2), 5)
        self.assertAlmostEqual(
            float(lc_ranking_loss(t_hat, same, select)),
            float(lc_ranking_loss(t_hat, 5, select)),
            places=6,
        )


class TestBadInputs(unittest.TestCase):
    """Each loss rejects bad input with a ValueError / TypeError naming the argument."""

    def setUp(self):
        self.maps = torch.randn(2, 3, 5, 6)
        self.sel = torch.tensor([[True, False, False], [False, True, False]])

    def test_class_loss(self):
        scores = torch.randn(2, 3)
        with self.assertRaisesRegex(ValueError, r"'labels' must hold only 0 and 1, got 2\.0"):
            lc_class_loss(scores, torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]]))
        with self.assertRaisesRegex(ValueError, r"'labels' must have shape \(2, 3\), got \(2, 4\)"):
            lc_class_loss(scores, torch.zeros(2, 4))
        with self.assertRaisesRegex(TypeError, "'scores' must be a torch.Tensor"):
            lc_class_loss([[0.0, 1.0]], torch.zeros(1, 2))

    def test_estimate_counts(self):
        with self.assertRaisesRegex(TypeError, "'density' must have a floating-point dtype"):
            estimate_counts(torch.ones(2, 3, 4, 4, dtype=torch.long))
        with self.assertRaisesRegex(ValueError, r"'valid' must have shape \(2, 1, 5, 6\), got"):
            estimate_counts(self.maps, torch.ones(2, 1, 5, 7))
        with self.assertRaisesRegex(ValueError, "'valid' must hold only 0 and 1"):
            estimate_counts(self.maps, torch.full((2, 1, 5, 6), 0.5))
        with self.assertRaisesRegex(ValueError, "'density' must have 4 dimensions"):
            estimate_counts(torch.ones(3, 4, 4))

    def test_hard_spatial_guidance(self):
        mask = torch.zeros(2, 3, 5, 6, dtype=torch.bool)
        kth = torch.full((2, 3), float("inf"))  # +inf: the documented "no peak"
        hard_spatial_guidance(self.maps, mask, kth, self.sel)
        kth[1, 2] = float("nan")
        with self.assertRaisesRegex(ValueError, r"'kth_values' must not contain NaN.*\(1, 2\)"):
            hard_spatial_guidance(self.maps, mask, kth, self.sel)
        with self.assertRaisesRegex(ValueError, r"'peak_mask' must have shape \(2, 3, 5, 6\)"):
            hard_spatial_guidance(self.maps, mask[:, :2], torch.zeros(2, 3), self.sel)
        with self.assertRaisesRegex(ValueError, r"'select' must have shape \(2, 3\), got \(3,\)"):
            hard_spatial_guidance(self.maps, mask, torch.zeros(2, 3), self.sel[0])

    def test_spatial_loss(self):
        guidance = torch.zeros(2, 3, 5, 6)
        neg = torch.tensor([[False, True, True], [True, False, True]])
        lc_spatial_loss(self.maps, guidance, self.sel, neg)
        with self.assertRaisesRegex(ValueError, "'guidance' must hold only 0 and 1, got 0.5"):
            lc_spatial_loss(self.maps, torch.full((2, 3, 5, 6), 0.5), self.sel, neg)
        with self.assertRaisesRegex(
            ValueError, r"'positive' and 'negative' must not overlap.*\(0, 0\)"
        ):
            lc_spatial_loss(self.maps, guidance, self.sel, neg | self.sel[[0, 0]])
        with self.assertRaisesRegex(
            ValueError, r"'guidance' must have shape \(2, 3, 5, 6\), got \(2, 3, 5, 5\)"
        ):
            lc_spatial_loss(self.maps, guidance[..., :5], self.sel, neg)
        with self.assertRaisesRegex(
            ValueError, r"'negative' must have shape \(2, 3\), got \(2, 2\)"
        ):
            lc_spatial_loss(self.maps, guidance, self.sel, neg[:, :2])
        with self.assertRaisesRegex(ValueError, "'positive' must hold only 0 and 1"):
            lc_spatial_loss(self.maps, guidance, self.sel.float() * 3, neg)

    def test_count_loss(self):
        t_hat = torch.randn(2, 3)
        counts = torch.tensor([[1, 0, 2], [0, 3, 0]])
        lc_count_loss(t_hat, counts, self.sel)
        with self.assertRaisesRegex(ValueError, r"'counts' must be >= 0, got -1 at index \(1, 0\)"):
            lc_count_loss(t_hat, torch.tensor([[1, 0, 2], [-1, 3, 0]]), self.sel)
        with self.assertRaisesRegex(ValueError, r"'counts' must have shape \(2, 3\), got \(3, 2\)"):
            lc_count_loss(t_hat, counts.t(), self.sel)
        with self.assertRaisesRegex(ValueError, r"'weights' must have shape \(2,\), got \(3,\)"):
            lc_count_loss(t_hat, counts, self.sel, weights=torch.ones(3))
        with self.assertRaisesRegex(ValueError, "'weights' must be >= 0"):
            lc_count_loss(t_hat, counts, self.sel, weights=torch.tensor([1.0, -1.0]))

    def test_ranking_loss(self):
        t_hat = torch.randn(2, 3)
        with self.assertRaisesRegex(ValueError, r"'lower_count' must lie in \[0.0, inf\], got -5"):
            lc_ranking_loss(t_hat, -5, self.sel)
        with self.assertRaisesRegex(ValueError, r"'lower_count' must have shape \(2, 3\)"):
            lc_ranking_loss(t_hat, torch.full((2, 1), 5), self.sel)
        with self.assertRaisesRegex(
            ValueError, r"'select' must have shape \(2, 3\), got \(2, 3, 1\)"
        ):
            lc_ranking_loss(t_hat, 5, self.sel[..., None])


class TestLCLoss(unittest.TestCase):
    """The loss component: built from MODEL.LC, the loss dict composed of the terms above."""

    def setUp(self):
        # one image, 3 classes on a 4x5 map: class 0 in S (t = 2), class 1 in S̃ (>= t̃), 2 in S0
        g = torch.Generator().manual_seed(0)
        self.maps = torch.randn(1, 3, 4, 5, generator=g)
        self.density = torch.randn(1, 3, 4, 5, generator=g)
        peaks = find_peaks(self.maps, 1, "median")
        self.peak_mask = peaks.mask
        self.scores = self.maps.flatten(2).amax(dim=2)
        self.valid = torch.ones(1, 1, 4, 5)
        self.t_hat = estimate_counts(self.density, self.valid, "paper")
        self.inputs = [
            {
                "labels": torch.tensor([1.0, 1.0, 0.0]),
                "counts": torch.tensor([2, 5, 0]),
                "count_ge": torch.tensor([False, True, False]),
            }
        ]

    def _kth(self, k):
        return kth_peak_value(self.maps.detach(), k, 1, "median")

    def _run(self, criterion, iteration=0):
        with EventStorage(iteration):
            return criterion(
                self.inputs,
                self.maps,
                self.density,
                self.peak_mask,
                self.scores,
                self.t_hat,
                self.valid,
                self._kth,
            )

    def test_built_from_config(self):
        cfg = get_wsis_cfg(opts=[
            "MODEL.LC.LOWER_COUNT", "4",
            "MODEL.LC.CLS_LOSS_WEIGHT", "2.0",
            "MODEL.LC.SPATIAL_LOSS_WEIGHT", "3.0",
            "MODEL.LC.COUNT_LOSS_WEIGHT", "0.5",
            "MODEL.LC.RANK_LOSS_WEIGHT", "0.25",
            "MODEL.LC.SPATIAL_MODE", "official",
            "MODEL.LC.COUNT_ABSENT", "False",
            "MODEL.LC.SPATIAL_START_ITER", "7",
            "MODEL.LC.DENSITY_START_ITER", "3",
            "MODEL.LC.IMAGE_LABELS_ONLY", "True",
        ])
        criterion = LCLoss(cfg)
        self.assertEqual(criterion.lower_count, 4)
        self.assertEqual(
            (
                criterion.cls_loss_weight,
                criterion.spatial_loss_weight,
                criterion.count_loss_weight,
                criterion.rank_loss_weight,
            ),
            (2.0, 3.0, 0.5, 0.25),
        )
        self.assertEqual(criterion.spatial_mode, "official")
        self.assertFalse(criterion.count_absent)
        self.assertEqual((criterion.spatial_start_iter, criterion.density_start_iter), (7, 3))
        self.assertTrue(criterion.image_labels_only)
        self.assertEqual(list(criterion.state_dict()), [])  # checkpoints are the model's alone

    def test_loss_dict_composes_the_terms(self):
        losses = self._run(LCLoss(get_wsis_cfg()))
        exact = torch.tensor([[True, False, False]])
        beyond = torch.tensor([[False, True, False]])
        absent = torch.tensor([[False, False, True]])
        counts = torch.tensor([[2, 5, 0]])
        guidance = hard_spatial_guidance(self.maps, self.peak_mask, self._kth(counts), exact)
        pos, neg = lc_spatial_loss(self.density, guidance, exact, absent, self.valid, "paper")
        expected = {
            "loss_cls": lc_class_loss(self.scores, torch.tensor([[1.0, 1.0, 0.0]])),
            "loss_sp_pos": pos,
            "loss_sp_neg": neg,
            "loss_count": lc_count_loss(self.t_hat, counts, exact | absent),
            "loss_rank": 0.1 * lc_ranking_loss(self.t_hat, 5, beyond),
        }
        self.assertEqual(list(losses), list(expected))
        for key, value in expected.items():
            torch.testing.assert_close(losses[key], value, msg=key)
        self.assertGreater(float(losses["loss_rank"]), 0.0)

    def test_variant_from_cfg_clone(self):
        cfg = get_wsis_cfg()
        base = self._run(LCLoss(cfg))
        weights = {"CLS": 2.0, "SPATIAL": 3.0, "COUNT": 0.5, "RANK": 0.4}
        variant_cfg = cfg.clone()
        for name, weight in weights.items():
            variant_cfg.merge_from_list([f"MODEL.LC.{name}_LOSS_WEIGHT", str(weight)])
        variant = LCLoss(variant_cfg)
        self.assertEqual(cfg.MODEL.LC.CLS_LOSS_WEIGHT, 1.0)  # the clone, not the config
        scaled = self._run(variant)
        factors = {
            "loss_cls": 2.0,
            "loss_sp_pos": 3.0,
            "loss_sp_neg": 3.0,
            "loss_count": 0.5,
            "loss_rank": 4.0,  # λ 0.1 -> 0.4
        }
        for key, factor in factors.items():
            torch.testing.assert_close(scaled[key], factor * base[key], msg=key)
        # stage 1 of the official schedule and the classification-only start: zeros, in the graph
        stage1 = self._run(LCLoss(get_wsis_cfg(opts=["MODEL.LC.SPATIAL_START_ITER", "5"])), 4)
        self.assertEqual(float(stage1["loss_sp_pos"]) + float(stage1["loss_sp_neg"]), 0.0)
        early = self._run(LCLoss(get_wsis_cfg(opts=["MODEL.LC.DENSITY_START_ITER", "5"])), 4)
        for key in ("loss_sp_pos", "loss_sp_neg", "loss_count", "loss_rank"):
            self.assertEqual(float(early[key]), 0.0, key)
        labels_only = self._run(LCLoss(get_wsis_cfg(opts=["MODEL.LC.IMAGE_LABELS_ONLY", "True"])))
        self.assertEqual(list(labels_only), ["loss_cls"])
        torch.testing.assert_close(labels_only["loss_cls"], base["loss_cls"])

    def test_bad_options_name_the_key(self):
        for key, value in (
            ("MODEL.LC.LOWER_COUNT", "1"),
            ("MODEL.LC.SPATIAL_MODE", "mean"),
        ):
            with self.subTest(key=key), self.assertRaisesRegex(ValueError, key):
                LCLoss(get_wsis_cfg(opts=[key, value]))
        self.inputs[0]["counts"] = torch.tensor([2, 5])
        with self.assertRaisesRegex(ValueError, "'counts' has 2 entries"):
            self._run(LCLoss(get_wsis_cfg()))


if __name__ == "__main__":
    unittest.main()
