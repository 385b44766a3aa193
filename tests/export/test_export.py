"""
TorchScript / ONNX export (wsis_d2.export, tools/export_model.py) of the three model families,
randomly initialised from the repository's configs and made small: each is traced on one image
size and run on another, and the file's outputs must match the PyTorch model's. ONNX needs
onnx and onnxruntime (requirements.txt); without them only TorchScript is checked.
"""

import importlib.util
import json
import os
import tempfile
import unittest

import numpy as np
import torch
from PIL import Image

from detectron2.modeling import build_model

from wsis_d2 import get_wsis_cfg
from wsis_d2.density.postprocessing import DensityPointDetector
from wsis_d2.export import (
    compare_outputs,
    export_model,
    lc_counting_inference,
    lc_counting_vs_model,
    load_exported,
    reference_outputs,
)
from wsis_d2.testing import config_path, load_tool

HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _image(h, w, seed):
    """(3, h, w) float32 pixel values in [0, 255] with some structure (blobs on noise)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, h, w, generator=g) * 60
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for _ in range(4):
        cy, cx = torch.randint(0, h, (1,), generator=g), torch.randint(0, w, (1,), generator=g)
        img += 180 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
    return img.clamp(0, 255)


def _model(config, opts):
    torch.manual_seed(0)
    cfg = get_wsis_cfg(config_path(config), opts + ["MODEL.DEVICE", "cpu"])
    cfg.MODEL.WEIGHTS = ""
    return build_model(cfg).eval()


DENSITY = {
    "unet": ("density_unet_cells.yaml", ["MODEL.UNET.CHANNELS", "[4, 8, 8]"]),
    "fcrn_a": ("density_fcrn_a_cells.yaml", []),
    "fcrn_b": ("density_fcrn_b_cells.yaml", []),
}
LC_OPTS = ["MODEL.LC.CLASS_THRESHOLD", "-1.0"]  # every class present: counts are rounded t̂


def _lc_model(opts):
    """The LC demo model with its near-zero initial head perturbed, so that class maps have
    distinct peaks and the density map counts a few objects."""
    model = _model("demo/lc_mnv2_synthetic_demo.yaml", opts)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.set_count_gain(torch.linspace(2.0, 6.0, model.num_classes))
    return model


RCNN_OPTS = ["MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


class TestExport(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.tmp.cleanup()

    def _round_trip(self, model, fmt, sizes, tol=1e-4):
        """Export on sizes[0], compare on every size; returns the last image's diffs."""
        images = [_image(h, w, i) for i, (h, w) in enumerate(sizes)]
        exported = export_model(model, images[0], fmt, os.path.join(self.tmp.name, fmt))
        self.assertTrue(os.path.getsize(exported.path) > 0)
        run = load_exported(exported.path, fmt)
        for image in images:
            ref = reference_outputs(exported, image)
            got = run(image)
            diffs = compare_outputs(exported.output_names, ref, got)
            for name, (diff, scale) in diffs.items():
                self.assertLessEqual(
                    diff, tol * max(1.0, scale), f"{fmt} {name} {tuple(image.shape)}"
                )
        return exported, dict(zip(exported.output_names, ref)), diffs

    def test_density_models_round_trip(self):
        for name, (config, opts) in DENSITY.items():
            for fmt in ("torchscript", "onnx") if HAS_ORT else ("torchscript",):
                with self.subTest(model=name, fmt=fmt):
                    model = _model(config, opts)
                    model.set_count_calibration(torch.tensor([2.0]), torch.tensor([1e-3]))
                    exported, ref, _ = self._round_trip(model, fmt, [(40, 48), (36, 60)])
                    self.assertEqual(exported.output_names, ["counts", "density"])
                    self.assertEqual(tuple(ref["density"].shape), (1, 36, 60))
                    # the calibrated model's own outputs, not the adapter's re-statement
                    own = model([{"image": _image(36, 60, 1)}])[0]
                    torch.testing.assert_close(ref["counts"], own["counts"])

    def test_density_dihedral_round_trip(self):
        # test-time flips/transposes (no rot90, which ONNX lacks) on a non-square image
        model = _model(*DENSITY["unet"])
        model.test_dihedral = True
        for fmt in ("torchscript", "onnx") if HAS_ORT else ("torchscript",):
            with self.subTest(fmt=fmt):
                self._round_trip(model, fmt, [(32, 40), (28, 52)])

    def test_density_peaks_refused(self):
        model = _model(*DENSITY["fcrn_a"])
        model.point_detector = DensityPointDetector()
        with self.assertRaisesRegex(ValueError, "PEAKS.ENABLED"):
            export_model(model, _image(32, 32, 0), "torchscript", self.tmp.name)

    def test_lc_counting_round_trip(self):
        model = _lc_model(LC_OPTS)
        for fmt in ("torchscript", "onnx") if HAS_ORT else ("torchscript",):
            with self.subTest(fmt=fmt):
                exported, ref, _ = self._round_trip(model, fmt, [(64, 80), (72, 56)])
                self.assertEqual(
                    exported.output_names, ["class_probs", "count_estimate", "counts", "density"]
                )
                self.assertGreater(float(ref["counts"].sum()), 0)

    def test_lc_counting_matches_inference_single(self):
        # the traceable re-statement (max-pool peaks, median by sort, valid cells by pooling)
        # against the model's own inference, also on sizes that leave padded map cells
        for threshold in ("median", "value", "none"):
            opts = LC_OPTS + [
                "MODEL.LC.PEAK_FILTER",
                threshold,
                "MODEL.LC.PEAK_FILTER_VALUE",
                "0.0",
            ]
            model = _lc_model(opts)
            for h, w in ((64, 80), (50, 70), (33, 97)):
                with self.subTest(threshold=threshold, size=(h, w)):
                    diffs = lc_counting_vs_model(model, _image(h, w, h))
                    self.assertEqual(diffs["counts"], 0.0)
                    self.assertLess(diffs["density"], 1e-6)
                    self.assertEqual(diffs["density_outside"], 0.0)
        # class probabilities: the model's peak-stimulated scores
        out = lc_counting_inference(model, [{"image": _image(50, 70, 3)}])[0]
        images = model.preprocess_image([{"image": _image(50, 70, 3)}])
        maps, _ = model.predict_maps(images.tensor)
        sizes = model.map_sizes(images.image_sizes, images.tensor.shape[-2:], maps.shape[-2:])
        _, idx = model.find_peaks(maps, sizes)
        torch.testing.assert_close(
            out["class_probs"], torch.sigmoid(model.class_scores(maps, idx, sizes))[0]
        )

    def test_mask_rcnn_round_trip(self):
        model = _model("mask_rcnn_mnv2_fpn_synthetic.yaml", RCNN_OPTS)
        for fmt in ("torchscript", "onnx") if HAS_ORT else ("torchscript",):
            with self.subTest(fmt=fmt):
                exported, ref, _ = self._round_trip(model, fmt, [(96, 128), (112, 80)])
                self.assertIn("instances.pred_masks", exported.output_names)
                masks = ref["instances.pred_masks"]
                self.assertGreater(masks.shape[0], 0)  # score threshold 0: boxes are kept
                self.assertEqual(tuple(masks.shape[1:]), (1, 28, 28))

    def test_mask_rcnn_scripting_round_trip(self):
        # detectron2's scripting_with_instances on the stock R-50-FPN Mask R-CNN (wsis_d2's
        # MobileNetV2 backbone does not script)
        model = _model("mask_rcnn_R_50_FPN_synthetic.yaml", RCNN_OPTS)
        images = [_image(96, 128, 0), _image(112, 88, 1)]
        exported = export_model(model, images[0], "torchscript", self.tmp.name, "scripting")
        self.assertNotIn("instances.image_size", exported.output_names)
        run = load_exported(
            exported.path, "torchscript", method="scripting", output_names=exported.output_names
        )
        for image in images:
            ref = reference_outputs(exported, image)
            self.assertGreater(ref[0].shape[0], 0)
            diffs = compare_outputs(exported.output_names, ref, run(image))
            for name, (diff, scale) in diffs.items():
                self.assertLessEqual(diff, 1e-4 * max(1.0, scale), name)
        with self.assertRaisesRegex(ValueError, "scripting"):
            export_model(model, images[0], "onnx", self.tmp.name, "scripting")
        with self.assertRaisesRegex(ValueError, "scripting"):
            export_model(
                _model(*DENSITY["fcrn_a"]), images[0], "torchscript", self.tmp.name, "scripting"
            )

    def test_unknown_model_and_format_refused(self):
        with self.assertRaisesRegex(ValueError, "META_ARCHITECTURE"):
            export_model(torch.nn.Conv2d(3, 1, 1), _image(8, 8, 0), "torchscript", self.tmp.name)
        model = _model(*DENSITY["fcrn_a"])
        with self.assertRaisesRegex(ValueError, "--format"):
            export_model(model, _image(8, 8, 0), "caffe2", self.tmp.name)
        with self.assertRaisesRegex(ValueError, "does not exist"):
            load_exported(os.path.join(self.tmp.name, "none.ts"), "torchscript")


