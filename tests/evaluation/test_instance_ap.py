"""InstanceAPEvaluator against hand-computed APs and an independent brute-force reference."""

import json
import os
import tempfile
import unittest
import uuid
from unittest import mock

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from wsis_d2.evaluation import InstanceAPEvaluator
from wsis_d2.evaluation import gather as gather_module
from wsis_d2.evaluation import instance_ap as instance_ap_module
from wsis_d2.evaluation.instance_ap import (
    average_precision,
    match_detections,
    pairwise_box_iou,
    voc_ap,
)


def rect_mask(h, w, x1, y1, x2, y2):
    """(h, w) bool mask with pixels [y1, y2) x [x1, x2) set."""
    m = np.zeros((h, w), dtype=bool)
    m[y1:y2, x1:x2] = True
    return m


def mask_box(m):
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def gt_ann(m, cls, iscrowd=0):
    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    ys, xs = np.nonzero(m)
    return {
        "bbox": mask_box(m),
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": cls,
        "segmentation": rle,
        "point": [float(xs[0]), float(ys[0])],
        "iscrowd": iscrowd,
    }


def pred_output(h, w, masks, scores, classes, boxes=None):
    inst = Instances((h, w))
    if len(masks):
        inst.pred_masks = torch.from_numpy(np.stack(masks))
    else:
        inst.pred_masks = torch.zeros((0, h, w), dtype=torch.bool)
    if boxes is None:
        boxes = [mask_box(m) for m in masks]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return {"instances": inst}


class _DatasetCase(unittest.TestCase):
    """Registers a throwaway dataset per test and removes it afterwards."""

    classes = ["a", "b"]

    def register(self, records):
        name = f"_test_instance_ap_{uuid.uuid4().hex}"
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(thing_classes=list(self.classes))

        def cleanup():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

        self.addCleanup(cleanup)
        return name

    def evaluate(self, records, outputs, **kwargs):
        name = self.register(records)
        ev = InstanceAPEvaluator(name, distributed=False, **kwargs)
        ev.reset()
        for rec, out in zip(records, outputs):
            ev.process([{"image_id": rec["image_id"], "file_name": rec["file_name"]}], [out])
        return ev.evaluate()["wsis_instance"]


def record(image_id, h, w, anns):
    return {
        "file_name": f"img{image_id}.png",
        "height": h,
        "width": w,
        "image_id": image_id,
        "annotations": anns,
    }


