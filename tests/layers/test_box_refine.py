"""CCGR's center-context-gap refinement: compiled op vs reference, convergence, guard, clamps."""

import unittest

import torch
from torchvision.ops import box_iou

from wsis_d2.layers import IntegralImage, compiled_ops_available, refine_context_gap


def _scene(dtype=torch.float64, device="cpu"):
    """Class 0: a high-score rectangle [30, 55] x [20, 40] and a second object at x 70-74."""
    g = torch.Generator().manual_seed(0)
    s = torch.full((1, 2, 60, 80), 0.1, dtype=dtype)
    s[0, 0, 20:40, 30:55] = 0.9
    s[0, 0, 22:26, 70:74] = 0.9
    s += 0.02 * torch.rand(s.shape, generator=g, dtype=dtype)
    return IntegralImage(s.to(device))


RECT = [30.0, 20.0, 55.0, 40.0]


def _triangle(device="cpu"):
    """Class 0: score 1 in a solid triangle (apex (50, 15), base y = 55 from x = 25 to 75), else 0."""
    ys = torch.arange(80, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(100, dtype=torch.float64)[None, :] + 0.5
    inside = (ys >= 15) & (ys <= 55) & ((xs - 50).abs() <= (ys - 15) * 25 / 40)
    return IntegralImage(inside.double()[None, None].to(device))


PEAKS = torch.tensor([[0, 42.0, 30.0], [0, 72.0, 24.0]], dtype=torch.float64)


class TestRefineContextGap(unittest.TestCase):
    device = "cpu"

    def _refine(self, boxes, **kw):
        kw.setdefault("steps", 200)
        return refine_context_gap(
            _scene(device=self.device),
            torch.tensor(boxes, dtype=torch.float64, device=self.device),
            torch.zeros(len(boxes), dtype=torch.long, device=self.device),
            kw.pop("peaks", PEAKS).to(self.device),
            torch.zeros(len(boxes), dtype=torch.long, device=self.device),
            **kw,
        )

    def test_moves_onto_the_rectangle_from_inside_and_outside(self):
        inside = [35.0, 25.0, 45.0, 33.0]
        outside = [20.0, 12.0, 62.0, 48.0]
        shifted = [26.3, 15.7, 49.2, 36.1]
        out, _, stopped = self._refine([inside, outside, shifted])
        self.assertFalse(bool(stopped.any()))
        for box in out.cpu():
            torch.testing.assert_close(box, torch.tensor(RECT, dtype=torch.float64), atol=1.0, rtol=0)

    def test_guard_stops_before_a_second_peak(self):
        # a box whose step grows over the second object's peak (x = 72) stops before it
        out, snaps, stopped = self._refine([[48.0, 18.0, 71.0, 42.0]], snapshots=(0, 1))
        self.assertTrue(bool(stopped[0]))
        self.assertLess(float(out[0, 2]), 72.0)
        # without the other peak the same box goes where the score leads
        free, _, stopped = self._refine([[48.0, 18.0, 71.0, 42.0]], peaks=PEAKS[:1])
        self.assertFalse(bool(stopped[0]))
        # a peak of another class does not stop it
        other = PEAKS.clone()
        other[1, 0] = 1
        _, _, stopped = self._refine([[48.0, 18.0, 71.0, 42.0]], peaks=other)
        self.assertFalse(bool(stopped[0]))

    def test_grow_only_keeps_the_start_box(self):
        # the unconstrained gap cuts a triangle's tight box down to a strip along its base
        # (Φ(B) of the strip is higher); projected onto boxes that contain the start box, the
        # tight box stays and a part box grows over the object
        tight = [25.0, 15.0, 75.0, 55.0]
        part = [38.0, 38.0, 62.0, 55.0]
        ii = _triangle(self.device)
        args = (torch.zeros(2, dtype=torch.long, device=self.device),)
        boxes = torch.tensor([tight, part], dtype=torch.float64, device=self.device)
        free, _, _ = refine_context_gap(ii, boxes, *args)
        grown, snaps, _ = refine_context_gap(ii, boxes, *args, grow_only=True, snapshots=(1, 50))
        self.assertLess(float(box_iou(free[:1].cpu(), torch.tensor([tight]).double())), 0.5)
        self.assertEqual(grown[0].tolist(), tight)
        for b in [grown] + list(snaps.values()):
            self.assertTrue(bool((b[:, :2] <= boxes[:, :2]).all()))
            self.assertTrue(bool((b[:, 2:] >= boxes[:, 2:]).all()))
        self.assertGreater(float(grown[1, 2] - grown[1, 0]), 36.0)  # from 24 px wide
        # from inside the rectangle, growing alone reaches it as the free descent does
        out, _, _ = self._refine([[35.0, 25.0, 45.0, 33.0]], grow_only=True)
        torch.testing.assert_close(
            out[0].cpu(), torch.tensor(RECT, dtype=torch.float64), atol=1.0, rtol=0
        )

    def test_degenerate_boxes_are_clamped_not_nan(self):
        boxes = [[40.0, 30.0, 40.0, 30.0], [-20.0, -5.0, 200.0, 300.0], [79.5, 59.5, 80.0, 60.0]]
        out, _, _ = self._refine(boxes, min_size=4.0, peaks=PEAKS[:1])
        self.assertTrue(bool(torch.isfinite(out).all()))
        w = out[:, 2] - out[:, 0]
        h = out[:, 3] - out[:, 1]
        self.assertTrue(bool((w >= 4.0 - 1e-9).all() and (h >= 4.0 - 1e-9).all()))
        self.assertTrue(bool((out[:, 0] >= 0).all() and (out[:, 2] <= 80).all()))
        self.assertTrue(bool((out[:, 1] >= 0).all() and (out[:, 3] <= 60).all()))

    def test_snapshots_and_zero_steps(self):
        out, snaps, _ = self._refine([[35.0, 25.0, 45.0, 33.0]], steps=20, snapshots=(0, 10, 20))
        self.assertEqual(sorted(snaps), [0, 10, 20])
        torch.testing.assert_close(snaps[20], out)
        self.assertEqual(snaps[0].tolist(), [[35.0, 25.0, 45.0, 33.0]])
        same, _, _ = self._refine([[35.0, 25.0, 45.0, 33.0]], steps=0)
        self.assertEqual(same.tolist(), [[35.0, 25.0, 45.0, 33.0]])

    @unittest.skipUnless(compiled_ops_available(), "wsis_d2._C not built")
    def test_op_equals_reference(self):
        boxes = [[35.0, 25.0, 45.0, 33.0], [20.0, 12.0, 62.0, 48.0], [48.0, 18.0, 71.0, 42.0],
                 [30.0, 20.0, 30.0, 44.0]]
        for grow_only in (False, True):
            kw = {"snapshots": (0, 50, 200), "grow_only": grow_only}
            out, snaps, stopped = self._refine(boxes, **kw)
            ref, ref_snaps, ref_stopped = self._refine(boxes, use_reference=True, **kw)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
            for s in (0, 50, 200):
                torch.testing.assert_close(snaps[s], ref_snaps[s], rtol=0, atol=1e-9)
            self.assertEqual(stopped.tolist(), ref_stopped.tolist())

    def test_float32_boxes_keep_their_dtype_and_errors(self):
        ii = _scene(device=self.device)
        out, _, _ = refine_context_gap(
            ii, torch.tensor([[35.0, 25.0, 45.0, 33.0]], device=self.device), torch.tensor([0]),
            steps=5,
        )
        self.assertEqual(out.dtype, torch.float32)
        with self.assertRaisesRegex(ValueError, "classes"):
            refine_context_gap(ii, torch.zeros(1, 4, device=self.device), torch.tensor([5]))
        with self.assertRaisesRegex(ValueError, "finite"):
            refine_context_gap(
                ii, torch.tensor([[float("nan"), 0, 1, 1]], device=self.device), torch.tensor([0])
            )


@unittest.skipUnless(torch.cuda.is_available(), "no GPU")
class TestRefineContextGapCUDA(TestRefineContextGap):
    device = "cuda"


if __name__ == "__main__":
    unittest.main()
