"""Peak finding: compiled op vs the max-pool reference, and the definition on hand-made maps."""
import unittest

import torch

from wsis_d2.layers import compiled_ops_available, find_peaks, find_peaks_reference, kth_peak_value


class PeaksTestBody:
    device = "cpu"

    def _maps(self, *shape, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g, dtype=dtype).to(self.device)

    def assertSamePeaks(self, a, b):
        for x, y, name in zip(a, b, a._fields):
            self.assertTrue(torch.equal(x.cpu(), y.cpu()), name)

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

    def test_parity_plateaus_and_quantised_values(self):
        # few distinct values: many ties and plateaus
        maps = (self._maps(2, 4, 15, 13) * 2).round().clamp(-2, 2)
        for r in (1, 2):
            self.assertSamePeaks(find_peaks(maps, r), find_peaks_reference(maps, r))

    def test_definition_borders_plateaus_nan(self):
        m = torch.zeros(1, 1, 4, 5, device=self.device)
        m[0, 0, 0, 0] = 3.0  # corner: window clipped, still a peak
        m[0, 0, 2, 2] = 2.0  # plateau of two equal values: both peaks
        m[0, 0, 2, 3] = 2.0
        m[0, 0, 3, 4] = float("nan")  # NaN: never a peak, never beats a neighbour
        m[0, 0, 3, 3] = 1.0
        p = find_peaks(m, radius=1, threshold=0.5)
        expected = {(0, 0, 0, 0), (0, 0, 2, 2), (0, 0, 2, 3)}
        self.assertEqual({tuple(r) for r in p.indices.tolist()}, expected)
        # sorted by value, ties by flat index
        self.assertEqual(p.indices[:, 2:].tolist(), [[0, 0], [2, 2], [2, 3]])
        self.assertEqual(p.values.tolist(), [3.0, 2.0, 2.0])
        self.assertEqual(p.counts.tolist(), [[3]])
        self.assertFalse(bool(p.mask[0, 0, 3, 4]))
        # (3, 3) = 1.0 is beaten by the plateau at (2, 2)-(2, 3) for r=1, not by the NaN
        self.assertFalse(bool(find_peaks(m, 1).mask[0, 0, 3, 3]))
        self.assertTrue(bool(find_peaks(m, 0).mask[0, 0, 3, 3]))

    def test_median_threshold(self):
        m = torch.arange(25, dtype=torch.float32, device=self.device).view(1, 1, 5, 5)
        m = torch.where(m % 2 == 0, m, -m)  # peaks at even values
        p = find_peaks(m, 1, "median")
        med = m.flatten().median()
        self.assertTrue(bool((p.values >= med).all()))
        self.assertGreater(len(p.values), 0)

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
        with self.assertRaises(ValueError):
            kth_peak_value(m, torch.ones(3, 2, dtype=torch.long), 1)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "N, C, H, W"):
            find_peaks(torch.zeros(3, 4, device=self.device))
        with self.assertRaisesRegex(ValueError, "radius"):
            find_peaks(torch.zeros(1, 1, 3, 3, device=self.device), radius=-1)
        with self.assertRaisesRegex(ValueError, "threshold"):
            find_peaks(torch.zeros(1, 1, 3, 3, device=self.device), threshold="mean")

    def test_gradients_flow_through_gathered_values(self):
        maps = self._maps(1, 2, 9, 9).requires_grad_()
        p = find_peaks(maps, 1)
        n, c, y, x = p.indices.unbind(1)
        maps[n, c, y, x].sum().backward()
        self.assertEqual(int((maps.grad != 0).sum()), len(p.values))


class TestPeaksCPU(PeaksTestBody, unittest.TestCase):
    def test_compiled_op_is_used(self):
        self.assertTrue(compiled_ops_available(), "wsis_d2._C not built")


@unittest.skipIf(not torch.cuda.is_available(), "needs a GPU")
class TestPeaksCUDA(PeaksTestBody, unittest.TestCase):
    device = "cuda"


if __name__ == "__main__":
    unittest.main()
