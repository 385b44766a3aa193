import json
import math
import os
import tempfile
import unittest

import numpy as np

from wsis_d2.ccgr.health import (
    StageHealthError,
    check_health,
    loss_curve_ends,
    positive_pairs,
    prior_bce,
    training_health,
)


def _write_metrics(path, losses, extra=None):
    with open(path, "w") as f:
        for i, loss in enumerate(losses):
            row = {"iteration": 20 * i + 19, "total_loss": loss}
            if extra and i in extra:
                row.update(extra[i])
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"iteration": 20 * len(losses), "data_time": 0.1}) + "\n")


class TestStageHealth(unittest.TestCase):
    def test_prior_bce(self):
        # class 0 in half the images: ln 2; class 1 in every image and class 2 in none: 0
        labels = np.array([[1, 1, 0], [0, 1, 0]], bool)
        self.assertAlmostEqual(prior_bce(labels), math.log(2) / 3, places=12)
        p = 0.25
        labels = np.array([[1], [0], [0], [0]])
        self.assertAlmostEqual(prior_bce(labels), -(p * math.log(p) + (1 - p) * math.log(1 - p)))
        with self.assertRaisesRegex(ValueError, r"labels: .*\(3,\)"):
            prior_bce(np.zeros(3))

    def test_loss_curve_ends_and_training_health(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "metrics.json")
            losses = [0.7, 0.69, 0.6] + [0.5] * 14 + [0.2, 0.1, 0.12]
            _write_metrics(path, losses)
            first, last = loss_curve_ends(path)  # windows of 2 rows
            self.assertAlmostEqual(first, 0.695)
            self.assertAlmostEqual(last, 0.11)
            h = training_health(path, prior_loss=0.55)
            self.assertAlmostEqual(h["health_loss_drop"], 0.11 / 0.695)
            self.assertAlmostEqual(h["health_loss_over_prior"], 0.11 / 0.55)
            _write_metrics(path, [0.6, float("nan")])
            self.assertTrue(math.isnan(training_health(path)["health_loss_drop"]))
            with self.assertRaisesRegex(ValueError, "missing.json"):
                loss_curve_ends(os.path.join(tmp, "missing.json"))
            with self.assertRaisesRegex(ValueError, "window"):
                loss_curve_ends(path, window=0.0)

    def test_check_health(self):
        ranges = {"a": (0.0, 0.6, "try this"), "b": (0.5, float("inf"), "try that")}
        check_health("s", {"a": 0.3, "b": 2.0, "c": 99.0}, ranges)  # c has no range
        with self.assertRaisesRegex(StageHealthError, r"stage round1/x: a = 0.9.*\[0, 0.6\]. try this"):
            check_health("round1/x", {"a": 0.9, "b": 2.0}, ranges)
        with self.assertRaisesRegex(StageHealthError, "b = 0.1.*try that"):
            check_health("s", {"a": 0.3, "b": 0.1}, ranges)
        with self.assertRaisesRegex(StageHealthError, "a = nan"):
            check_health("s", {"a": float("nan")}, ranges)

    def test_positive_pairs(self):
        self.assertEqual(positive_pairs([np.array([1, 0, 1]), np.array([0, 0, 0])]), 2)


if __name__ == "__main__":
    unittest.main()
