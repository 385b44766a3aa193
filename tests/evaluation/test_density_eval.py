"""GAME, count errors and DensityEvaluator against hand-computed values."""

import json
import math
import os
import tempfile
import unittest
import uuid

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from wsis_d2.evaluation import DensityEvaluator
from wsis_d2.evaluation.density import count_errors, game

# 4x4 density and four true points, one per quadrant
DENSITY = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.5],
        [0.0, 0.0, 2.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
)
POINTS = np.array([[0.5, 0.5], [3.2, 0.9], [3.9, 3.9], [1.0, 3.0]])  # x, y


class TestGame(unittest.TestCase):
    def test_hand_computed(self):
        # L=0: |3.5 - 4| ; L=1: quadrants pred (TL 1, TR .5, BL 0, BR 2) vs true (1, 1, 1, 1)
        self.assertAlmostEqual(game(DENSITY, POINTS, 0), 0.5)
        self.assertAlmostEqual(game(DENSITY, POINTS, 1), 0.0 + 0.5 + 1.0 + 1.0)
        # L=2: one cell per pixel: pixels (1,3) .5, (2,2) 2 wrong; (0,3), (3,3), (3,1) missed
        self.assertAlmostEqual(game(DENSITY, POINTS, 2), 0.5 + 2.0 + 1.0 + 1.0 + 1.0)
        # L=3 on a 4x4 image: some cells are empty, the others are single pixels again
        self.assertAlmostEqual(game(DENSITY, POINTS, 3), 5.5)

    def test_odd_size_and_classes(self):
        # 5x3 image, L=1: rows [0, 2) [2, 5) (round(2.5) = 2), cols [0, 2) [2, 3)
        density = np.zeros((2, 5, 3))
        density[0, 4, 2] = 1.0  # class 0, bottom-right
        density[1, 0, 0] = 2.0  # class 1, top-left
        points = np.array([[2.5, 4.5], [0.5, 1.9], [2.9, 0.1]])
        classes = np.array([0, 1, 1])
        # class 0: exact (0); class 1: TL pred 2 true 1 -> 1, TR pred 0 true 1 -> 1
        self.assertAlmostEqual(game(density, points, 1, classes), (0.0 + 2.0) / 2)
        # a point on the far border belongs to the last cell
        self.assertAlmostEqual(game(np.ones((1, 2, 2)) / 4, np.array([[2.0, 2.0]]), 1), 1.5)

    def test_no_points(self):
        self.assertAlmostEqual(game(np.full((3, 7), 0.1), np.zeros((0, 2)), 2), 2.1)


class TestCountErrors(unittest.TestCase):
    def test_hand_computed(self):
        e = count_errors(np.array([[10.0], [5.0], [0.0]]), np.array([[8.0], [5.0], [2.0]]))
        self.assertAlmostEqual(e["MAE"], 4 / 3)
        self.assertAlmostEqual(e["RMSE"], math.sqrt(8 / 3))
        self.assertAlmostEqual(e["MRE"], 100 * (2 / 8 + 0 / 5 + 2 / 2) / 3)
        e = count_errors(np.array([[1.0, 3.0]]), np.array([[0.0, 1.0]]))
        np.testing.assert_allclose(e["MAE_c"], [1.0, 2.0])
        self.assertAlmostEqual(e["MRE"], 200.0)  # the zero-count entry is left out
        with self.assertRaises(ValueError):
            count_errors(np.zeros((2, 1)), np.zeros((3, 1)))


