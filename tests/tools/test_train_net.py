"""
End-to-end: tools/train_net.py trains the supervised Mask R-CNN reference (stock detectron2 Mask
R-CNN on the MobileNetV2-FPN backbone, bfloat16 autocast as configured) on the tiny synthetic
splits, evaluates it with the evaluators chosen by evaluator_type, saves, resumes, and the saved
model loads in detectron2's DefaultPredictor; the main job's LC config fits its count calibration
after the last iteration into the final checkpoint.
"""
import os
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.evaluation import DatasetEvaluators

from wsis_d2.engine import WSISTrainer
from wsis_d2.testing import config_path, datasets_root, device_under_test, load_tool
from wsis_d2.evaluation import CountingEvaluator, FastCOCOEvaluator, InstanceAPEvaluator

MASK_RCNN = config_path("mask_rcnn_mnv2_fpn_synthetic.yaml")
LC_DEMO = config_path("demo", "lc_mnv2_synthetic_demo.yaml")


class _Args:
    def __init__(self, config_file, opts, resume=False, eval_only=False):
        self.config_file = config_file
        self.opts = opts
        self.resume = resume
        self.eval_only = eval_only
        self.num_gpus = 0


class TestTrainNet(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.train_net = load_tool("train_net")
        cls.tmp = tempfile.TemporaryDirectory()
        # tiny splits are generated into this temporary data root
        cls.enterClassContext(datasets_root(os.path.join(cls.tmp.name, "data")))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def _opts(self, out, max_iter):
        return [
            "OUTPUT_DIR", out, "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "2",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
            "DATASETS.TRAIN", "('wsis_synth_mini_train',)", "DATASETS.TEST", "('wsis_synth_mini_val',)",
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
            "DATALOADER.NUM_WORKERS", "0", "TEST.WSIS_COCO_EVAL", "False",
            "MODEL.WEIGHTS", "", "MODEL.DEVICE", device_under_test(),
        ]

    def test_train_eval_resume_predict(self):
        cfg_file = MASK_RCNN
        out = os.path.join(self.tmp.name, "run")
        self.train_net.main(_Args(cfg_file, self._opts(out, 2)))
        with open(os.path.join(out, "last_checkpoint")) as f:
            self.assertEqual(f.read().strip(), "model_final.pth")
        weights = os.path.join(out, "model_final.pth")
        results = self.train_net.main(
            _Args(cfg_file, self._opts(out, 2) + ["MODEL.WEIGHTS", weights], eval_only=True)
        )
        self.assertIn("wsis_instance", results)
        self.assertNotIn("counting", results)  # Mask R-CNN outputs no "counts": skipped
        for key in ("mAP_r25", "mAP_r50", "mAP_r75", "mAP_b50"):
            value = results["wsis_instance"][key]
            self.assertTrue(0.0 <= value <= 100.0, (key, value))

        # --resume continues from the saved iteration instead of starting over
        cfg = self.train_net.setup(_Args(cfg_file, self._opts(out, 3), resume=True))
        trainer = WSISTrainer(cfg)
        trainer.resume_or_load(resume=True)
        self.assertEqual(trainer.start_iter, 2)

        # the checkpoint loads in an unmodified DefaultPredictor; odd-sized BGR input
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = weights
        predictor = DefaultPredictor(cfg)
        image = np.random.RandomState(0).randint(0, 255, (97, 131, 3)).astype(np.uint8)
        instances = predictor(image)["instances"]
        self.assertEqual(instances.image_size, (97, 131))
        self.assertEqual(tuple(instances.pred_masks.shape[1:]), (97, 131))

    def test_lc_count_calibration_lands_in_the_final_checkpoint(self):
        from wsis_d2.lc.mapper import image_level_targets
        from wsis_d2.lc.calibration import build_lc_calibration_loader
        from wsis_d2.lc.meta_arch import fit_lower_count_gain

        out = os.path.join(self.tmp.name, "lc")
        opts = self._opts(out, 2) + ["MODEL.LC.CALIBRATION.MAX_IMAGES", "5"]
        # a 2-iteration model's counts are proportional to the image area (a collapsed model,
        # which the calibration refuses: tests/engine/test_calibration.py); here the fit itself
        # must land in the checkpoint
        with mock.patch("wsis_d2.lc.calibration.collapsed_classes", return_value=[]):
            self.train_net.main(_Args(LC_DEMO, opts))
        saved = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")["model"]
        gain = saved["count_gain"].double()
        self.assertEqual(tuple(gain.shape), (8,))
        # the same fit, redone on the saved model's raw counts of those 5 training images
        cfg = self.train_net.setup(_Args(LC_DEMO, opts + ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]))
        trainer_model = WSISTrainer.build_model(cfg)
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(trainer_model).load(cfg.MODEL.WEIGHTS)
        trainer_model.eval()
        raw, t, ge = [], [], []
        for batch in build_lc_calibration_loader(cfg):
            raw.append(trainer_model.raw_counts(batch[0]).double())
            _, tc, gc = image_level_targets(batch[0]["counts"].numpy(), cfg.MODEL.LC.LOWER_COUNT)
            t.append(tc)
            ge.append(gc)
        self.assertEqual(len(raw), 5)
        expected = fit_lower_count_gain(torch.stack(raw), torch.stack(t), torch.stack(ge))
        torch.testing.assert_close(gain, expected.float().double(), rtol=1e-4, atol=1e-6)
        self.assertFalse(torch.equal(gain, torch.ones(8, dtype=torch.float64)))

    def test_evaluators_follow_evaluator_type(self):
        cfg_file = MASK_RCNN
        out = os.path.join(self.tmp.name, "evals")
        cfg = self.train_net.setup(_Args(cfg_file, self._opts(out, 1) + ["TEST.WSIS_COCO_EVAL", "True"]))
        evaluator = WSISTrainer.build_evaluator(cfg, "wsis_synth_mini_val")
        self.assertIsInstance(evaluator, DatasetEvaluators)
        kinds = {type(e) for e in evaluator._evaluators}
        self.assertEqual(kinds, {InstanceAPEvaluator, CountingEvaluator, FastCOCOEvaluator})

        # a count-only image is refused when the evaluators are built, not after training
        name = "wsis_test_count_only_val"
        DatasetCatalog.register(name, lambda: [{"file_name": "c.jpg", "image_id": 0, "height": 8,
                                               "width": 8, "annotations": [],
                                               "class_counts": [2] + [0] * 7}])
        MetadataCatalog.get(name).set(evaluator_type="wsis_instance",
                                      thing_classes=list("abcdefgh"))
        try:
            with self.assertRaisesRegex(ValueError, "c.jpg.*evaluator_type 'counting'"):
                WSISTrainer.build_evaluator(cfg, name)
            # the check loads a split once per registration, not at every evaluation; the
            # same name registered again is checked again
            loads = []
            val = [dict(d) for d in DatasetCatalog.get("wsis_synth_mini_val")]
            no_coco = cfg.clone()
            no_coco.defrost()
            no_coco.TEST.WSIS_COCO_EVAL = False  # its evaluator converts the split once more
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, lambda: loads.append(1) or [dict(d) for d in val])
            for _ in range(3):
                WSISTrainer.build_evaluator(no_coco, name)
            self.assertEqual(len(loads), 1)
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, lambda: loads.append(1) or [dict(val[0], annotations=[])])
            with self.assertRaisesRegex(ValueError, "1 images"):
                WSISTrainer.build_evaluator(no_coco, name)
            self.assertEqual(len(loads), 2)
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, lambda: [{"file_name": "c.jpg", "image_id": 0, "height": 8,
                                                   "width": 8, "annotations": [],
                                                   "class_counts": [2] + [0] * 7}])
            MetadataCatalog.remove(name)
            MetadataCatalog.get(name).set(evaluator_type="counting", thing_classes=list("abcdefgh"))
            self.assertIsInstance(WSISTrainer.build_evaluator(cfg, name), CountingEvaluator)
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

        name = "wsis_test_unknown_evaluator_type"
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(evaluator_type="no_such_type")
        try:
            with self.assertRaisesRegex(ValueError, "no_such_type"):
                WSISTrainer.build_evaluator(cfg, name)
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


if __name__ == "__main__":
    torch.set_num_threads(2)
    unittest.main()
