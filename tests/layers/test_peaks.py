"""Peak finding: compiled op vs max-pool reference vs a brute-force reading of the definition."""

import itertools
import unittest
from unittest import mock

import torch

from wsis_d2.layers import _ext, compiled_ops_available, find_peaks, find_peaks_reference
from wsis_d2.layers import kth_peak_value, prominent_peaks


def brute_force_peaks(maps, radius, threshold=None):
    """The module docstring's definition, pixel by pixel: (mask, [(n, c, y, x, value)] sorted)."""
    n_, c_, h, w = maps.shape
    mask = torch.zeros(maps.shape, dtype=torch.bool)
    rows = []
    for n, c in itertools.product(range(n_), range(c_)):
        m = maps[n, c].double().cpu()
        if threshold == "median":
            t = m[~torch.isnan(m)].flatten().sort().values
            t = t[(len(t) - 1) // 2].item() if len(t) else float("inf")
        else:
            t = float("-inf") if threshold is None else threshold
        found = []
        for y, x in itertools.product(range(h), range(w)):
            v = m[y, x].item()
            if v != v or v < t:
                continue
            window = m[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1]
            if all(not (u > v) for u in window.flatten().tolist()):
                mask[n, c, y, x] = True
                found.append((-v, y * w + x, y, x, v))
        rows += [(n, c, y, x, v) for _, _, y, x, v in sorted(found)]
    return mask, rows


class PeaksTestBody:
    device = "cpu"

    def _maps(self, *shape, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g, dtype=dtype).to(self.device)

    def assertSamePeaks(self, a, b):
        for x, y, name in zip(a, b, a._fields):
            self.assertEqual(x.dtype, y.dtype, name)
            self.assertTrue(torch.equal(x.cpu(), y.cpu()), name)

    def assertMatchesDefinition(self, peaks, maps, radius, threshold=None):
        mask, rows = brute_force_peaks(maps, radius, threshold)
        self.assertTrue(torch.equal(peaks.mask.cpu(), mask))
        got = [tuple(i) + (v,) for i, v in zip(peaks.indices.tolist(), peaks.values.tolist())]
        self.assertEqual(got, [(n, c, y, x, float(v)) for n, c, y, x, v in rows])
        counts = mask.flatten(2).sum(2)
        self.assertTrue(torch.equal(peaks.counts.cpu(), counts))

    def test_parity_random_odd_sizes(self):
        for shape, seed in (((2, 3, 17, 23), 0), ((1, 5, 9, 31), 1), ((3, 1, 1, 7), 2)):
            for dtype in (torch.float32, torch.float64):
                maps = self._maps(*shape, dtype=dtype, seed=seed)
                for r in (0, 1, 2, 3):
                    for thr in (None, 0.3, "median"):
                        with self.subTest(shape=shape, r=r, thr=thr, dtype=dtype):
                            self.assertSamePeaks(
                                find_peaks(maps, r, thr), find_peaks_reference(maps, r, thr)
                            )

    def test_both_match_brute_force_definition(self):
        # quantised values: plateaus and ties; NaN and -inf sprinkled in
        maps = (self._maps(2, 2, 7, 9, seed=3) * 1.5).round()
        maps[0, 0, 3, 4] = float("nan")
        maps[0, 1, 0, :] = float("nan")
        maps[1, 0, 6, 8] = float("-inf")
        maps[1, 1] = float("-inf")  # every pixel of an all -inf map is >= its window
        for r in (0, 1, 2):
            for thr in (None, 0.0, "median"):
                with self.subTest(r=r, thr=thr):
                    self.assertMatchesDefinition(find_peaks(maps, r, thr), maps, r, thr)
                    self.assertMatchesDefinition(find_peaks_reference(maps, r, thr), maps, r, thr)

    def test_parity_plateaus_nan_inf(self):
        maps = (self._maps(2, 4, 15, 13, dtype=torch.float64, seed=4) * 2).round().clamp(-2, 2)
        maps[maps == 2] = float("inf")
        maps[maps == -2] = float("nan")
        for r in (1, 2):
            for thr in (None, "median"):
                self.assertSamePeaks(find_peaks(maps, r, thr), find_peaks_reference(maps, r, thr))

    def test_definition_borders_plateaus_nan(self):
        m = torch.zeros(1, 1, 4, 5, device=self.device)
        m[0, 0, 0, 0] = 3.0  # corner: window clipped, still a peak
        m[0, 0, 2, 2] = 2.0  # plateau of two equal values: both peaks
        m[0, 0, 2, 3] = 2.0
        m[0, 0, 3, 4] = float("nan")  # NaN: never a peak, never beats a neighbour
        m[0, 0, 3, 3] = 1.0
        p = find_peaks(m, radius=1, threshold=0.5)
        # sorted by value, ties by flat index
        self.assertEqual(p.indices.tolist(), [[0, 0, 0, 0], [0, 0, 2, 2], [0, 0, 2, 3]])
        self.assertEqual(p.values.tolist(), [3.0, 2.0, 2.0])
        self.assertEqual(p.counts.tolist(), [[3]])
        self.assertFalse(bool(p.mask[0, 0, 3, 4]))
        # (3, 3) = 1.0 is beaten by the plateau at (2, 2)-(2, 3) for r=1, not by the NaN
        self.assertFalse(bool(find_peaks(m, 1).mask[0, 0, 3, 3]))
        self.assertTrue(bool(find_peaks(m, 0).mask[0, 0, 3, 3]))
        self.assertFalse(bool(find_peaks(m, 0).mask[0, 0, 3, 4]))

    def test_median_threshold(self):
        m = torch.arange(25, dtype=torch.float32, device=self.device).view(1, 1, 5, 5)
        m = torch.where(m % 3 == 0, -m, m)  # 9 negative, 16 non-negative values
        # lower median of the 25 values: the 13th smallest, 5; r = 0 keeps exactly values >= 5
        p = find_peaks(m, 0, "median")
        self.assertEqual(p.values.min().item(), 5.0)
        self.assertEqual(p.counts.item(), 13)
        # random maps, r = 1: the unthresholded peaks with value >= the explicit lower median
        maps = self._maps(2, 2, 9, 10, seed=8)
        all_peaks = find_peaks(maps, 1)
        med = maps.flatten(2).sort(dim=2).values[:, :, (90 - 1) // 2]
        keep = all_peaks.values >= med[all_peaks.indices[:, 0], all_peaks.indices[:, 1]]
        self.assertTrue(bool((~keep).any()) and bool(keep.any()))  # the filter matters here
        p = find_peaks(maps, 1, "median")
        self.assertTrue(torch.equal(p.values, all_peaks.values[keep]))
        self.assertTrue(torch.equal(p.indices, all_peaks.indices[keep]))

    def test_kth_peak_value(self):
        m = torch.full((2, 2, 7, 7), -1.0, device=self.device)
        m[0, 0, 1, 1], m[0, 0, 1, 5], m[0, 0, 5, 3] = 9.0, 7.0, 8.0
        m[1, 1, 3, 3] = 4.0
        k = torch.tensor([[2, 1], [5, 1]], device=self.device)
        h = kth_peak_value(m, k, radius=1, threshold=0.0)
        self.assertEqual(h[0, 0].item(), 8.0)  # 2nd highest of {9, 8, 7}
        self.assertEqual(h[0, 1].item(), float("inf"))  # no peak above the threshold
        self.assertEqual(h[1, 0].item(), float("inf"))
        self.assertEqual(h[1, 1].item(), 4.0)  # fewer than k peaks: the lowest one
        k0 = torch.zeros(2, 2, dtype=torch.long, device=self.device)
        self.assertTrue(bool(torch.isinf(kth_peak_value(m, k0, 1)).all()))  # k = 0: none
        with self.assertRaises(ValueError):
            kth_peak_value(m, torch.ones(3, 2, dtype=torch.long), 1)

    def test_kth_peak_value_random_against_sorted_values(self):
        maps = self._maps(2, 3, 11, 13, seed=5)
        k = torch.randint(0, 40, (2, 3), generator=torch.Generator().manual_seed(5))
        h = kth_peak_value(maps, k.to(self.device), radius=1)
        mask = find_peaks_reference(maps, 1).mask
        for n, c in itertools.product(range(2), range(3)):
            values = maps[n, c][mask[n, c]].sort(descending=True).values.tolist()
            kk = int(k[n, c])
            expected = float("inf") if kk == 0 else values[min(kk, len(values)) - 1]
            self.assertEqual(h[n, c].item(), expected)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "N, C, H, W"):
            find_peaks(torch.zeros(3, 4, device=self.device))
        with self.assertRaisesRegex(ValueError, "radius"):
            find_peaks(torch.zeros(1, 1, 3, 3, device=self.device), radius=-1)
        for bad in ("mean", float("nan"), [0.5]):
            with self.assertRaisesRegex(ValueError, "threshold"):
                find_peaks(torch.zeros(1, 1, 3, 3, device=self.device), threshold=bad)

    def test_values_detached_gradients_flow_through_gather(self):
        maps = self._maps(1, 2, 9, 9).requires_grad_()
        p = find_peaks(maps, 1)
        self.assertFalse(p.values.requires_grad)
        n, c, y, x = p.indices.unbind(1)
        maps[n, c, y, x].sum().backward()
        self.assertEqual(int((maps.grad != 0).sum()), len(p.values))

    def test_half_precision_maps(self):
        maps = self._maps(1, 2, 9, 11, seed=6).half()
        a, b = find_peaks(maps, 1, 0.2), find_peaks(maps.float(), 1, 0.2)
        self.assertEqual(a.values.dtype, torch.float16)
        self.assertTrue(torch.equal(a.indices, b.indices))


class TestPeaksCPU(PeaksTestBody, unittest.TestCase):
    def test_compiled_op_is_used(self):
        self.assertTrue(compiled_ops_available(), "wsis_d2._C not built")
        maps = self._maps(1, 1, 5, 5)
        thr = torch.full((1, 1), float("-inf"))
        mask = torch.ops.wsis_d2.find_peaks(maps, 1, thr)[0]
        self.assertTrue(torch.equal(mask, find_peaks(maps, 1).mask))

    def test_missing_extension_falls_back_with_one_warning(self):
        maps = self._maps(2, 2, 9, 8, seed=7)
        expected = find_peaks(maps, 1, "median")
        with mock.patch.object(_ext, "_C", None), mock.patch.object(_ext, "_warned", False):
            with self.assertLogs(_ext.logger, "WARNING") as logs:
                got = find_peaks(maps, 1, "median")
            self.assertEqual(len(logs.records), 1)
            self.assertIn("reference", logs.output[0])
            with self.assertNoLogs(_ext.logger, "WARNING"):
                find_peaks(maps, 1)
        self.assertSamePeaks(got, expected)


class TestProminentPeaks(unittest.TestCase):
    def test_part_peaks_merge_objects_stay(self):
        ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")

        def bump(y, x, height, spread):
            return height * torch.exp(-((ys - y) ** 2 + (xs - x) ** 2) / spread)

        # one object with two maxima on a shallow saddle (0.85 between 1.04 and 0.99), and a
        # second one behind a deep valley
        m = bump(15, 12, 1.0, 30) + bump(15, 22, 0.95, 30) + bump(30, 48, 0.9, 8)
        found = find_peaks(m[None, None], 1, None)
        yx, val = found.indices[:, 2:], found.values
        self.assertEqual(yx.tolist(), [[15, 12], [15, 21], [30, 48]])
        self.assertEqual(prominent_peaks(m, yx, val, 0.2).tolist(), [True, False, True])
        self.assertEqual(prominent_peaks(m, yx, val, 0.1).tolist(), [True, True, True])
        self.assertEqual(prominent_peaks(m, yx, val, 0.95).tolist(), [True, False, False])
        # a part peak is not the top of a dome, also when the dome's top is not among the peaks
        self.assertEqual(prominent_peaks(m, yx[1:], val[1:], 0.2).tolist(), [False, True])
        # one per dome: of two equal tops of a plateau, the first
        flat = torch.zeros(5, 9)
        flat[2, 2:5] = 1.0
        self.assertEqual(
            prominent_peaks(flat, torch.tensor([[2, 2], [2, 4]]), torch.ones(2), 0.5).tolist(),
            [True, False],
        )
        self.assertEqual(prominent_peaks(m, yx[:0], val[:0], 0.2).shape, (0,))


@unittest.skipIf(not torch.cuda.is_available(), "needs a GPU")
class TestPeaksCUDA(PeaksTestBody, unittest.TestCase):
    device = "cuda"


class TestPeaksBadInput(unittest.TestCase):
    """kth_peak_value and prominent_peaks name the argument (find_peaks: PeaksTestBody)."""

    def test_kth_peak_value(self):
        maps = torch.rand(2, 3, 6, 7)
        with self.assertRaisesRegex(TypeError, "'k' must have an integer dtype, got torch.float32"):
            kth_peak_value(maps, torch.full((2, 3), 2.0))
        with self.assertRaisesRegex(TypeError, "'k' must have an integer dtype, got torch.float64"):
            kth_peak_value(maps, [[1.5, 1, 1], [1, 1, 1]])
        with self.assertRaisesRegex(ValueError, r"'k' must have shape \(2, 3\) .*got \(3,\)"):
            kth_peak_value(maps, torch.ones(3, dtype=torch.long))
        with self.assertRaisesRegex(TypeError, "radius"):
            kth_peak_value(maps, torch.ones(2, 3, dtype=torch.long), radius=1.5)
        # the documented conventions stay: k above the number of peaks, k = 0, no peak
        flat = torch.zeros(1, 1, 3, 3)
        k = torch.tensor([[0]])
        self.assertEqual(kth_peak_value(flat, k).item(), float("inf"))
        self.assertEqual(kth_peak_value(flat, torch.tensor([[99]])).item(), 0.0)

    def test_prominent_peaks(self):
        m = torch.rand(5, 6)
        yx = torch.tensor([[1, 1], [3, 4]])
        values = m[yx[:, 0], yx[:, 1]]
        self.assertEqual(prominent_peaks(m, yx, values, 0.1).shape, (2,))
        with self.assertRaisesRegex(ValueError, r"'height' must lie in \(0.0, inf\], got 0"):
            prominent_peaks(m, yx, values, 0)
        with self.assertRaisesRegex(ValueError, r"'yx' must have shape \(\*, 2\), got \(2, 3\)"):
            prominent_peaks(m, torch.zeros(2, 3, dtype=torch.long), values, 0.1)
        with self.assertRaisesRegex(TypeError, "'yx' must have an integer dtype"):
            prominent_peaks(m, yx.float(), values, 0.1)
        with self.assertRaisesRegex(ValueError, r"'values' must have shape \(2,\), got \(1,\)"):
            prominent_peaks(m, yx, values[:1], 0.1)
        with self.assertRaisesRegex(ValueError, "'yx' must lie inside"):
            prominent_peaks(m, yx + 5, values, 0.1)
        with self.assertRaisesRegex(ValueError, "'peak_map' must have 2 dimensions"):
            prominent_peaks(m[None], yx, values, 0.1)
        nan_map = m.clone()
        nan_map[0, 0] = float("nan")
        with self.assertRaisesRegex(ValueError, r"'peak_map' must not contain NaN.*\(0, 0\)"):
            prominent_peaks(nan_map, yx, values, 0.1)


if __name__ == "__main__":
    unittest.main()
