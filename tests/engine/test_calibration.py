"""wsis_d2.engine.calibration: the count calibration of density models fitted after training."""

import os
import unittest
from types import SimpleNamespace

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import wsis_d2  # noqa: F401  (registers models)
from wsis_d2 import add_wsis_config
from wsis_d2.engine import DensityCountCalibration, calibrate_density_counts
from wsis_d2.modeling.meta_arch.density import fit_count_calibration

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs")


def _model():
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "density_unet_cells.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.UNET.CHANNELS = [4, 8, 8]
    cfg.MODEL.UNET.MID_CHANNELS = 8
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


if __name__ == "__main__":
    unittest.main()
