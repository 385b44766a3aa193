"""
CCGR's rounds on the mini synthetic splits, kept short (a few iterations per stage): two rounds
end to end (round 2 seeded by the IS branch of round 1), resume after a stage was killed (earlier
stages skipped, the killed training continued from its checkpoint), the IS branch with
DefaultPredictor on an odd-sized image, and the errors for a round without pseudo instances.
"""

import json
import os
import tempfile
import unittest

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor, HookBase

import wsis_d2  # noqa: F401  (registers everything)
from wsis_d2.testing import config_path, datasets_root, device_under_test
from wsis_d2 import add_wsis_config
from wsis_d2.data.datasets import register_coco_counts_instances
from wsis_d2.engine import WSISTrainer
from wsis_d2.ccgr.rounds import (
    STAGE_FILE,
    CCGRRounds,
    seed_cues_from_instances,
    suppress_contained_centres,
)
from wsis_d2.ccgr.health import StageHealthError
from detectron2.structures import Boxes, Instances

FAST = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "",
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160"]  # fmt: skip


def _cfg(out, opts=()):
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.merge_from_file(config_path("ccgr_mnv2_synthetic.yaml"))
    cfg.merge_from_list(FAST + [
        "MODEL.DEVICE", device_under_test(), "OUTPUT_DIR", out,
        "DATASETS.TRAIN", "('wsis_synth_mini_train',)",
        "MODEL.CCGR.REFINE_STEPS", "5", "MODEL.CCGR.PEAK_RELATIVE_THRESHOLD", "0.0",
        "MODEL.CCGR.ROUNDS.NUM", "2", "MODEL.CCGR.ROUNDS.PROPOSAL_MAX", "300", "MODEL.CCGR.ROUNDS.WORKERS", "0",
        "MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG", config_path("demo", "ccgr_cls_mnv2_synthetic.yaml"),
        "MODEL.CCGR.ROUNDS.IS_CONFIG", config_path("mask_rcnn_mnv2_fpn_synthetic.yaml"),
        "MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS", FAST,
        # an IS branch of 3 iterations scores low: keep its boxes so that round 2 has bags
        "MODEL.CCGR.ROUNDS.IS_OPTS", FAST + ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1",
                                "DATASETS.TEST", "('wsis_synth_mini_val',)",
                                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                "TEST.DETECTIONS_PER_IMAGE", "10"],
        "MODEL.CCGR.ROUNDS.IS_SCORE_THRESHOLD", "0.0",
    ] + list(opts))  # fmt: skip
    return cfg


class _Killed(Exception):
    pass


class _KillAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise _Killed(f"killed after iteration {self.iteration}")


def _trainer_class(kill_is_at=None, started=None):
    """A WSISTrainer that records where each training started and can be killed in the IS
    branch (the Mask R-CNN) after a given iteration."""

    class Trainer(WSISTrainer):
        def build_hooks(self):
            hooks = super().build_hooks()
            if kill_is_at is not None and self.cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
                hooks.append(_KillAt(kill_is_at))
            return hooks

        def train(self):
            if started is not None:
                started.append((self.cfg.OUTPUT_DIR, self.start_iter))
            return super().train()

    return Trainer


