"""LCHead: shapes, upsampling and the density branch's gradient factor into the backbone."""

import copy
import unittest

import torch
from detectron2.layers import ShapeSpec

from wsis_d2.lc.heads import LCHead


class TestLCHead(unittest.TestCase):
    def _head(self, g, upsample=2):
        torch.manual_seed(0)
        return LCHead(
            input_shape=ShapeSpec(channels=6, stride=16),
            num_classes=3,
            branch_channels=5,
            norm="",
            upsample=upsample,
            density_backbone_grad=g,
        )

    def test_density_gradient_into_the_feature_is_scaled(self):
        full = self._head(1.0)
        for g in (0.0, 0.25):
            with self.subTest(g=g):
                head = copy.deepcopy(full)
                head.density_backbone_grad = g
                x = torch.randn(2, 6, 5, 7, requires_grad=True)
                x1 = x.detach().clone().requires_grad_(True)
                m, d = head(x)
                m1, d1 = full(x1)
                self.assertEqual(tuple(m.shape), (2, 3, 10, 14))
                torch.testing.assert_close(m, m1)
                torch.testing.assert_close(d, d1)
                w = torch.randn_like(d)
                (d * w).sum().backward()
                (d1 * w).sum().backward()
                torch.testing.assert_close(x.grad, g * x1.grad)
                # the density branch's own weights get their full gradient
                for (n, p), p1 in zip(head.density_branch.named_parameters(),
                                      full.density_branch.parameters()):
                    torch.testing.assert_close(p.grad, p1.grad, msg=n)
                full.zero_grad()
                # the classification branch's gradient into the feature is untouched
                x.grad = None
                x1.grad = None
                m, _ = head(x)
                m1, _ = full(x1)
                m.sum().backward()
                m1.sum().backward()
                torch.testing.assert_close(x.grad, x1.grad)
                full.zero_grad()

    def test_density_norm_of_its_own(self):
        head = LCHead(
            input_shape=ShapeSpec(channels=6, stride=16),
            num_classes=3,
            norm="",
            density_norm="BN",
        )
        kinds = lambda branch: [type(m).__name__ for m in branch.modules()]  # noqa: E731
        self.assertNotIn("BatchNorm2d", kinds(head.cls_branch))
        self.assertIn("BatchNorm2d", kinds(head.density_branch))
        same = LCHead(input_shape=ShapeSpec(channels=6, stride=16), num_classes=3, norm="BN")
        self.assertIn("BatchNorm2d", kinds(same.cls_branch))
        self.assertIn("BatchNorm2d", kinds(same.density_branch))

    def test_bad_factor(self):
        with self.assertRaisesRegex(ValueError, "DENSITY_BACKBONE_GRAD"):
            self._head(1.5)


if __name__ == "__main__":
    unittest.main()
