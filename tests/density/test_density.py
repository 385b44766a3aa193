"""Density targets, loss, backbones and the DensityCounter meta-architecture end to end."""

import importlib
import math
import unittest
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
from detectron2.engine import DefaultPredictor
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.utils.events import EventStorage
from scipy.special import erf

import wsis_d2  # noqa: F401  (registers models)
from wsis_d2.density.fcrn import block_norm
from wsis_d2.density.calibration import fit_count_calibration
from wsis_d2.density.losses import DensityLoss, density_mse_loss, density_window_count_loss
from wsis_d2.density.postprocessing import DensityPointDetector, build_point_detector
from wsis_d2.density.targets import DensityTargets, adaptive_sigmas, gaussian_density_map
from wsis_d2.testing import tiny_density_config


def _reference_density(points, height, width, sigmas):
    """Independent reference: 2-D Gaussian mass per pixel by 8x8 midpoint supersampling,
    renormalised to the mass that falls inside the image."""
    sub = 8
    ys = (np.arange(height * sub) + 0.5) / sub
    xs = (np.arange(width * sub) + 0.5) / sub
    out = np.zeros((height, width))
    for (x, y), s in zip(points, sigmas):
        pdf = np.exp(-((xs[None, :] - x) ** 2 + (ys[:, None] - y) ** 2) / (2 * s * s))
        pix = pdf.reshape(height, sub, width, sub).sum(axis=(1, 3))
        out += pix / pix.sum()
    return out


def small_cfg(config="density_unet_cells.yaml"):
    return tiny_density_config(config)


