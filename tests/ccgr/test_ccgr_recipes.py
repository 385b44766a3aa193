"""
The paper-recipe CCGR configs (configs/ccgr_r50_voc12.yaml, configs/ccgr_r50_coco_voc.yaml) on
format fixtures: a tiny VOC 2012 tree (trainaug image-level labels from XML, segmentation val
instances from palette PNGs) runs one round of every stage of the VOC recipe, with its models
(R-50 classifier, R-50-FPN CCGRNet, R-50-FPN Mask R-CNN) at a toy size; the COCO-VOC recipe
resolves to COCO-VOC datasets and the same stage configs. The real data cannot be downloaded here.
"""

import os
import tempfile
import unittest
import xml.etree.ElementTree as ET

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor
from PIL import Image

import wsis_d2  # noqa: F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg
from wsis_d2.data.proposals import load_proposal_file, save_proposal_file
from wsis_d2.ccgr.rounds import CCGRRounds
from wsis_d2.testing import config_path, datasets_root, device_under_test, repo_root

REPO = repo_root()
VOC_RECIPE = config_path("ccgr_r50_voc12.yaml")
COCO_VOC_RECIPE = config_path("ccgr_r50_coco_voc.yaml")
VOC = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()
TINY = ["SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]  # fmt: skip


def _xml(path, width, height, objects):
    root = ET.Element("annotation")
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for name, (x1, y1, x2, y2) in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = name
        ET.SubElement(o, "difficult").text = "0"
        box = ET.SubElement(o, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ET.SubElement(box, key).text = str(value)
    ET.ElementTree(root).write(path)


def _palette_png(path, indices):
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def _voc2012_fixture(root):
    """Four trainaug images (XML labels) and two segmentation-val images (palette PNGs)."""
    d = os.path.join(root, "VOC2012")
    for sub in ("JPEGImages", "Annotations", "ImageSets/Segmentation", "SegmentationObject",
                "SegmentationClass"):  # fmt: skip
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    rng = np.random.RandomState(0)
    h, w = 72, 96
    scenes = {
        "2008_000001": [("dog", (10, 12, 40, 50)), ("person", (55, 8, 90, 66))],
        "2008_000002": [("cat", (20, 20, 60, 60))],
        "2008_000003": [("dog", (5, 30, 35, 70)), ("dog", (50, 5, 85, 40))],
        "2008_000004": [("person", (30, 10, 70, 70)), ("cat", (72, 40, 95, 70))],
        "2008_000005": [("dog", (12, 14, 44, 52))],
        "2008_000006": [("cat", (40, 16, 80, 60)), ("person", (4, 4, 30, 66))],
    }
    colours = {"dog": (200, 60, 40), "person": (40, 60, 220), "cat": (60, 200, 60)}
    for image_id, objects in scenes.items():
        img = rng.randint(90, 140, size=(h, w, 3)).astype(np.uint8)
        obj = np.zeros((h, w), np.uint8)
        cls = np.zeros((h, w), np.uint8)
        for k, (name, (x1, y1, x2, y2)) in enumerate(objects, start=1):
            img[y1:y2, x1:x2] = colours[name]
            obj[y1:y2, x1:x2] = k
            cls[y1:y2, x1:x2] = VOC.index(name) + 1
        Image.fromarray(img).save(os.path.join(d, "JPEGImages", image_id + ".jpg"))
        _xml(os.path.join(d, "Annotations", image_id + ".xml"), w, h, objects)
        _palette_png(os.path.join(d, "SegmentationObject", image_id + ".png"), obj)
        _palette_png(os.path.join(d, "SegmentationClass", image_id + ".png"), cls)
    with open(os.path.join(d, "ImageSets/Segmentation/trainaug.txt"), "w") as f:
        f.write("\n".join(list(scenes)[:4]) + "\n")
    with open(os.path.join(d, "ImageSets/Segmentation/val.txt"), "w") as f:
        f.write("\n".join(list(scenes)[4:]) + "\n")


def _recipe_cfg(path, out, opts=()):
    return get_wsis_cfg(path, [
        "MODEL.DEVICE", device_under_test(), "OUTPUT_DIR", out,
        "MODEL.CCGR.REFINE_STEPS", "3",
        # untrained toy models: every pixel of a refined box is its pseudo mask
        "MODEL.CCGR.MASK_THRESHOLD", "0.0",
        "MODEL.CCGR.ROUNDS.NUM", "1", "MODEL.CCGR.ROUNDS.PROPOSAL_MAX", "50", "MODEL.CCGR.ROUNDS.WORKERS", "0",
        "MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG", config_path("ccgr", "cls_r50_voc.yaml"),
        "MODEL.CCGR.ROUNDS.IS_CONFIG", config_path("ccgr", "mask_rcnn_R_50_FPN_voc.yaml"),
        "MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS", TINY,
        "MODEL.CCGR.ROUNDS.IS_OPTS", TINY + ["DATASETS.TEST", "('voc_2012_seg_val_instance',)",
                                "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
                                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"],
    ] + TINY + list(opts))  # fmt: skip


class TestCCGRRecipes(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = os.path.join(cls.tmp.name, "data")
        _voc2012_fixture(cls.root)
        cls.enterClassContext(datasets_root(cls.root))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_stage_configs_resolve(self):
        for path, train, test in (
            (VOC_RECIPE, "voc_2012_count_trainaug", "voc_2012_seg_val_instance"),
            (COCO_VOC_RECIPE, "coco_voc_2014_train", "coco_voc_2014_val"),
        ):
            with self.subTest(recipe=os.path.basename(path)):
                cfg = get_wsis_cfg(path)
                self.assertEqual(cfg.MODEL.META_ARCHITECTURE, "CCGRNet")
                self.assertEqual(cfg.DATASETS.TRAIN, (train,))
                self.assertEqual(cfg.MODEL.ROI_HEADS.NUM_CLASSES, 20)
                self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 21)
                # the stage configs are named relative to the repository root
                cls_cfg = get_wsis_cfg(os.path.join(REPO, cfg.MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG),
                                       cfg.MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS)
                is_cfg = get_wsis_cfg(os.path.join(REPO, cfg.MODEL.CCGR.ROUNDS.IS_CONFIG), cfg.MODEL.CCGR.ROUNDS.IS_OPTS)
                self.assertTrue(cls_cfg.MODEL.LC.IMAGE_LABELS_ONLY)
                self.assertEqual(cls_cfg.MODEL.LC.NUM_CLASSES, 20)
                self.assertEqual(is_cfg.MODEL.META_ARCHITECTURE, "GeneralizedRCNN")
                self.assertEqual(is_cfg.MODEL.ROI_HEADS.NUM_CLASSES, 20)
                self.assertEqual(is_cfg.DATASETS.TEST, (test,))
                for name in (train, test):
                    self.assertIn(name, DatasetCatalog.list())

    def test_voc_recipe_one_round_on_fixtures(self):
        out = os.path.join(self.tmp.name, "voc")
        cfg = _recipe_cfg(VOC_RECIPE, out)
        cfg.freeze()
        rounds = CCGRRounds(cfg)
        self.assertEqual(rounds.num_classes, 20)
        metrics = rounds.run()
        # VOC trainaug has image-level labels only: no pseudo-label mAP, the IS branch's on val
        self.assertNotIn("pseudo_mAP_r50", metrics[1])
        self.assertGreater(metrics[1]["pseudo_instances"], 0)
        for key in ("mAP_r25", "mAP_r50", "mAP_r75", "mAP_b50"):
            self.assertIn(key, metrics[1])
        # the final IS branch is a plain Mask R-CNN for DefaultPredictor
        is_cfg = get_wsis_cfg(os.path.join(out, "round1", "is", "config.yaml"))
        is_cfg.MODEL.WEIGHTS = os.path.join(out, "round1", "is", "model_final.pth")
        predictor = DefaultPredictor(is_cfg)
        image = np.random.RandomState(1).randint(0, 255, (61, 83, 3)).astype(np.uint8)
        inst = predictor(image)["instances"]
        self.assertEqual(inst.image_size, (61, 83))

        # a proposal file given by MODEL.CCGR.ROUNDS.PROPOSAL_FILE (e.g. converted MCG boxes) replaces the
        # selective search; one that misses training images is refused, naming the file
        made = load_proposal_file(os.path.join(out, "proposals", "voc_2012_count_trainaug.pkl"))
        given = os.path.join(self.tmp.name, "mcg.pkl")
        save_proposal_file(given, made["ids"], [b[:20] for b in made["boxes"]],
                           [s[:20] for s in made["objectness_logits"]])
        cfg = _recipe_cfg(VOC_RECIPE, os.path.join(self.tmp.name, "given"),
                          ["MODEL.CCGR.ROUNDS.PROPOSAL_FILE", given])
        cfg.freeze()
        rounds = CCGRRounds(cfg)
        self.assertEqual(rounds._proposals(os.path.join(self.tmp.name, "given", "proposals")),
                         {"proposals_per_image": 20.0})
        mil_ss = rounds._mil_ss_cfg(1, os.path.join(self.tmp.name, "given", "round1", "mil_ss"))
        self.assertEqual(mil_ss.DATASETS.PROPOSAL_FILES_TRAIN, (given,))
        save_proposal_file(given, made["ids"][:3], made["boxes"][:3], made["objectness_logits"][:3])
        with self.assertRaisesRegex(ValueError, r"PROPOSAL_FILE .*mcg\.pkl: no proposals for image"):
            CCGRRounds(cfg).run()


if __name__ == "__main__":
    torch.set_num_threads(2)
    unittest.main()