class TestExportTool(unittest.TestCase):
    def _tool(self):
        module = load_tool("export_model")
        return module

    def test_cli_checks_images_and_writes_report(self):
        tool = self._tool()
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, (h, w) in enumerate(((40, 56), (52, 44))):
                path = os.path.join(tmp, f"img{i}.png")
                arr = _image(h, w, i).permute(1, 2, 0).numpy().astype(np.uint8)
                Image.fromarray(arr).save(path)
                paths.append(path)
            out = os.path.join(tmp, "out")
            args = tool.argument_parser().parse_args(
                [
                    "--config-file",
                    config_path("density_fcrn_a_cells.yaml"),
                    "--format",
                    "torchscript",
                    "--output",
                    out,
                    "--runs",
                    "1",
                    "--images",
                    *paths,
                ]
            )
            report = tool.main(args)
            self.assertTrue(report["ok"])
            self.assertEqual([r["size"] for r in report["images"]], [[40, 56], [52, 44]])
            with open(os.path.join(out, "export_check.json")) as f:
                self.assertEqual(json.load(f)["outputs"], ["counts", "density"])
            args.runs = 0
            with self.assertRaisesRegex(ValueError, "--runs"):
                tool.main(args)
            args.runs = 1
            args.images = [os.path.join(tmp, "missing.png")]
            with self.assertRaisesRegex(ValueError, "--images"):
                tool.main(args)
            args.config_file = os.path.join(tmp, "missing.yaml")
            with self.assertRaisesRegex(ValueError, "--config-file"):
                tool.main(args)


if __name__ == "__main__":
    unittest.main()