class TestHandComputed(_DatasetCase):
    H, W = 40, 50

    def test_perfect_predictions(self):
        m = [rect_mask(self.H, self.W, 0, 0, 10, 10), rect_mask(self.H, self.W, 20, 5, 35, 30)]
        m2 = rect_mask(self.H, self.W, 5, 5, 25, 15)
        recs = [
            record(0, self.H, self.W, [gt_ann(m[0], 0), gt_ann(m[1], 1)]),
            record(1, self.H, self.W, [gt_ann(m2, 0)]),
        ]
        outs = [
            pred_output(self.H, self.W, m, [0.9, 0.8], [0, 1]),
            pred_output(self.H, self.W, [m2], [0.3], [0]),
        ]
        res = self.evaluate(recs, outs)
        for key in ("mAP_r25", "mAP_r50", "mAP_r75", "mAP_b50", "AP_r50/a", "AP_r50/b"):
            self.assertAlmostEqual(res[key], 100.0, places=6, msg=key)

    def test_fp_ranked_above_tp(self):
        gt = rect_mask(self.H, self.W, 0, 0, 10, 10)
        fp = rect_mask(self.H, self.W, 30, 20, 40, 30)
        recs = [record(0, self.H, self.W, [gt_ann(gt, 0)])]
        outs = [pred_output(self.H, self.W, [fp, gt], [0.9, 0.8], [0, 0])]
        res = self.evaluate(recs, outs)
        # ranks: FP, TP -> P = (0, 1/2), R = (0, 1) -> AP = 1 * 1/2
        self.assertAlmostEqual(res["mAP_r50"], 50.0, places=6)
        self.assertAlmostEqual(res["mAP_b50"], 50.0, places=6)

    def test_tp_fp_tp(self):
        g1 = rect_mask(self.H, self.W, 0, 0, 10, 10)
        g2 = rect_mask(self.H, self.W, 20, 20, 30, 35)
        fp = rect_mask(self.H, self.W, 40, 0, 50, 10)
        recs = [record(0, self.H, self.W, [gt_ann(g1, 0), gt_ann(g2, 0)])]
        outs = [pred_output(self.H, self.W, [g2, g1, fp], [0.7, 0.9, 0.8], [0, 0, 0])]
        res = self.evaluate(recs, outs)
        # ranks TP, FP, TP: P = (1, 1/2, 2/3), R = (1/2, 1/2, 1); envelope (1, 2/3, 2/3)
        # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
        self.assertAlmostEqual(res["mAP_r50"], 100 * 5 / 6, places=6)

    def test_duplicate_is_false_positive(self):
        g1 = rect_mask(self.H, self.W, 0, 0, 10, 10)
        g2 = rect_mask(self.H, self.W, 20, 20, 30, 35)
        recs = [record(0, self.H, self.W, [gt_ann(g1, 0), gt_ann(g2, 0)])]
        # g1 twice (second copy is a duplicate), then g2
        outs = [pred_output(self.H, self.W, [g1, g1, g2], [0.9, 0.8, 0.7], [0, 0, 0])]
        res = self.evaluate(recs, outs)
        self.assertAlmostEqual(res["mAP_r50"], 100 * 5 / 6, places=6)

    def test_matching_follows_score_order_not_list_order(self):
        g = rect_mask(self.H, self.W, 0, 0, 10, 10)
        fp = rect_mask(self.H, self.W, 30, 20, 40, 30)
        recs = [record(0, self.H, self.W, [gt_ann(g, 0)])]
        # both copies of g compete for it; the higher-scored one (listed last) must win
        outs = [pred_output(self.H, self.W, [g, fp, g], [0.6, 0.7, 0.9], [0, 0, 0])]
        res = self.evaluate(recs, outs)
        # ranks TP (0.9), FP, FP -> AP 1 (list order would give FP, FP, TP -> 1/3)
        self.assertAlmostEqual(res["mAP_r50"], 100.0, places=6)

    def test_best_gt_already_matched_is_false_positive(self):
        # SDS/VOC: a detection goes to its max-IoU GT even if taken; it does not fall back
        g1 = rect_mask(self.H, self.W, 0, 0, 20, 10)
        g2 = rect_mask(self.H, self.W, 0, 10, 20, 20)
        d2 = rect_mask(self.H, self.W, 0, 0, 20, 17)  # IoU 10/17 with g1 (0.59), 7/20 with g2
        recs = [record(0, self.H, self.W, [gt_ann(g1, 0), gt_ann(g2, 0)])]
        outs = [pred_output(self.H, self.W, [g1, d2], [0.9, 0.8], [0, 0])]
        res = self.evaluate(recs, outs)
        # TP then FP: AP = 1/2
        self.assertAlmostEqual(res["mAP_r25"], 50.0, places=6)

    def test_class_without_gt_excluded_from_mean(self):
        g = rect_mask(self.H, self.W, 0, 0, 10, 10)
        other = rect_mask(self.H, self.W, 20, 20, 30, 30)
        recs = [record(0, self.H, self.W, [gt_ann(g, 0)])]
        outs = [pred_output(self.H, self.W, [g, other], [0.5, 0.9], [0, 1])]
        res = self.evaluate(recs, outs)
        self.assertAlmostEqual(res["mAP_r50"], 100.0, places=6)
        self.assertAlmostEqual(res["AP_r50/a"], 100.0, places=6)
        self.assertNotIn("AP_r50/b", res)

    def test_iou_threshold_boundaries(self):
        h = w = 100
        g = rect_mask(h, w, 0, 0, 100, 100)
        cases = {  # width of a full-height strip -> IoU = width / 100
            51: {"mAP_r25": 100, "mAP_r50": 100, "mAP_r75": 0},
            50: {"mAP_r25": 100, "mAP_r50": 100, "mAP_r75": 0},  # IoU == threshold counts
            49: {"mAP_r25": 100, "mAP_r50": 0, "mAP_r75": 0},
            76: {"mAP_r25": 100, "mAP_r50": 100, "mAP_r75": 100},
            74: {"mAP_r25": 100, "mAP_r50": 100, "mAP_r75": 0},
            24: {"mAP_r25": 0, "mAP_r50": 0, "mAP_r75": 0},
        }
        for width, expected in cases.items():
            with self.subTest(width=width):
                recs = [record(0, h, w, [gt_ann(g, 0)])]
                outs = [pred_output(h, w, [rect_mask(h, w, 0, 0, width, 100)], [0.9], [0])]
                res = self.evaluate(recs, outs)
                for key, value in expected.items():
                    self.assertAlmostEqual(res[key], value, places=6, msg=key)
                self.assertAlmostEqual(res["mAP_b50"], 100 if width >= 50 else 0, places=6)

    def test_crowd_ignored(self):
        g = rect_mask(self.H, self.W, 0, 0, 10, 10)
        crowd = rect_mask(self.H, self.W, 20, 10, 45, 35)
        recs = [record(0, self.H, self.W, [gt_ann(g, 0), gt_ann(crowd, 0, iscrowd=1)])]
        # detection on the crowd ranked first: ignored, not FP -> AP 100 (would be 50 if FP)
        outs = [pred_output(self.H, self.W, [crowd, g], [0.95, 0.9], [0, 0])]
        res = self.evaluate(recs, outs)
        self.assertAlmostEqual(res["mAP_r50"], 100.0, places=6)
        self.assertAlmostEqual(res["mAP_b50"], 100.0, places=6)
        # crowd GT is no positive: detecting only the crowd gives AP 0, not 50
        outs = [pred_output(self.H, self.W, [crowd], [0.95], [0])]
        self.assertAlmostEqual(self.evaluate(recs, outs)["mAP_r50"], 0.0, places=6)
        # below the threshold with the crowd it is a plain FP
        near = rect_mask(self.H, self.W, 20, 10, 30, 20)  # IoU 100/625 with the crowd
        outs = [pred_output(self.H, self.W, [near, g], [0.95, 0.9], [0, 0])]
        self.assertAlmostEqual(self.evaluate(recs, outs)["mAP_r50"], 50.0, places=6)

    def test_mask_and_box_iou_differ(self):
        h, w = 20, 20
        # GT: L-shape (left column + bottom row); prediction: the other L with the same box
        gt = np.zeros((h, w), dtype=bool)
        gt[:, :4] = True
        gt[16:, :] = True
        pred = np.zeros((h, w), dtype=bool)
        pred[:4, :] = True
        pred[:, 16:] = True
        recs = [record(0, h, w, [gt_ann(gt, 0)])]
        outs = [pred_output(h, w, [pred], [0.9], [0])]
        res = self.evaluate(recs, outs)
        self.assertAlmostEqual(res["mAP_b50"], 100.0, places=6)  # both boxes are the full image
        self.assertAlmostEqual(res["mAP_r25"], 0.0, places=6)  # mask IoU 32/256
        # and the converse: right mask, a wrong box
        outs = [pred_output(h, w, [gt], [0.9], [0], boxes=[[0.0, 0.0, 4.0, 4.0]])]
        res = self.evaluate(recs, outs)
        self.assertAlmostEqual(res["mAP_b50"], 0.0, places=6)
        self.assertAlmostEqual(res["mAP_r75"], 100.0, places=6)

    def test_multiple_images_global_ranking(self):
        ga = rect_mask(self.H, self.W, 0, 0, 10, 10)
        gb = rect_mask(self.H, self.W, 10, 10, 30, 30)
        fp = rect_mask(self.H, self.W, 35, 30, 45, 40)
        recs = [
            record(0, self.H, self.W, [gt_ann(ga, 0)]),
            record(1, self.H, self.W, [gt_ann(gb, 0)]),
        ]
        outs = [
            pred_output(self.H, self.W, [fp, ga], [0.9, 0.7], [0, 0]),
            pred_output(self.H, self.W, [gb], [0.8], [0]),
        ]
        res = self.evaluate(recs, outs)
        # ranks FP (img0), TP (img1), TP (img0): P = (0, 1/2, 2/3), R = (0, 1/2, 1)
        # envelope at the recall steps: 2/3 and 2/3 -> AP = 2/3
        self.assertAlmostEqual(res["mAP_r50"], 100 * 2 / 3, places=6)

    def test_two_classes_mean(self):
        ga = rect_mask(self.H, self.W, 0, 0, 10, 10)
        gb = rect_mask(self.H, self.W, 10, 10, 30, 30)
        fp = rect_mask(self.H, self.W, 35, 30, 45, 40)
        recs = [record(0, self.H, self.W, [gt_ann(ga, 0), gt_ann(gb, 1)])]
        outs = [pred_output(self.H, self.W, [ga, fp, gb], [0.5, 0.9, 0.4], [0, 1, 1])]
        res = self.evaluate(recs, outs)
        self.assertAlmostEqual(res["AP_r50/a"], 100.0, places=6)
        self.assertAlmostEqual(res["AP_r50/b"], 50.0, places=6)
        self.assertAlmostEqual(res["mAP_r50"], 75.0, places=6)

    def test_empty_predictions(self):
        g = rect_mask(self.H, self.W, 0, 0, 10, 10)
        recs = [record(0, self.H, self.W, [gt_ann(g, 0)])]
        outs = [pred_output(self.H, self.W, [], [], [])]
        res = self.evaluate(recs, outs)
        for key in ("mAP_r25", "mAP_r50", "mAP_r75", "mAP_b50"):
            self.assertEqual(res[key], 0.0)

    def test_polygon_gt_xywh_box_float_masks_and_missing_boxes(self):
        h, w = 30, 30
        poly = [[5.0, 5.0, 25.0, 5.0, 25.0, 25.0, 5.0, 25.0]]
        ann = {
            "bbox": [5.0, 5.0, 20.0, 20.0],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 1,
            "segmentation": poly,
            "iscrowd": 0,
        }
        recs = [record(7, h, w, [ann])]
        soft = rect_mask(h, w, 5, 5, 25, 25).astype(np.float32) * 0.8  # >= 0.5 -> foreground
        inst = Instances((h, w))
        inst.pred_masks = torch.from_numpy(soft[None])
        inst.scores = torch.tensor([0.9])
        inst.pred_classes = torch.tensor([1])
        res = self.evaluate(recs, [{"instances": inst}])
        self.assertAlmostEqual(res["mAP_r75"], 100.0, places=6)
        self.assertAlmostEqual(res["mAP_b50"], 100.0, places=6)
        self.assertAlmostEqual(res["AP_b50/b"], 100.0, places=6)