class TestDensityEvaluator(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.name = f"test_density_eval_{uuid.uuid4().hex[:8]}"
        specs = [
            ((5, 7), [[1.0, 1.0], [6.0, 4.0]]),
            ((3, 4), []),
            ((6, 6), [[1, 1], [5, 1], [1, 5], [5, 5]]),
        ]
        self.records = []
        for i, ((h, w), pts) in enumerate(specs):
            path = os.path.join(self.tmp.name, f"{i}.png")
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
            self.records.append(
                {
                    "file_name": path,
                    "height": h,
                    "width": w,
                    "image_id": i,
                    "points": np.asarray(pts, np.float32).reshape(-1, 2),
                    "point_classes": np.zeros(len(pts), np.int64),
                }
            )
        DatasetCatalog.register(self.name, lambda: self.records)
        MetadataCatalog.get(self.name).set(thing_classes=["cell"], evaluator_type="density")

    def tearDown(self):
        DatasetCatalog.remove(self.name)
        MetadataCatalog.remove(self.name)
        self.tmp.cleanup()

    def test_metrics_and_files(self):
        out_dir = os.path.join(self.tmp.name, "out")
        ev = DensityEvaluator(self.name, output_dir=out_dir, distributed=False)
        ev.reset()
        totals = [3.0, 0.5, 4.0]  # errors 1, 0.5, 0
        inputs = [{"image_id": r["image_id"]} for r in self.records]
        outputs = []
        for r, total in zip(self.records, totals):
            d = torch.full((1, r["height"], r["width"]), total / (r["height"] * r["width"]))
            outputs.append({"density": d, "counts": d.sum(dim=(1, 2))})
        ev.process(inputs[:2], outputs[:2])
        with self.assertLogs("wsis_d2.evaluation.density", "WARNING"):
            ev.process([inputs[2], inputs[2]], [{"counts": torch.ones(1)}, outputs[2]])
        res = ev.evaluate()["density"]
        self.assertAlmostEqual(res["MAE"], 1.5 / 3, places=5)
        self.assertAlmostEqual(res["RMSE"], math.sqrt((1 + 0.25) / 3), places=5)
        self.assertAlmostEqual(res["MRE"], 100 * (1 / 2 + 0) / 2, places=4)
        self.assertAlmostEqual(res["GAME0"], res["MAE"], places=5)
        expected_game2 = np.mean(
            [game(o["density"].numpy(), r["points"], 2) for o, r in zip(outputs, self.records)]
        )
        self.assertAlmostEqual(res["GAME2"], expected_game2, places=5)
        # uniform density on image 0 (5x7), L=1 cells rows [0,2) [2,5), cols [0,4) [4,7)
        per_pixel = 3.0 / 35
        cells = np.array([8, 6, 12, 9]) * per_pixel
        true = np.array([1, 0, 0, 1])
        g1_img0 = np.abs(cells - true).sum()
        g1_img1 = 0.5
        g1_img2 = 0.0  # one point per quadrant, 1.0 each
        self.assertAlmostEqual(res["GAME1"], (g1_img0 + g1_img1 + g1_img2) / 3, places=5)
        for f in (
            "density_eval.json",
            "density_scatter.png",
            "density_overlay_0.png",
            "density_overlay_2.png",
        ):
            self.assertTrue(os.path.isfile(os.path.join(out_dir, f)), f)
        with open(os.path.join(out_dir, "density_eval.json")) as f:
            self.assertEqual(len(json.load(f)["images"]), 3)

    def test_unknown_image_and_wrong_size(self):
        ev = DensityEvaluator(self.name, distributed=False)
        with self.assertRaisesRegex(ValueError, "image_id 42"):
            ev.process([{"image_id": 42}], [{"density": torch.zeros(1, 5, 7)}])
        with self.assertRaisesRegex(ValueError, "0.png"):
            ev.process([{"image_id": 0}], [{"density": torch.zeros(1, 4, 7)}])
        self.assertEqual(ev.evaluate(), {})


class TestDensityBadInputsNamed(unittest.TestCase):
    setUp = TestDensityEvaluator.setUp
    tearDown = TestDensityEvaluator.tearDown

    def test_nan_density_is_rejected_with_the_image_id(self):
        ev = DensityEvaluator(self.name, distributed=False)
        density = torch.zeros(1, 5, 7)
        density[0, 2, 3] = float("nan")
        with self.assertRaisesRegex(ValueError, r"image_id 0 .*'density' must not contain NaN"):
            ev.process([{"image_id": 0}], [{"density": density, "counts": torch.zeros(1)}])
        with self.assertRaisesRegex(ValueError, r"image_id 0 .*'counts' must not contain NaN"):
            ev.process(
                [{"image_id": 0}],
                [{"density": torch.zeros(1, 5, 7), "counts": torch.tensor([float("nan")])}],
            )
        with self.assertRaisesRegex(ValueError, r"'counts' must have shape \(1,\)"):
            ev.process(
                [{"image_id": 0}], [{"density": torch.zeros(1, 5, 7), "counts": torch.zeros(2)}]
            )

    def test_game(self):
        with self.assertRaisesRegex(
            ValueError, r"'points' must have shape \(\*, 2\), got \(2, 3\)"
        ):
            game(DENSITY, np.zeros((2, 3)), 1)
        with self.assertRaisesRegex(ValueError, r"'level' must lie in \[0, inf\], got -1"):
            game(DENSITY, POINTS, -1)
        with self.assertRaisesRegex(TypeError, "'level' must be an integer, got 1.5"):
            game(DENSITY, POINTS, 1.5)
        with self.assertRaisesRegex(ValueError, "'density' must not contain NaN"):
            game(np.full((4, 4), np.nan), POINTS, 0)
        with self.assertRaisesRegex(
            ValueError, r"'classes' must lie in 0..0 \(C of density\), got 0..2"
        ):
            game(DENSITY, POINTS, 0, classes=np.array([0, 0, 2, 0]))
        with self.assertRaisesRegex(ValueError, r"'classes' must have shape \(4,\), got \(3,\)"):
            game(DENSITY, POINTS, 0, classes=np.zeros(3, np.int64))
        with self.assertRaisesRegex(ValueError, "'density' must have 2 or 3 dimensions"):
            game(DENSITY.reshape(-1), POINTS, 0)

    def test_count_errors(self):
        with self.assertRaisesRegex(ValueError, "'pred' must not contain NaN"):
            count_errors(np.array([[np.nan]]), np.array([[1.0]]))
        with self.assertRaisesRegex(ValueError, "'gt' must be >= 0"):
            count_errors(np.array([[1.0]]), np.array([[-2.0]]))
        with self.assertRaisesRegex(ValueError, "'pred' and 'gt' must be equal"):
            count_errors(np.zeros((2, 1)), np.zeros((1, 2)))


if __name__ == "__main__":
    unittest.main()