class TestTargets(unittest.TestCase):
    def test_integral_equals_count_including_border_points(self):
        points = torch.tensor(
            [[0.0, 0.0], [12.0, 4.5], [11.9, 9.99], [5.5, 5.5], [0.2, 7.0]], dtype=torch.float32
        )
        for sigma in (0.5, 2.0, 6.0):
            d = gaussian_density_map(points, (10, 12), sigma)
            self.assertEqual(tuple(d.shape), (1, 10, 12))
            self.assertAlmostEqual(float(d.sum()), 5.0, places=4)
            self.assertGreaterEqual(float(d.min()), 0.0)

    def test_matches_supersampled_reference(self):
        rng = np.random.default_rng(0)
        points = np.column_stack([rng.uniform(0, 15, 6), rng.uniform(0, 9, 6)])
        points[0] = [0.3, 8.8]  # near a corner: most of its mass is given back to the image
        sigmas = rng.uniform(0.8, 3.0, 6)
        ours = gaussian_density_map(
            torch.tensor(points, dtype=torch.float32), (9, 15), torch.tensor(sigmas)
        )[0].numpy()
        ref = _reference_density(points, 9, 15, sigmas)
        np.testing.assert_allclose(ours, ref, atol=2e-3 * ref.max())
        self.assertAlmostEqual(float(ours.sum()), 6.0, places=4)

    def test_isolated_kernel_has_exact_pixel_mass(self):
        # far from the border a point at a pixel centre puts (erf-integrated) mass in its pixel
        d = gaussian_density_map(torch.tensor([[20.5, 20.5]]), (41, 41), 1.5)[0]
        one_d = erf(0.5 / (1.5 * math.sqrt(2)))
        self.assertAlmostEqual(float(d[20, 20]), one_d**2, places=5)

    def test_classes_go_to_their_channel(self):
        points = torch.tensor([[2.0, 2.0], [7.0, 3.0], [4.0, 4.0]])
        d = gaussian_density_map(points, (6, 9), 1.0, torch.tensor([2, 0, 2]), num_classes=3)
        np.testing.assert_allclose(d.sum(dim=(1, 2)).numpy(), [1, 0, 2], atol=1e-5)
        empty = gaussian_density_map(torch.zeros((0, 2)), (6, 9), 1.0, num_classes=2)
        self.assertEqual(tuple(empty.shape), (2, 6, 9))
        self.assertEqual(float(empty.abs().sum()), 0.0)
        with self.assertRaises(ValueError):
            gaussian_density_map(points, (6, 9), 1.0, torch.tensor([0, 3, 0]), num_classes=3)

    def test_adaptive_sigmas_brute_force(self):
        rng = np.random.default_rng(3)
        pts = rng.uniform(0, 50, size=(7, 2))
        k, beta = 3, 0.3
        expected = []
        for i in range(7):
            dist = sorted(np.hypot(*(pts - pts[i]).T))[1 : k + 1]
            expected.append(np.clip(beta * np.mean(dist), 0.5, 100.0))
        got = adaptive_sigmas(torch.tensor(pts), k, beta, 4.0, (0.5, 100.0))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
        few = adaptive_sigmas(torch.tensor(pts[:3]), k, beta, 4.0)
        np.testing.assert_allclose(few.numpy(), [4.0, 4.0, 4.0])

    def test_adaptive_sigmas_match_distance_matrix(self):
        # the k-d tree against the (P, P) matrix it replaced, with repeated points (distance 0)
        rng = np.random.default_rng(5)
        pts = torch.from_numpy(rng.uniform(0, 200, size=(300, 2)))
        pts = torch.cat([pts, pts[:20]]).float()
        dist = torch.cdist(pts.double(), pts.double())
        knn = dist.topk(5, dim=1, largest=False).values[:, 1:]
        expected = (0.3 * knn.mean(dim=1)).clamp(0.5, 20.0)
        got = adaptive_sigmas(pts, 4, 0.3, 4.0, (0.5, 20.0))
        self.assertEqual(got.dtype, torch.float32)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6)
        alone = adaptive_sigmas(pts[:300], 4, 0.3, 4.0, (0.5, 20.0))
        self.assertTrue(bool((got[:20] < alone[:20]).all()))  # a twin is a neighbour at 0
        torch.testing.assert_close(got[300:], got[:20])

    def test_mse_loss_hand_computed(self):
        pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        target = torch.tensor([[[[0.0, 2.0], [5.0, 4.0]]]])
        valid = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
        self.assertAlmostEqual(float(density_mse_loss(pred, target)), (1 + 0 + 4 + 0) / 4)
        self.assertAlmostEqual(float(density_mse_loss(pred, target, valid)), (1 + 0 + 0) / 3)

    def test_window_count_loss_brute_force(self):
        gen = torch.Generator().manual_seed(3)
        pred = torch.rand(2, 2, 7, 10, generator=gen) * 5
        target = torch.rand(2, 2, 7, 10, generator=gen) * 5
        valid = (torch.rand(2, 1, 7, 10, generator=gen) > 0.3).float()
        valid[1, :, 4:, :] = 0  # windows of the bottom row of image 1 hold no valid pixel
        w, s = 4, 2.0
        for v in (None, valid):
            vv = torch.ones(2, 1, 7, 10) if v is None else v
            total, k = 0.0, 0
            for n in range(2):
                for y in range(0, 7, w):
                    for x in range(0, 10, w):
                        area = vv[n, 0, y : y + w, x : x + w]
                        if area.sum() == 0:
                            continue
                        k += 1
                        for c in range(2):
                            d = (
                                pred[n, c, y : y + w, x : x + w]
                                - target[n, c, y : y + w, x : x + w]
                            )
                            total += float((d * area).sum() / s) ** 2
            got = float(density_window_count_loss(pred, target, v, window=w, scale=s))
            self.assertAlmostEqual(got, total / (2 * k), places=4)
        # a window of the whole map is the squared error of the image counts
        got = density_window_count_loss(pred, target, None, window=10, scale=1.0)
        expected = ((pred - target).sum(dim=(2, 3)) ** 2).mean()
        self.assertAlmostEqual(float(got), float(expected), places=3)
        # mass moved inside a window costs nothing, across windows it does
        t = torch.zeros(1, 1, 8, 8)
        t[0, 0, 1, 1] = 1.0
        p = torch.zeros(1, 1, 8, 8)
        p[0, 0, 2, 2] = 1.0
        self.assertEqual(float(density_window_count_loss(p, t, None, window=4)), 0.0)
        p = torch.zeros(1, 1, 8, 8)
        p[0, 0, 5, 5] = 1.0
        self.assertAlmostEqual(float(density_window_count_loss(p, t, None, window=4)), 2 / 4)
        with self.assertRaisesRegex(ValueError, "window"):
            density_window_count_loss(p, t, None, window=0)


