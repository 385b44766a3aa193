"""wsis_d2.lc.calibration and wsis_d2.density.calibration: the count calibration of density and LC models fitted after
training."""

import os
import unittest
from types import SimpleNamespace

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import wsis_d2  # noqa: F401  (registers models)
from wsis_d2 import add_wsis_config
from wsis_d2.lc.mapper import image_level_targets
from wsis_d2.density.calibration import DensityCountCalibration, calibrate_density_counts
from wsis_d2.lc.calibration import (
    LCCountCalibration,
    build_lc_calibration_loader,
    calibrate_lc_counts,
)
from wsis_d2.density.calibration import fit_count_calibration
from wsis_d2.lc.meta_arch import fit_lower_count_gain
from wsis_d2.testing import tiny_density_config, tiny_lc_config


def _model():
    cfg = tiny_density_config("density_unet_cells.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    # a bias on the head so that the untrained network predicts a sizeable mass (~5 per 100 px)
    with torch.no_grad():
        model.head.bias.fill_(5.0)
    return model


def _batches():
    """Five single-image batches of odd sizes (one with an ROI) whose true counts follow the
    untrained model's raw counts with a gain, an offset and noise, as a trained model's would."""
    rng = np.random.default_rng(3)
    model = _model().eval()
    batches = []
    for i, (h, w) in enumerate([(24, 20), (17, 33), (30, 30), (21, 25), (16, 16)]):
        item = {
            "image": torch.as_tensor(rng.integers(0, 255, (3, h, w)), dtype=torch.uint8),
            "file_name": f"img{i}.png",
        }
        if i == 2:
            roi = torch.zeros(h, w, dtype=torch.bool)
            roi[5:20, 3:25] = True
            item["roi"] = roi
        with torch.no_grad():
            raw = float(model([item])[0]["counts"][0])
        num = max(int(round(0.8 * raw + 2.0 + rng.normal(0, 1.0))), 0)
        item["points"] = torch.as_tensor(rng.uniform(0, min(h, w), (num, 2)), dtype=torch.float32)
        item["point_classes"] = torch.zeros(num, dtype=torch.long)
        batches.append([item])
    return batches


class TestCalibrateDensityCounts(unittest.TestCase):
    def test_fits_on_raw_counts_and_sets_the_model(self):
        model = _model()
        batches = _batches()
        model.set_count_calibration(3.0, 1.0)  # a stale calibration is ignored while fitting
        model.train()
        result = calibrate_density_counts(model, batches, "affine")
        self.assertTrue(model.training)  # mode restored

        probe = _model().eval()
        probe.load_state_dict(model.state_dict())
        probe.set_count_calibration(1.0, 0.0)
        with torch.no_grad():
            raw = torch.stack([probe(b)[0]["counts"].double() for b in batches])
        areas = torch.tensor([24 * 20, 17 * 33, 15 * 22, 21 * 25, 16 * 16], dtype=torch.float64)
        true = torch.tensor([[len(b[0]["points"])] for b in batches], dtype=torch.float64)
        gain, offset = fit_count_calibration(raw, areas, true, "affine")
        self.assertAlmostEqual(result["gain"][0], float(gain[0]), places=5)
        self.assertAlmostEqual(result["offset"][0], float(offset[0]), places=8)
        self.assertAlmostEqual(float(model.count_gain[0]), float(gain[0]), places=5)
        self.assertEqual(result["images"], 5)
        self.assertLessEqual(result["mae_after"], result["mae_before"])

        model.eval()
        with torch.no_grad():
            calibrated = torch.stack([model(b)[0]["counts"].double() for b in batches])
        expected = raw * gain + areas[:, None] * offset
        torch.testing.assert_close(calibrated, expected, rtol=1e-4, atol=1e-3)

    def test_none_and_errors(self):
        model = _model()
        self.assertEqual(calibrate_density_counts(model, _batches(), "none"), {})
        self.assertEqual(float(model.count_gain[0]), 1.0)
        batches = _batches()
        del batches[1][0]["points"]
        model.set_count_calibration(2.0, 0.0)
        with self.assertRaisesRegex(ValueError, "img1.png"):
            calibrate_density_counts(model, batches, "affine")
        self.assertEqual(float(model.count_gain[0]), 2.0)  # left as it was
        with self.assertRaisesRegex(ValueError, "CALIBRATION.MODE"):
            calibrate_density_counts(model, _batches(), "scale")
        with self.assertRaisesRegex(ValueError, "no images"):
            calibrate_density_counts(model, [], "gain")
        with self.assertRaisesRegex(ValueError, "DensityCounter"):
            calibrate_density_counts(torch.nn.Linear(2, 2), _batches(), "gain")

    def test_hook_checks_mode_and_model_before_training(self):
        cfg = get_cfg()
        add_wsis_config(cfg)
        cfg.MODEL.DENSITY.CALIBRATION.MODE = "scale"
        with self.assertRaisesRegex(ValueError, "CALIBRATION.MODE"):
            DensityCountCalibration(cfg)
        cfg.MODEL.DENSITY.CALIBRATION.MODE = "affine"
        hook = DensityCountCalibration(cfg)
        hook.trainer = SimpleNamespace(model=torch.nn.Linear(2, 2))
        with self.assertRaisesRegex(ValueError, "DensityCounter"):
            hook.before_train()
        hook.trainer = SimpleNamespace(model=_model())
        hook.before_train()  # a density model passes


def _lc_cfg():
    cfg = tiny_lc_config(3)
    cfg.MODEL.LC.CALIBRATION.MODE = "gain"
    return cfg


def _lc_model():
    torch.manual_seed(0)
    model = build_model(_lc_cfg())
    with torch.no_grad():  # positive densities: raw counts of a few objects
        model.head.density_branch[-1].bias.fill_(0.02)
    return model


def _lc_batches():
    """Six single-image test-time inputs with exact counts (some >= t̃ = 5)."""
    rng = np.random.default_rng(4)
    batches = []
    for i, (h, w) in enumerate([(64, 80), (70, 52), (96, 96), (64, 64), (50, 90), (88, 60)]):
        counts = torch.as_tensor(rng.integers(0, 9, 3), dtype=torch.long)
        batches.append([{
            "image": torch.as_tensor(rng.integers(0, 255, (3, h, w)), dtype=torch.uint8),
            "height": h, "width": w, "file_name": f"lc{i}.png",
            "counts": counts, "labels": (counts > 0).float(),
            "count_ge": torch.zeros(3, dtype=torch.bool),
        }])
    return batches


class TestCalibrateLCCounts(unittest.TestCase):
    def test_fits_censored_gain_and_sets_the_model(self):
        model = _lc_model()
        batches = _lc_batches()
        model.set_count_gain(7.0)  # a stale gain is not used while fitting
        model.train()
        result = calibrate_lc_counts(model, batches, lower_count=5)
        self.assertTrue(model.training)

        probe = _lc_model().eval()
        probe.load_state_dict(model.state_dict())
        raw, t, ge = [], [], []
        for b in batches:
            raw.append(probe.raw_counts(b[0]).double())
            _, tc, gc = image_level_targets(b[0]["counts"].numpy(), 5)
            t.append(tc)
            ge.append(gc)
        raw, t, ge = torch.stack(raw), torch.stack(t).double(), torch.stack(ge)
        self.assertTrue(bool(ge.any()))  # the censoring of the training supervision applies
        expected = fit_lower_count_gain(raw, t, ge)
        torch.testing.assert_close(torch.tensor(result["gain"], dtype=torch.float64), expected)
        torch.testing.assert_close(model.count_gain.double(), expected, rtol=1e-6, atol=0)
        self.assertEqual(result["images"], 6)
        self.assertLessEqual(result["mae_after"], result["mae_before"])
        # without censoring every count is exact: another fit
        uncensored = calibrate_lc_counts(model, batches, lower_count=None)
        t_exact = torch.stack([b[0]["counts"] for b in batches]).double()
        torch.testing.assert_close(
            torch.tensor(uncensored["gain"], dtype=torch.float64),
            fit_lower_count_gain(raw, t_exact, torch.zeros_like(ge)),
        )
        # inference reads α·t̂
        model.eval()
        out = model(batches[0])[0]
        present = out["counts"] > 0
        torch.testing.assert_close(
            out["counts"][present],
            (raw[0].float() * model.count_gain).round().clamp_min(0)[present],
        )

    def test_errors(self):
        model = _lc_model()
        batches = _lc_batches()
        del batches[2][0]["counts"]
        with self.assertRaisesRegex(ValueError, "lc2.png"):
            calibrate_lc_counts(model, batches, 5)
        self.assertEqual(model.count_gain.tolist(), [1.0] * 3)
        with self.assertRaisesRegex(ValueError, "no images"):
            calibrate_lc_counts(model, [], 5)
        with self.assertRaisesRegex(ValueError, "ImageLevelCounter"):
            calibrate_lc_counts(torch.nn.Linear(2, 2), _lc_batches(), 5)

    def test_hook_checks_mode_model_and_labels_before_training(self):
        cfg = _lc_cfg()
        cfg.MODEL.LC.CALIBRATION.MODE = "affine"
        with self.assertRaisesRegex(ValueError, "LC.CALIBRATION.MODE"):
            LCCountCalibration(cfg)
        cfg.MODEL.LC.CALIBRATION.MODE = "gain"
        cfg.MODEL.LC.IMAGE_LABELS_ONLY = True
        with self.assertRaisesRegex(ValueError, "IMAGE_LABELS_ONLY"):
            LCCountCalibration(cfg)
        cfg.MODEL.LC.IMAGE_LABELS_ONLY = False
        hook = LCCountCalibration(cfg)
        hook.trainer = SimpleNamespace(model=_model())  # a density model
        with self.assertRaisesRegex(ValueError, "ImageLevelCounter"):
            hook.before_train()
        hook.trainer = SimpleNamespace(model=_lc_model())
        hook.before_train()

    def test_loader_takes_evenly_spaced_images_with_exact_counts(self):
        import tempfile

        from detectron2.data import DatasetCatalog, MetadataCatalog
        from PIL import Image

        name = "wsis_test_lc_calibration"
        with tempfile.TemporaryDirectory() as tmp:
            dicts = []
            for i in range(10):
                path = os.path.join(tmp, f"im{i}.png")
                Image.fromarray(np.full((40, 30, 3), 20 * i, np.uint8)).save(path)
                dicts.append({
                    "file_name": path, "image_id": i, "height": 40, "width": 30,
                    "annotations": [
                        {"bbox": [1, 1, 5, 5], "bbox_mode": 1, "category_id": i % 3}
                        for _ in range(i)
                    ],
                })
            DatasetCatalog.register(name, lambda: dicts)
            MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
            try:
                cfg = _lc_cfg()
                cfg.DATASETS.TRAIN = (name,)
                cfg.DATASETS.TEST = (name,)
                cfg.INPUT.MIN_SIZE_TEST = 40
                cfg.MODEL.LC.CALIBRATION.MAX_IMAGES = 4
                got = [b[0] for b in build_lc_calibration_loader(cfg)]
                self.assertEqual([g["image_id"] for g in got], [0, 3, 6, 9])
                for g in got:
                    i = g["image_id"]
                    expected = [0, 0, 0]
                    expected[i % 3] = i
                    self.assertEqual(g["counts"].tolist(), expected)  # exact, also >= 5
                    self.assertNotIn("instances", g)
                cfg.MODEL.LC.CALIBRATION.MAX_IMAGES = 0
                self.assertEqual(len(list(build_lc_calibration_loader(cfg))), 10)
                cfg.MODEL.LC.CALIBRATION.MAX_IMAGES = -1
                with self.assertRaisesRegex(ValueError, "MAX_IMAGES"):
                    build_lc_calibration_loader(cfg)
            finally:
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)


