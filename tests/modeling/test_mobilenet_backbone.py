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
from wsis_d2.modeling.mobilenet import convert_torchvision_mobilenet_v2
from wsis_d2.testing import config_path, repo_root

REPO = repo_root()


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
                config_path("demo", "lc_mnv2_synthetic_demo.yaml")
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
            ({"NORM": "SyncBN"}, "NORM"),
            ({"M5_DILATION": 4}, "M5_DILATION"),
        ):
            with self.subTest(key=key), self.assertRaisesRegex(ValueError, key):
                build_backbone(_cfg(**kwargs))
        with self.assertRaisesRegex(ValueError, "no 'features"):
            convert_torchvision_mobilenet_v2({"conv1.weight": torch.zeros(1)})


def _fpn_cfg(**mobilenet):
    """The MobileNetV2-FPN Mask R-CNN config of the benchmark (no weights, CPU)."""
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.merge_from_file(config_path("mask_rcnn_mnv2_fpn_synthetic.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    for key, value in mobilenet.items():
        setattr(cfg.MODEL.MOBILENET, key, value)
    return cfg


class TestMobileNetV2FPN(unittest.TestCase):
    def test_names_strides_channels_odd_sizes(self):
        cfg = _fpn_cfg()
        backbone = build_backbone(cfg).eval()
        c = cfg.MODEL.FPN.OUT_CHANNELS
        shapes = backbone.output_shape()
        self.assertEqual(
            {k: (v.stride, v.channels) for k, v in shapes.items()},
            {"p2": (4, c), "p3": (8, c), "p4": (16, c), "p5": (32, c), "p6": (64, c)},
        )
        self.assertEqual(backbone.size_divisibility, 32)
        # detectron2 pads inputs to size_divisibility; any multiple of 32 gives exact strides
        x = torch.randn(1, 3, 96, 160)
        with torch.no_grad():
            out = backbone(x)
        for name, spec in shapes.items():
            self.assertEqual(tuple(out[name].shape), (1, c, -(-96 // spec.stride), -(-160 // spec.stride)))

    def test_fpn_is_detectrons_own(self):
        from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

        backbone = build_backbone(_fpn_cfg())
        self.assertIs(type(backbone), FPN)
        self.assertIsInstance(backbone.top_block, LastLevelMaxPool)

    def test_backbone_checkpoint_loads_into_the_fpn(self):
        """The LC backbone file ("backbone.features.*") fills every bottom-up parameter."""
        tv = _random_torchvision()
        state = convert_torchvision_mobilenet_v2(tv.state_dict())
        cfg = _fpn_cfg()
        model = build_model(cfg)
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
        self.assertFalse([k for k in missing if k.startswith("backbone.bottom_up.")], missing)
        # what is missing are the FPN and the heads, trained from scratch
        self.assertTrue(all(not k.startswith("backbone.bottom_up.") for k in missing))
        # only the final 1x1 conv to 1280 channels (features[18]) is not part of the backbone
        self.assertTrue(all(".features.18." in k for k in unexpected), unexpected)
        got = model.backbone.bottom_up.features[3].conv[1][0].weight
        torch.testing.assert_close(got, tv.features[3].conv[1][0].weight)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "mnv2.pth")
            torch.save({"model": state}, path)
            model2 = build_model(cfg)
            DetectionCheckpointer(model2).load(path)
        for (name, p), (_, q) in zip(
            model2.backbone.bottom_up.state_dict().items(),
            model.backbone.bottom_up.state_dict().items(),
        ):
            torch.testing.assert_close(p, q, msg=name)
        # a Mask R-CNN checkpoint (the FPN's own names) loads back unchanged
        missing, unexpected = build_model(cfg).load_state_dict(model2.state_dict(), strict=True)
        self.assertEqual((missing, unexpected), ([], []))

    @unittest.skipUnless(
        os.path.isfile(os.path.join(REPO, "weights", "mobilenet_v2_imagenet.pth")),
        "ImageNet weights not fetched (make install writes them)",
    )
    def test_imagenet_file_leaves_no_backbone_parameter_missing(self):
        ckpt = torch.load(
            os.path.join(REPO, "weights", "mobilenet_v2_imagenet.pth"), weights_only=True
        )["model"]
        model = build_model(_fpn_cfg())
        missing, _ = model.load_state_dict(ckpt, strict=False)
        self.assertFalse([k for k in missing if "bottom_up" in k], missing)

    def test_freeze_at(self):
        backbone = build_backbone(_fpn_cfg(FREEZE_AT=2))
        frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
        self.assertTrue(frozen)
        for name in frozen:
            self.assertTrue(name.startswith("bottom_up.features."), name)
            self.assertLess(int(name.split(".")[2]), 4, name)  # features[0:4] = m1, m2
        for name, p in backbone.named_parameters():
            if name.startswith("fpn_") or int(name.split(".")[2]) >= 4:
                self.assertTrue(p.requires_grad, name)
        everything = build_backbone(_fpn_cfg(FREEZE_AT=0))
        self.assertTrue(all(p.requires_grad for p in everything.parameters()))

    def test_norms(self):
        for norm, kind in (
            ("FrozenBN", FusedFrozenBatchNorm2d),
            ("BN", torch.nn.BatchNorm2d),
            ("GN", torch.nn.GroupNorm),
        ):
            with self.subTest(norm=norm):
                bottom_up = build_backbone(_fpn_cfg(NORM=norm)).bottom_up
                norms = [m for m in bottom_up.modules() if isinstance(m, kind)]
                self.assertEqual(len(norms), 51)  # every norm layer of features[0:18]
        # GN takes γ, β from a BN checkpoint and ignores its running statistics
        tv = _random_torchvision()
        model = build_model(_fpn_cfg(NORM="GN"))
        _, unexpected = model.load_state_dict(
            convert_torchvision_mobilenet_v2(tv.state_dict()), strict=False
        )
        # only the dropped final conv (features[18]) is left over, running statistics included
        self.assertTrue(all(".features.18." in k for k in unexpected), unexpected)
        gn32 = model.backbone.bottom_up.features[1].conv[0][1]
        gn16 = model.backbone.bottom_up.features[1].conv[2]
        self.assertEqual((gn32.num_groups, gn16.num_groups), (32, 16))  # gcd(32, C)
        torch.testing.assert_close(gn32.weight, tv.features[1].conv[0][1].weight)
        torch.testing.assert_close(gn16.bias, tv.features[1].conv[2].bias)

    def test_channels_last_gives_the_same_features(self):
        tv = _random_torchvision()
        state = {k[len("backbone.") :]: v for k, v in convert_torchvision_mobilenet_v2(
            tv.state_dict()).items()}
        outs = []
        for cl in (False, True):
            cfg = _fpn_cfg()
            cfg.MODEL.CHANNELS_LAST = cl
            torch.manual_seed(0)
            backbone = build_backbone(cfg).eval()
            backbone.load_state_dict(state, strict=False)
            with torch.no_grad():
                outs.append(backbone(torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))))
        self.assertTrue(outs[1]["p2"].is_contiguous(memory_format=torch.channels_last))
        for name in outs[0]:
            torch.testing.assert_close(outs[1][name], outs[0][name], rtol=1e-4, atol=1e-4)

    def test_bad_fpn_in_features_name_both_keys(self):
        cfg = _fpn_cfg()
        cfg.MODEL.MOBILENET.OUT_FEATURES = ["m3", "m4", "m5"]
        with self.assertRaisesRegex(ValueError, "FPN.IN_FEATURES.*MOBILENET.OUT_FEATURES"):
            build_backbone(cfg)


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
