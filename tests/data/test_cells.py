"""Synthetic fluorescence cells: determinism, annotations, caching and invalidation."""

import copy
import json
import os
import tempfile
import unittest

import numpy as np
from detectron2.data import DatasetCatalog
from PIL import Image

import wsis_d2  # noqa: F401  (registers the builtin splits)
from wsis_d2.data.datasets import cells
from wsis_d2.data.datasets.cells import GENERATOR_SPEC, prepare_synthetic_cells, render_cell_image
from wsis_d2.data.datasets.point_datasets import load_point_json


def _small_spec(**changes):
    spec = copy.deepcopy(GENERATOR_SPEC)
    spec["image_size"] = [64, 80]
    spec["num_cells"] = [20, 30]
    spec.update(changes)
    return spec


class TestRender(unittest.TestCase):
    def test_deterministic_and_in_range(self):
        a, pa = render_cell_image(np.random.default_rng([5, 1]))
        b, pb = render_cell_image(np.random.default_rng([5, 1]))
        c, _ = render_cell_image(np.random.default_rng([5, 2]))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(pa, pb)
        self.assertFalse(np.array_equal(a, c))
        self.assertEqual(a.shape, (256, 256, 3))
        self.assertEqual(a.dtype, np.uint8)
        self.assertTrue(20 * 0.9 <= len(pa) <= 300)
        self.assertTrue(np.all((pa >= 0) & (pa < 256)))

    def test_cells_are_bright_where_points_are(self):
        # the annotation is the body centre: the signal there beats the background far from cells
        from scipy import ndimage

        image, points = render_cell_image(
            np.random.default_rng([7, 0]), _small_spec(num_cells=[8, 10])
        )
        signal = ndimage.uniform_filter(image.astype(float).sum(axis=2), 3)
        at_points = signal[points[:, 1].astype(int), points[:, 0].astype(int)]
        yy, xx = np.mgrid[0:64, 0:80] + 0.5
        dist = np.hypot(xx[..., None] - points[:, 0], yy[..., None] - points[:, 1]).min(axis=2)
        background = signal[dist > 15]
        self.assertGreater(background.size, 100)
        self.assertGreater(np.median(at_points), 3 * np.median(background))

    def test_count_range_follows_spec(self):
        spec = _small_spec(num_cells=[25, 25])
        counts = [len(render_cell_image(np.random.default_rng([1, i]), spec)[1]) for i in range(3)]
        # crowded placements may give up on a few cells, never add any
        self.assertTrue(all(20 <= n <= 25 for n in counts), counts)


class TestCache(unittest.TestCase):
    def test_generate_cache_and_invalidate(self):
        spec = _small_spec()
        with tempfile.TemporaryDirectory() as root:
            image_root, json_file = prepare_synthetic_cells(
                root, "tiny", num_images=3, seed=11, spec=spec
            )
            self.assertEqual(os.path.dirname(image_root), os.path.join(root, "wsis_cells", "tiny"))
            recs = load_point_json(json_file, image_root)
            self.assertEqual(len(recs), 3)
            for rec in recs:
                img = np.asarray(Image.open(rec["file_name"]))
                self.assertEqual(img.shape, (64, 80, 3))
                self.assertEqual((rec["height"], rec["width"]), (64, 80))
                # exact float annotations survive the round trip
                rng_img, rng_pts = render_cell_image(
                    np.random.default_rng([11, rec["image_id"]]), spec
                )
                np.testing.assert_array_equal(img, rng_img)
                np.testing.assert_allclose(rec["points"], rng_pts, rtol=1e-6)
            # no leftovers from the atomic write
            self.assertEqual(os.listdir(os.path.join(root, "wsis_cells")), ["tiny"])

            # cached: a second call does not rewrite
            stamp = os.path.getmtime(json_file)
            prepare_synthetic_cells(root, "tiny", num_images=3, seed=11, spec=spec)
            self.assertEqual(os.path.getmtime(json_file), stamp)

            # a changed generator spec regenerates the split
            spec2 = _small_spec(image_size=[48, 40])
            prepare_synthetic_cells(root, "tiny", num_images=3, seed=11, spec=spec2)
            with open(json_file) as f:
                self.assertEqual(json.load(f)["images"][0]["height"], 48)
            self.assertEqual(os.listdir(os.path.join(root, "wsis_cells")), ["tiny"])

    def test_nested_prefix_and_unknown_split(self):
        spec = _small_spec()
        with tempfile.TemporaryDirectory() as root:
            small = load_point_json(
                *reversed(prepare_synthetic_cells(root, "a", num_images=2, seed=3, spec=spec))
            )
            big = load_point_json(
                *reversed(prepare_synthetic_cells(root, "b", num_images=4, seed=3, spec=spec))
            )
            for s, b in zip(small, big):
                np.testing.assert_array_equal(s["points"], b["points"])
            with self.assertRaisesRegex(ValueError, "Unknown synthetic cells split"):
                prepare_synthetic_cells(root, "nope")

    def test_builtin_split_table(self):
        self.assertEqual(cells.SYNTHETIC_CELL_SPLITS["train"][0], 128)
        self.assertGreaterEqual(cells.SYNTHETIC_CELL_SPLITS["test"][0], 100)
        # every split has its own seed (no image shared between train, val, val_200 and test)
        seeds = [seed for _, seed in cells.SYNTHETIC_CELL_SPLITS.values()]
        self.assertEqual(len(seeds), len(set(seeds)))
        self.assertEqual(cells.SYNTHETIC_CELL_SPLITS["val_200"][0], 200)
        self.assertIn("wsis_cells_val_200", DatasetCatalog.list())


if __name__ == "__main__":
    unittest.main()
