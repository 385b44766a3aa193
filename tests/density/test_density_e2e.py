"""The whole density pipeline from a config: dataset -> mapper -> train loader -> DensityCounter ->
training steps in the config's loop (bfloat16 autocast) -> inference_on_dataset with
DensityEvaluator (odd sizes, an empty image); and the same config through WSISTrainer."""

import copy
import os
import tempfile
import unittest
import uuid

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from PIL import Image

import wsis_d2  # noqa: F401  (registers models, mappers)
from wsis_d2 import add_wsis_config
from wsis_d2.data import build_dataset_mapper
from wsis_d2.data.datasets.cells import GENERATOR_SPEC, prepare_synthetic_cells
from wsis_d2.data.datasets.point_datasets import load_point_json, register_point_dataset
from wsis_d2.engine import AutocastTrainer, WSISTrainer, build_train_loop
from wsis_d2.evaluation import DensityEvaluator
from wsis_d2.testing import config_path


class TestDensityPipeline(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cls.tmp = tempfile.TemporaryDirectory()
        spec = copy.deepcopy(GENERATOR_SPEC)
        spec["image_size"] = [45, 61]
        spec["num_cells"] = [5, 15]
        image_root, json_file = prepare_synthetic_cells(
            cls.tmp.name, "e2e", num_images=3, seed=5, spec=spec
        )
        empty = os.path.join(cls.tmp.name, "empty.png")
        Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(empty)
        records = load_point_json(json_file, image_root)
        records.append(
            {
                "file_name": empty,
                "height": 37,
                "width": 53,
                "image_id": "empty",
                "points": np.zeros((0, 2), np.float32),
                "point_classes": np.zeros(0, np.int64),
            }
        )
        cls.records = records
        cls.name = f"density_e2e_{uuid.uuid4().hex[:8]}"
        register_point_dataset(cls.name, lambda: cls.records, thing_classes=["cell"])

    @classmethod
    def tearDownClass(cls):
        DatasetCatalog.remove(cls.name)
        MetadataCatalog.remove(cls.name)
        cls.tmp.cleanup()
        torch.set_num_threads(cls._threads)

    def _demo_cfg(self):
        cfg = get_cfg()
        add_wsis_config(cfg)
        cfg.merge_from_file(config_path("demo", "density_unet_cells_demo.yaml"))
        cfg.MODEL.UNET.CHANNELS = [4, 8, 8]
        cfg.MODEL.UNET.MID_CHANNELS = 8
        cfg.INPUT.CROP.SIZE = [32, 32]
        cfg.DATASETS.TRAIN = (self.name,)
        cfg.DATASETS.TEST = (self.name,)
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.SOLVER.IMS_PER_BATCH = 2
        # the bfloat16 loop also on CPUs without native bfloat16 (there it only runs slower)
        cfg.SOLVER.AMP.BF16_FALLBACK = False
        return cfg

    def test_train_and_evaluate_from_demo_config(self):
        cfg = self._demo_cfg()
        self.assertEqual(MetadataCatalog.get(self.name).evaluator_type, "density")

        model = build_model(cfg)
        loader = build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, True))
        trainer = build_train_loop(cfg, model, loader, build_optimizer(cfg, model))
        self.assertIsInstance(trainer, AutocastTrainer)  # the cells configs train in bfloat16
        trainer.train(0, 3)
        self.assertTrue(np.isfinite(trainer.storage.history("total_loss").latest()))

        evaluator = DensityEvaluator(self.name, output_dir=os.path.join(self.tmp.name, "eval"))
        test_loader = build_detection_test_loader(
            cfg, self.name, mapper=build_dataset_mapper(cfg, False)
        )
        results = inference_on_dataset(model, test_loader, evaluator)["density"]
        for key in ("MAE", "RMSE", "MRE", "GAME0", "GAME1", "GAME2", "GAME3"):
            self.assertTrue(np.isfinite(results[key]), key)
        self.assertAlmostEqual(results["GAME0"], results["MAE"], places=3)
        self.assertTrue(os.path.isfile(os.path.join(self.tmp.name, "eval", "density_scatter.png")))

    def test_train_net_trainer_runs_the_autocast_loop(self):
        # tools/train_net.py's trainer (WSISTrainer) with the config's SOLVER.AMP bfloat16
        cfg = self._demo_cfg()
        cfg.OUTPUT_DIR = os.path.join(self.tmp.name, "train_net")
        cfg.SOLVER.MAX_ITER = 2
        cfg.SOLVER.WARMUP_ITERS = 1
        cfg.SOLVER.CHECKPOINT_PERIOD = 100
        trainer = WSISTrainer(cfg)
        self.assertIsInstance(trainer, WSISTrainer)
        self.assertIsInstance(trainer._trainer, AutocastTrainer)
        self.assertTrue(trainer.cfg.SOLVER.AMP.ENABLED)
        # the count calibration (Base-Density: affine) runs before the final checkpoint
        names = [type(h).__name__ for h in trainer._hooks]
        self.assertLess(names.index("DensityCountCalibration"), names.index("PeriodicCheckpointer"))
        trainer.train()  # 2 bfloat16 steps, calibration, then DensityEvaluator at the end
        self.assertEqual(trainer.iter, 2)  # max_iter after a finished run
        self.assertTrue(np.isfinite(trainer.storage.history("total_loss").latest()))
        self.assertTrue(np.isfinite(trainer._last_eval_results["density"]["MAE"]))
        # the fit of a 2-step model may be refused (non-positive gain: the identity is kept and
        # logged), so only the logged value and the checkpoint are checked here (the fit itself:
        # tests/engine/test_calibration.py)
        gain = float(trainer.model.count_gain[0])
        logged = trainer.storage.history("density/calibration_gain_0").latest()
        self.assertAlmostEqual(logged, gain, delta=1e-5 * abs(gain))
        saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
        self.assertEqual(float(saved["model"]["count_gain"][0]), gain)
        self.assertEqual(
            float(saved["model"]["count_offset"][0]), float(trainer.model.count_offset[0])
        )

        cfg.MODEL.DENSITY.CALIBRATION.MODE = "none"
        names = [type(h).__name__ for h in WSISTrainer(cfg)._hooks]
        self.assertNotIn("DensityCountCalibration", names)


if __name__ == "__main__":
    unittest.main()
