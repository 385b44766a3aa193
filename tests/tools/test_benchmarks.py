"""The real-data benchmarks: they stop at once, naming the missing path, when their data is absent;
the CCGR config they build."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

from wsis_d2.testing import load_tool, repo_root

ROOT = repo_root()


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


class TestMissingData(unittest.TestCase):
    def test_vgg_cells_benchmark_names_the_folder(self):
        with tempfile.TemporaryDirectory() as d:
            missing = os.path.join(d, "nowhere", "vgg_cells")
            res = _run("tools/benchmark_density.py", "--dataset", "vgg_cells", "--data-root",
                       missing)
            self.assertNotEqual(res.returncode, 0)
            self.assertIn(missing, res.stderr)
            # the default: $DETECTRON2_DATASETS/vgg_cells
            res = _run("tools/benchmark_density.py", "--dataset", "vgg_cells",
                       env={"DETECTRON2_DATASETS": d})
            self.assertNotEqual(res.returncode, 0)
            self.assertIn(os.path.join(d, "vgg_cells"), res.stderr)

    def test_real_benchmark_names_the_file(self):
        with tempfile.TemporaryDirectory() as d:
            missing = os.path.join(d, "train.json")
            res = _run("tools/benchmark_real.py", "--json", missing, "--images", d,
                       "--output", os.path.join(d, "out"))
            self.assertNotEqual(res.returncode, 0)
            self.assertIn(f"--json: {missing} does not exist", res.stderr)


class TestRealSplit(unittest.TestCase):
    def test_stratified_seeded_split(self):
        split_coco = load_tool("benchmark_real").split_coco
        images, anns = [], []
        # 40 images of class 1, 20 of class 2, 8 of both; labels from image_labels or annotations
        for i in range(68):
            labels = [1] if i < 40 else [2] if i < 60 else [1, 2]
            img = {"id": i + 1, "file_name": f"{i}.jpg", "height": 8, "width": 8}
            if i % 2:
                img["image_labels"] = labels
            else:
                anns += [{"id": len(anns) + 1, "image_id": i + 1, "category_id": c,
                          "bbox": [0, 0, 2, 2]} for c in labels]
            images.append(img)
        data = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
        train, val = split_coco(data, 0.25, seed=0)
        tr, va = {i["id"] for i in train["images"]}, {i["id"] for i in val["images"]}
        self.assertFalse(tr & va)
        self.assertEqual(tr | va, set(range(1, 69)))
        self.assertEqual(len(va & set(range(1, 41))), 10)  # a quarter of each label set
        self.assertEqual(len(va & set(range(41, 61))), 5)
        self.assertEqual(len(va & set(range(61, 69))), 2)
        self.assertTrue(all(a["image_id"] in va for a in val["annotations"]))
        self.assertEqual(len(train["annotations"]) + len(val["annotations"]), len(anns))
        self.assertEqual(split_coco(data, 0.25, seed=0)[1], val)  # seeded
        self.assertNotEqual({i["id"] for i in split_coco(data, 0.25, seed=1)[1]["images"]}, va)


class TestRealCCGRConfig(unittest.TestCase):
    def test_rounds_come_from_the_config_unless_given(self):
        tool = load_tool("benchmark_real")
        base = ["--json", "a.json", "--images", "im"]
        for extra, rounds in (([], 2), (["--rounds", "3"], 3), (["MODEL.CCGR.ROUNDS.NUM", "1"], 1)):
            args = tool.argument_parser().parse_args(base + extra)
            cfg = tool.ccgr_cfg(args, "real_train", 3, [])
            self.assertEqual(cfg.MODEL.CCGR.ROUNDS.NUM, rounds, extra)  # configs/real: 2 rounds
            self.assertEqual(cfg.DATASETS.TRAIN, ("real_train",))
            self.assertEqual(cfg.MODEL.ROI_HEADS.NUM_CLASSES, 3)


class TestRealPartialResults(unittest.TestCase):
    def test_a_failing_method_keeps_the_figures_of_those_before_it(self):
        import json
        from unittest import mock

        from detectron2.data import DatasetCatalog

        tool = load_tool("benchmark_real")
        for name in ("partial_train", "partial_val"):
            if name not in DatasetCatalog.list():
                DatasetCatalog.register(name, lambda: [{}])

        def ccgr_fails(*args):
            raise RuntimeError("CCGR stage failed")

        with tempfile.TemporaryDirectory() as d, mock.patch.multiple(
            tool,
            prepare_data=lambda args: ("partial_train", "partial_val", ["a", "b"]),
            run_supervised=lambda *a: ({"mAP_r50": 60.0}, 1.0, 2.0),
            run_lc=lambda *a: ({"mRMSE": 1.0, "baseline_mRMSE": 2.0, "mAP_r50": 30.0}, 3.0, 4.0, 7),
            run_ccgr=ccgr_fails,
        ):
            # run in the order supervised, lc, ccgr whatever the order given
            argv = ["--json", "x.json", "--images", d, "--output", d, "--methods", "ccgr,lc,supervised"]
            with self.assertRaisesRegex(RuntimeError, "CCGR stage failed"):
                tool.main(argv)
            with open(os.path.join(d, "benchmark_real.json")) as f:
                saved = json.load(f)
            self.assertEqual(saved["unfinished"], ["ccgr"])
            self.assertEqual(saved["supervised_mAP_r50"], 60.0)
            self.assertEqual(saved["lc_mRMSE_over_baseline"], 0.5)
            self.assertEqual(saved["times_s"]["lc/train"], 3.0)
            # a whole run leaves no "unfinished"
            out = tool.main(argv[:-1] + ["supervised,lc"])
            with open(os.path.join(d, "benchmark_real.json")) as f:
                self.assertEqual(json.load(f), out)
            self.assertNotIn("unfinished", out)


class TestRealDataPreparation(unittest.TestCase):
    def _file(self, d, images, categories):
        import json

        path = os.path.join(d, "data.json")
        with open(path, "w") as f:
            json.dump({"images": images, "annotations": [], "categories": categories}, f)
        return path

    def test_an_empty_split_stops_before_training(self):
        tool = load_tool("benchmark_real")
        with tempfile.TemporaryDirectory() as d:
            # 4 label sets of 2 images: a quarter of 2 rounds to 0 in each, so no validation
            images = [{"id": i, "file_name": f"{i}.jpg", "height": 8, "width": 8,
                       "image_labels": [1 + i % 4]} for i in range(8)]
            path = self._file(d, images, [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)])
            args = tool.argument_parser().parse_args(
                ["--json", path, "--images", d, "--output", d, "--name", "empty_split"])
            with self.assertRaisesRegex(SystemExit, "leaves the validation split .* empty"):
                tool.prepare_data(args)

    def test_count_only_images_stop_before_training(self):
        tool = load_tool("benchmark_real")
        with tempfile.TemporaryDirectory() as d:
            images = [{"id": i, "file_name": f"{i}.jpg", "height": 8, "width": 8,
                       "image_counts": {"1": i % 3}} for i in range(8)]
            path = self._file(d, images, [{"id": 1, "name": "a"}])
            args = tool.argument_parser().parse_args(
                ["--json", path, "--images", d, "--output", d, "--name", "count_only"])
            with self.assertRaisesRegex(SystemExit, r"5 images have 'image_counts' but no annot"):
                tool.prepare_data(args)

    def test_another_file_with_other_classes_in_the_same_process(self):
        from detectron2.data import MetadataCatalog

        tool = load_tool("benchmark_real")
        with tempfile.TemporaryDirectory() as d:
            # int and str image ids mixed, as the loader allows
            images = [{"id": i if i % 2 else f"im{i}", "file_name": f"{i}.jpg", "height": 8,
                       "width": 8, "image_labels": [1]} for i in range(8)]
            for names in (["a"], ["b"]):
                path = self._file(d, images, [{"id": 1, "name": names[0]}])
                args = tool.argument_parser().parse_args(
                    ["--json", path, "--images", d, "--output", d, "--name", "two_files"])
                train, val, classes = tool.prepare_data(args)
                self.assertEqual(classes, names)
                self.assertEqual(MetadataCatalog.get(train).thing_classes, names)
                self.assertEqual(MetadataCatalog.get(val).thing_classes, names)


class TestCocoLoadingBenchmark(unittest.TestCase):
    def test_generated_file_and_a_missing_one(self):
        res = _run("tools/benchmark_coco_loading.py", "--images", "30", "--evaluations", "2")
        self.assertEqual(res.returncode, 0, res.stderr[-2000:])
        out = json.loads(res.stdout.strip().splitlines()[-1])
        self.assertEqual(out["images"], 30)
        self.assertGreater(out["annotations"], 30)
        self.assertEqual(len(out["evaluation_s"]), 2)
        with tempfile.TemporaryDirectory() as d:
            missing = os.path.join(d, "instances_val2014.json")
            res = _run("tools/benchmark_coco_loading.py", "--json", missing)
            self.assertNotEqual(res.returncode, 0)
            self.assertIn(missing, res.stderr)
