"""MobileNetV2 backbone: stages, torchvision equivalence, freezing, dilation, weight conversion."""

import os
import subprocess
import sys
import tempfile
import unittest

import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model

import wsis_d2  # noqa: F401  (registers the backbone)
from wsis_d2 import add_wsis_config
from wsis_d2.layers import FusedFrozenBatchNorm2d
from wsis_d2.modeling.backbone.mobilenet import convert_torchvision_mobilenet_v2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(out_features=("m1", "m2", "m3", "m4", "m5"), **mobilenet):
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_mobilenet_v2_backbone"
    cfg.MODEL.MOBILENET.OUT_FEATURES = list(out_features)
    for key, value in mobilenet.items():
        setattr(cfg.MODEL.MOBILENET, key, value)
    return cfg


def _random_torchvision():
    """torchvision's MobileNetV2 with random, non-trivial BN statistics, in eval mode."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


class TestMobileNetV2Backbone(unittest.TestCase):
    def test_strides_channels_and_odd_sizes(self):
        backbone = build_backbone(_cfg(FREEZE_AT=0)).eval()
        shapes = backbone.output_shape()
        self.assertEqual(
            {k: (v.stride, v.channels) for k, v in shapes.items()},
            {"m1": (2, 16), "m2": (4, 24), "m3": (8, 32), "m4": (16, 96), "m5": (32, 320)},
        )
        self.assertEqual(backbone.size_divisibility, 32)
        x = torch.randn(1, 3, 97, 131)
        out = backbone(x)
        for name, spec in shapes.items():
            s = spec.stride
            self.assertEqual(tuple(out[name].shape), (1, spec.channels, -(-97 // s), -(-131 // s)))

    def test_converted_torchvision_weights_give_torchvision_features(self):
        tv = _random_torchvision()
        cfg = _cfg(out_features=("m3", "m5"))
        backbone = build_backbone(cfg).eval()
        state = convert_torchvision_mobilenet_v2(tv.state_dict())
        missing, unexpected = backbone.load_state_dict(
            {k[len("backbone.") :]: v for k, v in state.items()}, strict=False
        )
        self.assertEqual(missing, [])
        # only the final 1x1 conv to 1280 channels (features[18]) is not part of the backbone
        self.assertTrue(unexpected and all(k.startswith("features.18.") for k in unexpected))
        x = torch.randn(2, 3, 64, 80)
        with torch.no_grad():
            out = backbone(x)
            ref8 = tv.features[:7](x)
            ref32 = tv.features[:18](x)
        torch.testing.assert_close(out["m3"], ref8, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["m5"], ref32, rtol=1e-4, atol=1e-4)
        # FrozenBN: training mode does not change the outputs or the statistics
        backbone.train()
        with torch.no_grad():
            torch.testing.assert_close(backbone(x)["m5"], ref32, rtol=1e-4, atol=1e-4)
        frozen = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
        self.assertTrue(frozen and all(isinstance(m, FusedFrozenBatchNorm2d) for m in frozen))
        # the input gradient (peak response maps) equals torchvision's
        xg = x.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(backbone(xg)["m5"].square().sum(), xg)
        (gr,) = torch.autograd.grad(tv.features[:18](xr).square().sum(), xr)
        torch.testing.assert_close(g, gr, rtol=1e-3, atol=1e-4)

    def test_checkpointer_loads_the_converted_file(self):
        tv = _random_torchvision()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "mnv2.pth")
            torch.save({"model": convert_torchvision_mobilenet_v2(tv.state_dict())}, path)
            cfg = get_cfg()
            add_wsis_config(cfg)
            cfg.merge_from_file(
                os.path.join(REPO, "configs", "demo", "lc_mnv2_synthetic_demo.yaml")
            )
            cfg.MODEL.DEVICE = "cpu"
            model = build_model(cfg).eval()
            DetectionCheckpointer(model).load(path)
        got = model.backbone.features[3].conv[1][0].weight
        torch.testing.assert_close(got, tv.features[3].conv[1][0].weight)

    def test_freeze_at(self):
        backbone = build_backbone(_cfg(FREEZE_AT=2))
        frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
        trained = {n for n, p in backbone.named_parameters() if p.requires_grad}
        self.assertTrue(frozen and trained)
        for name in frozen:
            self.assertLess(int(name.split(".")[1]), 4, name)  # features[0:4] = m1, m2
        for name in trained:
            self.assertGreaterEqual(int(name.split(".")[1]), 4, name)

    def test_m5_dilation_keeps_stride_16(self):
        backbone = build_backbone(_cfg(out_features=("m4", "m5"), M5_DILATION=2)).eval()
        self.assertEqual(backbone.output_shape()["m5"].stride, 16)
        out = backbone(torch.randn(1, 3, 96, 112))
        self.assertEqual(out["m5"].shape[-2:], out["m4"].shape[-2:])

    def test_unused_later_blocks_are_not_built(self):
        backbone = build_backbone(_cfg(out_features=("m4",)))
        self.assertEqual(len(backbone.features), 14)

    def test_bad_config_names_the_key(self):
        for kwargs, key in (
            ({"out_features": ("res4",)}, "OUT_FEATURES"),
            ({"FREEZE_AT": 6}, "FREEZE_AT"),
            ({"NORM": "GN"}, "NORM"),
            ({"M5_DILATION": 4}, "M5_DILATION"),
        ):
            with self.subTest(key=key), self.assertRaisesRegex(ValueError, key):
                build_backbone(_cfg(**kwargs))
        with self.assertRaisesRegex(ValueError, "no 'features"):
            convert_torchvision_mobilenet_v2({"conv1.weight": torch.zeros(1)})


class TestFetchMobileNetWeights(unittest.TestCase):
    def test_rejects_a_file_with_the_wrong_checksum(self):
        with tempfile.TemporaryDirectory() as tmp:
            bogus = os.path.join(tmp, "mobilenet_v2-b0353104.pth")
            torch.save(_random_torchvision().state_dict(), bogus)
            out = os.path.join(tmp, "out.pth")
            result = subprocess.run(
                [
                    sys.executable,
                    os.path.join(REPO, "tools", "fetch_mobilenet_weights.py"),
                    "--pth",
                    bogus,
                    "--output",
                    out,
                ],
                capture_output=True,
                text=True,
            )
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("SHA-256", result.stderr)
            self.assertIn(bogus, result.stderr)
            self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
