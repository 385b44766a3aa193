"""Integral-image box scoring: op vs per-box summation reference, gradcheck, edge cases."""

import unittest
from unittest import mock

import torch

from wsis_d2.layers import (
    IntegralImage,
    _ext,
    box_context_gap,
    box_mean,
    box_sum,
    box_sum_reference,
    compiled_ops_available,
    context_boxes,
)
from wsis_d2.layers.box_score import _BoxSum


def coverage_sum(m, x1, y1, x2, y2):
    """Integral of one (H, W) map over a box by explicit per-pixel overlaps (float64, no clip)."""
    h, w = m.shape
    xs = torch.arange(w, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64)
    ox = (torch.clamp(xs + 1, max=x2) - torch.clamp(xs, min=x1)).clamp(min=0)
    oy = (torch.clamp(ys + 1, max=y2) - torch.clamp(ys, min=y1)).clamp(min=0)
    return (oy[:, None] * ox[None, :] * m.double().cpu()).sum().item()


class BoxScoreTestBody:
    device = "cpu"

    def _case(self, dtype=torch.float64, seed=0, k=12, n=2, c=3, h=17, w=23):
        g = torch.Generator().manual_seed(seed)
        maps = torch.randn(n, c, h, w, generator=g, dtype=dtype)
        # corners away from integers (the integral has kinks at pixel edges), some outside
        xy = torch.rand(k, 4, generator=g, dtype=dtype) * torch.tensor([w, h, w, h]) * 1.2 - 2
        xy = torch.floor(xy) + 0.1 + 0.8 * torch.rand(k, 4, generator=g, dtype=dtype)
        lo, hi = torch.minimum(xy[:, :2], xy[:, 2:]), torch.maximum(xy[:, :2], xy[:, 2:])
        idx = torch.randint(0, n, (k, 1), generator=g).to(dtype)
        classes = torch.randint(0, c, (k,), generator=g)
        boxes = torch.cat([idx, lo, hi], 1)
        return maps.to(self.device), boxes.to(self.device), classes.to(self.device)

    def _zeros(self, k):
        return torch.zeros(k, dtype=torch.long, device=self.device)

    def test_parity_values_and_gradients(self):
        for seed, shape in ((0, (2, 3, 17, 23)), (1, (1, 2, 9, 31)), (2, (3, 1, 33, 5))):
            maps, boxes, classes = self._case(
                seed=seed, k=16, n=shape[0], c=shape[1], h=shape[2], w=shape[3]
            )
            weights = torch.randn(len(boxes), dtype=maps.dtype, device=self.device)
            outs = []
            for ref in (False, True):
                m = maps.clone().requires_grad_()
                b = boxes.clone().requires_grad_()
                s, area = box_sum(m, b, classes, use_reference=ref)
                inside, ring = box_context_gap(m, b, classes, use_reference=ref)
                ((s * weights).sum() + inside.sum() + (ring * weights).sum()).backward()
                outs.append((s, area, inside, ring, m.grad, b.grad))
            for a, r, name in zip(outs[0], outs[1], ("sum", "area", "inside", "ring", "dM", "dB")):
                with self.subTest(seed=seed, value=name):
                    torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)

    def test_parity_float32(self):
        maps, boxes, classes = self._case(dtype=torch.float32, seed=5, k=30, h=41, w=37)
        for ref in (False, True):
            m = maps.clone().requires_grad_()
            b = boxes.clone().requires_grad_()
            mean = box_mean(m, b, classes, use_reference=ref)
            mean.sum().backward()
            if ref:
                torch.testing.assert_close(mean, first[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(m.grad, first[1], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(b.grad, first[2], rtol=1e-4, atol=1e-4)
            first = (mean, m.grad, b.grad)

    def test_sums_match_explicit_coverage(self):
        maps, boxes, classes = self._case(seed=6, k=10)
        s, area = box_sum(maps, boxes, classes)
        h, w = maps.shape[2:]
        for k in range(len(boxes)):
            n, x1, y1, x2, y2 = boxes[k].tolist()
            x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
            y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
            expected = coverage_sum(maps[int(n), int(classes[k])], x1, y1, x2, y2)
            self.assertAlmostEqual(s[k].item(), expected, places=9)
            self.assertAlmostEqual(area[k].item(), (x2 - x1) * (y2 - y1), places=12)

    def test_exact_on_hand_made_map(self):
        m = torch.zeros(1, 1, 4, 4, dtype=torch.float64, device=self.device)
        m[0, 0, 1, 1] = 4.0
        boxes = torch.tensor(
            [[0, 0.5, 0.5, 2.0, 2.0], [0, 1.0, 1.0, 2.0, 2.0]],
            dtype=torch.float64,
            device=self.device,
        )
        s, area = box_sum(m, boxes, self._zeros(2))
        # box 0 covers pixel (1, 1) fully (4.0), area 2.25; box 1 is exactly that pixel
        self.assertEqual(s.tolist(), [4.0, 4.0])
        self.assertEqual(area.tolist(), [2.25, 1.0])
        inside, ring = box_context_gap(m, boxes[1:], self._zeros(1))
        # context: 1.5x about (1.5, 1.5) -> [0.75, 2.25]^2, ring area 2.25 - 1 with score 0
        self.assertAlmostEqual(inside.item(), 4.0)
        self.assertAlmostEqual(ring.item(), 0.0)

    def test_context_ring_by_hand(self):
        m = torch.arange(16, dtype=torch.float64, device=self.device).view(1, 1, 4, 4)
        box = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64, device=self.device)
        inside, ring = box_context_gap(m, box, self._zeros(1), context_scale=1.5)
        # context [0.5, 3.5]^2: border pixels weigh 0.5 per axis, inner ones 1
        w = torch.tensor([0.5, 1.0, 1.0, 0.5], dtype=torch.float64)
        total_ctx = (w[:, None] * w[None, :] * m[0, 0].cpu()).sum().item()
        total_box = m[0, 0, 1:3, 1:3].sum().item()
        self.assertAlmostEqual(inside.item(), total_box / 4)
        self.assertAlmostEqual(ring.item(), (total_ctx - total_box) / (9 - 4))
        # a box at the corner: the context is clipped, the ring is the clipped L shape
        corner = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64, device=self.device)
        _, ring = box_context_gap(m, corner, self._zeros(1), context_scale=2.0)
        ctx = m[0, 0, :3, :3].sum().item()  # [-1, 3] clipped to [0, 3]
        self.assertAlmostEqual(ring.item(), (ctx - m[0, 0, :2, :2].sum().item()) / (9 - 4))

    def test_gradcheck_float64(self):
        maps, boxes, classes = self._case(k=5, n=2, c=2, h=9, w=11)
        idx = boxes[:, :1]
        m = maps.clone().requires_grad_()
        xy = boxes[:, 1:].clone().requires_grad_()
        self.assertTrue(
            torch.autograd.gradcheck(
                lambda M, XY: box_sum(M, torch.cat([idx, XY], 1), classes)[0], (m, xy)
            )
        )
        self.assertTrue(
            torch.autograd.gradcheck(
                lambda M, XY: box_mean(M, torch.cat([idx, XY], 1), classes), (m, xy)
            )
        )
        self.assertTrue(
            torch.autograd.gradcheck(
                lambda M, XY: box_context_gap(M, torch.cat([idx, XY], 1), classes), (m, xy)
            )
        )
        integral = IntegralImage(maps)
        self.assertTrue(
            torch.autograd.gradcheck(
                lambda XY: integral.box_context_gap(torch.cat([idx, XY], 1), classes), (xy,)
            )
        )

    def test_raw_op_gradcheck(self):
        # the op itself (no Python clipping): boxes inside the image, double backward not needed
        maps, boxes, classes = self._case(k=6, n=1, c=2, h=7, w=8, seed=8)
        boxes[:, 1:] = boxes[:, 1:].clamp(0.05, 6.95)
        idx = boxes[:, :1]
        m = maps.clone().requires_grad_()
        xy = boxes[:, 1:].clone().requires_grad_()
        self.assertTrue(
            torch.autograd.gradcheck(
                lambda M, XY: _BoxSum.apply(M, torch.cat([idx, XY], 1), classes), (m, xy)
            )
        )

    def test_integral_image_matches_one_shot(self):
        maps, boxes, classes = self._case(dtype=torch.float32, seed=3, k=40)
        integral = IntegralImage(maps)
        torch.testing.assert_close(
            integral.box_mean(boxes, classes), box_mean(maps, boxes, classes)
        )
        a = integral.box_context_gap(boxes, classes)
        b = box_context_gap(maps, boxes, classes)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)

    def test_outside_and_zero_area_boxes(self):
        maps = torch.rand(1, 1, 8, 8, dtype=torch.float64, device=self.device) + 1
        boxes = torch.tensor(
            [
                [0, -4.5, -4.5, 2.5, 2.5],  # partly outside: mean over the clipped part
                [0, 20.0, 20.0, 30.0, 30.0],  # fully outside: 0, no gradient
                [0, 3.5, 2.0, 3.5, 6.0],  # zero width: 0
                [0, -1.0, -1.0, 9.0, 9.0],  # covers the image
            ],
            dtype=torch.float64,
            device=self.device,
            requires_grad=True,
        )
        for ref in (False, True):
            boxes.grad = None
            mean = box_mean(maps, boxes, self._zeros(4), use_reference=ref)
            m = maps[0, 0]
            expected = (
                m[:2, :2].sum() + 0.5 * m[2, :2].sum() + 0.5 * m[:2, 2].sum() + 0.25 * m[2, 2]
            ) / 6.25
            torch.testing.assert_close(mean[0], expected)
            self.assertEqual(mean[1].item(), 0.0)
            self.assertEqual(mean[2].item(), 0.0)
            torch.testing.assert_close(mean[3], maps.mean())
            mean.sum().backward()
            self.assertEqual(boxes.grad[1].abs().sum().item(), 0.0)
            self.assertEqual(boxes.grad[2].abs().sum().item(), 0.0)
            self.assertTrue(bool(torch.isfinite(boxes.grad).all()))
            # clipped corners get no gradient; the two inside ones (x2, y2) of box 0 do
            self.assertEqual(boxes.grad[0, :3].abs().sum().item(), 0.0)
            self.assertNotEqual(boxes.grad[0, 3].item(), 0.0)
            self.assertEqual(boxes.grad[3].abs().sum().item(), 0.0)
        # a ring entirely outside the image is empty: context mean 0
        _, ring = box_context_gap(maps, boxes[3:].detach(), self._zeros(1))
        self.assertEqual(ring.item(), 0.0)

    def test_gradients_at_the_image_bounds_match_the_reference(self):
        # coordinates exactly at 0 / W / H and beyond: sums, areas and their box gradients are the
        # same on every path (torch.clamp semantics: zero gradient at and beyond the bounds)
        g = torch.Generator().manual_seed(4)
        maps = torch.rand(1, 2, 9, 11, generator=g, dtype=torch.float64).to(self.device)
        rows = [[0, 0.0, 2.5, 11.0, 9.0], [0, -3.0, 0.0, 4.5, 12.0], [0, 2.3, 1.5, 6.4, 4.2]]
        classes = torch.tensor([0, 1, 1], device=self.device)
        results = []
        for ref in (False, True):
            boxes = torch.tensor(rows, dtype=torch.float64, device=self.device).requires_grad_()
            total, area = box_sum(maps, boxes, classes, use_reference=ref)
            (grad,) = torch.autograd.grad((total + area).sum(), boxes)
            results.append((total.detach(), area.detach(), grad))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected)

    def test_clipping_gradient_does_not_follow_torch_clamp(self):
        # torch.clamp's gradient at the bound itself changed between releases (1 in torch 2.11,
        # 0 in 2.14); the reference's clipping must give the op's convention on any release
        from wsis_d2.layers.box_score import _clip_coord

        v = torch.tensor([-1.0, 0.0, 0.5, 3.0, 7.0, 9.0], dtype=torch.float64, device=self.device)
        v.requires_grad_()
        out = _clip_coord(v, 7)
        (grad,) = torch.autograd.grad(out.sum(), v)
        self.assertEqual(out.tolist(), [0.0, 0.0, 0.5, 3.0, 7.0, 7.0])
        self.assertEqual(grad.tolist(), [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])

    def test_integer_coordinates_take_the_ops_one_sided_derivative(self):
        # proposals are integer boxes, so CCGR's first step reads the derivative at a kink: the
        # reference must take the op's derivative from the right / below, not split the tie
        g = torch.Generator().manual_seed(5)
        maps = torch.rand(1, 2, 9, 11, generator=g, dtype=torch.float64).to(self.device)
        rows = [[0, 2.0, 3.0, 6.0, 7.0], [0, 3.0, 2.0, 3.0, 5.0], [0, 1.0, 1.0, 10.0, 8.0],
                [0, 2.5, 3.0, 7.0, 6.5], [0, 0.0, 4.0, 5.0, 9.0]]
        classes = torch.tensor([1, 0, 1, 0, 1], device=self.device)
        results = []
        for ref in (False, True):
            boxes = torch.tensor(rows, dtype=torch.float64, device=self.device).requires_grad_()
            inside, ring = box_context_gap(maps, boxes, classes, use_reference=ref)
            (grad,) = torch.autograd.grad((ring - inside).sum(), boxes)
            results.append((inside.detach(), ring.detach(), grad))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        # by hand: d(box sum)/dx2 at x2 = 6 is the map's column 6 over the box's rows
        boxes = torch.tensor(rows[:1], dtype=torch.float64, device=self.device).requires_grad_()
        total, _ = box_sum(maps, boxes, classes[:1], use_reference=True)
        (grad,) = torch.autograd.grad(total.sum(), boxes)
        self.assertAlmostEqual(float(grad[0, 3]), float(maps[0, 1, 3:7, 6].sum()), places=12)
        self.assertAlmostEqual(float(grad[0, 1]), -float(maps[0, 1, 3:7, 2].sum()), places=12)

    def test_empty_box_list(self):
        maps = torch.rand(1, 2, 5, 5, device=self.device)
        boxes = torch.zeros(0, 5, device=self.device)
        self.assertEqual(box_mean(maps, boxes, self._zeros(0)).shape, (0,))
        inside, ring = box_context_gap(maps, boxes, self._zeros(0))
        self.assertEqual((inside.shape, ring.shape), ((0,), (0,)))

    def test_bad_input(self):
        maps, boxes, classes = self._case(k=3)
        n0, c0 = int(boxes[0, 0]), int(classes[0])
        nan_box = boxes.clone()
        nan_box[1, 2] = float("nan")
        for ref in (False, True):
            with self.assertRaisesRegex(ValueError, "boxes contain NaN"):
                box_mean(maps, nan_box, classes, use_reference=ref)
            for bad in (float("nan"), float("inf")):
                bad_maps = maps.clone()
                bad_maps[n0, c0, 3, 4] = bad
                with self.assertRaisesRegex(ValueError, rf"maps\[{n0}, {c0}\].*NaN or inf"):
                    box_mean(bad_maps, boxes, classes, use_reference=ref)
                with self.assertRaisesRegex(ValueError, "NaN or inf"):
                    IntegralImage(bad_maps)
            flipped = boxes.clone()
            flipped[0, 3] = flipped[0, 1] - 1
            with self.assertRaisesRegex(ValueError, "x2 < x1"):
                box_mean(maps, flipped, classes, use_reference=ref)
            with self.assertRaisesRegex(ValueError, "classes"):
                box_mean(maps, boxes, classes + 10, use_reference=ref)
            for bad_index in (7.0, 0.5, -1.0):
                wrong_image = boxes.clone()
                wrong_image[0, 0] = bad_index
                with self.assertRaisesRegex(ValueError, "image indices"):
                    box_mean(maps, wrong_image, classes, use_reference=ref)
            with self.assertRaisesRegex(ValueError, r"\(K, 5\)"):
                box_mean(maps, boxes[:, :4], classes, use_reference=ref)
        with self.assertRaisesRegex(ValueError, "context_scale"):
            box_context_gap(maps, boxes, classes, context_scale=0.5)
        # the same messages when scoring from prebuilt integral images
        integral = IntegralImage(maps)
        flipped = boxes.clone()
        flipped[2, 4] = flipped[2, 2] - 0.5
        wrong_image = boxes.clone()
        wrong_image[0, 0] = 7.0
        for bad_boxes, bad_classes, message in (
            (nan_box, classes, "boxes contain NaN"),
            (flipped, classes, r"boxes\[2\] has x2 < x1 or y2 < y1"),
            (boxes, classes + 10, "classes must be in"),
            (wrong_image, classes, "image indices"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                integral.box_mean(bad_boxes, bad_classes)

    def test_context_boxes(self):
        b = torch.tensor([[0, 2.0, 4.0, 6.0, 8.0]])
        torch.testing.assert_close(context_boxes(b, 1.5), torch.tensor([[0, 1.0, 3.0, 7.0, 9.0]]))


class TestBoxScoreCPU(BoxScoreTestBody, unittest.TestCase):
    def test_compiled_op_is_used_and_raises_value_error(self):
        self.assertTrue(compiled_ops_available(), "wsis_d2._C not built")
        maps = torch.zeros(1, 1, 4, 4)
        maps[0, 0, 2, 2] = float("nan")
        boxes = torch.tensor([[0, 0.5, 0.5, 1.5, 1.5]])
        with self.assertRaisesRegex(ValueError, "NaN or inf"):
            torch.ops.wsis_d2.box_sum_forward(maps, boxes, torch.zeros(1, dtype=torch.long))
        with self.assertRaisesRegex(ValueError, "image indices"):
            torch.ops.wsis_d2.box_sum_forward(maps, boxes + 1, torch.zeros(1, dtype=torch.long))

    def test_missing_extension_falls_back_to_reference(self):
        maps, boxes, classes = self._case(seed=9)
        expected = box_context_gap(maps, boxes, classes)
        with mock.patch.object(_ext, "_C", None), mock.patch.object(_ext, "_warned", True):
            got = box_context_gap(maps, boxes, classes)
            with mock.patch(
                "wsis_d2.layers.box_score.box_sum_reference", wraps=box_sum_reference
            ) as ref:
                box_mean(maps, boxes, classes)
                self.assertEqual(ref.call_count, 1)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@unittest.skipIf(not torch.cuda.is_available(), "needs a GPU")
class TestBoxScoreCUDA(BoxScoreTestBody, unittest.TestCase):
    device = "cuda"


class TestContextBoxesBadInput(unittest.TestCase):
    def test_names_the_argument(self):
        boxes = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]])
        self.assertEqual(context_boxes(boxes, 1.0).tolist(), boxes.tolist())
        with self.assertRaisesRegex(ValueError, r"'boxes' must have shape \(\*, 5\), got \(1, 4\)"):
            context_boxes(boxes[:, 1:])
        with self.assertRaisesRegex(
            ValueError, r"'context_scale' must lie in \[1.0, inf\], got 0.5"
        ):
            context_boxes(boxes, 0.5)
        with self.assertRaisesRegex(TypeError, "'boxes' must be a torch.Tensor, got list"):
            context_boxes([[0, 1, 1, 5, 5]])


if __name__ == "__main__":
    unittest.main()
