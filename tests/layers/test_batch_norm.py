import unittest

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from wsis_d2.layers import FusedFrozenBatchNorm2d, fuse_frozen_batchnorm


def _frozen(channels, seed):
    g = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(channels)
    bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(channels, generator=g))
    bn.running_mean.copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    return bn


class TestFusedFrozenBatchNorm(unittest.TestCase):
    def test_same_output_and_input_gradient_as_detectron2(self):
        ref = _frozen(6, 0)
        fused = FusedFrozenBatchNorm2d(6)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(2, 6, 5, 7, requires_grad=True)
        target = torch.randn(2, 6, 5, 7)
        outs, grads = [], []
        for m in (ref, fused):
            y = m(x)
            (g,) = torch.autograd.grad(((y - target) ** 2).sum(), x)
            outs.append(y)
            grads.append(g)
        torch.testing.assert_close(outs[1], outs[0])
        torch.testing.assert_close(grads[1], grads[0])
        with torch.no_grad():  # the plain path
            torch.testing.assert_close(fused(x), outs[0])
        # the buffers never get gradients
        self.assertTrue(all(b.grad is None for b in fused.buffers()))

    def test_gradcheck(self):
        fused = _frozen(3, 1).double()
        fuse_frozen_batchnorm(fused)
        x = torch.randn(1, 3, 4, 4, dtype=torch.double, requires_grad=True)
        self.assertTrue(torch.autograd.gradcheck(fused, (x,)))

    def test_bfloat16_input(self):
        ref = _frozen(4, 2)
        fused = FusedFrozenBatchNorm2d(4)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(1, 4, 3, 3).bfloat16().requires_grad_()
        y = fused(x)
        self.assertEqual(y.dtype, torch.bfloat16)
        torch.testing.assert_close(y.float(), ref(x.detach().float()), atol=0.05, rtol=0.02)
        (g,) = torch.autograd.grad(y.float().sum(), x)
        self.assertEqual(g.dtype, torch.bfloat16)

    def test_fuse_converts_nested_modules_and_keeps_state_dict(self):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), _frozen(4, 3), nn.Sequential(_frozen(4, 4)))
        before = {k: v.clone() for k, v in net.state_dict().items()}
        x = torch.randn(1, 3, 8, 8)
        y0 = net(x)
        self.assertIs(fuse_frozen_batchnorm(net), net)
        kinds = [type(m) for m in net.modules() if isinstance(m, FrozenBatchNorm2d)]
        self.assertEqual(kinds, [FusedFrozenBatchNorm2d] * 2)
        self.assertEqual(before.keys(), net.state_dict().keys())
        torch.testing.assert_close(net(x), y0)
        single = fuse_frozen_batchnorm(_frozen(2, 5))
        self.assertIsInstance(single, FusedFrozenBatchNorm2d)

    def test_converted_batchnorm_has_the_same_keys_on_every_detectron2(self):
        # detectron2 main's convert_frozen_batchnorm copies BN's num_batches_tracked counter; the
        # fused layer drops it, so a converted network has v0.6's four keys per layer
        bn = nn.BatchNorm2d(5)
        bn(torch.randn(4, 5, 3, 3))  # the counter becomes 1
        net = fuse_frozen_batchnorm(FrozenBatchNorm2d.convert_frozen_batchnorm(nn.Sequential(bn)))
        self.assertEqual(
            sorted(net.state_dict()), ["0.bias", "0.running_mean", "0.running_var", "0.weight"]
        )
        torch.testing.assert_close(net.state_dict()["0.running_mean"], bn.running_mean)
        # a checkpoint with the counter (a BN one, or saved under detectron2 main before this
        # fix) loads without missing or unused keys
        incompatible = net.load_state_dict(
            {f"0.{k}": v for k, v in bn.state_dict().items()}, strict=False
        )
        self.assertEqual((incompatible.missing_keys, incompatible.unexpected_keys), ([], []))


class TestFuseBadInput(unittest.TestCase):
    def test_names_the_argument(self):
        with self.assertRaisesRegex(TypeError, "'module' must be an nn.Module, got dict"):
            fuse_frozen_batchnorm({"bn": FrozenBatchNorm2d(3)})


if __name__ == "__main__":
    unittest.main()
