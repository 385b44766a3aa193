"""wsis_d2.engine.health: a counting model collapsed to a constant output is reported at the end
of training (spread of its counts on training images, loss at the best constant output's)."""

import copy
import logging
import os
import tempfile
import unittest
import uuid
from types import SimpleNamespace

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.events import EventStorage

import wsis_d2  # noqa: F401  (registers models, mappers)
from wsis_d2 import add_wsis_config
from wsis_d2.data.datasets.cells import GENERATOR_SPEC, prepare_synthetic_cells
from wsis_d2.data.datasets.point_datasets import load_point_json, register_point_dataset
from wsis_d2.engine import CountHealthCheck, WSISTrainer, collapsed_classes
from wsis_d2.lc.calibration import lc_trainer_hooks
from wsis_d2.engine.health import loss_at_constant_output
from wsis_d2.testing import config_path, tiny_lc_config

HEALTH_LOGGER = "wsis_d2.engine.health"


class TestCollapseMeasures(unittest.TestCase):
    def test_collapsed_classes(self):
        true = torch.tensor([[3.0, 0.0], [9.0, 0.0], [15.0, 0.0], [6.0, 0.0]])
        working = true * 0.9 + torch.tensor([[0.4, 0.0], [-0.3, 0.0], [0.2, 0.0], [0.0, 0.0]])
        self.assertEqual(collapsed_classes(working, true), [])
        self.assertEqual(collapsed_classes(working * 0.01, true), [])  # uncalibrated scale
        self.assertEqual(collapsed_classes(torch.zeros(4, 2), true), [0])
        constant = torch.full((4, 2), 8.25)
        self.assertEqual(collapsed_classes(constant, true), [0])  # class 1 has no spread to lose
        # a constant output map on images of different sizes: counts follow the area only
        areas = torch.tensor([100.0, 300.0, 200.0, 400.0])
        per_area = areas[:, None] * 0.03 * torch.ones(1, 2)
        self.assertEqual(collapsed_classes(per_area, true), [])
        self.assertEqual(collapsed_classes(per_area, true, areas), [0])
        self.assertEqual(collapsed_classes(true[:1], true[:1]), [])  # one image: no spread
        nan = working.clone()
        nan[2, 0] = float("nan")
        self.assertEqual(collapsed_classes(nan, true), [0, 1])
        with self.assertRaisesRegex(ValueError, r"'pred' and 'true' must both be \(N, C\)"):
            collapsed_classes(constant[:, :1], true)
        with self.assertRaisesRegex(ValueError, r"'areas' must be \(4,\) positive"):
            collapsed_classes(constant, true, areas[:3])

    def test_loss_at_constant_output(self):
        self.assertTrue(loss_at_constant_output([1.0, 1.02, 0.99], [1.0, 1.0, 1.01]))
        self.assertFalse(loss_at_constant_output([0.3, 0.35, 0.31], [1.0, 1.0, 1.01]))
        self.assertFalse(loss_at_constant_output([], [1.0]))

    def test_hook_loss_check_reads_the_storage(self):
        cfg = get_cfg()
        add_wsis_config(cfg)
        for losses, warned in (([2.0] * 5, True), ([0.5] * 5, False)):
            hook = CountHealthCheck(cfg, None, "density training", window=5)
            with EventStorage() as storage:
                for it, value in enumerate(losses):
                    storage.iter = it
                    storage.put_scalar("loss_density", value)
                    storage.put_scalar("density/loss_constant", 1.9)
                hook.trainer = SimpleNamespace(storage=storage, iter=4, max_iter=5)
                with self.assertLogs(HEALTH_LOGGER, logging.INFO) as logs:
                    hook.after_step()
                    logging.getLogger(HEALTH_LOGGER).info("end")
            text = "\n".join(r.getMessage() for r in logs.records)
            self.assertEqual("COLLAPSED" in text, warned, text)
            self.assertEqual(hook.report["loss_at_constant"], warned)


