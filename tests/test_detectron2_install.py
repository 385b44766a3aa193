"""
The detectron2 produced by tools/install_detectron2.py must work on its own (imported without
wsis_d2, no run-time patching) and say clearly what its missing compiled ops are.
"""
import importlib.util
import os
import subprocess
import sys
import unittest

import numpy as np
import torch

import detectron2

# True for the source-release build (pure-Python detectron2/_C.py), False for upstream compiled builds
SOURCE_RELEASE_BUILD = (importlib.util.find_spec("detectron2._C").origin or "").endswith(".py")


class TestDetectron2Standalone(unittest.TestCase):
    def test_imports_without_wsis_d2(self):
        # a fresh interpreter in another directory: nothing of wsis_d2 is importable or imported
        code = (
            "import sys, detectron2, detectron2.data, detectron2.evaluation, detectron2.engine, "
            "detectron2.layers, detectron2.modeling; "
            "from detectron2.utils.collect_env import collect_env_info; info = collect_env_info(); "
            "assert 'detectron2' in info; "
            "assert not any(m.startswith('wsis_d2') for m in sys.modules); print('ok')"
        )
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=os.path.abspath(os.sep), env=env,
            capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        self.assertIn("ok", out.stdout)

    def test_numpy_and_pillow_names_repaired(self):
        from detectron2.data import transforms as T
        from detectron2.data.build import print_instances_class_histogram
        from detectron2.evaluation import SemSegEvaluator  # noqa: F401

        # default interpolation of ExtentTransform used Image.LINEAR (removed in Pillow 10)
        t = T.ExtentTransform(src_rect=(0, 0, 8, 8), output_size=(4, 4))
        out = t.apply_image(np.zeros((8, 8, 3), dtype=np.uint8))
        self.assertEqual(out.shape, (4, 4, 3))
        # np.int in the class histogram (silently swallowed before the repair)
        dicts = [{"annotations": [{"category_id": 0, "iscrowd": 0}, {"category_id": 1}]}]
        print_instances_class_histogram(dicts, ["a", "b"])

    def test_model_zoo_configs_shipped(self):
        from detectron2 import model_zoo

        path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
        self.assertTrue(os.path.isfile(path))
        cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
        self.assertTrue(cfg.MODEL.MASK_ON)

    @unittest.skipIf(not SOURCE_RELEASE_BUILD, "detectron2 has its compiled ops")
    def test_missing_compiled_ops_fail_clearly(self):
        from detectron2 import _C
        from detectron2.layers import nms_rotated
        from detectron2.layers.rotated_boxes import pairwise_iou_rotated

        boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
        with self.assertRaisesRegex(NotImplementedError, "unavailable.*rotated boxes"):
            pairwise_iou_rotated(boxes, boxes)
        with self.assertRaisesRegex(NotImplementedError, "unavailable"):
            nms_rotated(boxes, torch.ones(1), 0.5)
        # on CPU the deformable-conv layers refuse before reaching _C; on GPU they reach _C
        with self.assertRaisesRegex(NotImplementedError, "modulated deformable convolution"):
            _C.modulated_deform_conv_forward

    @unittest.skipIf(not SOURCE_RELEASE_BUILD, "detectron2 has its compiled ops")
    def test_fast_cocoeval_names_the_slow_path(self):
        from detectron2 import _C

        with self.assertRaisesRegex(NotImplementedError, "use_fast_impl=False"):
            _C.COCOevalAccumulate
        self.assertFalse(_C.has_cuda())
        self.assertIn("not built", _C.get_compiler_version())

    def test_version(self):
        self.assertTrue(detectron2.__version__.startswith("0."))


if __name__ == "__main__":
    unittest.main()
