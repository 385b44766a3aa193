"""
CCGR part 1 end to end on the mini synthetic split: proposals -> image-level classifier -> cues
-> CCGRNet (WSDDN + PSP) trained a few steps -> pseudo instances written as COCO json and read
back by register_coco_counts_instances. Also the mapper (flips, no ground-truth leak) and the
errors for bad proposal files and cues.
"""

import os
import pickle
import tempfile
import unittest

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.data.build import load_proposals_into_dataset
from detectron2.structures import Boxes, Instances, pairwise_iou
from PIL import Image

from wsis_d2.engine import WSISTrainer
import wsis_d2  # noqa: F401  (registers everything)
from wsis_d2.testing import config_path, datasets_root, device_under_test
from wsis_d2 import add_wsis_config
from wsis_d2.data import build_dataset_mapper
from wsis_d2.ccgr.files import (
    check_pseudo_label_json,
    load_cues,
    write_cues,
    write_pseudo_label_json,
)
from wsis_d2.data.datasets import register_coco_counts_instances
from wsis_d2.ccgr.mapper import CCGRDatasetMapper
from wsis_d2.data.proposals import SelectiveSearchProposals, load_proposal_file, save_proposal_file
from wsis_d2.ccgr.stages import compute_cues, cue_parameters, make_proposal_file, run_ccgr_inference
from wsis_d2.evaluation import InstanceAPEvaluator
from wsis_d2.layers import graph_segment
from wsis_d2.ccgr.labels import assign_pixels, grabcut_masks, pseudo_instances
from wsis_d2.ccgr import BagBuilder, ContextGapRefiner, PseudoLabeller

DS = "wsis_synth_mini_train"


def _cfg(path, out, opts=()):
    # the models train from a seeded state, not from whatever the tests before them left
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.merge_from_file(config_path(path))
    cfg.merge_from_list(
        ["MODEL.DEVICE", device_under_test(), "MODEL.WEIGHTS", "", "OUTPUT_DIR", out,
         "DATASETS.TRAIN", f"('{DS}',)", "DATASETS.TEST", f"('{DS}',)",
         "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0"] + list(opts)
    )
    return cfg


