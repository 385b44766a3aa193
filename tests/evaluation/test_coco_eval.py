"""
FastCOCOEvaluator: detectron2's COCOEvaluator with faster-coco-eval's COCOeval gives pycocotools'
AP (box and mask) on the same predictions; the backend choice and its fallback.
"""

import importlib.util
import tempfile
import unittest
import uuid
from unittest import mock

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from wsis_d2.evaluation import FastCOCOEvaluator, coco_eval
from wsis_d2.evaluation.coco_eval import cocoeval_class, default_coco_backend

HAS_FASTER = importlib.util.find_spec("faster_coco_eval") is not None
H, W = 120, 160


def _dataset(rng, num_images=12, num_classes=3):
    """Records with 1-4 rectangular instances each (bitmask RLE), and noisy predictions of them
    plus false positives."""
    records, outputs = [], []
    for i in range(num_images):
        anns, boxes, scores, classes, masks = [], [], [], [], []
        for _ in range(rng.integers(1, 5)):
            # small (< 32²) and medium objects
            x1, y1 = rng.integers(0, W - 50), rng.integers(0, H - 50)
            x2, y2 = x1 + rng.integers(8, 50), y1 + rng.integers(8, 50)
            mask = np.zeros((H, W), np.uint8)
            mask[y1:y2, x1:x2] = 1
            c = int(rng.integers(num_classes))
            rle = mask_util.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode()
            anns.append(
                {
                    "bbox": [x1, y1, x2, y2],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": c,
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
            for _ in range(2):  # a close and a shifted detection of each object
                d = rng.integers(-3, 4, size=4)
                bx = np.clip([x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3]], 0, [W, H, W, H])
                m = np.zeros((H, W), bool)
                m[int(bx[1]) : int(bx[3]), int(bx[0]) : int(bx[2])] = True
                boxes.append(bx)
                masks.append(m)
                scores.append(float(rng.random()))
                classes.append(c if rng.random() < 0.8 else int(rng.integers(num_classes)))
        records.append(
            {
                "file_name": f"img{i}.png",
                "image_id": i,
                "height": H,
                "width": W,
                "annotations": anns,
            }
        )
        inst = Instances((H, W))
        inst.pred_boxes = Boxes(torch.tensor(np.array(boxes), dtype=torch.float32))
        inst.scores = torch.tensor(scores)
        inst.pred_classes = torch.tensor(classes)
        inst.pred_masks = torch.from_numpy(np.stack(masks))
        outputs.append({"instances": inst})
    return records, outputs


class TestFastCOCOEvaluator(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        records, cls.outputs = _dataset(np.random.default_rng(0))
        cls.name = f"_test_coco_eval_{uuid.uuid4().hex[:8]}"
        DatasetCatalog.register(cls.name, lambda: records)
        MetadataCatalog.get(cls.name).set(thing_classes=["a", "b", "c"])
        cls.inputs = [{"image_id": r["image_id"]} for r in records]
        # COCOEvaluator writes the dataset's COCO json here once and keeps its path in metadata
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def _run(self, backend):
        ev = FastCOCOEvaluator(
            self.name, distributed=False, output_dir=self.tmp.name, backend=backend
        )
        ev.reset()
        ev.process(self.inputs, self.outputs)
        return ev.evaluate()

    @unittest.skipIf(not HAS_FASTER, "faster-coco-eval not installed")
    def test_faster_coco_eval_equals_pycocotools(self):
        ref = self._run("pycocotools")
        with mock.patch.object(
            coco_eval, "_cocoeval_opt_as", wraps=coco_eval._cocoeval_opt_as
        ) as swap:
            fast = self._run("faster_coco_eval")
        self.assertEqual(swap.call_count, 1)
        self.assertEqual(swap.call_args[0][0].__name__, "FasterCOCOeval")
        self.assertEqual(set(ref), {"bbox", "segm"})
        for task in ("bbox", "segm"):
            self.assertEqual(set(ref[task]), set(fast[task]))
            for key, value in ref[task].items():
                if np.isnan(value):  # an area range without objects (APl): NaN in both
                    self.assertTrue(np.isnan(fast[task][key]), f"{task} {key}")
                    continue
                # detectron2 reports AP in percent: 1e-4 here is 1e-6 of AP
                self.assertAlmostEqual(value, fast[task][key], delta=1e-4, msg=f"{task} {key}")
            self.assertGreater(ref[task]["AP"], 10.0)  # the noisy detections match objects
        # the module-level class detectron2 reads is restored after each evaluation
        from detectron2.evaluation import coco_evaluation

        self.assertNotEqual(coco_evaluation.COCOeval_opt.__name__, "FasterCOCOeval")

    def test_backend_choice_and_fallback(self):
        with mock.patch.object(coco_eval, "_detectron2_compiled", return_value=False):
            expected = "faster_coco_eval" if HAS_FASTER else "pycocotools"
            self.assertEqual(default_coco_backend(), expected)
            real = importlib.util.find_spec

            def without_faster(name, *args):
                return None if name == "faster_coco_eval" else real(name, *args)

            with mock.patch.object(coco_eval.importlib.util, "find_spec", without_faster):
                self.assertEqual(default_coco_backend(), "pycocotools")
        with mock.patch.object(coco_eval, "_detectron2_compiled", return_value=True):
            self.assertEqual(default_coco_backend(), "detectron2")
        with self.assertRaisesRegex(ValueError, "backend"):
            cocoeval_class("lvis")
        with self.assertRaisesRegex(ValueError, "backend"):
            FastCOCOEvaluator(self.name, distributed=False, backend="fast")


if __name__ == "__main__":
    unittest.main()