class TestTargetBadInputs(unittest.TestCase):
    """The density target builder names the argument and both shapes."""

    def test_gaussian_density_map(self):
        pts = torch.tensor([[2.0, 3.0], [5.0, 1.0]])
        self.assertAlmostEqual(float(gaussian_density_map(pts, (8, 9), 1.5).sum()), 2.0, places=4)
        with self.assertRaisesRegex(
            ValueError, r"'points' must have shape \(\*, 2\), got \(2, 3\)"
        ):
            gaussian_density_map(torch.zeros(2, 3), (8, 9), 1.5)
        with self.assertRaisesRegex(ValueError, r"'points' must have shape \(\*, 2\), got \(4,\)"):
            gaussian_density_map(torch.zeros(4), (8, 9), 1.5)
        with self.assertRaisesRegex(ValueError, r"'sigma' must be .* P = 2 .*got shape \(3,\)"):
            gaussian_density_map(pts, (8, 9), torch.tensor([1.0, 2.0, 3.0]))
        with self.assertRaisesRegex(ValueError, r"'sigma' must be .* P = 2 .*got shape \(1,\)"):
            gaussian_density_map(pts, (8, 9), [1.0])
        listed = gaussian_density_map(pts, (8, 9), [1.0, 2.0])
        self.assertAlmostEqual(float(listed.sum()), 2.0, places=4)
        with self.assertRaisesRegex(ValueError, "'sigma' must be positive"):
            gaussian_density_map(pts, (8, 9), torch.tensor([1.0, 0.0]))
        with self.assertRaisesRegex(ValueError, r"'classes' must have shape \(2,\), got \(3,\)"):
            gaussian_density_map(pts, (8, 9), 1.5, torch.zeros(3, dtype=torch.long), 2)
        with self.assertRaisesRegex(TypeError, "'classes' must have an integer dtype"):
            gaussian_density_map(pts, (8, 9), 1.5, torch.zeros(2), 2)
        with self.assertRaisesRegex(ValueError, r"'classes' must lie in 0..1 .*got 0..2"):
            gaussian_density_map(pts, (8, 9), 1.5, torch.tensor([0, 2]), 2)
        with self.assertRaisesRegex(ValueError, "'image_size' must be \\(H, W\\)"):
            gaussian_density_map(pts, (8,), 1.5)
        with self.assertRaisesRegex(ValueError, "'points' must not contain NaN"):
            gaussian_density_map(torch.tensor([[float("nan"), 1.0]]), (8, 9), 1.5)

    def test_adaptive_sigmas(self):
        pts = torch.rand(6, 2, dtype=torch.float64) * 20
        self.assertEqual(adaptive_sigmas(pts, 3, 0.3, 4.0).shape, (6,))
        with self.assertRaisesRegex(
            ValueError, r"'points' must have shape \(\*, 2\), got \(6, 1\)"
        ):
            adaptive_sigmas(pts[:, :1], 3, 0.3, 4.0)
        with self.assertRaisesRegex(TypeError, "'k' must be an integer, got 2.5"):
            adaptive_sigmas(pts, 2.5, 0.3, 4.0)
        with self.assertRaisesRegex(ValueError, r"'beta' must lie in \(0.0, inf\], got 0"):
            adaptive_sigmas(pts, 3, 0, 4.0)
        with self.assertRaisesRegex(ValueError, "'sigma_range' must be \\(min, max\\)"):
            adaptive_sigmas(pts, 3, 0.3, 4.0, (5.0, 1.0))
        with self.assertRaisesRegex(TypeError, "'points' must have a floating-point dtype"):
            adaptive_sigmas(pts.long(), 3, 0.3, 4.0)

    def test_mse_loss(self):
        pred = torch.zeros(2, 1, 4, 5)
        with self.assertRaisesRegex(
            ValueError, r"'target' must have shape \(2, 1, 4, 5\), got \(2, 1, 5, 4\)"
        ):
            density_mse_loss(pred, torch.zeros(2, 1, 5, 4))
        with self.assertRaisesRegex(ValueError, r"'valid' must have shape \(2, 1, 4, 5\)"):
            density_mse_loss(pred, pred, torch.ones(1, 1, 4, 5))


class TestBackbones(unittest.TestCase):
    def test_output_at_input_resolution(self):
        cfg = small_cfg()
        counts = {}
        for name in ("FCRN_A", "FCRN_B", "UNet"):
            net = BACKBONE_REGISTRY.get(name)(cfg, ShapeSpec(channels=3))
            convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
            counts[name] = len(convs)
            self.assertEqual(net.size_divisibility, 8)
            for h, w in ((32, 40), (37, 23)):
                out = net(torch.randn(2, 3, h, w))["dense"]
                self.assertEqual(tuple(out.shape), (2, 4, h, w))
        # 3 down + 1 middle + 3 up blocks: FCRN-A 1 conv each, FCRN-B and U-Net 2
        self.assertEqual(counts, {"FCRN_A": 7, "FCRN_B": 14, "UNet": 14})

    def test_width_and_depth_configurable(self):
        cfg = small_cfg()
        cfg.MODEL.UNET.CHANNELS = [3, 5]
        net = BACKBONE_REGISTRY.get("UNet")(cfg, ShapeSpec(channels=1))
        self.assertEqual(net.size_divisibility, 4)
        self.assertEqual(tuple(net(torch.randn(1, 1, 9, 11))["dense"].shape), (1, 3, 9, 11))

    def test_norms(self):
        # GN: groups of >= 8 channels, at most 32 groups (detectron2's fixed 32 cannot divide 16)
        self.assertEqual(block_norm("GN", 16).num_groups, 2)
        self.assertEqual(block_norm("GN", 4).num_groups, 1)
        self.assertEqual(block_norm("GN", 512).num_groups, 32)
        self.assertIsInstance(block_norm("BN", 8), torch.nn.BatchNorm2d)
        self.assertIsNone(block_norm("", 8))
        for norm in ("GN", ""):
            cfg = small_cfg()
            cfg.MODEL.UNET.NORM = norm
            net = BACKBONE_REGISTRY.get("UNet")(cfg, ShapeSpec(channels=3)).eval()
            x = torch.randn(2, 3, 16, 24)
            # batch-independent: an image gives the same output alone and in a batch
            torch.testing.assert_close(net(x)["dense"][:1], net(x[:1])["dense"])
            convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
            self.assertTrue(all((c.bias is None) == (norm != "") for c in convs))