class TestCollapsedDensityTraining(unittest.TestCase):
    """A U-Net whose output is forced constant (head weights 0, learning rate 0) is reported."""

    @classmethod
    def setUpClass(cls):
        cls._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cls.tmp = tempfile.TemporaryDirectory()
        spec = copy.deepcopy(GENERATOR_SPEC)
        spec["image_size"] = [40, 48]
        spec["num_cells"] = [2, 14]
        image_root, json_file = prepare_synthetic_cells(
            cls.tmp.name, "health", num_images=4, seed=3, spec=spec
        )
        records = load_point_json(json_file, image_root)
        counts = [len(r["points"]) for r in records]
        assert len(set(counts)) > 1, counts  # the true counts must have a spread
        cls.name = f"density_health_{uuid.uuid4().hex[:8]}"
        register_point_dataset(cls.name, lambda: records, thing_classes=["cell"])

    @classmethod
    def tearDownClass(cls):
        DatasetCatalog.remove(cls.name)
        MetadataCatalog.remove(cls.name)
        cls.tmp.cleanup()
        torch.set_num_threads(cls._threads)

    def _trainer(self, calibration: str) -> WSISTrainer:
        cfg = get_cfg()
        add_wsis_config(cfg)
        cfg.merge_from_file(config_path("demo", "density_unet_cells_demo.yaml"))
        cfg.MODEL.UNET.CHANNELS = [4, 8, 8]
        cfg.MODEL.UNET.MID_CHANNELS = 8
        cfg.INPUT.CROP.SIZE = [32, 32]
        cfg.DATASETS.TRAIN = (self.name,)
        cfg.DATASETS.TEST = ()
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.SOLVER.MAX_ITER = 3
        # the model stays at its constant head; a constant schedule: upstream's cosine one
        # divides by BASE_LR
        cfg.SOLVER.BASE_LR = 0.0
        cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
        cfg.SOLVER.STEPS = ()
        cfg.SOLVER.WARMUP_ITERS = 0
        cfg.SOLVER.CHECKPOINT_PERIOD = 1000
        cfg.MODEL.DENSITY.CALIBRATION.MODE = calibration
        cfg.OUTPUT_DIR = os.path.join(self.tmp.name, f"out_{calibration}")
        trainer = WSISTrainer(cfg)
        with torch.no_grad():
            trainer.model.head.weight.zero_()
            trainer.model.head.bias.fill_(0.5)
        return trainer

    def _train(self, trainer):
        with self.assertLogs("wsis_d2", logging.WARNING) as logs:
            trainer.train()
        return "\n".join(r.getMessage() for r in logs.records if r.levelno >= logging.WARNING)

    def test_reported_without_calibration(self):
        trainer = self._trainer("none")
        hook = next(h for h in trainer._hooks if isinstance(h, CountHealthCheck))
        warnings = self._train(trainer)
        self.assertEqual(hook.report["collapsed_classes"], [0])
        self.assertTrue(hook.report["loss_at_constant"])
        self.assertIn("COLLAPSED to a constant count on 4 training images", warnings)
        self.assertIn("loss of the best constant output", warnings)
        self.assertIn("MODEL.PIXEL_MEAN", warnings)
        self.assertIn("BASE_LR", warnings)

    def test_calibration_refuses_a_collapsed_model(self):
        trainer = self._trainer("gain")
        warnings = self._train(trainer)
        self.assertIn("count calibration: the model has COLLAPSED", warnings)
        self.assertIn("left off for the collapsed classes [0]", warnings)
        # without the refusal the gain would map the constant to the mean training count
        self.assertEqual(float(trainer.model.count_gain[0]), 1.0)
        self.assertEqual(trainer.storage.history("density/calibration_gain_0").latest(), 1.0)


class TestCollapsedLCModel(unittest.TestCase):
    """The hook's spread check on an LC model without calibration: its density branch forced
    constant (last conv weights 0) gives counts that follow the image area only."""

    def test_reported(self):
        import numpy as np
        from detectron2.modeling import build_model
        from PIL import Image

        self.addCleanup(torch.set_rng_state, torch.get_rng_state())
        name = f"lc_health_{uuid.uuid4().hex[:8]}"
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        dicts = []
        for i, (h, w) in enumerate([(40, 30), (48, 40), (36, 52), (44, 44), (40, 56)]):
            path = os.path.join(tmp.name, f"im{i}.png")
            rng = np.random.default_rng(i)
            pixels = rng.integers(0, 60 + 40 * i, (h, w, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(path)
            dicts.append({"file_name": path, "image_id": i, "height": h, "width": w,
                          "class_counts": [i + 1, (2 * i) % 5, 0]})  # fmt: skip
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
        self.addCleanup(DatasetCatalog.remove, name)
        self.addCleanup(MetadataCatalog.remove, name)
        cfg = tiny_lc_config(3)
        cfg.DATASETS.TRAIN = (name,)
        cfg.INPUT.MIN_SIZE_TEST = 0  # the images' own sizes
        torch.manual_seed(0)
        model = build_model(cfg)
        hook = next(h for h in lc_trainer_hooks(cfg) if isinstance(h, CountHealthCheck))
        hook.trainer = SimpleNamespace(model=model, iter=0, max_iter=1, storage=EventStorage())
        hook.after_step()
        self.assertEqual(hook.report["collapsed_classes"], [])  # random weights: not constant
        with torch.no_grad():
            model.head.density_branch[-1].weight.zero_()
            model.head.density_branch[-1].bias.fill_(0.02)
        with self.assertLogs(HEALTH_LOGGER, logging.WARNING) as logs:
            hook.after_step()
        self.assertEqual(hook.report["collapsed_classes"], [0, 1])  # class 2: never present
        self.assertIn("LC training: the model has COLLAPSED", logs.output[0])


if __name__ == "__main__":
    unittest.main()