class TestCCGRRounds(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.enterClassContext(datasets_root(os.path.join(cls.tmp.name, "data")))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_rounds_kill_resume_and_predictor(self):
        out = os.path.join(self.tmp.name, "run")
        cfg = _cfg(out)
        cfg.freeze()
        # the first run is killed inside round 1's IS training, after iteration 1 (checkpoint 1)
        with self.assertRaises(_Killed):
            CCGRRounds(cfg, _trainer_class(kill_is_at=1)).run()
        for stage in ("proposals", "round1/classifier", "round1/cues", "round1/mil_ss",
                      "round1/pseudo_labels"):  # fmt: skip
            self.assertTrue(os.path.isfile(os.path.join(out, stage, STAGE_FILE)), stage)
        self.assertFalse(os.path.isfile(os.path.join(out, "round1", "is", STAGE_FILE)))
        self.assertTrue(os.path.isfile(os.path.join(out, "round1", "is", "model_0000001.pth")))
        # the benchmarks' stage times: the finished stages only, in run order
        seconds = CCGRRounds(cfg).stage_seconds()
        self.assertEqual(list(seconds), ["proposals", "round1/classifier", "round1/cues",
                                         "round1/mil_ss", "round1/pseudo_labels"])
        self.assertTrue(all(t >= 0 for t in seconds.values()))
        mtime = os.path.getmtime(os.path.join(out, "round1", "mil_ss", "model_final.pth"))

        started = []
        metrics = CCGRRounds(cfg, _trainer_class(started=started)).run(resume=True)
        # finished stages were skipped; the IS training continued after its checkpoint
        self.assertEqual(
            mtime, os.path.getmtime(os.path.join(out, "round1", "mil_ss", "model_final.pth"))
        )
        self.assertEqual(started[0], (os.path.join(out, "round1", "is"), 2))
        self.assertEqual([s[0] for s in started[1:]],
                         [os.path.join(out, "round2", "mil_ss"), os.path.join(out, "round2", "is")])
        self.assertEqual(sorted(metrics), [1, 2])
        for k in (1, 2):
            m = metrics[k]
            for key in ("pseudo_instances", "pseudo_mAP_r50", "mAP_r50", "mAP_b50"):
                self.assertIn(key, m)
                self.assertTrue(np.isfinite(m[key]))
            self.assertGreater(m["pseudo_instances"], 0)
            # the stage diagnostics follow the objects through the round
            for key in ("diag_bags_per_image", "diag_objects_with_bag", "diag_bag_recall50",
                        "diag_mil_iou", "diag_refined_iou", "diag_pseudo_mask_iou"):
                self.assertIn(key, m)
            self.assertGreater(m["diag_bags_per_image"], 0)
        self.assertGreater(metrics[2]["seed_boxes_per_image"], 0)
        self.assertEqual(metrics[2]["positives_seeded_below_threshold"], 0)
        # round 2's cues again at a threshold no box reaches: no present class is seeded, but
        # with IS_SEED_EVERY_CLASS each keeps its best box (of the IS branch's 10 per image),
        # also where the IS config's own test threshold would drop it
        for every in (False, True):
            folder = os.path.join(self.tmp.name, f"cues_every_class_{every}")
            os.makedirs(folder)
            high = _cfg(out, ["MODEL.CCGR.ROUNDS.IS_SCORE_THRESHOLD", "1.01",
                              "MODEL.CCGR.ROUNDS.IS_SEED_EVERY_CLASS", str(every)])
            is_opts = list(high.MODEL.CCGR.ROUNDS.IS_OPTS)
            is_opts[is_opts.index("MODEL.ROI_HEADS.SCORE_THRESH_TEST") + 1] = "0.99"
            high.MODEL.CCGR.ROUNDS.IS_OPTS = is_opts
            m = CCGRRounds(high)._seed_cues(2, folder)
            below, without = m["positives_seeded_below_threshold"], m["positives_without_seed"]
            self.assertAlmostEqual(below + without, 1.0)
            self.assertEqual(below > 0, every, m)
            self.assertEqual(m["seed_boxes_per_image"] > 0, every, m)
        self.assertGreater(metrics[1]["peaks_per_image"], 0)
        with open(os.path.join(out, "rounds.json")) as f:
            self.assertEqual(sorted(json.load(f)), ["1", "2"])
        # per-round metrics in detectron2's event storage (step = round)
        with open(os.path.join(out, "metrics.json")) as f:
            events = [json.loads(line) for line in f if line.strip()]
        self.assertEqual([e["iteration"] for e in events], [1, 2])
        self.assertIn("ccgr/mAP_r50", events[1])
        # round 2's MIL + SS model started from round 1's (fine-tuning)
        with open(os.path.join(out, "round2", "mil_ss", "config.yaml")) as f:
            self.assertIn(os.path.join(out, "round1", "mil_ss", "model_final.pth"), f.read())
        # and round 2's IS branch from round 1's (MODEL.CCGR.ROUNDS.IS_FINETUNE), not from MODEL.WEIGHTS ""
        with open(os.path.join(out, "round2", "is", "config.yaml")) as f:
            self.assertIn(os.path.join(out, "round1", "is", "model_final.pth"), f.read())
        with open(os.path.join(out, "round1", "is", "config.yaml")) as f:
            self.assertNotIn("model_final.pth", f.read())

        # the IS branch's training sets: round k's pseudo labels, or with IS_LABEL_ROUNDS n also
        # those of the n - 1 rounds before it (as far as they go)
        name = "wsis_synth_mini_train_ccgr_round{}".format
        self.assertEqual(CCGRRounds(cfg)._is_cfg(2).DATASETS.TRAIN, (name(2),))
        mixed = CCGRRounds(_cfg(out, ["MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS", "3"]))
        self.assertEqual(mixed._is_cfg(2).DATASETS.TRAIN, (name(2), name(1)))
        self.assertEqual(mixed._is_cfg(1).DATASETS.TRAIN, (name(1),))

        # the final model is a stock Mask R-CNN for DefaultPredictor
        is_cfg = CCGRRounds(cfg)._is_cfg(2)
        is_cfg.MODEL.WEIGHTS = os.path.join(out, "round2", "is", "model_final.pth")
        is_cfg.freeze()
        image = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)
        inst = DefaultPredictor(is_cfg)(image)["instances"]
        self.assertEqual(inst.image_size, (97, 131))

    def test_until_stops_after_the_stage(self):
        out = os.path.join(self.tmp.name, "until")
        cfg = _cfg(out)
        cfg.freeze()
        with self.assertRaisesRegex(ValueError, "round1/mil_ss"):
            CCGRRounds(cfg).run(until="round1/mil")  # not a stage: the stages are listed
        metrics = CCGRRounds(cfg).run(until="round1/cues")
        self.assertTrue(os.path.isfile(os.path.join(out, "round1", "cues", STAGE_FILE)))
        self.assertFalse(os.path.isdir(os.path.join(out, "round1", "mil_ss")))
        self.assertEqual(list(metrics), [1])  # round 1 as far as it went: its cues
        self.assertEqual(list(metrics[1]), ["peaks_per_image", "health_peaks_per_positive"])

    def test_health_check_stops_a_stalled_classifier(self):
        # two iterations leave the classifier at its initial loss, above the label prior's
        # entropy: with the check on for any schedule the run stops at that stage
        out = os.path.join(self.tmp.name, "health")
        cfg = _cfg(out, ["MODEL.CCGR.HEALTH.MIN_ITERS", "0"])
        cfg.freeze()
        with self.assertRaisesRegex(
            StageHealthError, r"round1/classifier: health_loss_over_prior = .*SEED"
        ):
            CCGRRounds(cfg).run(until="round1/cues")
        # the stage is not marked finished: --resume checks it again
        self.assertFalse(os.path.isfile(os.path.join(out, "round1", "classifier", STAGE_FILE)))

    def test_health_ranges_of_fine_tuned_stages(self):
        cfg = _cfg(os.path.join(self.tmp.name, "ranges"), ["MODEL.CCGR.HEALTH.MIN_ITERS", "100"])
        cfg.freeze()
        rounds = CCGRRounds(cfg)
        flat = {"health_loss_drop": 0.95}
        rounds._check("round2/mil_ss", flat, 500, finetuned=True)  # starts near its final loss
        rounds._check("round2/mil_ss", flat, 50)  # too short a schedule to judge
        with self.assertRaisesRegex(StageHealthError, "round2/mil_ss: health_loss_drop = 0.95"):
            rounds._check("round2/mil_ss", flat, 500)
        with self.assertRaisesRegex(StageHealthError, "health_loss_drop = nan"):
            rounds._check("round2/is", {"health_loss_drop": float("nan")}, 500, finetuned=True)
        with self.assertRaisesRegex(StageHealthError, "health_pseudo_per_positive = 0.2"):
            rounds._check("round1/pseudo_labels", {"health_pseudo_per_positive": 0.2}, 500)

    def test_round_without_pseudo_instances(self):
        out = os.path.join(self.tmp.name, "empty")
        # no image-level label says any class is present: no peak, no bag, no pseudo instance
        name = "_test_ccgr_rounds_no_labels"
        if name not in DatasetCatalog.list():
            def load():
                dicts = [dict(d) for d in DatasetCatalog.get("wsis_synth_mini_train")]
                for d in dicts:
                    d["class_counts"] = [0] * 8
                    d["annotations"] = []
                return dicts

            DatasetCatalog.register(name, load)
            MetadataCatalog.get(name).set(
                thing_classes=list(MetadataCatalog.get("wsis_synth_mini_train").thing_classes)
            )
        cfg = _cfg(out, ["MODEL.CCGR.ROUNDS.NUM", "1", "DATASETS.TRAIN", f"('{name}',)"])
        cfg.freeze()
        with self.assertRaisesRegex(ValueError, "CCGR round 1: .*pseudo_labels.json.*no pseudo"):
            CCGRRounds(cfg).run()

    def _one_round_on(self, name: str, data: dict, tag: str):
        """(output folder, frozen one-round config) on ``data`` (a COCO dict) registered as
        ``name``."""
        path = os.path.join(self.tmp.name, f"{tag}.json")
        with open(path, "w") as f:
            json.dump(data, f)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_counts_instances(name, {}, path, "")
        out = os.path.join(self.tmp.name, tag)
        cfg = _cfg(out, ["MODEL.CCGR.ROUNDS.NUM", "1", "DATASETS.TRAIN", f"('{name}',)"])
        cfg.freeze()
        return out, cfg

    def test_coco_json_with_image_labels_only(self):
        # a user's COCO json that says which classes each image shows and nothing else: no
        # annotation at all, "image_labels" per image (the README's "Your own data")
        name = "_test_ccgr_rounds_image_labels"
        src = DatasetCatalog.get("wsis_synth_mini_train")
        meta = MetadataCatalog.get("wsis_synth_mini_train")
        to_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        data = {
            "images": [
                {"id": d["image_id"], "file_name": d["file_name"], "height": d["height"],
                 "width": d["width"],
                 "image_labels": sorted({to_id[a["category_id"]] for a in d["annotations"]})}
                for d in src
            ],
            "annotations": [],
            "categories": [{"id": to_id[c], "name": n} for c, n in enumerate(meta.thing_classes)],
        }  # fmt: skip
        out, cfg = self._one_round_on(name, data, "image_labels")
        metrics = CCGRRounds(cfg).run()
        self.assertGreater(metrics[1]["pseudo_instances"], 0)
        self.assertNotIn("pseudo_mAP_r50", metrics[1])  # no masks to score them against
        with open(os.path.join(out, "round1", "pseudo_labels", "pseudo_labels.json")) as f:
            pseudo = json.load(f)
        labels = {im["id"]: set(im["image_labels"]) for im in data["images"]}
        for a in pseudo["annotations"]:
            self.assertIn(a["category_id"], labels[a["image_id"]])  # present classes only

    def test_coco_json_mixing_masks_and_count_only_images(self):
        # half the images annotated with masks, half counted only ("image_counts"): CCGR trains
        # on all, and scores its pseudo labels on the annotated half
        name = "_test_ccgr_rounds_count_only"
        src = DatasetCatalog.get("wsis_synth_mini_train")
        meta = MetadataCatalog.get("wsis_synth_mini_train")
        to_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        images, anns = [], []
        for k, d in enumerate(src):
            images.append({"id": d["image_id"], "file_name": d["file_name"],
                           "height": d["height"], "width": d["width"]})
            if k % 2:
                images[-1]["image_counts"] = {
                    str(to_id[c]): n for c, n in enumerate(d["class_counts"]) if n}
            else:
                anns += [{"id": len(anns) + i + 1, "image_id": d["image_id"],
                          "iscrowd": a.get("iscrowd", 0), "segmentation": a["segmentation"],
                          "category_id": to_id[a["category_id"]]}
                         for i, a in enumerate(d["annotations"])]
        data = {"images": images, "annotations": anns,
                "categories": [{"id": to_id[c], "name": n}
                               for c, n in enumerate(meta.thing_classes)]}  # fmt: skip
        out, cfg = self._one_round_on(name, data, "count_only")
        metrics = CCGRRounds(cfg).run(until="round1/pseudo_labels")
        self.assertIn("pseudo_mAP_r50", metrics[1])
        # the diagnostics count the objects of the annotated images only
        annotated = [d for k, d in enumerate(src) if k % 2 == 0]
        objects = sum(1 for d in annotated for a in d["annotations"] if not a.get("iscrowd", 0))
        self.assertAlmostEqual(metrics[1]["diag_objects_per_image"], objects / len(annotated))

    def test_bad_configs(self):
        with self.assertRaisesRegex(ValueError, "MODEL.CCGR.ROUNDS.IS_CONFIG.*nowhere.yaml"):
            CCGRRounds(_cfg(self.tmp.name, ["MODEL.CCGR.ROUNDS.IS_CONFIG", "nowhere.yaml"]))
        with self.assertRaisesRegex(ValueError, "exactly one training dataset"):
            CCGRRounds(_cfg(self.tmp.name, ["DATASETS.TRAIN", "('a', 'b')"]))
        with self.assertRaisesRegex(ValueError, "MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS must be >= 1"):
            CCGRRounds(_cfg(self.tmp.name, ["MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS", "0"]))
        with self.assertRaisesRegex(ValueError, "MODEL.CCGR.ROUNDS.LABEL_SETS must be >= 1"):
            CCGRRounds(_cfg(self.tmp.name, ["MODEL.CCGR.ROUNDS.LABEL_SETS", "0"]))

    def test_label_sets(self):
        # two MIL + SS models per round, seeded apart; the IS branch trains on every set
        out = os.path.join(self.tmp.name, "sets")
        cfg = _cfg(out, ["MODEL.CCGR.ROUNDS.LABEL_SETS", "2", "MODEL.CCGR.ROUNDS.IS_LABEL_ROUNDS", "2",
                         "SEED", "3"])  # fmt: skip
        cfg.freeze()
        rounds = CCGRRounds(cfg)
        self.assertEqual(rounds.stages()[3:9], [
            "round1/mil_ss", "round1/pseudo_labels", "round1/mil_ss_2", "round1/pseudo_labels_2",
            "round1/is", "round2/cues"])  # fmt: skip
        metrics = rounds.run(until="round2/pseudo_labels_2")
        for stage in ("round1/mil_ss_2", "round1/pseudo_labels_2", "round2/mil_ss_2",
                      "round2/pseudo_labels_2"):  # fmt: skip
            self.assertTrue(os.path.isfile(os.path.join(out, stage, STAGE_FILE)), stage)
        self.assertFalse(os.path.isdir(os.path.join(out, "round2", "is")))
        # set 1's figures keep their names, set 2's are prefixed
        for key in ("pseudo_instances", "set2_pseudo_instances", "set2_pseudo_mAP_r50", "mAP_r50"):
            self.assertIn(key, metrics[1])
        self.assertIn("set2_pseudo_mAP_r50", metrics[2])
        # the sets' models differ (their seeds), and each fine-tunes its own of the round before
        weights = [
            torch.load(os.path.join(out, "round1", d, "model_final.pth"), weights_only=False)["model"]
            for d in ("mil_ss", "mil_ss_2")
        ]
        self.assertFalse(all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0]))
        with open(os.path.join(out, "round2", "mil_ss_2", "config.yaml")) as f:
            self.assertIn(os.path.join(out, "round1", "mil_ss_2", "model_final.pth"), f.read())
        name = "wsis_synth_mini_train_ccgr_round{}".format
        self.assertEqual(rounds._is_cfg(1).DATASETS.TRAIN, (name(1), name("1_set2")))
        self.assertEqual(rounds._is_cfg(2).DATASETS.TRAIN,
                         (name(2), name("2_set2"), name(1), name("1_set2")))

    def test_seed_cues_from_instances(self):
        inst = Instances((20, 30))
        inst.pred_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 15], [1, 1, 4, 4]]))
        masks = torch.zeros(3, 20, 30, dtype=torch.bool)
        masks[0, 0:10, 0:10] = True
        masks[1, 5:15, 5:25] = True
        masks[2, 1:4, 1:4] = True
        inst.pred_masks = masks
        inst.scores = torch.tensor([0.9, 0.6, 0.2])
        inst.pred_classes = torch.tensor([0, 2, 1])
        peaks, sem, seeds = seed_cues_from_instances(inst, torch.tensor([1, 0, 1]), 3, 0.5)
        # class 1 is absent from the labels, the third box scores below 0.5
        self.assertEqual(seeds.tolist(), [[0, 0, 0, 10, 10, 0.8999999761581421],
                                          [2, 5, 5, 25, 15, 0.6000000238418579]])
        self.assertEqual(peaks[:, :3].tolist(), [[0, 5, 5], [2, 15, 10]])
        self.assertEqual(int(sem[2, 2]), 0)
        self.assertEqual(int(sem[12, 20]), 2)
        self.assertEqual(int(sem[7, 7]), 255)  # both classes
        self.assertEqual(int(sem[18, 28]), 3)  # background

    def test_seed_every_class(self):
        # class 0: two boxes below the threshold (0.3 best); class 1: one above (0.8) and one
        # below (0.1); class 2 present without any box; class 3 absent (0.05)
        inst = Instances((40, 40))
        inst.pred_boxes = Boxes(torch.tensor([
            [0.0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 15, 15], [25, 0, 35, 10], [0, 30, 8, 38]
        ]))
        inst.scores = torch.tensor([0.1, 0.3, 0.8, 0.1, 0.05])
        inst.pred_classes = torch.tensor([0, 0, 1, 1, 3])
        masks = torch.zeros(5, 40, 40, dtype=torch.bool)
        masks[1, 20:30, 20:30] = True
        masks[2, 5:15, 5:15] = True
        inst.pred_masks = masks
        labels = torch.tensor([1, 1, 1, 0])
        _, sem, seeds = seed_cues_from_instances(inst, labels, 4, 0.5)
        self.assertEqual(seeds[:, 0].tolist(), [1])
        self.assertEqual(int(sem[25, 25]), 4)
        peaks, sem, seeds = seed_cues_from_instances(inst, labels, 4, 0.5, every_class=True)
        # class 0 keeps its best box only, class 1 its box above the threshold only
        self.assertEqual(sorted(seeds[:, [0, 5]].tolist()),
                         [[0.0, 0.30000001192092896], [1.0, 0.800000011920929]])
        self.assertEqual(peaks[:, :3].tolist(), [[0, 25, 25], [1, 10, 10]])
        self.assertEqual(int(sem[25, 25]), 0)  # its mask labels the class
        self.assertEqual(int(sem[10, 10]), 1)
        # nothing above the threshold, no box of a present class: both unchanged
        none = seed_cues_from_instances(inst[[4]], labels, 4, 0.5, every_class=True)
        self.assertEqual(len(none[2]), 0)
        self.assertEqual(len(seed_cues_from_instances(inst[:0], labels, 4, 0.5, True, True)[2]), 0)

    def test_seed_centre_nms(self):
        # class 0: a whole object (0.7) with two parts, one better scored (0.9) and one worse
        # (0.5), whose centres lie inside it; a neighbour (0.6) whose centre lies outside every
        # kept box; class 1: a box at the same place as the whole object stays (other class)
        boxes = torch.tensor([
            [10.0, 10, 50, 50],   # 0 whole, 0.7
            [12.0, 12, 24, 24],   # 1 part, 0.9: its centre (18, 18) is inside box 0
            [30.0, 30, 44, 44],   # 2 part, 0.5: centre (37, 37) inside box 0 only
            [45.0, 10, 80, 40],   # 3 neighbour, 0.6: centre (62.5, 25) outside 0 and 1
            [10.0, 10, 50, 50],   # 4 class 1, 0.3
        ])
        scores = torch.tensor([0.7, 0.9, 0.5, 0.6, 0.3])
        classes = torch.tensor([0, 0, 0, 0, 1])
        # best first: 1 kept; 0's centre (30, 30) is outside box 1 -> kept; 3 kept; 2 inside 0
        self.assertEqual(suppress_contained_centres(boxes, scores, classes).tolist(), [1, 0, 3, 4])
        self.assertEqual(suppress_contained_centres(boxes[:0], scores[:0], classes[:0]).tolist(), [])

        inst = Instances((60, 90))
        inst.pred_boxes = Boxes(boxes)
        inst.scores = scores
        inst.pred_classes = classes
        masks = torch.zeros(5, 60, 90, dtype=torch.bool)
        masks[2, 30:44, 30:44] = True
        inst.pred_masks = masks
        _, sem_all, all_seeds = seed_cues_from_instances(inst, torch.tensor([1, 1]), 2, 0.2)
        peaks, sem, seeds = seed_cues_from_instances(
            inst, torch.tensor([1, 1]), 2, 0.2, centre_nms=True
        )
        self.assertEqual(len(all_seeds), 5)
        self.assertEqual(seeds[:, 5].tolist(), [scores[i].item() for i in (1, 0, 3, 4)])
        self.assertEqual(len(peaks), 4)
        # the dropped box's mask still labels its pixels, wherever it is among the instances
        self.assertTrue(torch.equal(sem, sem_all))
        self.assertEqual(int(sem[35, 35]), 0)
        _, sem_last, _ = seed_cues_from_instances(
            inst[[0, 1, 3, 4, 2]], torch.tensor([1, 1]), 2, 0.2, centre_nms=True
        )
        self.assertTrue(torch.equal(sem_last, sem))


if __name__ == "__main__":
    unittest.main()