class TestEvaluatorBehaviour(_DatasetCase):
    H, W = 24, 32

    def _data(self):
        g = [rect_mask(self.H, self.W, 0, 0, 8, 8), rect_mask(self.H, self.W, 10, 10, 20, 20)]
        recs = [record(i, self.H, self.W, [gt_ann(g[i], 0)]) for i in range(2)]
        outs = [pred_output(self.H, self.W, [g[i]], [0.5], [0]) for i in range(2)]
        return recs, outs

    def test_missing_instances_skipped_with_one_warning(self):
        recs, outs = self._data()
        name = self.register(recs)
        ev = InstanceAPEvaluator(name, distributed=False)
        with self.assertLogs(instance_ap_module.logger, level="WARNING") as logs:
            ev.process([{"image_id": 0}, {"image_id": 1}], [{"counts": None}, {"counts": None}])
        self.assertEqual(len(logs.records), 1)
        ev.process([{"image_id": 1}], [outs[1]])
        # image 0 was skipped, so its GT is not in the evaluated set: AP 100
        self.assertAlmostEqual(ev.evaluate()["wsis_instance"]["mAP_r50"], 100.0, places=6)

    def test_distributed_gather(self):
        recs, outs = self._data()
        name = self.register(recs)
        evs = [InstanceAPEvaluator(name, distributed=True) for _ in range(2)]
        # image 1 on rank 0, image 0 on rank 1; image 0 has a miss on rank 1
        evs[0].process([{"image_id": 1}], [outs[1]])
        evs[1].process([{"image_id": 0}], [pred_output(self.H, self.W, [], [], [])])
        parts = [evs[0]._predictions, evs[1]._predictions]
        comm = gather_module.comm  # the evaluators gather through wsis_d2.evaluation.gather
        with mock.patch.object(comm, "gather", return_value=parts), mock.patch.object(
            comm, "synchronize"
        ):
            with mock.patch.object(comm, "is_main_process", return_value=True):
                res = evs[0].evaluate()["wsis_instance"]
            with mock.patch.object(comm, "is_main_process", return_value=False):
                self.assertEqual(evs[1].evaluate(), {})
        self.assertAlmostEqual(res["mAP_r50"], 50.0, places=6)

    def test_output_dir_json(self):
        recs, outs = self._data()
        with tempfile.TemporaryDirectory() as d:
            res = self.evaluate(recs, outs, output_dir=d)
            with open(os.path.join(d, "instance_ap.json")) as f:
                saved = json.load(f)
        self.assertEqual(saved["results"]["AP_r50/a"], res["AP_r50/a"])
        self.assertEqual(saved["num_gt"], {"a": 2, "b": 0})

    def test_bad_inputs_raise(self):
        recs, outs = self._data()
        name = self.register(recs)
        ev = InstanceAPEvaluator(name, distributed=False)
        ev.process([{"image_id": 0}], [pred_output(self.H + 1, self.W, [], [], [])])
        with self.assertRaisesRegex(ValueError, "pred_masks"):
            ev.evaluate()
        ev.reset()
        ev.process([{"image_id": 99}], [outs[0]])
        with self.assertRaisesRegex(ValueError, "99"):
            ev.evaluate()
        bad = [record(0, self.H, self.W, [dict(gt_ann(rect_mask(self.H, 8, 0, 0, 2, 2), 0))])]
        ev = InstanceAPEvaluator(self.register(bad), distributed=False)
        ev.process([{"image_id": 0}], [outs[0]])
        with self.assertRaisesRegex(ValueError, "img0.png.*segmentation"):
            ev.evaluate()
        # a count-only image (counts without annotations) cannot be scored: its objects have no mask
        counted = record(0, self.H, self.W, [])
        counted["class_counts"] = [0, 2]
        ev = InstanceAPEvaluator(self.register([counted]), distributed=False)
        ev.process([{"image_id": 0}], [outs[0]])
        with self.assertRaisesRegex(ValueError, "img0.png.*counts 2 objects.*0 non-crowd"):
            ev.evaluate()


