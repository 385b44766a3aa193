"""counting_metrics and CountingEvaluator against hand-computed values."""

import json
import math
import os
import tempfile
import unittest
import uuid
from unittest import mock

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from wsis_d2.evaluation import CountingEvaluator, counting_metrics
from wsis_d2.evaluation import counting as counting_module
from wsis_d2.evaluation import gather as gather_module

# 3 images x 2 classes
GT = np.array([[0, 2], [1, 0], [3, 0]], dtype=np.float64)
PRED = np.array([[1, 2], [1, 1], [1, 0]], dtype=np.float64)
# class 0: errors 1, 0, -2 -> squared 1, 0, 4; divided by (c + 1): 1/1, 0/2, 4/4
#          non-zero images 1, 2 -> squared 0, 4; relative 0, 1
# class 1: errors 0, 1, 0 -> squared 0, 1, 0; divided by (c + 1): 0/3, 1/1, 0/1
#          non-zero image 0 -> squared 0; relative 0
RMSE = [math.sqrt(5 / 3), math.sqrt(1 / 3)]
REL = [math.sqrt(2 / 3), math.sqrt(1 / 3)]
RMSE_NZ = [math.sqrt(4 / 2), 0.0]
REL_NZ = [math.sqrt(1 / 2), 0.0]
MAE = [3 / 3, 1 / 3]


class TestCountingMetrics(unittest.TestCase):
    def test_hand_computed(self):
        m = counting_metrics(PRED, GT)
        np.testing.assert_allclose(m["RMSE_c"], RMSE)
        np.testing.assert_allclose(m["relRMSE_c"], REL)
        np.testing.assert_allclose(m["RMSE_nz_c"], RMSE_NZ)
        np.testing.assert_allclose(m["relRMSE_nz_c"], REL_NZ)
        np.testing.assert_allclose(m["MAE_c"], MAE)
        self.assertAlmostEqual(m["mRMSE"], np.mean(RMSE))
        self.assertAlmostEqual(m["m_relRMSE"], np.mean(REL))
        self.assertAlmostEqual(m["mRMSE_nz"], np.mean(RMSE_NZ))
        self.assertAlmostEqual(m["m_relRMSE_nz"], np.mean(REL_NZ))
        self.assertAlmostEqual(m["MAE"], 2 / 3)

    def test_class_without_positive_images_excluded_from_nz(self):
        gt = np.concatenate([GT, np.zeros((3, 1))], axis=1)
        pred = np.concatenate([PRED, np.array([[2.0], [0.0], [0.0]])], axis=1)
        m = counting_metrics(pred, gt)
        self.assertTrue(np.isnan(m["RMSE_nz_c"][2]))
        self.assertAlmostEqual(m["mRMSE_nz"], np.mean(RMSE_NZ))
        self.assertAlmostEqual(m["m_relRMSE_nz"], np.mean(REL_NZ))
        # but it counts in the plain means: RMSE_2 = sqrt(4 / 3), relRMSE_2 = sqrt(4 / 3)
        self.assertAlmostEqual(m["mRMSE"], np.mean(RMSE + [math.sqrt(4 / 3)]))
        self.assertAlmostEqual(m["m_relRMSE"], np.mean(REL + [math.sqrt(4 / 3)]))
        self.assertAlmostEqual(m["MAE"], np.mean(MAE + [2 / 3]))

    def test_all_zero_gt_gives_nan_nz(self):
        m = counting_metrics(np.ones((2, 2)), np.zeros((2, 2)))
        self.assertTrue(math.isnan(m["mRMSE_nz"]))
        self.assertAlmostEqual(m["mRMSE"], 1.0)
        self.assertAlmostEqual(m["m_relRMSE"], 1.0)

    def test_fractional_predictions_not_rounded(self):
        m = counting_metrics(np.array([[1.5]]), np.array([[1.0]]))
        self.assertAlmostEqual(m["mRMSE"], 0.5)
        self.assertAlmostEqual(m["m_relRMSE"], math.sqrt(0.25 / 2))

    def test_bad_shapes_raise(self):
        with self.assertRaisesRegex(ValueError, "pred"):
            counting_metrics(np.zeros((2, 3)), np.zeros((2, 2)))
        with self.assertRaisesRegex(ValueError, "gt"):
            counting_metrics(np.zeros((1, 1)), -np.ones((1, 1)))