class TestCalibrationRefusesCollapsedModels(unittest.TestCase):
    """A model forced to a constant output is not calibrated (its constant would become the mean
    training count) and a WARNING names the collapse and what to try."""

    def setUp(self):
        # _model() / _lc_model() reseed torch: later tests that train without a seed of their
        # own (test_ccgr_rounds) must see the global generator as these tests found it
        self.addCleanup(torch.set_rng_state, torch.get_rng_state())

    def test_density(self):
        model = _model()
        with torch.no_grad():
            model.head.weight.zero_()  # the same density everywhere: counts follow the area
        batches = [b for b in _batches()]
        with self.assertLogs("wsis_d2.engine", "WARNING") as logs:
            result = calibrate_density_counts(model, batches, "gain")
        text = "\n".join(r.getMessage() for r in logs.records)
        self.assertIn("COLLAPSED", text)
        self.assertIn("MODEL.PIXEL_MEAN", text)
        self.assertEqual(result["collapsed"], [0])
        self.assertEqual(float(model.count_gain[0]), 1.0)
        # the same batches with the untrained (not constant) model are calibrated
        result = calibrate_density_counts(_model(), batches, "gain")
        self.assertEqual(result["collapsed"], [])
        self.assertNotEqual(result["gain"][0], 1.0)

    def test_lc(self):
        model = _lc_model()
        with torch.no_grad():
            model.head.density_branch[-1].weight.zero_()
        with self.assertLogs("wsis_d2.engine", "WARNING") as logs:
            result = calibrate_lc_counts(model, _lc_batches(), lower_count=5)
        self.assertIn("LC count calibration: the model has COLLAPSED", logs.output[0])
        self.assertEqual(result["collapsed"], [0, 1, 2])
        self.assertEqual(model.count_gain.tolist(), [1.0] * 3)
        self.assertEqual(calibrate_lc_counts(_lc_model(), _lc_batches(), 5)["collapsed"], [])


if __name__ == "__main__":
    unittest.main()
