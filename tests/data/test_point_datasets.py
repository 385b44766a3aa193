"""Point dataset loaders (VGG cells, UCSD, Mall, json, csv) on tiny fixtures, and the mapper."""

import json
import logging
import os
import tempfile
import unittest

import numpy as np
import scipy.io
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image

import wsis_d2  # noqa: F401  (registers datasets)
from wsis_d2 import add_wsis_config
from wsis_d2.data import build_dataset_mapper
from wsis_d2.data.datasets.point_datasets import (
    load_mall,
    load_point_csv,
    load_point_json,
    load_roi_mask,
    load_ucsd,
    load_vgg_cells,
    vgg_cells_draw,
    register_all_density,
)
from wsis_d2.density.mapper import (
    DensityDatasetMapper,
    ElasticTransform,
    ImageCache,
    RandomChannelGain,
    RandomGaussianBlur,
    RandomEdgeCrop,
    RandomElasticDeform,
    Rot90Transform,
    artificial_edges,
    build_density_augmentation,
    crop_edge_mask,
)
from wsis_d2.testing import config_path

LOGGER = "wsis_d2.data.datasets.point_datasets"


def _save_image(path, height, width, mode="RGB", value=30):
    channels = {"RGB": 3, "L": 1}[mode]
    arr = np.full((height, width, channels), value, dtype=np.uint8)
    Image.fromarray(arr if channels == 3 else arr[..., 0], mode=mode).save(path)


