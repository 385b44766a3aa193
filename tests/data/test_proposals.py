"""Proposals: the selective-search generator, the proposal files and their converters, and
tools/make_proposals.py on a registered dataset (the file loads with detectron2's loader)."""

import os
import pickle
import tempfile
import unittest

import numpy as np
import scipy.io
from detectron2.data import DatasetCatalog
from detectron2.data.build import load_proposals_into_dataset
from detectron2.structures import BoxMode

import wsis_d2  # noqa: F401  (registers the synthetic datasets)
from wsis_d2.testing import datasets_root, load_tool
from wsis_d2.data.proposals import (
    SelectiveSearchProposals,
    check_proposals,
    load_fast_rcnn_mat,
    load_mcg_mat,
    load_proposal_file,
    save_proposal_file,
    score_to_logit,
)
from wsis_d2.evaluation import proposal_recall


def _load_tool():
    module = load_tool("make_proposals")
    return module


def _scene():
    """A 70 x 90 image: two flat rectangles on a flat background."""
    image = np.full((70, 90, 3), 40, np.uint8)
    image[10:30, 15:45] = (200, 30, 30)
    image[40:65, 50:80] = (30, 200, 60)
    return image, np.array([[15, 10, 45, 30], [50, 40, 80, 65]], np.float32)


class TestSelectiveSearch(unittest.TestCase):
    def test_finds_the_objects_and_ranks_them(self):
        image, gt = _scene()
        for min_size in (0, 140):  # native size, and resized (boxes return to image pixels)
            with self.subTest(min_size=min_size):
                boxes, scores = SelectiveSearchProposals(min_size=min_size, max_proposals=50)(image)
                self.assertLessEqual(len(boxes), 50)
                self.assertTrue(np.all(np.diff(scores) <= 0))  # sorted by straddling
                self.assertTrue(np.all((scores >= 0) & (scores <= 1)))
                self.assertTrue(np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 2] <= 90))
                self.assertTrue(np.all(boxes[:, 1] >= 0) and np.all(boxes[:, 3] <= 70))
                self.assertEqual(proposal_recall([gt], [boxes], 50, 0.9), 1.0)
                # boxes along the flat rectangles' outlines cut few regions: they come first
                self.assertEqual(proposal_recall([gt], [boxes], 5, 0.75), 1.0)

    def test_bad_configuration_and_input(self):
        with self.assertRaisesRegex(ValueError, "similarities"):
            SelectiveSearchProposals(similarities=("XYZ",))
        with self.assertRaisesRegex(ValueError, "colour space"):
            SelectiveSearchProposals(colour_spaces=("cmyk",))
        with self.assertRaisesRegex(ValueError, "uint8"):
            SelectiveSearchProposals()(np.zeros((5, 5, 3), np.float32))