class TestDensityCounter(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # tiny models: one thread avoids OpenMP spinning on a busy shared machine
        cls._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    @classmethod
    def tearDownClass(cls):
        torch.set_num_threads(cls._threads)

    def _inputs(self, sizes, num_points):
        gen = torch.Generator().manual_seed(0)
        inputs = []
        for (h, w), n in zip(sizes, num_points):
            pts = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
            inputs.append(
                {
                    "image": torch.randint(0, 255, (3, h, w), generator=gen, dtype=torch.uint8),
                    "points": pts,
                    "point_classes": torch.zeros(n, dtype=torch.long),
                    "height": h,
                    "width": w,
                }
            )
        return inputs

    def test_end_to_end_every_backbone(self):
        for config in (
            "density_fcrn_a_cells.yaml",
            "density_fcrn_b_cells.yaml",
            "density_unet_cells.yaml",
        ):
            with self.subTest(config=config):
                torch.manual_seed(0)
                cfg = small_cfg(config)
                model = build_model(cfg)
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                inputs = self._inputs([(45, 33), (30, 51)], [6, 0])  # one image without points
                # the local count loss is on in the configs that set μ > 0
                expected = {"loss_density"}
                if cfg.MODEL.DENSITY.COUNT_LOSS_WEIGHT > 0:
                    expected.add("loss_density_count")
                with EventStorage():
                    for _ in range(2):
                        losses = model(inputs)
                        self.assertEqual(set(losses), expected)
                        loss = sum(losses.values())
                        self.assertTrue(torch.isfinite(loss))
                        opt.zero_grad()
                        loss.backward()
                        self.assertTrue(
                            all(p.grad is not None for p in model.parameters() if p.requires_grad)
                        )
                        opt.step()
                model.eval()
                inputs[1]["height"], inputs[1]["width"] = 45, 77  # output at another size
                with torch.no_grad():
                    outputs = model(inputs)
                for out, (h, w) in zip(outputs, ((45, 33), (45, 77))):
                    self.assertEqual(tuple(out["density"].shape), (1, h, w))
                    self.assertEqual(tuple(out["counts"].shape), (1,))
                # same size: the count is the integral of the returned map
                self.assertAlmostEqual(
                    float(outputs[0]["counts"]), float(outputs[0]["density"].sum()), places=4
                )
                # resized (x1.5 in width): integral kept up to interpolation error
                self.assertAlmostEqual(
                    float(outputs[1]["counts"]),
                    float(outputs[1]["density"].sum()),
                    delta=0.05 * float(outputs[1]["density"].abs().sum()) + 1e-6,
                )

    def test_loss_is_pixel_mse_of_scaled_target(self):
        cfg = small_cfg()
        model = build_model(cfg)
        model.train()
        inputs = self._inputs([(16, 24), (13, 19)], [3, 2])
        inputs[0]["roi"] = torch.zeros(16, 24, dtype=torch.bool)
        inputs[0]["roi"][:, :10] = True
        # crop-cut band of the mapper's CROP_EDGE_MARGIN: out of the loss, like outside the ROI
        inputs[1]["loss_mask"] = torch.ones(13, 19, dtype=torch.bool)
        inputs[1]["loss_mask"][:3] = False
        images = model.preprocess_image(inputs)
        with torch.no_grad(), EventStorage():
            pred = model.predict_raw(images)
            loss = float(model(inputs)["loss_density"])
        # reference: loop over images, valid pixels only, target = s * D with the config's s and σ
        scale, sigma = cfg.MODEL.DENSITY.SCALE, cfg.MODEL.DENSITY.SIGMA
        sq, n = 0.0, 0
        for i, inp in enumerate(inputs):
            h, w = inp["image"].shape[-2:]
            target = scale * gaussian_density_map(inp["points"], (h, w), sigma)
            mask = inp.get("roi", torch.ones(h, w, dtype=torch.bool))
            mask = mask & inp.get("loss_mask", torch.ones(h, w, dtype=torch.bool))
            diff = (pred[i, :, :h, :w] - target)[:, mask]
            sq += float((diff**2).sum())
            n += int(mask.sum())
        self.assertAlmostEqual(loss, sq / n, places=5)
        inputs[1]["loss_mask"] = torch.ones(12, 19, dtype=torch.bool)
        with EventStorage(), self.assertRaisesRegex(ValueError, "loss_mask .* has shape"):
            model(inputs)

    def test_logged_count_error_is_over_the_loss_pixels(self):
        # a point in the crop-cut band is out of the loss: neither count may include it
        cfg = small_cfg()
        model = build_model(cfg)
        model.train()
        inputs = self._inputs([(16, 24), (13, 19)], [3, 2])
        inputs[1]["points"] = torch.tensor([[9.5, 1.5], [9.5, 9.5]])
        inputs[1]["loss_mask"] = torch.ones(13, 19, dtype=torch.bool)
        inputs[1]["loss_mask"][:4] = False
        images = model.preprocess_image(inputs)
        with torch.no_grad(), EventStorage() as storage:
            pred = model.predict_raw(images)
            model(inputs)
            logged_mae = storage.history("density/count_mae").latest()
            logged_true = storage.history("density/true_count").latest()
        scale, sigma = cfg.MODEL.DENSITY.SCALE, cfg.MODEL.DENSITY.SIGMA
        errors, trues = [], []
        for i, inp in enumerate(inputs):
            h, w = inp["image"].shape[-2:]
            mask = inp.get("loss_mask", torch.ones(h, w, dtype=torch.bool))
            target = gaussian_density_map(inp["points"], (h, w), sigma)[0]
            trues.append(float(target[mask].sum()))
            errors.append(abs(float(pred[i, 0, :h, :w][mask].sum()) / scale - trues[-1]))
        self.assertLess(trues[1], 1.01)  # the masked point is not counted
        self.assertAlmostEqual(logged_true, sum(trues) / 2, places=4)
        self.assertAlmostEqual(logged_mae, sum(errors) / 2, places=4)

    def test_window_count_loss_in_training(self):
        cfg = small_cfg()
        cfg.MODEL.DENSITY.COUNT_LOSS_WEIGHT = 0.5
        cfg.MODEL.DENSITY.COUNT_LOSS_WINDOW = 8
        model = build_model(cfg)
        model.train()
        inputs = self._inputs([(16, 24), (13, 19)], [3, 2])
        images = model.preprocess_image(inputs)
        with torch.no_grad(), EventStorage():
            pred = model.predict_raw(images)
            target, valid = model.targets(inputs, images)
            losses = model(inputs)
        self.assertEqual(set(losses), {"loss_density", "loss_density_count"})
        expected = 0.5 * density_window_count_loss(pred, target, valid, 8, 100.0)
        self.assertAlmostEqual(float(losses["loss_density_count"]), float(expected), places=5)
        cfg.MODEL.DENSITY.COUNT_LOSS_WINDOW = 0
        with self.assertRaisesRegex(ValueError, "COUNT_LOSS_WINDOW"):
            build_model(cfg)

    def test_adaptive_targets_keep_counts(self):
        cfg = small_cfg("density_unet_mall.yaml")
        self.assertEqual(cfg.MODEL.DENSITY.ADAPTIVE_K, 3)
        model = build_model(cfg)
        points = torch.tensor([[1.0, 1.0], [3.0, 1.0], [30.0, 20.0], [31.0, 22.0], [10.0, 5.0]])
        target = model.targets.density(points, None, (24, 32))
        self.assertAlmostEqual(float(target.sum()), 5.0, places=4)
        sigmas = adaptive_sigmas(points, 3, 0.3, 4.0, (2.0, 12.0))
        np.testing.assert_allclose(
            target[0].numpy(), gaussian_density_map(points, (24, 32), sigmas)[0].numpy()
        )
        self.assertGreater(float(sigmas.max()), float(sigmas.min()))

    def test_training_reduces_count_error(self):
        # a tiny model learns to count bright dots; checks that gradients point the right way
        torch.manual_seed(0)
        cfg = small_cfg("density_fcrn_a_cells.yaml")
        cfg.MODEL.PIXEL_MEAN = [0.0, 0.0, 0.0]
        cfg.MODEL.PIXEL_STD = [255.0, 255.0, 255.0]
        cfg.MODEL.DENSITY.SIGMA = 1.5
        model = build_model(cfg)
        model.train()
        gen = torch.Generator().manual_seed(1)
        inputs = []
        for n in (3, 8, 1, 5):
            img = torch.zeros(3, 24, 24, dtype=torch.uint8)
            pix = torch.randperm(24 * 24, generator=gen)[:n]
            rows, cols = pix // 24, pix % 24
            img[:, rows, cols] = 255
            inputs.append(
                {"image": img, "points": torch.stack([cols + 0.5, rows + 0.5], 1).float()}
            )
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with EventStorage() as storage:
            for it in range(60):
                loss = model(inputs)["loss_density"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                if it == 0:
                    first = storage.history("density/count_mae").latest()
            last = storage.history("density/count_mae").latest()
        self.assertLess(last, 0.5 * first)

    def test_channels_last_and_autocast(self):
        # MODEL.CHANNELS_LAST stores the conv weights NHWC and gives the float32 model's outputs
        # up to rounding; under bfloat16 autocast the 1x1 head still returns float32
        torch.manual_seed(0)
        cfg = small_cfg()
        model = build_model(cfg).eval()
        cfg.MODEL.CHANNELS_LAST = True
        model_cl = build_model(cfg).eval()
        model_cl.load_state_dict(model.state_dict())
        conv = next(p for p in model_cl.backbone.parameters() if p.dim() == 4 and p.shape[-1] > 1)
        self.assertTrue(conv.is_contiguous(memory_format=torch.channels_last))
        self.assertFalse(conv.is_contiguous())
        inputs = self._inputs([(37, 29)], [4])
        with torch.no_grad():
            ref = model(inputs)[0]
            out = model_cl(inputs)[0]
        torch.testing.assert_close(out["density"], ref["density"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["counts"], ref["counts"], rtol=1e-4, atol=1e-4)
        # float32 training: the channels-last head (a matrix product over NHWC channels) has the
        # 1x1 convolution's gradients
        model.train()
        model_cl.train()
        with EventStorage():
            model(inputs)["loss_density"].backward()
            model_cl(inputs)["loss_density"].backward()
        for name in ("weight", "bias"):
            ref_grad = getattr(model.head, name).grad
            self.assertGreater(float(ref_grad.abs().max()), 0.0)
            torch.testing.assert_close(
                getattr(model_cl.head, name).grad, ref_grad, rtol=1e-4, atol=1e-6
            )
        model_cl.zero_grad()
        with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
            images = model_cl.preprocess_image(inputs)
            pred = model_cl.predict_raw(images)
            loss = model_cl(inputs)["loss_density"]
        self.assertEqual(pred.dtype, torch.float32)
        self.assertEqual(loss.dtype, torch.float32)
        loss.backward()
        self.assertTrue(all(torch.isfinite(p.grad).all() for p in model_cl.parameters()))


def _reference_find_peaks(maps, radius=1, threshold=None):
    """Local maxima over a (2r+1)^2 window above ``threshold``, in the shared Peaks format."""
    pooled = torch.nn.functional.max_pool2d(maps, 2 * radius + 1, stride=1, padding=radius)
    mask = maps == pooled
    if threshold is not None:
        mask &= maps > threshold
    idx = mask.nonzero()
    vals = maps[mask]
    order = sorted(range(len(idx)), key=lambda i: (int(idx[i, 0]), int(idx[i, 1]), -float(vals[i])))
    return SimpleNamespace(mask=mask, indices=idx[order], values=vals[order])


class TestComponents(unittest.TestCase):
    """DensityCounter is built from its components (targets, loss, point detector), each from its
    own from_config; a variant is built from a config clone, not by mutating the model."""

    def test_built_from_config(self):
        cfg = small_cfg()
        cfg.MODEL.DENSITY.SIGMA = 2.5
        cfg.MODEL.DENSITY.SCALE = 50.0
        cfg.MODEL.DENSITY.COUNT_LOSS_WEIGHT = 0.25
        model = build_model(cfg)
        self.assertIsInstance(model.targets, DensityTargets)
        self.assertEqual((model.targets.sigma, model.targets.scale), (2.5, 50.0))
        self.assertEqual((model.loss.count_loss_weight, model.loss.scale), (0.25, 50.0))
        self.assertIsNone(model.point_detector)
        cfg.MODEL.DENSITY.PEAKS.ENABLED = True
        cfg.MODEL.DENSITY.PEAKS.RADIUS = 3
        detector = build_point_detector(cfg)
        self.assertEqual((detector.radius, detector.sigma), (3, 2.5))

    def test_variant_from_a_config_clone(self):
        cfg = small_cfg()
        model = build_model(cfg).eval()
        wide = cfg.clone()
        wide.MODEL.DENSITY.SIGMA = 4.0
        points = torch.tensor([[16.0, 12.0]])
        narrow_map = model.targets.density(points, None, (24, 32))
        model.targets = DensityTargets(wide)
        wide_map = model.targets.density(points, None, (24, 32))
        # the same single count, spread wider
        self.assertAlmostEqual(float(narrow_map.sum()), float(wide_map.sum()), places=4)
        self.assertGreater(float(narrow_map.max()), 1.5 * float(wide_map.max()))
        image = {"image": torch.zeros(3, 16, 24, dtype=torch.uint8)}
        with torch.no_grad():
            self.assertNotIn("instances", model([image])[0])
            model.point_detector = DensityPointDetector(wide)
            self.assertIn("instances", model([image])[0])

    def test_bad_options_name_the_key(self):
        cfg = small_cfg()
        cfg.MODEL.DENSITY.COUNT_LOSS_WINDOW = 0
        with self.assertRaisesRegex(ValueError, "MODEL.DENSITY.COUNT_LOSS_WINDOW"):
            DensityLoss(cfg)


class TestInference(unittest.TestCase):
    def _model(self):
        cfg = small_cfg()
        cfg.MODEL.DENSITY.PEAKS.ENABLED = True
        cfg.MODEL.DENSITY.PEAKS.BOX_SIZE = 6.0
        cfg.MODEL.DENSITY.SIGMA = 1.0
        model = build_model(cfg).eval()
        return model

    def _fake_prediction(self, model, points, size):
        """Replace the network by a map equal to s * (target density of ``points``)."""
        density = model.targets.scale * gaussian_density_map(points, size, 1.0)
        return mock.patch.object(model, "predict_raw", return_value=density[None])

    def test_point_detections_from_peaks(self):
        model = self._model()
        points = torch.tensor([[4.5, 5.5], [15.5, 10.5], [1.5, 1.5]])
        with self._fake_prediction(model, points, (16, 24)), mock.patch(
            "wsis_d2.density.postprocessing.find_peaks", _reference_find_peaks
        ):
            out = model([{"image": torch.zeros(3, 16, 24, dtype=torch.uint8)}])[0]
        inst = out["instances"]
        self.assertEqual(inst.image_size, (16, 24))
        centres = inst.pred_boxes.get_centers()
        got = sorted(map(tuple, centres.tolist()))
        # boxes are centred on the peak pixels, clipped at the border for the corner point
        self.assertEqual(got[1:], sorted([(4.5, 5.5), (15.5, 10.5)]))
        self.assertEqual(tuple(inst.pred_boxes.tensor[0].tolist()), (0.0, 0.0, 4.5, 4.5))
        self.assertTrue(torch.all(inst.pred_classes == 0))
        expected_peak = float(out["density"][0, 5, 4])
        self.assertIn(round(expected_peak, 6), [round(v, 6) for v in inst.scores.tolist()])
        self.assertAlmostEqual(float(out["counts"][0]), 3.0, places=4)

    @unittest.skipUnless(
        getattr(importlib.import_module("wsis_d2.layers"), "find_peaks", None) is not None,
        "wsis_d2.layers.find_peaks is not available yet",
    )
    def test_point_detections_with_the_real_op(self):
        model = self._model()
        points = torch.tensor([[4.5, 5.5], [15.5, 10.5]])
        with self._fake_prediction(model, points, (16, 24)):
            inst = model([{"image": torch.zeros(3, 16, 24, dtype=torch.uint8)}])[0]["instances"]
        self.assertEqual(
            sorted(map(tuple, inst.pred_boxes.get_centers().tolist())),
            [(4.5, 5.5), (15.5, 10.5)],
        )

    def test_roi_masks_density(self):
        model = build_model(small_cfg()).eval()
        roi = torch.zeros(12, 10, dtype=torch.bool)
        roi[2:7, 3:9] = True
        with torch.no_grad():
            out = model([{"image": torch.zeros(3, 12, 10, dtype=torch.uint8), "roi": roi}])[0]
        self.assertEqual(float(out["density"][0][~roi].abs().sum()), 0.0)
        self.assertAlmostEqual(float(out["counts"][0]), float(out["density"].sum()), places=5)

    def test_dihedral_mean_at_test_time(self):
        torch.manual_seed(0)
        cfg = small_cfg()
        model = build_model(cfg).eval()
        cfg.MODEL.DENSITY.TEST_DIHEDRAL = True
        tta = build_model(cfg).eval()
        tta.load_state_dict(model.state_dict())
        image = torch.randint(0, 255, (3, 16, 24), dtype=torch.uint8)
        with torch.no_grad():
            out = tta([{"image": image}])[0]["density"]
            # the 8 turned / flipped images, each prediction turned back, averaged
            expected = torch.zeros_like(out)
            for k in range(4):
                for flip in (False, True):
                    img = torch.rot90(image, k, dims=(1, 2))
                    img = img.flip(2) if flip else img
                    d = model([{"image": img.contiguous()}])[0]["density"]
                    d = d.flip(2) if flip else d
                    expected += torch.rot90(d, -k, dims=(1, 2)) / 8
            plain = model([{"image": image}])[0]["density"]
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
        self.assertFalse(torch.allclose(out, plain))  # a random network is not symmetric
        tta.train()  # training is unchanged: one forward of the batch as it is
        with mock.patch.object(tta, "_predict_dihedral") as dihedral:
            tta.predict_raw(tta.preprocess_image([{"image": image}]))
        dihedral.assert_not_called()

    def test_default_predictor(self):
        cfg = small_cfg()
        predictor = DefaultPredictor(cfg)
        image = np.random.default_rng(0).integers(0, 255, (21, 30, 3), dtype=np.uint8)
        out = predictor(image)
        self.assertEqual(set(out), {"density", "counts"})
        self.assertEqual(tuple(out["density"].shape), (1, 21, 30))
        self.assertEqual(tuple(out["counts"].shape), (1,))


class TestCountCalibration(unittest.TestCase):
    def _data(self):
        rng = np.random.default_rng(0)
        true = torch.tensor(rng.integers(10, 300, size=(40, 2)), dtype=torch.float64)
        areas = torch.tensor(rng.choice([256.0 * 256, 200.0 * 300, 128.0 * 128], size=40))
        return true, areas

    def test_affine_recovers_gain_and_background(self):
        true, areas = self._data()
        gain = torch.tensor([1.03, 0.95])
        offset = torch.tensor([4e-5, -2e-5])
        # predictions whose error is a gain and a background density: p = (t - β·A) / α
        pred = (true - areas[:, None] * offset) / gain
        g, o = fit_count_calibration(pred, areas, true, "affine")
        torch.testing.assert_close(g, gain.double(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(o, offset.double(), rtol=1e-6, atol=1e-12)

    def test_affine_is_least_squares(self):
        true, areas = self._data()
        rng = np.random.default_rng(1)
        pred = true * 0.9 + torch.tensor(rng.normal(0, 5, size=true.shape)) + 3.0
        g, o = fit_count_calibration(pred, areas, true, "affine")
        for c in range(2):
            design = torch.stack([pred[:, c], areas], dim=1)
            expected = torch.linalg.lstsq(design, true[:, c : c + 1]).solution[:, 0]
            torch.testing.assert_close(torch.stack([g[c], o[c]]), expected, rtol=1e-7, atol=1e-12)

    def test_gain_is_least_squares_through_origin(self):
        true, areas = self._data()
        pred = true * 1.1 + 2.0
        g, o = fit_count_calibration(pred, areas, true, "gain")
        expected = (pred * true).sum(0) / (pred * pred).sum(0)
        torch.testing.assert_close(g, expected)
        self.assertTrue(torch.all(o == 0))

    def test_degenerate_cases(self):
        # one image: the affine system is singular -> gain only
        g, o = fit_count_calibration(
            torch.tensor([[50.0]]), torch.tensor([100.0]), torch.tensor([[55.0]]), "affine"
        )
        self.assertAlmostEqual(float(g[0]), 1.1)
        self.assertEqual(float(o[0]), 0.0)
        # a class predicted empty everywhere keeps the identity
        g, o = fit_count_calibration(
            torch.zeros(3, 1), torch.tensor([1.0, 2.0, 3.0]), torch.ones(3, 1), "gain"
        )
        self.assertEqual((float(g[0]), float(o[0])), (1.0, 0.0))
        g, o = fit_count_calibration(torch.ones(3, 1), torch.ones(3), torch.ones(3, 1), "none")
        self.assertEqual((float(g[0]), float(o[0])), (1.0, 0.0))
        with self.assertRaisesRegex(ValueError, "CALIBRATION.MODE"):
            fit_count_calibration(torch.ones(3, 1), torch.ones(3), torch.ones(3, 1), "linear")
        with self.assertRaisesRegex(ValueError, "areas"):
            fit_count_calibration(torch.ones(3, 1), torch.ones(2), torch.ones(3, 1), "gain")

    def test_inference_applies_calibration_in_image_roi_and_resize(self):
        model = build_model(small_cfg()).eval()
        self.assertEqual(model.count_gain.tolist(), [1.0])
        self.assertIn("count_gain", model.state_dict())  # saved with the weights
        image = torch.randint(0, 255, (3, 12, 10), dtype=torch.uint8)
        roi = torch.zeros(12, 10, dtype=torch.bool)
        roi[2:7, 3:9] = True
        inputs = [
            {"image": image},
            {"image": image, "roi": roi},
            {"image": image, "height": 24, "width": 20},
        ]
        with torch.no_grad():
            raw = model(inputs)
            model.set_count_calibration(1.25, 0.01)
            cal = model(inputs)
        area = [120.0, float(roi.sum()), 120.0]
        for r, c, a in zip(raw, cal, area):
            self.assertAlmostEqual(
                float(c["counts"][0]), 1.25 * float(r["counts"][0]) + 0.01 * a, places=4
            )
            self.assertAlmostEqual(float(c["counts"][0]), float(c["density"].sum()), places=4)
        self.assertEqual(float(cal[1]["density"][0][~roi].abs().sum()), 0.0)
        with self.assertRaisesRegex(ValueError, "finite"):
            model.set_count_calibration(float("nan"), 0.0)
        # a checkpoint restores the calibration
        other = build_model(small_cfg())
        other.load_state_dict(model.state_dict())
        self.assertAlmostEqual(float(other.count_gain[0]), 1.25)
        self.assertAlmostEqual(float(other.count_offset[0]), 0.01)


if __name__ == "__main__":
    unittest.main()