def reference_voc_ap(is_tp, num_pos):
    """AP as (1 / num_pos) * sum over true positives of the best precision at that rank or later."""
    is_tp = np.asarray(is_tp, dtype=bool)
    total = 0.0
    for k in range(len(is_tp)):
        if is_tp[k]:
            best = max(is_tp[: j + 1].sum() / (j + 1) for j in range(k, len(is_tp)))
            total += best
    return total / num_pos


class TestAgainstBruteForce(_DatasetCase):
    classes = ["a", "b", "c"]

    def test_voc_ap_formula(self):
        rng = np.random.default_rng(0)
        for _ in range(50):
            n = int(rng.integers(1, 30))
            is_tp = rng.random(n) < 0.5
            num_pos = int(is_tp.sum() + rng.integers(0, 4)) or 1
            tp = np.cumsum(is_tp)
            ap = voc_ap(tp / num_pos, tp / np.arange(1, n + 1))
            self.assertAlmostEqual(ap, reference_voc_ap(is_tp, num_pos), places=10)

    def test_random_scenes(self):
        rng = np.random.default_rng(1)
        h, w = 32, 40
        thresholds = (0.25, 0.5, 0.75)
        recs, outs, dense_gt, dense_pred = [], [], [], []
        for i in range(10):
            gts = []
            for _ in range(int(rng.integers(0, 5))):
                x1, y1 = int(rng.integers(0, w - 6)), int(rng.integers(0, h - 6))
                x2, y2 = x1 + int(rng.integers(3, 14)), y1 + int(rng.integers(3, 14))
                m = rect_mask(h, w, x1, y1, min(x2, w), min(y2, h))
                gts.append((m, int(rng.integers(0, 3)), int(rng.random() < 0.15)))
            preds = []
            for m, c, _ in gts:  # jittered copies of GT and random boxes
                for _ in range(int(rng.integers(0, 4))):
                    ys, xs = np.nonzero(m)
                    dx, dy = rng.integers(-2, 3, size=2)
                    jit = rect_mask(
                        h,
                        w,
                        max(xs.min() + dx, 0),
                        max(ys.min() + dy, 0),
                        min(xs.max() + 1 + dx + int(rng.integers(-1, 2)), w),
                        min(ys.max() + 1 + dy, h),
                    )
                    if jit.any():
                        preds.append((jit, c if rng.random() < 0.85 else (c + 1) % 3))
            for _ in range(int(rng.integers(0, 3))):
                x1, y1 = int(rng.integers(0, w - 5)), int(rng.integers(0, h - 5))
                preds.append((rect_mask(h, w, x1, y1, x1 + 5, y1 + 5), int(rng.integers(0, 3))))
            # scores on a coarse grid so that ties occur
            scores = [float(rng.integers(1, 8)) / 8 for _ in preds]
            recs.append(record(i, h, w, [gt_ann(m, c, crowd) for m, c, crowd in gts]))
            outs.append(pred_output(h, w, [p[0] for p in preds], scores, [p[1] for p in preds]))
            dense_gt.append(gts)
            dense_pred.append([(m, c, s) for (m, c), s in zip(preds, scores)])

        res = self.evaluate(recs, outs, iou_thresholds=thresholds)

        def dense_iou(a, b):
            return (a & b).sum() / (a | b).sum()

        def boxes_iou(a, b):
            ba, bb = mask_box(a), mask_box(b)
            iw = max(0.0, min(ba[2], bb[2]) - max(ba[0], bb[0]))
            ih = max(0.0, min(ba[3], bb[3]) - max(ba[1], bb[1]))
            inter = iw * ih
            area = lambda q: (q[2] - q[0]) * (q[3] - q[1])  # noqa: E731
            return inter / (area(ba) + area(bb) - inter)

        for tag, iou_fn, thr in [("r", dense_iou, t) for t in thresholds] + [("b", boxes_iou, 0.5)]:
            aps = []
            for c in range(3):
                ranked = []  # (score, image, order) with a tie-break matching a stable sort
                num_pos = 0
                flags = {}
                for i, (gts, preds) in enumerate(zip(dense_gt, dense_pred)):
                    g = [(m, crowd) for m, cc, crowd in gts if cc == c]
                    num_pos += sum(1 for _, crowd in g if not crowd)
                    d = [(s, k, m) for k, (m, cc, s) in enumerate(preds) if cc == c]
                    d.sort(key=lambda t: -t[0])  # stable: original order breaks ties
                    used = [False] * len(g)
                    for s, k, m in d:
                        ious = [iou_fn(m, gm) for gm, _ in g]
                        flag = 0
                        if ious:
                            j = int(np.argmax(ious))
                            if ious[j] >= thr:
                                if g[j][1]:
                                    flag = -1
                                elif not used[j]:
                                    used[j] = True
                                    flag = 1
                        ranked.append((s, i, len(ranked)))
                        flags[len(ranked) - 1] = flag
                if num_pos == 0:
                    continue
                ranked.sort(key=lambda t: (-t[0], t[2]))
                seq = [flags[t[2]] for t in ranked if flags[t[2]] >= 0]
                aps.append(reference_voc_ap([f == 1 for f in seq], num_pos))
                name = self.classes[c]
                self.assertAlmostEqual(
                    res[f"AP_{tag}{int(thr * 100)}/{name}"], 100 * aps[-1], places=6
                )
            self.assertAlmostEqual(res[f"mAP_{tag}{int(thr * 100)}"], 100 * np.mean(aps), places=6)