class TestCCGRPart1(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.enterClassContext(datasets_root(os.path.join(cls.tmp.name, "data")))
        cls.dicts = DatasetCatalog.get(DS)
        cls.proposals = os.path.join(cls.tmp.name, "proposals.pkl")
        fast = SelectiveSearchProposals(
            scales=(100.0,), colour_spaces=("hsv",), similarities=("CTSF",), max_proposals=300
        )
        cls.proposal_stats = make_proposal_file(cls.proposals, cls.dicts, fast)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def _cues(self):
        path = os.path.join(self.tmp.name, "cues.pkl")
        if os.path.exists(path):
            return path
        cfg = _cfg("demo/ccgr_cls_mnv2_synthetic.yaml", os.path.join(self.tmp.name, "cls"),
                   ["SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)"])
        cfg.freeze()
        trainer = WSISTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        loader = build_detection_test_loader(cfg, DS, mapper=build_dataset_mapper(cfg, False))
        params = dict(cue_parameters(cfg), peak_threshold=0.0)  # an untrained model: keep peaks
        cues = compute_cues(trainer.model, loader, params)
        self.assertEqual(set(cues), {d["image_id"] for d in self.dicts})
        for d in self.dicts:
            peaks, sem = cues[d["image_id"]]
            self.assertEqual(tuple(sem.shape), (d["height"], d["width"]))
            present = {a["category_id"] for a in d["annotations"]}
            self.assertTrue(set(peaks[:, 0].long().tolist()) <= present)  # present classes only
        write_cues(path, cues, 8)
        return path

    def _ccgr_cfg(self, out, cues, opts=()):
        return _cfg("ccgr_mnv2_synthetic.yaml", out, [
            "INPUT.CCGR.CUES_FILE", cues, "DATASETS.PROPOSAL_FILES_TRAIN", f"('{self.proposals}',)",
            "DATASETS.PROPOSAL_FILES_TEST", f"('{self.proposals}',)", "MODEL.CCGR.REFINE_STEPS", "6",
            "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
        ] + list(opts))

    def test_end_to_end(self):
        self.assertEqual(self.proposal_stats["images"], len(self.dicts))
        cues = self._cues()
        out = os.path.join(self.tmp.name, "ccgr")
        cfg = self._ccgr_cfg(out, cues, ["SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)"])
        cfg.freeze()
        trainer = WSISTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        # the trained model with a refiner that also reports the boxes after 0, 3 and 6 steps
        model = trainer.model.replace(refiner=ContextGapRefiner(cfg, snapshots=(0, 3, 6)))
        loader = build_detection_test_loader(cfg, DS, mapper=build_dataset_mapper(cfg, False))
        evaluator = InstanceAPEvaluator(DS, distributed=False)
        evaluator.reset()
        pseudo = {}
        for inp, res in run_ccgr_inference(model, loader):
            h, w = inp["height"], inp["width"]
            self.assertEqual(tuple(res["sem_seg"].shape), (9, h, w))
            # S over the image's present classes and the background only
            absent = torch.cat([inp["labels"] < 0.5, torch.zeros(1, dtype=torch.bool)])
            self.assertTrue(bool((res["sem_seg"][absent] == 0).all()))
            torch.testing.assert_close(res["sem_seg"].sum(0), torch.ones(h, w))
            inst = res["instances"]
            self.assertEqual(inst.image_size, (h, w))
            info = res["ccgr"]
            self.assertEqual(sorted(info["snapshots"]), [0, 3, 6])
            self.assertTrue(bool(torch.isfinite(info["refined_boxes"]).all()))
            # MODEL.CCGR.REFINE_GROW_ONLY (the default): each refined box holds its MIL box
            self.assertTrue(model.refiner.grow_only)
            mil = info["mil_boxes"].clone()
            mil[:, 0::2] = mil[:, 0::2].clamp(0, w)
            mil[:, 1::2] = mil[:, 1::2].clamp(0, h)
            refined_boxes = info["refined_boxes"]
            self.assertTrue(bool((refined_boxes[:, :2] <= mil[:, :2] + 1e-4).all()))
            self.assertTrue(bool((refined_boxes[:, 2:] >= mil[:, 2:] - 1e-4).all()))
            evaluator.process([inp], [res])
            pseudo[inp["image_id"]] = inst
        results = evaluator.evaluate()["wsis_instance"]
        self.assertTrue(0.0 <= results["mAP_b50"] <= 100.0)
        # the pseudo labels as COCO json, read back as a dataset of the package
        meta = MetadataCatalog.get(DS)
        inverse = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        path = os.path.join(self.tmp.name, "pseudo.json")
        n = write_pseudo_label_json(path, self.dicts, pseudo, [inverse[c] for c in range(8)],
                                    meta.thing_classes)
        self.assertEqual(n, sum(len(i) for i in pseudo.values()))
        register_coco_counts_instances("_test_ccgr_pseudo", {}, path, "")
        try:
            loaded = DatasetCatalog.get("_test_ccgr_pseudo")
            self.assertEqual(len(loaded), len(self.dicts))
            self.assertEqual(sum(len(d["annotations"]) for d in loaded), n)
        finally:
            DatasetCatalog.remove("_test_ccgr_pseudo")
            MetadataCatalog.remove("_test_ccgr_pseudo")
        # SCORE_MODE "regions" (the default): refinement and masks read S averaged over the
        # image's graph regions; "pixels": S itself
        model.eval()
        inp = next(iter(loader))[0]
        regions = graph_segment(inp["image"].float(), *model.labeller.segment_params)
        regions = torch.nn.functional.interpolate(
            regions[None, None].float(), size=(inp["height"], inp["width"]), mode="nearest"
        )[0, 0].long().numpy()
        refined = {}
        # the descent alone (REFINE_SEARCH off), whose boxes follow S at every step: the search
        # ends on the whole image in both modes (this untrained model's MIL boxes nearly cover it)
        for mode in ("pixels", "regions"):
            other = cfg.clone()
            other.defrost()
            other.MODEL.CCGR.REFINE_SEARCH = False
            other.MODEL.CCGR.SCORE_MODE = mode
            # the trained model with a refiner and a labeller of those settings
            variant = model.replace(
                refiner=ContextGapRefiner(other), labeller=PseudoLabeller(other)
            )
            with torch.no_grad():
                res = variant([inp])[0]
            if mode == "regions":
                with self.assertRaisesRegex(ValueError, "need the input"):
                    variant.labeller(
                        res["sem_seg"], res["ccgr"]["mil_boxes"], res["ccgr"]["classes"],
                        res["ccgr"]["mil_scores"])
            s = res["sem_seg"][:8].cpu().numpy().astype(np.float64)
            if mode == "regions":
                for r in np.unique(regions):
                    s[:, regions == r] = s[:, regions == r].mean(axis=1, keepdims=True)
            info = {k: v.cpu() for k, v in res["ccgr"].items() if k != "snapshots"}
            refined[mode] = info["refined_boxes"]
            expected = pseudo_instances(torch.tensor(s, dtype=torch.float32), info["refined_boxes"],
                                        info["classes"], info["mil_scores"],
                                        mask_threshold=model.labeller.mask_threshold,
                                        nms_threshold=model.labeller.nms_threshold)
            # MASK_REFINE "grabcut" (the default): then GrabCut on the image at the output size
            self.assertEqual(model.labeller.mask_refine, "grabcut")
            image = torch.nn.functional.interpolate(
                inp["image"][None].float(), size=(inp["height"], inp["width"]), mode="bilinear",
                align_corners=False)[0]
            expected.pred_masks = grabcut_masks(image, expected.pred_boxes.tensor,
                                                expected.pred_masks,
                                                iterations=model.labeller.grabcut_iters,
                                                context_scale=model.labeller.context_scale)
            expected = assign_pixels(expected)
            self.assertGreater(len(expected), 0)
            self.assertEqual(len(res["instances"]), len(expected))
            self.assertTrue(torch.equal(res["instances"].pred_masks.cpu(), expected.pred_masks))
        self.assertFalse(torch.equal(refined["pixels"], refined["regions"]))  # refinement reads it
        # MASK_REFINE "none": the thresholded region scores themselves
        other = cfg.clone()
        other.defrost()
        other.MODEL.CCGR.MASK_REFINE = "none"
        with torch.no_grad():
            res = model.replace(labeller=PseudoLabeller(other))([inp])[0]
        info = {k: v.cpu() for k, v in res["ccgr"].items() if k != "snapshots"}
        plain = pseudo_instances(torch.tensor(s, dtype=torch.float32), info["refined_boxes"],
                                 info["classes"], info["mil_scores"],
                                 mask_threshold=model.labeller.mask_threshold,
                                 nms_threshold=model.labeller.nms_threshold)
        self.assertTrue(torch.equal(res["instances"].pred_masks.cpu(), plain.pred_masks))
        # DefaultPredictor-style input without cues: connected components, no crash
        image = torch.randint(0, 255, (3, 97, 131), dtype=torch.uint8)
        with torch.no_grad():
            res = model([{"image": image, "height": 97, "width": 131}])[0]
        self.assertEqual(res["instances"].image_size, (97, 131))

    def _map_first_image(self, cues, proposal_topk, flip=False):
        """(first training image with its proposals, its training input without / with a flip)."""
        d = load_proposals_into_dataset([dict(self.dicts[0])], self.proposals)[0]
        augs = [T.RandomFlip(prob=1.0)] if flip else []
        mapper = CCGRDatasetMapper(True, augmentations=augs, image_format="RGB", num_classes=8,
                                   proposal_topk=proposal_topk, cues=cues)
        return d, mapper(d)

    def test_mapper_flips_everything_and_keeps_no_ground_truth(self):
        cues = load_cues(self._cues())
        d, plain = self._map_first_image(cues, 50)
        _, flipped = self._map_first_image(cues, 50, flip=True)
        w = d["width"]
        for out in (plain, flipped):
            self.assertNotIn("annotations", out)
            self.assertNotIn("instances", out)
            self.assertEqual(set(out) & {"image", "labels", "proposals", "peaks", "sem_seg"},
                             {"image", "labels", "proposals", "peaks", "sem_seg"})
        counts = np.bincount([a["category_id"] for a in d["annotations"]], minlength=8)
        self.assertEqual(plain["labels"].tolist(), (counts > 0).astype(np.float32).tolist())
        torch.testing.assert_close(flipped["sem_seg"], plain["sem_seg"].flip(-1))
        torch.testing.assert_close(flipped["image"], plain["image"].flip(-1))
        if len(plain["peaks"]):
            torch.testing.assert_close(flipped["peaks"][:, 1], w - plain["peaks"][:, 1])
        pb = plain["proposals"].proposal_boxes.tensor
        fb = flipped["proposals"].proposal_boxes.tensor
        torch.testing.assert_close(fb[:, 0], w - pb[:, 2])

    def test_bad_proposal_files_and_cues(self):
        cues = self._cues()
        data = load_proposal_file(self.proposals)
        missing = os.path.join(self.tmp.name, "missing_one.pkl")
        save_proposal_file(missing, data["ids"][1:], data["boxes"][1:], data["objectness_logits"][1:])
        cfg = self._ccgr_cfg(os.path.join(self.tmp.name, "bad"), cues,
                             ["DATASETS.PROPOSAL_FILES_TRAIN", f"('{missing}',)"])
        with self.assertRaisesRegex(ValueError, f"missing_one.pkl.*{data['ids'][0]!r}"):
            build_dataset_mapper(cfg, True)
        outside = os.path.join(self.tmp.name, "outside.pkl")
        boxes = [b.copy() for b in data["boxes"]]
        boxes[2][0] = [0, 0, 5000, 10]
        save_proposal_file(outside, data["ids"], boxes, data["objectness_logits"])
        cfg = self._ccgr_cfg(os.path.join(self.tmp.name, "bad"), cues,
                             ["DATASETS.PROPOSAL_FILES_TRAIN", f"('{outside}',)"])
        with self.assertRaisesRegex(ValueError, f"outside.pkl.*{data['ids'][2]!r}.*outside"):
            build_dataset_mapper(cfg, True)
        with open(outside, "wb") as f:
            pickle.dump({"ids": data["ids"], "boxes": [np.zeros((3, 5))] * len(data["ids"])}, f)
        with self.assertRaisesRegex(ValueError, "outside.pkl.*shape"):
            build_dataset_mapper(cfg, True)
        cfg = self._ccgr_cfg(os.path.join(self.tmp.name, "bad"), "no/such/cues.pkl")
        with self.assertRaisesRegex(ValueError, "CUES_FILE.*no/such/cues.pkl"):
            build_dataset_mapper(cfg, True)

    def _seed_box_cues(self):
        """Cues of a later round: the ground-truth boxes stand in for the IS branch's boxes."""
        cues = load_cues(self._cues())
        round2, seeds = {}, {}
        for d in self.dicts:
            rows = [
                [a["category_id"], a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                 a["bbox"][1] + a["bbox"][3], 0.9]
                for a in d["annotations"]
            ]  # fmt: skip
            sb = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
            centres = torch.stack(
                [sb[:, 0], (sb[:, 1] + sb[:, 3]) / 2, (sb[:, 2] + sb[:, 4]) / 2, sb[:, 5]], dim=1
            )
            sem = torch.from_numpy(np.asarray(Image.open(cues["sem_seg"][d["image_id"]])))
            round2[d["image_id"]] = (centres, sem)
            seeds[d["image_id"]] = sb
        path = os.path.join(self.tmp.name, "round2_cues.pkl")
        write_cues(path, round2, 8, seed_boxes=seeds)
        return path, seeds

    def test_seed_box_cues_of_later_rounds(self):
        path, seeds = self._seed_box_cues()
        cues = load_cues(path)
        self.assertIn("seed_boxes", cues)
        d, plain = self._map_first_image(cues, 300)
        _, flipped = self._map_first_image(cues, 300, flip=True)
        w = d["width"]
        torch.testing.assert_close(plain["seed_boxes"], seeds[d["image_id"]])
        torch.testing.assert_close(flipped["seed_boxes"][:, 1], w - plain["seed_boxes"][:, 3])
        torch.testing.assert_close(flipped["seed_boxes"][:, 3], w - plain["seed_boxes"][:, 1])
        # trained and run on them: every bag is a seed box; its MIL box is the seed box itself or
        # one of the K - 1 proposals of highest IoU with it (MODEL.CCGR.SEED_IN_BAG, the default)
        cfg = self._ccgr_cfg(os.path.join(self.tmp.name, "round2"), path,
                             ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)"])
        cfg.freeze()
        trainer = WSISTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model
        loader = build_detection_test_loader(cfg, DS, mapper=build_dataset_mapper(cfg, False))
        other = cfg.clone()
        other.defrost()
        other.MODEL.CCGR.SEED_IN_BAG = False
        plain_bags = BagBuilder(other)
        checked = 0
        for inp, res in run_ccgr_inference(model, loader):
            info = res["ccgr"]
            sb = inp["seed_boxes"]  # input pixels, as the proposals
            self.assertEqual(len(info["classes"]), len(sb))
            self.assertEqual(info["classes"].tolist(), sb[:, 0].long().tolist())
            props = inp["proposals"].proposal_boxes
            h_in, w_in = inp["image"].shape[-2:]
            to_input = torch.tensor([w_in / inp["width"], h_in / inp["height"]] * 2)
            for box, seed in zip(info["mil_boxes"], sb):
                iou = pairwise_iou(Boxes(seed[None, 1:5]), props)[0]
                top = torch.topk(iou, 9).values
                mine = pairwise_iou(Boxes(seed[None, 1:5]), Boxes((box * to_input)[None]))[0, 0]
                if float(mine) < 1 - 1e-4:
                    self.assertGreaterEqual(float(mine), float(top[-1]) - 1e-5)
                checked += 1
            # the bags themselves: instance 0 of each bag is its seed box, appended to the proposals
            boxes, objectness, peaks = model._fields(inp, 0)
            bags, _, rows, _, all_boxes = model.bag_builder(inp, boxes, objectness, peaks, None)
            self.assertEqual(len(all_boxes), len(props) + len(sb))
            torch.testing.assert_close(all_boxes.tensor[bags[:, 0]], sb[rows, 1:5])
            bags, _, _, _, plain_boxes = plain_bags(inp, boxes, objectness, peaks, None)
            self.assertEqual(len(plain_boxes), len(props))
            self.assertTrue(bool((bags < len(props)).all()))
        self.assertGreater(checked, 0)
        # a cues file whose seed boxes do not pair with its peaks
        bad = dict(cues)
        first = self.dicts[0]["image_id"]
        bad["seed_boxes"] = dict(bad["seed_boxes"])
        bad["seed_boxes"][first] = np.zeros((0, 6), np.float32)
        if len(cues["peaks"][first]):
            with self.assertRaisesRegex(ValueError, "seed boxes"):
                self._map_first_image(bad, 50)

    def test_pseudo_label_json_checked_against_its_dataset(self):
        meta = MetadataCatalog.get(DS)
        inverse = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        ids = [inverse[c] for c in range(8)]
        d0 = self.dicts[0]
        inst = Instances((d0["height"], d0["width"]))
        masks = torch.zeros(1, d0["height"], d0["width"], dtype=torch.bool)
        masks[0, 5:20, 5:30] = True
        inst.pred_masks = masks
        inst.pred_classes = torch.tensor([3])
        inst.scores = torch.tensor([0.7])
        good = os.path.join(self.tmp.name, "pseudo_ok.json")
        write_pseudo_label_json(good, self.dicts, {d0["image_id"]: inst}, ids, meta.thing_classes)
        self.assertEqual(check_pseudo_label_json(good, self.dicts, meta.thing_classes), 1)
        with self.assertRaisesRegex(ValueError, "pseudo_ok.json.*images"):
            check_pseudo_label_json(good, self.dicts[1:], meta.thing_classes)
        with self.assertRaisesRegex(ValueError, "pseudo_ok.json.*categories"):
            check_pseudo_label_json(good, self.dicts, list(meta.thing_classes)[::-1])
        moved = [dict(d) for d in self.dicts]
        moved[1]["height"] += 1
        with self.assertRaisesRegex(ValueError, f"pseudo_ok.json.*{moved[1]['image_id']!r}"):
            check_pseudo_label_json(good, moved, meta.thing_classes)
        empty = os.path.join(self.tmp.name, "pseudo_empty.json")
        write_pseudo_label_json(empty, self.dicts, {}, ids, meta.thing_classes)
        with self.assertRaisesRegex(ValueError, "round 2: .*pseudo_empty.json.*no pseudo instance"):
            check_pseudo_label_json(empty, self.dicts, meta.thing_classes, "round 2")
        with self.assertRaisesRegex(ValueError, "not_there.json"):
            check_pseudo_label_json(os.path.join(self.tmp.name, "not_there.json"), self.dicts,
                                    meta.thing_classes)

    def test_images_without_peaks_train_without_bags(self):
        cues_path = self._cues()
        cues = load_cues(cues_path)
        empty = {
            k: (torch.zeros(0, 4), torch.from_numpy(np.asarray(Image.open(cues["sem_seg"][k]))))
            for k in cues["peaks"]
        }
        path = os.path.join(self.tmp.name, "no_peaks.pkl")
        write_cues(path, empty, 8)
        cfg = self._ccgr_cfg(os.path.join(self.tmp.name, "nopeaks"), path,
                             ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)"])
        cfg.freeze()
        trainer = WSISTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()  # the SS branch trains, the MIL loss is a connected zero
        self.assertGreaterEqual(trainer.model.images_without_bags, 4)


if __name__ == "__main__":
    unittest.main()
