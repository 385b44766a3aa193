"""Integral-image box scoring: op vs per-box summation reference, gradcheck, edge cases."""
import unittest

import torch

from wsis_d2.layers import (
    IntegralImage,
    box_context_gap,
    box_mean,
    box_sum,
    compiled_ops_available,
    context_boxes,
)


class BoxScoreTestBody:
    device = "cpu"

    def _case(self, dtype=torch.float64, seed=0, k=12, n=2, c=3, h=17, w=23):
        g = torch.Generator().manual_seed(seed)
        maps = torch.randn(n, c, h, w, generator=g, dtype=dtype)
        # corners away from integers (the mean is not differentiable at pixel edges)
        xy = torch.rand(k, 4, generator=g, dtype=dtype) * torch.tensor([w, h, w, h]) * 1.2 - 2
        xy = torch.floor(xy) + 0.1 + 0.8 * torch.rand(k, 4, generator=g, dtype=dtype)
        lo, hi = torch.minimum(xy[:, :2], xy[:, 2:]), torch.maximum(xy[:, :2], xy[:, 2:])
        idx = torch.randint(0, n, (k, 1), generator=g).to(dtype)
        classes = torch.randint(0, c, (k,), generator=g)
        boxes = torch.cat([idx, lo, hi], 1)
        return maps.to(self.device), boxes.to(self.device), classes.to(self.device)

    def test_parity_values_and_gradients(self):
        for seed, shape in ((0, (2, 3, 17, 23)), (1, (1, 2, 9, 31)), (2, (3, 1, 33, 5))):
            maps, boxes, classes = self._case(seed=seed, n=shape[0], c=shape[1], h=shape[2], w=shape[3])
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

    def test_exact_on_hand_made_map(self):
        m = torch.zeros(1, 1, 4, 4, dtype=torch.float64, device=self.device)
        m[0, 0, 1, 1] = 4.0
        boxes = torch.tensor([[0, 0.5, 0.5, 2.0, 2.0], [0, 1.0, 1.0, 2.0, 2.0]],
                             dtype=torch.float64, device=self.device)
        s, area = box_sum(m, boxes, torch.zeros(2, dtype=torch.long, device=self.device))
        # box 0 covers pixel (1, 1) fully (4.0), area 2.25; box 1 is exactly that pixel
        torch.testing.assert_close(s.cpu(), torch.tensor([4.0, 4.0], dtype=torch.float64))
        torch.testing.assert_close(area.cpu(), torch.tensor([2.25, 1.0], dtype=torch.float64))
        inside, ring = box_context_gap(m, boxes[1:], torch.zeros(1, dtype=torch.long, device=self.device))
        # context: 1.5x about (1.5, 1.5) -> [0.75, 2.25]^2, ring area 2.25 - 1 with score 0
        self.assertAlmostEqual(inside.item(), 4.0)
        self.assertAlmostEqual(ring.item(), 0.0)

    def test_gradcheck_float64(self):
        maps, boxes, classes = self._case(k=5, n=2, c=2, h=9, w=11)
        idx = boxes[:, :1]
        m = maps.clone().requires_grad_()
        xy = boxes[:, 1:].clone().requires_grad_()
        self.assertTrue(torch.autograd.gradcheck(
            lambda M, XY: box_mean(M, torch.cat([idx, XY], 1), classes), (m, xy)))
        self.assertTrue(torch.autograd.gradcheck(
            lambda M, XY: box_context_gap(M, torch.cat([idx, XY], 1), classes), (m, xy)))
        integral = IntegralImage(maps)
        self.assertTrue(torch.autograd.gradcheck(
            lambda XY: integral.box_context_gap(torch.cat([idx, XY], 1), classes), (xy,)))

    def test_integral_image_matches_one_shot(self):
        maps, boxes, classes = self._case(dtype=torch.float32, seed=3, k=40)
        integral = IntegralImage(maps)
        torch.testing.assert_close(integral.box_mean(boxes, classes), box_mean(maps, boxes, classes))
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
            dtype=torch.float64, device=self.device, requires_grad=True,
        )
        classes = torch.zeros(4, dtype=torch.long, device=self.device)
        mean = box_mean(maps, boxes, classes)
        self.assertAlmostEqual(mean[0].item(), maps[0, 0, :3, :3].mean().item() * 1.0, delta=0.5)
        torch.testing.assert_close(
            mean[0], (maps[0, 0, :2, :2].sum() + 0.5 * maps[0, 0, 2, :2].sum()
                      + 0.5 * maps[0, 0, :2, 2].sum() + 0.25 * maps[0, 0, 2, 2]) / 6.25)
        self.assertEqual(mean[1].item(), 0.0)
        self.assertEqual(mean[2].item(), 0.0)
        torch.testing.assert_close(mean[3], maps.mean())
        mean.sum().backward()
        self.assertEqual(boxes.grad[1].abs().sum().item(), 0.0)
        self.assertEqual(boxes.grad[2].abs().sum().item(), 0.0)
        self.assertTrue(torch.isfinite(boxes.grad).all())
        # the covering box is clipped on every side: its corners get no gradient
        self.assertEqual(boxes.grad[3].abs().sum().item(), 0.0)
        # a ring entirely outside the image is empty: context mean 0
        _, ring = box_context_gap(maps, boxes[3:].detach(), classes[3:])
        self.assertEqual(ring.item(), 0.0)

    def test_bad_input(self):
        maps, boxes, classes = self._case(k=3)
        with self.assertRaisesRegex(ValueError, "NaN"):
            box_mean(maps, torch.where(torch.arange(5, device=self.device) == 2,
                                       torch.tensor(float("nan"), device=self.device), boxes),
                     classes)
        bad_maps = maps.clone()
        bad_maps[0, 0, 0, 0] = float("nan")
        with self.assertRaisesRegex(ValueError, "NaN"):
            box_mean(bad_maps, boxes, classes)
        with self.assertRaisesRegex(ValueError, "NaN"):
            IntegralImage(bad_maps)
        flipped = boxes.clone()
        flipped[0, 3] = flipped[0, 1] - 1
        with self.assertRaisesRegex(ValueError, "x2 < x1"):
            box_mean(maps, flipped, classes)
        with self.assertRaisesRegex(ValueError, "classes"):
            box_mean(maps, boxes, classes + 10)
        wrong_image = boxes.clone()
        wrong_image[0, 0] = 7
        with self.assertRaisesRegex(ValueError, "image indices"):
            box_mean(maps, wrong_image, classes)
        with self.assertRaisesRegex(ValueError, r"\(K, 5\)"):
            box_mean(maps, boxes[:, :4], classes)

    def test_context_boxes(self):
        b = torch.tensor([[0, 2.0, 4.0, 6.0, 8.0]])
        torch.testing.assert_close(context_boxes(b, 1.5), torch.tensor([[0, 1.0, 3.0, 7.0, 9.0]]))


class TestBoxScoreCPU(BoxScoreTestBody, unittest.TestCase):
    def test_compiled_op_is_used(self):
        self.assertTrue(compiled_ops_available(), "wsis_d2._C not built")


@unittest.skipIf(not torch.cuda.is_available(), "needs a GPU")
class TestBoxScoreCUDA(BoxScoreTestBody, unittest.TestCase):
    device = "cuda"


if __name__ == "__main__":
    unittest.main()