class TestProposalFiles(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dicts = [
            {"image_id": 7, "file_name": "a.jpg", "height": 20, "width": 30},
            {"image_id": "b", "file_name": "b.jpg", "height": 10, "width": 10},
        ]

    def tearDown(self):
        self.tmp.cleanup()

    def _path(self, name):
        return os.path.join(self.tmp.name, name)

    def test_round_trip_sorted_and_detectron2_loads_it(self):
        path = self._path("p.pkl")
        boxes = [np.array([[0, 0, 5, 5], [1, 1, 20, 10]], np.float32), np.zeros((0, 4))]
        logits = [np.array([0.1, 2.0], np.float32), np.zeros(0)]
        save_proposal_file(path, [7, "b"], boxes, logits)
        data = load_proposal_file(path)
        self.assertEqual(data["ids"], [7, "b"])
        np.testing.assert_array_equal(data["boxes"][0], boxes[0][::-1])  # best first
        check_proposals(path, data, self.dicts)
        loaded = load_proposals_into_dataset([dict(d) for d in self.dicts], path)
        np.testing.assert_array_equal(loaded[0]["proposal_boxes"], boxes[0][::-1])
        self.assertEqual(loaded[0]["proposal_bbox_mode"], BoxMode.XYXY_ABS)
        self.assertEqual(loaded[1]["proposal_boxes"].shape, (0, 4))

    def test_errors_name_the_file_and_image(self):
        path = self._path("p.pkl")
        save_proposal_file(path, [7], [np.zeros((1, 4), np.float32)], [np.zeros(1)])
        with self.assertRaisesRegex(ValueError, r"p\.pkl.*'b'"):
            check_proposals(path, load_proposal_file(path), self.dicts)
        save_proposal_file(
            path, [7, "b"], [np.array([[0, 0, 5, 5]], np.float32), np.array([[2, 2, 14, 5]])],
            [np.zeros(1), np.zeros(1)],
        )
        with self.assertRaisesRegex(ValueError, r"p\.pkl.*'b'.*outside"):
            check_proposals(path, load_proposal_file(path), self.dicts)
        with open(path, "wb") as f:
            pickle.dump({"ids": [7], "boxes": [np.zeros((2, 3))], "objectness_logits": [np.zeros(2)]}, f)
        with self.assertRaisesRegex(ValueError, r"p\.pkl.*7.*shape"):
            load_proposal_file(path)
        with self.assertRaisesRegex(ValueError, "does not exist"):
            load_proposal_file(self._path("missing.pkl"))

    def test_fast_rcnn_pickle_keys(self):
        path = self._path("frcn.pkl")
        with open(path, "wb") as f:
            pickle.dump({"indexes": [7], "boxes": [np.array([[1, 2, 3, 4]])],
                         "scores": [np.array([0.5])]}, f)
        data = load_proposal_file(path)
        self.assertEqual(data["ids"], [7])
        np.testing.assert_array_equal(data["objectness_logits"][0], [0.5])

    def test_mcg_and_fast_rcnn_mat(self):
        mcg = self._path("a.mat")
        # 1-based inclusive [y1 x1 y2 x2]
        scipy.io.savemat(mcg, {"boxes": np.array([[1, 1, 10, 20], [3, 4, 5, 6]]),
                               "scores": np.array([[0.2], [0.9]])})
        boxes, scores = load_mcg_mat(mcg)
        np.testing.assert_array_equal(boxes, [[3, 2, 6, 5], [0, 0, 20, 10]])
        np.testing.assert_allclose(scores, [0.9, 0.2])
        scipy.io.savemat(mcg, {"boxes": np.array([[1, 1, 10, 20]])})
        with self.assertRaisesRegex(ValueError, "scores"):
            load_mcg_mat(mcg)
        frcn = self._path("ss.mat")
        arr = np.empty((1, 2), dtype=object)
        arr[0, 0] = np.array([[1, 1, 10, 20]])
        arr[0, 1] = np.array([[2, 2, 4, 4], [1, 1, 2, 2]])
        scipy.io.savemat(frcn, {"images": np.array([["a"], ["b"]], dtype=object), "boxes": arr})
        names, arrays = load_fast_rcnn_mat(frcn)
        self.assertEqual(names, ["a", "b"])
        np.testing.assert_array_equal(arrays[1], [[1, 1, 4, 4], [0, 0, 2, 2]])

    def test_score_to_logit(self):
        np.testing.assert_allclose(score_to_logit(np.array([0.5, 0.0, 1.0]))[0], 0.0)
        self.assertTrue(np.all(np.isfinite(score_to_logit(np.array([0.0, 1.0])))))


class TestMakeProposalsTool(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.enterClassContext(datasets_root(os.path.join(cls.tmp.name, "data")))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_selective_search_and_mcg_on_a_dataset(self):
        tool = _load_tool()
        out = os.path.join(self.tmp.name, "mini.pkl")
        tool.main(["--dataset", "wsis_synth_mini_val", "--output", out, "--workers", "0",
                   "--max-proposals", "300"])
        dicts = DatasetCatalog.get("wsis_synth_mini_val")
        loaded = load_proposals_into_dataset([dict(d) for d in dicts], out)
        self.assertEqual(len(loaded), len(dicts))
        self.assertTrue(all(0 < len(d["proposal_boxes"]) <= 300 for d in loaded))
        gt = [np.array([a["bbox"] for a in d["annotations"]]).reshape(-1, 4) for d in dicts]
        self.assertGreater(proposal_recall(gt, [d["proposal_boxes"] for d in loaded], 300, 0.7), 0.8)
        # MCG files for all but one image: the missing one is named
        mcg = os.path.join(self.tmp.name, "mcg")
        os.makedirs(mcg)
        for d in dicts[1:]:
            stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
            scipy.io.savemat(os.path.join(mcg, stem + ".mat"),
                             {"boxes": np.array([[1, 1, 10, 10]]), "scores": np.array([[0.7]])})
        with self.assertRaisesRegex(ValueError, f"image id {dicts[0]['image_id']!r}"):
            tool.main(["--dataset", "wsis_synth_mini_val", "--output", out, "--mcg-dir", mcg])


if __name__ == "__main__":
    unittest.main()