class TestBadInputsNamed(_DatasetCase):
    """The AP functions reject inputs that break their invariants, naming the argument."""

    H, W = 40, 50

    def test_nan_scores_are_rejected_with_the_image_id(self):
        m = rect_mask(self.H, self.W, 5, 5, 20, 20)
        recs = [record(7, self.H, self.W, [gt_ann(m, 0)])]
        name = self.register(recs)
        ev = InstanceAPEvaluator(name, distributed=False)
        out = pred_output(self.H, self.W, [m, m], [float("nan"), 0.5], [0, 0])
        with self.assertRaisesRegex(ValueError, r"image_id 7 .*'scores' must be finite, got nan"):
            ev.process([{"image_id": 7, "file_name": "img7.png"}], [out])
        out = pred_output(self.H, self.W, [m], [float("inf")], [0])
        with self.assertRaisesRegex(ValueError, "image_id 7.*'scores'"):
            ev.process([{"image_id": 7}], [out])

    def test_voc_ap(self):
        self.assertAlmostEqual(voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0])), 1.0)
        with self.assertRaisesRegex(ValueError, r"'recall' must lie in \[0, 1\], got 2.0"):
            voc_ap(np.array([1.0, 2.0]), np.array([1.0, 1.0]))
        with self.assertRaisesRegex(ValueError, "'recall' must be non-decreasing.*0.8 then 0.4"):
            voc_ap(np.array([0.8, 0.4]), np.array([1.0, 0.5]))
        with self.assertRaisesRegex(ValueError, r"'precision' must lie in \[0, 1\], got -0.1"):
            voc_ap(np.array([0.5, 1.0]), np.array([1.0, -0.1]))
        with self.assertRaisesRegex(ValueError, "'precision' must not contain NaN"):
            voc_ap(np.array([0.5, 1.0]), np.array([np.nan, 1.0]))
        with self.assertRaisesRegex(
            ValueError, r"'recall' and 'precision' must have the same shape"
        ):
            voc_ap(np.array([0.5]), np.array([1.0, 1.0]))

    def test_match_detections(self):
        ious = np.array([[0.7, 0.1]])
        self.assertEqual(match_detections(ious, np.zeros(2, bool), 0.5).tolist(), [1])
        for bad in (1.5, -0.1, float("nan")):
            with self.assertRaisesRegex(ValueError, r"'iou_threshold' must lie in \[0.0, 1.0\]"):
                match_detections(ious, np.zeros(2, bool), bad)
        with self.assertRaisesRegex(TypeError, "'iou_threshold' must be a real number"):
            match_detections(ious, np.zeros(2, bool), "0.5")
        with self.assertRaisesRegex(ValueError, r"'ious' must lie in \[0, 1\]"):
            match_detections(ious * 2, np.zeros(2, bool), 0.5)
        with self.assertRaisesRegex(ValueError, "'gt_ignore' must have G = 2 entries"):
            match_detections(ious, np.zeros(3, bool), 0.5)
        with self.assertRaisesRegex(ValueError, "'ious' must have 2 dimensions"):
            match_detections(np.array([0.7, 0.1]), np.zeros(2, bool), 0.5)

    def test_average_precision(self):
        self.assertAlmostEqual(average_precision(np.array([0.9]), np.array([1]), 1), 1.0)
        self.assertTrue(np.isnan(average_precision(np.zeros(0), np.zeros(0), 0)))
        with self.assertRaisesRegex(ValueError, r"'scores' must not contain NaN.*\(0,\)"):
            average_precision(np.array([np.nan, 0.5]), np.array([1, 0]), 1)
        with self.assertRaisesRegex(
            ValueError, "2 true positives in 'labels' but num_positives is 1"
        ):
            average_precision(np.array([0.9, 0.5]), np.array([1, 1]), 1)
        with self.assertRaisesRegex(ValueError, "'labels' must be -1, 0 or 1"):
            average_precision(np.array([0.9]), np.array([2]), 1)
        with self.assertRaisesRegex(ValueError, r"'labels' must have shape \(2,\), got \(1,\)"):
            average_precision(np.array([0.9, 0.5]), np.array([1]), 1)
        with self.assertRaisesRegex(ValueError, r"'num_positives' must lie in \[0, inf\], got -1"):
            average_precision(np.zeros(0), np.zeros(0), -1)

    def test_pairwise_box_iou(self):
        self.assertEqual(pairwise_box_iou([], [[0, 0, 1, 1]]).shape, (0, 1))
        with self.assertRaisesRegex(
            ValueError, r"'boxes1' must have shape \(\*, 4\), got \(2, 2\)"
        ):
            pairwise_box_iou(np.zeros((2, 2)), np.zeros((1, 4)))
        with self.assertRaisesRegex(ValueError, "'boxes2' must not contain NaN"):
            pairwise_box_iou(np.zeros((1, 4)), np.array([[0, 0, np.nan, 1]]))


if __name__ == "__main__":
    unittest.main()
