"""
tools/demo.py with tiny fake models registered here (so the test does not depend on the LC
model): input expansion, the rendered PNG (instances, density heatmap, peaks, counts band) and
counts.json. A real LC model is exercised too when a CPU demo config for it exists.
"""

import glob
import json
import os
import tempfile
import unittest

import numpy as np
import torch
from PIL import Image
from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances

from wsis_d2.testing import config_path, load_tool

H, W = 120, 160
CLASSES = ["apple", "bean", "cherry"]
META = "_test_demo_fruit"
# fake outputs, in output-image pixels: an instance of class 1 in the top-left quarter
MASK_BOX = (10, 30, 70, 80)  # x1, y1, x2, y2
PEAK = (1, 60.0, 120.0)  # class, y, x
COUNTS = [0.0, 2.0, 1.0]
SEEN_INPUT_SIZES = []  # (h, w) of the images the fake models received


def _load_demo():
    return load_tool("demo")


def _fake_instances(h, w):
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    x1, y1, x2, y2 = MASK_BOX
    masks[0, y1:y2, x1:x2] = True
    masks[1, 90:110, 5:30] = True
    inst = Instances((h, w))
    inst.pred_masks = masks
    inst.pred_boxes = Boxes(torch.tensor([MASK_BOX, (5, 90, 30, 110)], dtype=torch.float32))
    inst.scores = torch.tensor([0.9, 0.2])
    inst.pred_classes = torch.tensor([1, 0])
    return inst


class _FakeBase(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, batched_inputs):
        outs = []
        for inp in batched_inputs:
            SEEN_INPUT_SIZES.append(tuple(inp["image"].shape[-2:]))
            outs.append(self.output(int(inp["height"]), int(inp["width"])))
        return outs