def ann(cls, iscrowd=0):
    return {
        "bbox": [0.0, 0.0, 2.0, 2.0],
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": cls,
        "point": [1.0, 1.0],
        "iscrowd": iscrowd,
    }


class TestCountingEvaluator(unittest.TestCase):
    def setUp(self):
        # image 0 and 1 give class_counts; image 2 only annotations (one crowd, not counted)
        records = [
            {"file_name": "0.png", "image_id": "i0", "height": 4, "width": 4,
             "class_counts": [0, 2]},
            {"file_name": "1.png", "image_id": "i1", "height": 4, "width": 4,
             "class_counts": [1, 0]},
            {"file_name": "2.png", "image_id": "i2", "height": 4, "width": 4,
             "annotations": [ann(0), ann(0), ann(0), ann(1, iscrowd=1)]},
        ]  # fmt: skip
        self.name = f"_test_counting_{uuid.uuid4().hex}"
        DatasetCatalog.register(self.name, lambda: records)
        MetadataCatalog.get(self.name).set(thing_classes=["cat", "dog"])
        self.inputs = [{"image_id": r["image_id"], "file_name": r["file_name"]} for r in records]
        self.outputs = [{"counts": torch.tensor(p, dtype=torch.float32)} for p in PRED]

    def tearDown(self):
        DatasetCatalog.remove(self.name)
        MetadataCatalog.remove(self.name)

    def check(self, res):
        self.assertAlmostEqual(res["mRMSE"], np.mean(RMSE), places=6)
        self.assertAlmostEqual(res["mRMSE_nz"], np.mean(RMSE_NZ), places=6)
        self.assertAlmostEqual(res["m_relRMSE"], np.mean(REL), places=6)
        self.assertAlmostEqual(res["m_relRMSE_nz"], np.mean(REL_NZ), places=6)
        self.assertAlmostEqual(res["MAE"], 2 / 3, places=6)
        self.assertAlmostEqual(res["MAE/cat"], MAE[0], places=6)
        self.assertAlmostEqual(res["MAE/dog"], MAE[1], places=6)

    def test_hand_computed_through_evaluator(self):
        ev = CountingEvaluator(self.name, distributed=False)
        ev.reset()
        # processed in a scrambled order, two per batch
        order = [2, 0, 1]
        ev.process([self.inputs[i] for i in order[:2]], [self.outputs[i] for i in order[:2]])
        ev.process([self.inputs[order[2]]], [self.outputs[order[2]]])
        self.check(ev.evaluate()["counting"])

    def test_mean_count_baseline(self):
        # "training" set: mean counts (cat, dog) = (2, 0.5)
        train = f"{self.name}_train"
        DatasetCatalog.register(
            train,
            lambda: [
                {"file_name": "a", "image_id": "a", "class_counts": [3, 1]},
                {"file_name": "b", "image_id": "b", "class_counts": [1, 0]},
            ],
        )
        MetadataCatalog.get(train).set(thing_classes=["cat", "dog"])
        try:
            ev = CountingEvaluator(self.name, distributed=False, baseline_dataset=train)
            ev.process(self.inputs, self.outputs)
            with self.assertLogs(counting_module.logger, level="INFO") as logs:
                res = ev.evaluate()["counting"]
            self.check(res)
            # GT (cat, dog): (0, 2), (1, 0), (3, 0); per-class RMSE of predicting (2, 0.5)
            gt = np.array([[0, 2], [1, 0], [3, 0]], dtype=float)
            rmse = np.sqrt(((gt - np.array([2.0, 0.5])) ** 2).mean(axis=0))
            self.assertAlmostEqual(res["baseline_mRMSE"], rmse.mean(), places=9)
            self.assertAlmostEqual(res["mRMSE/baseline"], np.mean(RMSE) / rmse.mean(), places=9)
            self.assertTrue(any("x baseline" in r.getMessage() for r in logs.records))
            MetadataCatalog.get(f"{train}_other").set(thing_classes=["cat", "cow"])
            with self.assertRaisesRegex(ValueError, f"{train}_other"):
                CountingEvaluator(self.name, baseline_dataset=f"{train}_other")
        finally:
            DatasetCatalog.remove(train)
            MetadataCatalog.remove(train)
            MetadataCatalog.remove(f"{train}_other")

    def test_logs_predicted_and_true_counts_of_first_images(self):
        ev = CountingEvaluator(self.name, distributed=False)
        ev.num_examples = 2
        ev.process(self.inputs, self.outputs)
        with self.assertLogs(counting_module.logger, level="INFO") as logs:
            ev.evaluate()
        table = [r.getMessage() for r in logs.records if "pred/true" in r.getMessage()]
        self.assertEqual(len(table), 1)
        lines = table[0].splitlines()
        self.assertEqual(len(lines), 3)  # header + the first two images in dataset order
        self.assertTrue(lines[1].startswith("  image i0: "), lines[1])
        self.assertIn(f"dog {PRED[0][1]:g}/2", lines[1])
        self.assertTrue(lines[2].startswith("  image i1: "), lines[2])
        self.assertIn(f"cat {PRED[1][0]:g}/1", lines[2])

    def test_missing_counts_skipped_once(self):
        ev = CountingEvaluator(self.name, distributed=False)
        with self.assertLogs(counting_module.logger, level="WARNING") as logs:
            ev.process(self.inputs[:2], [{"instances": None}, {"density": None}])
        self.assertEqual(len(logs.records), 1)
        ev.process(self.inputs[2:], self.outputs[2:])
        res = ev.evaluate()["counting"]
        # only image 2 evaluated: errors (-2, 0), gt (3, 0)
        self.assertAlmostEqual(res["mRMSE"], 1.0, places=6)
        self.assertAlmostEqual(res["m_relRMSE"], (1.0 + 0.0) / 2, places=6)
        self.assertAlmostEqual(res["mRMSE_nz"], 2.0, places=6)

    def test_distributed_gather_and_json(self):
        evs = [CountingEvaluator(self.name, distributed=True) for _ in range(2)]
        evs[0].process(self.inputs[:1], self.outputs[:1])
        evs[1].process(self.inputs[1:], self.outputs[1:])
        comm = gather_module.comm  # the evaluators gather through wsis_d2.evaluation.gather
        parts = [evs[1]._predictions, evs[0]._predictions]
        with tempfile.TemporaryDirectory() as d:
            evs[0]._output_dir = d
            with mock.patch.object(comm, "gather", return_value=parts), mock.patch.object(
                comm, "synchronize"
            ), mock.patch.object(comm, "is_main_process", return_value=True):
                res = evs[0].evaluate()["counting"]
            with open(os.path.join(d, "counting.json")) as f:
                saved = json.load(f)
        self.check(res)
        self.assertAlmostEqual(saved["per_class"]["RMSE_c"]["cat"], RMSE[0], places=6)
        with mock.patch.object(comm, "gather", return_value=[]), mock.patch.object(
            comm, "synchronize"
        ), mock.patch.object(comm, "is_main_process", return_value=False):
            self.assertEqual(evs[1].evaluate(), {})

    def test_bad_inputs_raise(self):
        ev = CountingEvaluator(self.name, distributed=False)
        with self.assertRaisesRegex(ValueError, "counts"):
            ev.process(self.inputs[:1], [{"counts": torch.zeros(3)}])
        ev.process([{"image_id": "nope"}], self.outputs[:1])
        with self.assertRaisesRegex(ValueError, "nope"):
            ev.evaluate()


class TestCountingBadInputsNamed(unittest.TestCase):
    setUp = TestCountingEvaluator.setUp
    tearDown = TestCountingEvaluator.tearDown

    def test_nan_counts_are_rejected_with_the_image_id(self):
        ev = CountingEvaluator(self.name, distributed=False)
        bad = {"counts": torch.tensor([1.0, float("nan")])}
        image_id = self.inputs[0]["image_id"]
        with self.assertRaisesRegex(
            ValueError, f"'counts' of image_id {image_id!r} .*must be finite, got \\[1.0, nan\\]"
        ):
            ev.process(self.inputs[:1], [bad])

    def test_counting_metrics(self):
        with self.assertRaisesRegex(ValueError, "'pred' contains NaN"):
            counting_metrics(np.array([[np.nan]]), np.array([[1.0]]))
        with self.assertRaisesRegex(ValueError, "'gt' must be finite and >= 0"):
            counting_metrics(np.array([[1.0]]), np.array([[-1.0]]))


if __name__ == "__main__":
    unittest.main()
