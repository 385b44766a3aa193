"""CCGRNet: its components built by their own from_config, variants that share the trained
modules (replace), and checkpoints of the layout before WSDDNOutputLayers."""

import os
import tempfile
import unittest

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from wsis_d2.ccgr import (
    BagBuilder,
    CCGRNet,
    ContextGapRefiner,
    PseudoLabeller,
    WSDDNOutputLayers,
    WSDDNROIHeads,
)
from wsis_d2.testing import get_config


def _cfg(*opts):
    return get_config("ccgr_mnv2_synthetic.yaml", ["MODEL.WEIGHTS", "", *opts], device="cpu")


class TestCCGRNet(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.cfg = _cfg(
            "MODEL.CCGR.REFINE_STEPS",
            "50",
            "MODEL.CCGR.BAG_SIZE",
            "7",
            "MODEL.CCGR.MASK_REFINE",
            "none",
        )
        cls.model = build_model(cls.cfg)

    def test_components_from_config(self):
        m = self.model
        self.assertIsInstance(m, CCGRNet)
        self.assertIsInstance(m.roi_heads, WSDDNROIHeads)
        self.assertIsInstance(m.roi_heads.box_predictor, WSDDNOutputLayers)
        self.assertIsInstance(m.bag_builder, BagBuilder)
        self.assertIsInstance(m.refiner, ContextGapRefiner)
        self.assertIsInstance(m.labeller, PseudoLabeller)
        self.assertEqual((m.refiner.steps, m.bag_builder.bag_size), (50, 7))
        self.assertEqual(m.labeller.mask_refine, "none")
        self.assertEqual(m.num_classes, 8)

    def test_replace_shares_the_modules_and_keeps_the_model(self):
        other = self.cfg.clone()
        other.MODEL.CCGR.REFINE_GROW_ONLY = False
        variant = self.model.replace(refiner=ContextGapRefiner(other))
        self.assertIsNot(variant, self.model)
        self.assertFalse(variant.refiner.grow_only)
        self.assertTrue(self.model.refiner.grow_only)
        for name in ("backbone", "roi_heads", "sem_seg_head", "bag_builder", "labeller"):
            self.assertIs(getattr(variant, name), getattr(self.model, name))
        self.assertTrue(torch.equal(variant.pixel_mean, self.model.pixel_mean))
        self.assertTrue(torch.equal(variant.pixel_std, self.model.pixel_std))
        self.assertEqual(variant.training, self.model.training)
        with self.assertRaisesRegex(ValueError, "'refine_grow_only'"):
            self.model.replace(refine_grow_only=False)

    def test_bad_option_names_the_config_key(self):
        for key, value in (("SCORE_MODE", "boxes"), ("REFINE_LR", "-1.0"), ("BAG_SIZE", "0")):
            with self.assertRaisesRegex(ValueError, f"MODEL.CCGR.{key}"):
                build_model(_cfg(f"MODEL.CCGR.{key}", value))

    def test_loads_checkpoints_of_the_old_layout(self):
        # before WSDDNOutputLayers: roi_heads.cls_score.* and roi_heads.det_score.*
        state = {k.replace("box_predictor.", ""): v for k, v in self.model.state_dict().items()}
        self.assertIn("roi_heads.det_score.weight", state)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model_final.pth")
            torch.save({"model": state, "iteration": 9}, path)
            torch.manual_seed(1)
            fresh = build_model(self.cfg)
            extra = DetectionCheckpointer(fresh).load(path)
        self.assertEqual(extra["iteration"], 9)  # the rest of the checkpoint
        for k, v in self.model.state_dict().items():
            self.assertTrue(torch.equal(fresh.state_dict()[k], v), k)


if __name__ == "__main__":
    unittest.main()