@META_ARCH_REGISTRY.register()
class _DemoTestFakeCounter(_FakeBase):
    """Instances + counts + density (quarter resolution, blob around the peak) + peaks."""

    def output(self, h, w):
        density = torch.zeros(3, h // 4, w // 4)
        py, px = int(PEAK[1]) // 4, int(PEAK[2]) // 4
        density[1, py - 1 : py + 2, px - 1 : px + 2] = 1.0
        density[2, 1, 1] = 0.5
        return {
            "instances": _fake_instances(h, w),
            "counts": torch.tensor(COUNTS),
            "density": density,
            "peaks": torch.tensor([PEAK]),
        }


@META_ARCH_REGISTRY.register()
class _DemoTestFakeCounterWithExtras(_DemoTestFakeCounter):
    """LC with MODEL.LC.PRM.EXTRA_PEAKS: the low-score instance is an extra peak's."""

    def output(self, h, w):
        out = super().output(h, w)
        out["instances"].counted = torch.tensor([True, False])
        return out


@META_ARCH_REGISTRY.register()
class _DemoTestFakeInstancesOnly(_FakeBase):
    """A Mask R-CNN-like output: instances only."""

    def output(self, h, w):
        return {"instances": _fake_instances(h, w)}


class TestDemo(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.demo = _load_demo()
        cls.tmp = tempfile.TemporaryDirectory()
        if META not in MetadataCatalog.list():
            MetadataCatalog.get(META).set(thing_classes=CLASSES)
        cls.img_dir = os.path.join(cls.tmp.name, "imgs")
        os.makedirs(os.path.join(cls.img_dir, "sub"))
        rng = np.random.RandomState(0)
        # mid-grey images with mild noise, so that overlays are easy to detect
        cls.image = (120 + rng.randint(0, 16, size=(H, W, 3))).astype(np.uint8)
        for rel in ("a.png", "b.jpg", "sub/a.png"):
            Image.fromarray(cls.image).save(os.path.join(cls.img_dir, rel), quality=100)
        with open(os.path.join(cls.img_dir, "notes.txt"), "w") as f:
            f.write("not an image")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def _args(self, arch, out, inputs, extra=()):
        cfg_path = os.path.join(self.tmp.name, f"{arch}.yaml")
        with open(cfg_path, "w") as f:
            f.write(
                f"MODEL:\n  META_ARCHITECTURE: {arch}\n  DEVICE: cpu\n  WEIGHTS: ''\n"
                f"DATASETS:\n  TEST: ('{META}',)\n"
                "INPUT:\n  MIN_SIZE_TEST: 240\n  MAX_SIZE_TEST: 1000\n"
            )
        source = ["--input", *inputs] if isinstance(inputs, list) else ["--dataset", inputs]
        argv = ["--config-file", cfg_path, "--output", out, *source, *extra]
        return self.demo.get_parser().parse_args(argv)

    def test_expand_inputs(self):
        d = self.img_dir
        paths = self.demo.expand_inputs(
            [os.path.join(d, "b.jpg"), d, os.path.join(d, "*", "*.png")]
        )
        self.assertEqual(
            paths,
            [os.path.join(d, "b.jpg"), os.path.join(d, "a.png"), os.path.join(d, "sub", "a.png")],
        )
        with self.assertRaisesRegex(ValueError, "nothing_here"):
            self.demo.expand_inputs([os.path.join(d, "nothing_here*.png")])

    def test_counter_outputs(self):
        out = os.path.join(self.tmp.name, "out_counter")
        args = self._args(
            "_DemoTestFakeCounter",
            out,
            [os.path.join(self.img_dir, "a.png"), os.path.join(self.img_dir, "sub")],
            ["--confidence-threshold", "0.5"],
        )
        results = self.demo.main(args)
        # two inputs with the same stem get distinct PNGs
        pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.png")))
        self.assertEqual(pngs, ["a.png", "a_1.png"])
        with open(os.path.join(out, "counts.json")) as f:
            saved = json.load(f)
        self.assertEqual(saved, results)
        for entry in saved.values():
            self.assertEqual(entry["counts"], dict(zip(CLASSES, COUNTS)))
            self.assertEqual(entry["num_instances"], 2)

        pic = np.asarray(Image.open(os.path.join(out, "a.png")).convert("RGB")).astype(int)
        # [instances | summed density] side by side, counts band below
        self.assertEqual(pic.shape[1], 2 * W)
        self.assertGreater(pic.shape[0], H)
        inst_panel, heat_panel, band = pic[:H, :W], pic[:H, W:], pic[H:]
        x1, y1, x2, y2 = MASK_BOX
        grey = self.image.astype(int)
        # the mask interior is tinted; the low-score instance (bottom-left) is not drawn
        inside = np.abs(
            inst_panel[y1 + 15 : y2 - 5, x1 + 5 : x2 - 5] - grey[y1 + 15 : y2 - 5, x1 + 5 : x2 - 5]
        )
        self.assertGreater(inside.mean(), 10)
        low = np.abs(inst_panel[92:108, 7:28] - grey[92:108, 7:28])
        self.assertLess(low.mean(), 3)
        # heatmap: the density peak region is red-ish (JET high), the far corner blue-ish
        py, px = int(PEAK[1]), int(PEAK[2])
        self.assertEqual(tuple(heat_panel[py, px]), (0, 0, 0))  # the peak dot
        hot = heat_panel[py - 6 : py + 7, px - 6 : px + 7].reshape(-1, 3)
        self.assertGreater((hot[:, 0] - hot[:, 2]).max(), 50)
        cold = heat_panel[H - 20 :, 2:30].reshape(-1, 3)
        self.assertGreater((cold[:, 2] - cold[:, 0]).mean(), 20)
        # the band holds dark text on white
        self.assertEqual(band.max(), 255)
        self.assertLess(band.min(), 100)
        # the model saw the resized image (MIN_SIZE_TEST 240) and answered at the input size
        self.assertIn((240, 320), SEEN_INPUT_SIZES)

    def test_counting_models_draw_every_instance_by_default(self):
        out = os.path.join(self.tmp.name, "out_default")
        args = self._args("_DemoTestFakeCounter", out, [os.path.join(self.img_dir, "a.png")])
        self.demo.main(args)
        pic = np.asarray(Image.open(os.path.join(out, "a.png")).convert("RGB")).astype(int)
        # the low-score instance (bottom-left) is drawn: a counting model's instances are its
        # counted objects
        low = np.abs(pic[92:108, 7:28] - self.image.astype(int)[92:108, 7:28])
        self.assertGreater(low.mean(), 10)

    def test_extra_peaks_are_not_drawn_by_default(self):
        low_box = (slice(92, 108), slice(7, 28))  # the extra instance, bottom-left
        drawn = {}
        for name, extra in (("default", []), ("threshold", ["--confidence-threshold", "0.1"])):
            out = os.path.join(self.tmp.name, f"out_extras_{name}")
            args = self._args(
                "_DemoTestFakeCounterWithExtras", out, [os.path.join(self.img_dir, "a.png")], extra
            )
            (entry,) = self.demo.main(args).values()
            self.assertEqual(entry["counts"], dict(zip(CLASSES, COUNTS)))
            pic = np.asarray(Image.open(os.path.join(out, "a.png")).convert("RGB")).astype(int)
            drawn[name] = np.abs(pic[low_box] - self.image.astype(int)[low_box]).mean()
        # by default only what the model counted; with a threshold every instance above it
        self.assertLess(drawn["default"], 10)
        self.assertGreater(drawn["threshold"], 10)

    def test_per_class_density_and_instances_only(self):
        out = os.path.join(self.tmp.name, "out_per_class")
        args = self._args(
            "_DemoTestFakeCounter",
            out,
            [os.path.join(self.img_dir, "b.jpg")],
            ["--density", "per-class"],
        )
        self.demo.main(args)
        pic = np.asarray(Image.open(os.path.join(out, "b.png")))
        # instances + one heatmap per class with a non-zero count (bean, cherry)
        self.assertEqual(pic.shape[1], 3 * W)

        out = os.path.join(self.tmp.name, "out_instances")
        args = self._args(
            "_DemoTestFakeInstancesOnly", out, [os.path.join(self.img_dir, "b.jpg")]
        )
        results = self.demo.main(args)
        (entry,) = results.values()
        # counted from the instances scoring >= 0.5 (the default without model counts): one bean
        self.assertEqual(entry["counts"], {"apple": 0.0, "bean": 1.0, "cherry": 0.0})
        pic = np.asarray(Image.open(os.path.join(out, "b.png")))
        self.assertEqual(pic.shape[1], W)
        args = self._args(
            "_DemoTestFakeInstancesOnly",
            out,
            [os.path.join(self.img_dir, "b.jpg")],
            ["--confidence-threshold", "0.1"],
        )
        (entry,) = self.demo.main(args).values()
        self.assertEqual(entry["counts"], {"apple": 1.0, "bean": 1.0, "cherry": 0.0})

    def test_dataset_images_with_true_counts(self):
        name = "_test_demo_fruit_dataset"
        files = [os.path.join(self.img_dir, f) for f in ("a.png", "b.jpg", "sub/a.png")]
        truth = [[1, 0, 3], [0, 2, 0], [5, 5, 5]]
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(
                name,
                lambda: [
                    {"file_name": f, "image_id": i, "height": H, "width": W, "class_counts": t}
                    for i, (f, t) in enumerate(zip(files, truth))
                ],
            )
            MetadataCatalog.get(name).set(thing_classes=CLASSES)
        out = os.path.join(self.tmp.name, "out_dataset")
        args = self._args("_DemoTestFakeCounter", out, name, ["--num-images", "2"])
        results = self.demo.main(args)
        # the first two records, in dataset order, with their true counts next to the predicted
        self.assertEqual(list(results), files[:2])
        for f, t in zip(files[:2], truth[:2]):
            self.assertEqual(results[f]["true_counts"], dict(zip(CLASSES, map(float, t))))
            self.assertEqual(results[f]["counts"], dict(zip(CLASSES, COUNTS)))
        # the band lists "predicted/true" and every class with a non-zero predicted or true count
        plain = self.demo.counts_strip(2 * W, np.array(COUNTS), CLASSES)
        both = self.demo.counts_strip(2 * W, np.array(COUNTS), CLASSES, np.array([1.0, 0, 0]))
        self.assertGreater(both.shape[0], plain.shape[0])
        pic = np.asarray(Image.open(results[files[0]]["output"]))
        self.assertEqual(pic.shape[0], H + both.shape[0])
        with self.assertRaisesRegex(ValueError, "no_such_dataset"):
            self.demo.dataset_inputs("no_such_dataset", 2)
        with self.assertRaisesRegex(ValueError, "--num-images"):
            self.demo.dataset_inputs(name, 0)
        # --input and --dataset exclude each other
        with self.assertRaises(SystemExit):
            self.demo.get_parser().parse_args(
                ["--config-file", "x.yaml", "--output", out, "--input", "a", "--dataset", name]
            )

    def test_coco_json_registered_with_register_coco_counts_instances(self):
        # a user's COCO json (category ids 3, 7, 9), registered before and after it exists: the
        # metadata's thing_classes come from the json, so --dataset names the classes right
        from wsis_d2.data.datasets import register_coco_counts_instances, thing_classes_of
        from wsis_d2.evaluation import CountingEvaluator

        files = ["a.png", "b.jpg"]
        truth = [[1, 0, 2], [0, 3, 0]]
        cats = [{"id": cid, "name": n} for cid, n in zip((3, 7, 9), CLASSES)]
        images = [
            {"id": i + 1, "file_name": f, "height": H, "width": W} for i, f in enumerate(files)
        ]
        anns = []
        for i, t in enumerate(truth):
            for c, num in enumerate(t):
                for _ in range(num):
                    anns.append({"id": len(anns) + 1, "image_id": i + 1,
                                 "category_id": cats[c]["id"], "bbox": [5, 5, 10, 10]})  # fmt: skip
        data = {"images": images, "annotations": anns, "categories": cats}
        for when in ("before", "after"):
            with self.subTest(json_written=when):
                name = f"_test_demo_coco_counts_{when}"
                path = os.path.join(self.tmp.name, f"{name}.json")
                if when == "before":
                    with open(path, "w") as f:
                        json.dump(data, f)
                register_coco_counts_instances(name, {}, path, self.img_dir)
                self.addCleanup(DatasetCatalog.remove, name)
                self.addCleanup(MetadataCatalog.remove, name)
                has = hasattr(MetadataCatalog.get(name), "thing_classes")
                self.assertEqual(has, when == "before")  # filled at registration if it can be
                if when == "after":
                    with open(path, "w") as f:
                        json.dump(data, f)
                    self.assertEqual(thing_classes_of(name), CLASSES)  # loads the split
                    MetadataCatalog.remove(name)  # unfilled again, for demo.main below
                    MetadataCatalog.get(name).set(json_file=path, image_root=self.img_dir)
                out = os.path.join(self.tmp.name, f"out_{name}")
                results = self.demo.main(self._args("_DemoTestFakeCounter", out, name))
                expected = [os.path.join(self.img_dir, f) for f in files]
                self.assertEqual(list(results), expected)
                for f, t in zip(expected, truth):
                    self.assertEqual(results[f]["true_counts"], dict(zip(CLASSES, map(float, t))))
                self.assertEqual(CountingEvaluator(name)._class_names, CLASSES)

    def test_unreadable_image(self):
        bad = os.path.join(self.tmp.name, "bad.png")
        with open(bad, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n broken")
        args = self._args("_DemoTestFakeCounter", os.path.join(self.tmp.name, "o"), [bad])
        with self.assertRaisesRegex(ValueError, "bad.png"):
            self.demo.main(args)


_LC_DEMO_CONFIGS = sorted(glob.glob(config_path("demo", "lc_*.yaml")))


@unittest.skipIf(
    not _LC_DEMO_CONFIGS, "no CPU demo config of the LC model (configs/demo/lc_*.yaml)"
)
class TestDemoWithLCModel(unittest.TestCase):
    def test_runs(self):
        demo = _load_demo()
        with tempfile.TemporaryDirectory() as tmp:
            img = os.path.join(tmp, "x.png")
            Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 64, 3), np.uint8)).save(
                img
            )
            args = demo.get_parser().parse_args(
                [
                    "--config-file", _LC_DEMO_CONFIGS[0], "--input", img, "--output", tmp,
                    "--opts", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
                ]
            )  # fmt: skip
            (entry,) = demo.main(args).values()
            self.assertTrue(os.path.isfile(entry["output"]))
            self.assertIsNotNone(entry["counts"])


if __name__ == "__main__":
    unittest.main()