def _save_noise(path, height, width, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _frames_struct(locs):
    """A MATLAB 1 x F cell array of 1x1 structs with field 'loc' (as in UCSD / Mall files)."""
    cells = np.empty((1, len(locs)), dtype=object)
    for i, loc in enumerate(locs):
        rec = np.empty((1, 1), dtype=[("loc", object)])
        rec[0, 0]["loc"] = np.asarray(loc, dtype=np.float64).reshape(
            -1, np.shape(loc)[-1] if len(loc) else 2
        )
        cells[0, i] = rec
    return cells


class TestVGGCells(unittest.TestCase):
    def test_dots_become_points(self):
        with tempfile.TemporaryDirectory() as d:
            for idx, dots in ((1, [(3, 4), (10, 0)]), (2, [])):
                _save_image(os.path.join(d, f"{idx:03d}cell.png"), 16, 12)
                arr = np.zeros((16, 12, 3), dtype=np.uint8)
                arr[5, 5] = (0, 0, 255)  # a blue pixel is not a dot
                for r, c in dots:
                    arr[r, c] = (255, 0, 0)
                Image.fromarray(arr).save(os.path.join(d, f"{idx:03d}dots.png"))
            recs = load_vgg_cells(d)
            self.assertEqual([r["image_id"] for r in recs], ["001", "002"])
            self.assertEqual((recs[0]["height"], recs[0]["width"]), (16, 12))
            # row r, col c -> (x, y) = (c + 0.5, r + 0.5); np.nonzero scans rows first
            np.testing.assert_allclose(recs[0]["points"], [[4.5, 3.5], [0.5, 10.5]])
            self.assertEqual(recs[1]["points"].shape, (0, 2))
            self.assertEqual(len(load_vgg_cells(d, [2])), 1)

    def test_protocol_draws(self):
        draws = [vgg_cells_draw(32, d) for d in range(3)]
        for drawn in draws:
            self.assertEqual(len(drawn), 32)
            self.assertEqual(len(set(drawn)), 32)
            self.assertEqual(drawn, sorted(drawn))
            self.assertTrue(all(1 <= i <= 100 for i in drawn))  # the pool, never 101-200
        self.assertEqual(draws[0], vgg_cells_draw(32, 0))  # seeded by the draw's index
        self.assertNotEqual(draws[0], draws[1])
        self.assertEqual(vgg_cells_draw(100, 5), list(range(1, 101)))
        for bad in ((0, 0), (101, 0), (8, -1)):
            with self.assertRaises(ValueError):
                vgg_cells_draw(*bad)

    def test_errors_name_the_file(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaisesRegex(ValueError, "No NNNcell.png"):
                load_vgg_cells(d)
            _save_image(os.path.join(d, "001cell.png"), 8, 8)
            with self.assertRaisesRegex(ValueError, "001dots.png"):
                load_vgg_cells(d)
            with open(os.path.join(d, "001dots.png"), "wb") as f:
                f.write(b"not a png")
            with self.assertRaisesRegex(ValueError, "001dots.png"):
                load_vgg_cells(d)


class TestUCSD(unittest.TestCase):
    def _fixture(self, d, height=10, width=14):
        rng = np.random.default_rng(0)
        vid_root = os.path.join(d, "ucsdpeds", "vidf")
        ann = os.path.join(d, "vidf-cvpr")
        os.makedirs(ann)
        roi = np.ones((height, width), dtype=np.uint8)
        roi[:, :3] = 0  # columns 0..2 (x < 3) outside the walkway
        roi_struct = np.empty((1, 1), dtype=[("mask", object), ("xi", object), ("yi", object)])
        roi_struct[0, 0]["mask"] = roi
        roi_struct[0, 0]["xi"] = np.zeros((1, 1))
        roi_struct[0, 0]["yi"] = np.zeros((1, 1))
        scipy.io.savemat(os.path.join(ann, "vidf1_33_roi_mainwalkway.mat"), {"roi": roi_struct})
        expected = {}
        for video in range(10):
            name = f"vidf1_33_{video:03d}"
            os.makedirs(os.path.join(vid_root, f"{name}.y"))
            locs = []
            for f in range(200):
                frame = video * 200 + f
                # a few frames only carry images: the loader must not need the others
                n = frame % 4
                loc = np.column_stack(
                    [rng.uniform(1, width, n), rng.uniform(1, height, n), np.ones(n)]
                )
                if frame == 700:
                    loc = np.array([[1.0, 5.0, 1.0], [8.0, 4.0, 1.0], [30.0, 4.0, 1.0]])
                locs.append(loc)
                expected[frame] = loc
                Image.fromarray(np.zeros((height, width), np.uint8), mode="L").save(
                    os.path.join(vid_root, f"{name}.y", f"{name}_f{f + 1:03d}.png")
                )
            scipy.io.savemat(
                os.path.join(ann, f"{name}_frame_full.mat"), {"frame": _frames_struct(locs)}
            )
        return expected

    def test_split_roi_and_coordinates(self):
        with tempfile.TemporaryDirectory() as d:
            expected = self._fixture(d)
            with self.assertLogs(LOGGER, logging.WARNING) as logs:
                train = load_ucsd(d, "train")
            self.assertTrue(any("outside" in m for m in logs.output))
            test = load_ucsd(d, "test")
            self.assertEqual([r["image_id"] for r in train], list(range(600, 1400)))
            self.assertEqual(len(test), 1200)
            self.assertEqual(test[0]["image_id"], 0)
            self.assertTrue(train[0]["file_name"].endswith("vidf1_33_003.y/vidf1_33_003_f001.png"))
            rec = train[100]  # frame 700
            self.assertEqual(rec["image_id"], 700)
            # (1, 5) -> (0.5, 4.5) is outside the ROI (x < 3); (30, 4) is outside the image
            np.testing.assert_allclose(rec["points"], [[7.5, 3.5]])
            self.assertTrue(rec["roi"].endswith("vidf1_33_roi_mainwalkway.mat"))
            self.assertEqual(load_roi_mask(rec["roi"]).shape, (10, 14))
            # without ROI every in-image point stays
            no_roi = load_ucsd(d, "all", use_roi=False)
            self.assertEqual(len(no_roi), 2000)
            self.assertEqual(len(no_roi[700]["points"]), 2)
            self.assertNotIn("roi", no_roi[700])
            inside = expected[5][:, :2] - 0.5
            np.testing.assert_allclose(no_roi[5]["points"], inside)

    def test_missing_annotation(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaisesRegex(ValueError, "vidf1_33_roi_mainwalkway.mat"):
                load_ucsd(d, "train")
            with self.assertRaisesRegex(ValueError, "vidf1_33_003_frame_full.mat"):
                load_ucsd(d, "train", use_roi=False)


class TestMall(unittest.TestCase):
    def test_split_and_counts(self):
        with tempfile.TemporaryDirectory() as d:
            base = os.path.join(d, "mall_dataset")
            os.makedirs(os.path.join(base, "frames"))
            locs, counts = [], []
            for i in range(2000):
                n = i % 3
                locs.append(np.column_stack([np.arange(n) * 3.0 + 2.0, np.full(n, 4.0)]))
                counts.append(n)
                _save_image(os.path.join(base, "frames", f"seq_{i + 1:06d}.jpg"), 6, 8)
            counts[5] = 7  # disagrees with its points: points win, with a warning
            scipy.io.savemat(
                os.path.join(base, "mall_gt.mat"),
                {"frame": _frames_struct(locs), "count": np.asarray(counts, float)[:, None]},
            )
            with self.assertLogs(LOGGER, logging.WARNING) as logs:
                train = load_mall(d, "train")
            self.assertTrue(any("count" in m for m in logs.output))
            test = load_mall(d, "test")
            self.assertEqual(len(train), 800)
            self.assertEqual(len(test), 1200)
            self.assertEqual(test[0]["image_id"], 800)
            self.assertTrue(test[0]["file_name"].endswith("seq_000801.jpg"))
            np.testing.assert_allclose(train[2]["points"], [[1.5, 3.5], [4.5, 3.5]])
            self.assertEqual(len(train[5]["points"]), 2)
            self.assertEqual((train[0]["height"], train[0]["width"]), (6, 8))


class TestGenericFormats(unittest.TestCase):
    def test_json(self):
        with tempfile.TemporaryDirectory() as d:
            _save_image(os.path.join(d, "a.png"), 20, 30)
            _save_image(os.path.join(d, "b.png"), 8, 8)
            data = {
                "images": [
                    {"id": 7, "file_name": "a.png", "height": 20, "width": 30},
                    {"id": 9, "file_name": "b.png"},
                ],
                "annotations": [
                    {"id": 1, "image_id": 7, "point": [1.0, 2.0], "category_id": 5},
                    {"id": 2, "image_id": 7, "point": [29.5, 19.0], "category_id": 3},
                    {"id": 3, "image_id": 7, "point": [31.0, 2.0], "category_id": 3},
                ],
                "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}],
            }
            path = os.path.join(d, "points.json")
            with open(path, "w") as f:
                json.dump(data, f)
            with self.assertLogs(LOGGER, logging.WARNING) as logs:
                recs = load_point_json(path, d)
            self.assertIn("points.json: dropped 1 point", logs.output[0])
            np.testing.assert_allclose(recs[0]["points"], [[1.0, 2.0], [29.5, 19.0]])
            np.testing.assert_array_equal(recs[0]["point_classes"], [1, 0])
            self.assertEqual((recs[1]["height"], recs[1]["width"]), (8, 8))  # read from the file
            self.assertEqual(recs[1]["points"].shape, (0, 2))

            data["annotations"].append({"id": 4, "image_id": 99, "point": [0, 0]})
            with open(path, "w") as f:
                json.dump(data, f)
            with self.assertRaisesRegex(ValueError, "points.json.*annotation 4.*unknown image"):
                load_point_json(path, d)
            with self.assertRaisesRegex(ValueError, "missing.json"):
                load_point_json(os.path.join(d, "missing.json"), d)

    def test_csv(self):
        with tempfile.TemporaryDirectory() as d:
            _save_image(os.path.join(d, "a.png"), 10, 10)
            _save_image(os.path.join(d, "b.png"), 10, 10)
            path = os.path.join(d, "points.csv")
            with open(path, "w") as f:
                f.write(
                    "image,x,y,class\na.png,1,2,dog\na.png,3.5,4,cat\nb.png,,\na.png,-1,4,cat\n"
                )
            recs = load_point_csv(path, d)
            self.assertEqual([r["image_id"] for r in recs], ["a.png", "b.png"])
            np.testing.assert_allclose(recs[0]["points"], [[1, 2], [3.5, 4]])
            np.testing.assert_array_equal(recs[0]["point_classes"], [1, 0])  # cat=0, dog=1
            self.assertEqual(recs[1]["points"].shape, (0, 2))
            recs = load_point_csv(path, d, class_names=["dog", "cat"])
            np.testing.assert_array_equal(recs[0]["point_classes"], [0, 1])
            with open(path, "w") as f:
                f.write("a.png,1,2\nmissing.png,3,4\n")
            with self.assertRaisesRegex(ValueError, "missing.png"):
                load_point_csv(path, d)
            with open(path, "w") as f:
                f.write("a.png,1,2\na.png,x,4\n")
            with self.assertRaisesRegex(ValueError, "points.csv: row 2"):
                load_point_csv(path, d)


class TestRegistration(unittest.TestCase):
    def test_builtin_names(self):
        register_all_density()  # already registered on import: a no-op
        for name in (
            "wsis_cells_train_32",
            "wsis_cells_test",
            "vgg_cells_test",
            "ucsd_train",
            "mall_test",
        ):
            self.assertIn(name, DatasetCatalog.list())
            self.assertEqual(MetadataCatalog.get(name).evaluator_type, "density")


class TestMapper(unittest.TestCase):
    def test_rot90_coordinates(self):
        # a single bright pixel must move with its point under every quarter turn
        img = np.zeros((5, 7), dtype=np.uint8)
        img[1, 4] = 255
        point = np.array([[4.5, 1.5]])
        for k in range(4):
            t = Rot90Transform(k, 5, 7)
            out = t.apply_image(img)
            row, col = np.argwhere(out == 255)[0]
            np.testing.assert_allclose(t.apply_coords(point), [[col + 0.5, row + 0.5]])
            np.testing.assert_allclose(t.inverse().apply_coords(t.apply_coords(point)), point)

    def _cfg(self):
        cfg = get_cfg()
        add_wsis_config(cfg)
        cfg.merge_from_file(
            os.path.join(os.path.dirname(__file__), "../../configs/Base-Density.yaml")
        )
        return cfg

    def test_crop_flip_keeps_points_on_their_pixels(self):
        with tempfile.TemporaryDirectory() as d:
            rng = np.random.default_rng(1)
            img = np.zeros((40, 50, 3), dtype=np.uint8)
            pts = np.array([[5.5, 3.5], [30.5, 20.5], [44.5, 37.5]])
            for x, y in pts:
                img[int(y), int(x)] = (255, 255, 255)
            Image.fromarray(img).save(os.path.join(d, "a.png"))
            roi = np.zeros((40, 50), dtype=bool)
            roi[10:30, 20:40] = True
            record = {
                "file_name": os.path.join(d, "a.png"),
                "height": 40,
                "width": 50,
                "image_id": 0,
                "points": pts.astype(np.float32),
                "point_classes": np.array([0, 1, 0]),
                "roi": roi,
            }
            cfg = self._cfg()
            cfg.INPUT.CROP.SIZE = [24, 24]
            mapper = build_dataset_mapper(cfg, True)
            self.assertIsInstance(mapper, DensityDatasetMapper)
            for seed in range(12):
                np.random.seed(seed + int(rng.integers(1000)))
                out = mapper(record)
                image = out["image"].numpy()
                self.assertEqual(image.shape, (3, 24, 24))
                self.assertEqual(tuple(out["roi"].shape), (24, 24))
                lit = {(int(c) + 0.5, int(r) + 0.5) for r, c in np.argwhere(image[0] == 255)}
                got = {tuple(p) for p in out["points"].tolist()}
                self.assertEqual(got, lit)  # kept points are exactly the visible dots
            test_out = DensityDatasetMapper(cfg, False)(record)
            np.testing.assert_allclose(test_out["points"].numpy(), pts)
            self.assertTrue(torch.equal(test_out["roi"], torch.from_numpy(roi)))

    @staticmethod
    def _photometric_cfg():
        """A config whose training augmentations are only the photometric ones under test."""
        cfg = get_cfg()
        add_wsis_config(cfg)
        cfg.INPUT.CROP.ENABLED = False
        cfg.INPUT.DENSITY.FLIPS = []
        cfg.INPUT.MIN_SIZE_TRAIN = (0,)
        cfg.INPUT.MIN_SIZE_TEST = 0
        return cfg

    def test_brightness_gain(self):
        cfg = self._photometric_cfg()
        self.assertEqual(build_density_augmentation(cfg, True), [])  # (1, 1): off
        cfg.INPUT.DENSITY.BRIGHTNESS = (0.5, 2.0)
        augs = build_density_augmentation(cfg, True)
        self.assertEqual(len(augs), 1)
        self.assertIsInstance(augs[0], T.RandomBrightness)
        self.assertEqual(build_density_augmentation(cfg, False), [])  # training only
        image = np.full((6, 7, 3), 100, np.uint8)
        np.random.seed(0)
        gains = set()
        for _ in range(20):
            out = T.AugInput(image.copy())
            T.AugmentationList(augs)(out)
            values = np.unique(out.image)
            self.assertEqual(len(values), 1)  # one factor per image
            self.assertTrue(50 <= int(values[0]) <= 200)
            gains.add(int(values[0]))
        self.assertGreater(len(gains), 5)
        cfg.INPUT.DENSITY.BRIGHTNESS = (0.0, 1.0)
        with self.assertRaisesRegex(ValueError, "INPUT.DENSITY.BRIGHTNESS"):
            build_density_augmentation(cfg, True)

    def test_channel_gain_and_blur(self):
        cfg = self._photometric_cfg()
        cfg.INPUT.DENSITY.CHANNEL_GAIN = (0.5, 1.5)
        cfg.INPUT.DENSITY.BLUR_PROB = 1.0
        cfg.INPUT.DENSITY.BLUR_SIGMA = (1.0, 2.0)
        augs = build_density_augmentation(cfg, True)
        self.assertEqual([type(a) for a in augs], [RandomChannelGain, RandomGaussianBlur])
        # a flat image: the gain is one factor per channel, independent between channels
        flat = np.full((6, 7, 3), 100, np.uint8)
        np.random.seed(0)
        ratios = []
        for _ in range(10):
            out = T.AugInput(flat.copy())
            T.AugmentationList(augs[:1])(out)
            per_channel = [np.unique(out.image[..., k]) for k in range(3)]
            self.assertTrue(all(len(v) == 1 for v in per_channel))
            values = np.array([int(v[0]) for v in per_channel])
            self.assertTrue(((values >= 50) & (values <= 150)).all())
            ratios.append(values[1] / values[0])
        self.assertGreater(np.std(ratios), 0.05)
        # blur spreads a single bright pixel and keeps its mass (up to rounding)
        dot = np.zeros((21, 21, 3), np.uint8)
        dot[10, 10] = 250
        out = T.AugInput(dot.copy())
        T.AugmentationList(augs[1:])(out)
        self.assertLess(int(out.image[10, 10, 0]), 250)
        self.assertGreater(int(out.image[10, 11, 0]), 0)
        self.assertLess(abs(int(out.image[..., 0].astype(int).sum()) - 250), 30)
        cfg.INPUT.DENSITY.BLUR_PROB = 0.0
        cfg.INPUT.DENSITY.CHANNEL_GAIN = (1.0, 1.0)
        self.assertEqual(build_density_augmentation(cfg, True), [])
        cfg.INPUT.DENSITY.CHANNEL_GAIN = (0.0, 1.0)
        with self.assertRaisesRegex(ValueError, "CHANNEL_GAIN"):
            build_density_augmentation(cfg, True)
        cfg.INPUT.DENSITY.CHANNEL_GAIN = (1.0, 1.0)
        cfg.INPUT.DENSITY.BLUR_PROB = 0.5
        cfg.INPUT.DENSITY.BLUR_SIGMA = (2.0, 1.0)
        with self.assertRaisesRegex(ValueError, "BLUR_SIGMA"):
            build_density_augmentation(cfg, True)

    def test_elastic_deformation_moves_points_with_the_image(self):
        cfg = self._photometric_cfg()
        cfg.INPUT.DENSITY.ELASTIC.PROB = 1.0
        cfg.INPUT.DENSITY.ELASTIC.ALPHA = 2.0
        cfg.INPUT.DENSITY.ELASTIC.SPACING = 16.0
        augs = build_density_augmentation(cfg, True)
        self.assertEqual([type(a) for a in augs], [RandomElasticDeform])
        self.assertEqual(build_density_augmentation(cfg, False), [])  # training only
        # Gaussian spots (σ 1.5 px) at known points: after the warp, each spot's intensity
        # centroid lies on its transformed point, and no spot is lost (the field is zero at the
        # borders, so nothing enters or leaves the image)
        h, w = 48, 64
        pts = np.array([[8.3, 9.7], [31.5, 24.2], [50.8, 12.1], [20.4, 38.6], [56.9, 40.3]])
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        spots = [np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2)) for x, y in pts]
        image = (200 * np.clip(sum(spots), 0, 1)[..., None]).repeat(3, axis=2).astype(np.float32)
        np.random.seed(3)
        moved = miss = 0.0
        for _ in range(5):
            t = augs[0].get_transform(image)
            self.assertIsInstance(t, ElasticTransform)
            for f in (t.dx, t.dy):
                self.assertEqual(f.shape, (h, w))
                self.assertLess(np.abs(f[0]).max() + np.abs(f[:, 0]).max(), 0.5)
            out = t.apply_image(image.copy())[..., 0]
            new = t.apply_coords(pts.copy())
            self.assertEqual(new.shape, pts.shape)
            # the inverse map: p + d(p) is the original point
            np.testing.assert_allclose(new + t._field_at(new), pts, atol=1e-3)
            for (x, y), (x0, y0) in zip(new, pts):
                win = (np.abs(xx - x) < 4) & (np.abs(yy - y) < 4)
                mass = out[win]
                cx, cy = (xx[win] * mass).sum() / mass.sum(), (yy[win] * mass).sum() / mass.sum()
                self.assertLess(np.hypot(cx - x, cy - y), 0.5)
                # the forward map p = q + d(q) (a wrong inverse) would miss by about 2 |d|
                wrong = np.array([x0, y0]) + t._field_at(np.array([[x0, y0]]))[0]
                miss = max(miss, np.hypot(cx - wrong[0], cy - wrong[1]))
            moved = max(moved, np.abs(new - pts).max())
        self.assertGreater(moved, 1.0)  # the warp did move the points
        self.assertGreater(miss, 1.0)
        # a zero field is the identity
        zero = ElasticTransform(np.zeros((h, w)), np.zeros((h, w)))
        np.testing.assert_allclose(zero.apply_image(image.copy()), image)
        np.testing.assert_allclose(zero.apply_coords(pts.copy()), pts)
        with self.assertRaisesRegex(ValueError, "does not match"):
            zero.apply_image(np.zeros((h + 1, w, 3), np.uint8))
        # through the mapper (segmentation warped too), on uint8 images: all points are kept
        with tempfile.TemporaryDirectory() as d:
            Image.fromarray(image.astype(np.uint8)).save(os.path.join(d, "a.png"))
            record = {
                "file_name": os.path.join(d, "a.png"),
                "height": h,
                "width": w,
                "image_id": 0,
                "points": pts.astype(np.float32),
                "roi": np.ones((h, w), dtype=bool),
            }
            out = DensityDatasetMapper(cfg, True)(record)
            self.assertEqual(tuple(out["points"].shape), (5, 2))
            self.assertTrue(bool(out["roi"].all()))
        cfg.INPUT.DENSITY.ELASTIC.SPACING = 0.0
        with self.assertRaisesRegex(ValueError, "SPACING"):
            build_density_augmentation(cfg, True)

    def test_artificial_edges_match_brute_force(self):
        # an output border is an original border iff every pixel on it came from the same
        # border of the original image; checked on an image of original pixel coordinates
        h, w = 12, 10
        ys, xs = np.mgrid[0:h, 0:w]
        coords = np.stack([ys, xs, np.zeros_like(ys)], axis=2).astype(np.uint8)
        augs = T.AugmentationList(
            [
                RandomEdgeCrop((6, 5), edge_prob=0.5),
                T.RandomFlip(horizontal=True, vertical=False),
                T.RandomFlip(horizontal=False, vertical=True),
            ]
        )
        np.random.seed(3)
        seen = set()
        for trial in range(60):
            aug_input = T.AugInput(coords.copy())
            tl = augs(aug_input)
            if trial % 2:  # and quarter turns
                k = trial % 4
                tl = tl + T.TransformList([Rot90Transform(k, *aug_input.image.shape[:2])])
                aug_input.image = Rot90Transform(k, *aug_input.image.shape[:2]).apply_image(
                    aug_input.image
                )
            out = aug_input.image
            oy, ox = out[..., 0].astype(int), out[..., 1].astype(int)

            def real(side_y, side_x):
                on_top = np.all(side_y == 0) or np.all(side_y == h - 1)
                on_left = np.all(side_x == 0) or np.all(side_x == w - 1)
                return bool(on_top or on_left)

            expected = {
                "top": not real(oy[0], ox[0]),
                "bottom": not real(oy[-1], ox[-1]),
                "left": not real(oy[:, 0], ox[:, 0]),
                "right": not real(oy[:, -1], ox[:, -1]),
            }
            got = artificial_edges(tl, h, w)
            self.assertEqual(got, expected, f"trial {trial}: {tl.transforms}")
            seen.add(tuple(sorted(k for k, v in got.items() if v)))
        self.assertGreater(len(seen), 4)

    def test_crop_edge_mask_and_edge_crop(self):
        edges = {"top": True, "bottom": False, "left": False, "right": True}
        mask = crop_edge_mask(edges, 6, 5, 2)
        self.assertFalse(mask[:2].any() or mask[:, 3:].any())
        self.assertTrue(mask[2:, :3].all())
        self.assertTrue(crop_edge_mask(edges, 6, 5, 0).all())
        np.random.seed(0)
        image = np.zeros((20, 30, 3), np.uint8)
        snapped = [RandomEdgeCrop((8, 10), 1.0).get_transform(image) for _ in range(40)]
        self.assertEqual({t.x0 for t in snapped}, {0, 20})
        self.assertEqual({t.y0 for t in snapped}, {0, 12})
        free = [RandomEdgeCrop((8, 10), 0.0).get_transform(image) for _ in range(200)]
        self.assertGreater(len({t.x0 for t in free}), 10)
        self.assertTrue(all(0 <= t.x0 <= 20 and 0 <= t.y0 <= 12 for t in free))
        self.assertEqual((free[0].h, free[0].w), (8, 10))

    def test_crop_edge_config(self):
        cfg = get_cfg()
        add_wsis_config(cfg)
        cfg.INPUT.CROP.ENABLED = True
        cfg.INPUT.CROP.TYPE = "absolute"
        cfg.INPUT.CROP.SIZE = [8, 8]
        cfg.INPUT.DENSITY.CROP_EDGE_PROB = 0.5
        cfg.INPUT.DENSITY.CROP_EDGE_MARGIN = 2
        self.assertTrue(
            any(isinstance(a, RandomEdgeCrop) for a in build_density_augmentation(cfg, True))
        )
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "a.png")
            _save_image(path, 20, 24)
            record = {"file_name": path, "height": 20, "width": 24, "points": [[3.0, 4.0]]}
            out = DensityDatasetMapper(cfg, is_train=True)(record)
            mask = out["loss_mask"]
            self.assertEqual(tuple(mask.shape), (8, 8))
            self.assertLess(int(mask.sum()), 64)  # at least one crop cut
            self.assertNotIn("loss_mask", DensityDatasetMapper(cfg, is_train=False)(record))
        cfg.INPUT.DENSITY.CROP_EDGE_PROB = 1.5
        with self.assertRaisesRegex(ValueError, "CROP_EDGE_PROB"):
            build_density_augmentation(cfg, True)
        cfg.INPUT.DENSITY.CROP_EDGE_PROB = 0.5
        cfg.INPUT.CROP.TYPE = "relative"
        with self.assertRaisesRegex(ValueError, "CROP_EDGE_PROB needs"):
            build_density_augmentation(cfg, True)
        cfg.INPUT.CROP.TYPE = "absolute"
        cfg.INPUT.DENSITY.CROP_EDGE_MARGIN = -1
        with self.assertRaisesRegex(ValueError, "CROP_EDGE_MARGIN"):
            DensityDatasetMapper(cfg, is_train=True)

    def test_image_cache(self):
        with tempfile.TemporaryDirectory() as d:
            paths = [os.path.join(d, f"{i}.png") for i in range(3)]
            for i, path in enumerate(paths):
                _save_noise(path, 10, 12, seed=i)
            cache = ImageCache(2 * 10 * 12 * 3)  # room for two images
            first = cache.read(paths[0], "BGR")
            self.assertIs(cache.read(paths[0], "BGR"), first)
            self.assertFalse(first.flags.writeable)
            self.assertEqual((cache.hits, cache.misses), (1, 1))
            cache.read(paths[1], "BGR")
            cache.read(paths[0], "BGR")  # 0 is now the most recently used
            cache.read(paths[2], "BGR")  # evicts 1
            self.assertEqual((len(cache), cache.bytes), (2, 2 * 10 * 12 * 3))
            self.assertIs(cache.read(paths[0], "BGR"), first)
            misses = cache.misses
            cache.read(paths[1], "BGR")
            self.assertEqual(cache.misses, misses + 1)
            # another format is another entry; a rewritten file is read again
            np.testing.assert_array_equal(cache.read(paths[0], "RGB"), first[:, :, ::-1])
            Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(paths[2])
            os.utime(paths[2], ns=(1, 1))
            self.assertTrue((cache.read(paths[2], "BGR") == 7).all())
            # 0 MiB: no caching
            off = ImageCache(0)
            np.testing.assert_array_equal(off.read(paths[0], "BGR"), first)
            self.assertEqual((len(off), off.misses), (0, 1))
            with self.assertRaisesRegex(ValueError, "max_bytes"):
                ImageCache(-1)

    def test_mapper_with_image_cache(self):
        # every training augmentation of the cells configs runs on read-only cached images and
        # gives the same crops as without the cache
        cfg = get_cfg()
        add_wsis_config(cfg)
        cfg.merge_from_file(config_path("density_unet_cells.yaml"))
        cfg.INPUT.CROP.SIZE = [12, 12]
        cfg.INPUT.DENSITY.CHANNEL_GAIN = (0.7, 1.4)
        cfg.INPUT.DENSITY.BLUR_PROB = 1.0
        self.assertGreater(cfg.INPUT.DENSITY.IMAGE_CACHE_MB, 0)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "a.png")
            _save_noise(path, 20, 24)
            record = {"file_name": path, "height": 20, "width": 24, "points": [[3.0, 4.0]]}
            cached = DensityDatasetMapper(cfg, is_train=True)
            cfg.INPUT.DENSITY.IMAGE_CACHE_MB = 0.0
            plain = DensityDatasetMapper(cfg, is_train=True)
            for seed in range(12):
                np.random.seed(seed)
                a = cached(record)
                np.random.seed(seed)
                b = plain(record)
                self.assertTrue(torch.equal(a["image"], b["image"]))
                self.assertTrue(torch.equal(a["points"], b["points"]))
            self.assertEqual((cached.image_cache.hits, cached.image_cache.misses), (11, 1))
            self.assertEqual(len(plain.image_cache), 0)
            # the cache is for training: test-time mappers read every time
            self.assertEqual(DensityDatasetMapper(cfg, is_train=False).image_cache.max_bytes, 0)
            cfg.INPUT.DENSITY.IMAGE_CACHE_MB = -1.0
            with self.assertRaisesRegex(ValueError, "IMAGE_CACHE_MB"):
                DensityDatasetMapper(cfg, is_train=True)

    def test_unreadable_image(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bad.png")
            with open(path, "wb") as f:
                f.write(b"garbage")
            mapper = DensityDatasetMapper(is_train=False, augmentations=[T.NoOpTransform()])
            with self.assertRaisesRegex(ValueError, "bad.png"):
                mapper({"file_name": path, "height": 4, "width": 4, "points": np.zeros((0, 2))})


if __name__ == "__main__":
    unittest.main()
