"""Graph-based segmentation: op vs Python reference, semantics, agreement with skimage, errors."""

import importlib
import itertools
import math
import unittest
from unittest import mock

import numpy as np
import torch
from scipy import ndimage

from wsis_d2.layers import (
    compiled_ops_available,
    edge_weights,
    graph_segment,
    graph_segment_reference,
    graph_segment_scales,
)

# the package's name graph_segment is the function; the module is reached through importlib
graph_segment_module = importlib.import_module("wsis_d2.layers.graph_segment")


def first_appearance(labels: np.ndarray) -> np.ndarray:
    """Relabels any partition 0..S-1 by first appearance in raster order."""
    _, first, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse].reshape(labels.shape)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Agreement of two partitions of the same pixels (1: identical, ~0: chance)."""
    a = np.unique(a.ravel(), return_inverse=True)[1]
    b = np.unique(b.ravel(), return_inverse=True)[1]
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([a.size]))
    return (index - expected) / ((rows + cols) / 2 - expected)


def shapes_image(seed: int, h: int = 96, w: int = 128, noise: float = 4.0):
    """(H, W, 3) uint8 image of five flat-colour shapes with Gaussian noise, and its (H, W) map."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:h, :w]
    truth = np.zeros((h, w), np.int64)
    truth[10:40, 15:60] = 1
    truth[(yy - 65) ** 2 + (xx - 90) ** 2 < 22**2] = 2
    truth[(yy > 50) & (xx < 50) & (yy - 50 > (xx - 5) * 0.8)] = 3
    truth[5:30, 80:120] = 4
    colours = np.array([[90, 90, 90], [200, 40, 40], [40, 180, 60], [50, 50, 200], [220, 220, 60]])
    image = colours[truth] + rng.randn(h, w, 3) * noise
    return np.clip(np.round(image), 0, 255).astype(np.uint8), truth


def random_image(k, h, w, kind, generator):
    if kind == "uint8-ties":  # few levels: many equal weights, zero weights after sigma = 0
        return torch.randint(0, 3, (k, h, w), generator=generator).mul(60).to(torch.uint8)
    if kind == "uint8":
        return torch.randint(0, 256, (k, h, w), generator=generator).to(torch.uint8)
    return torch.rand(k, h, w, generator=generator, dtype=torch.float64).mul(255).float()


class GraphSegmentSemanticsTest(unittest.TestCase):
    """Properties of the definition, through graph_segment (compiled op or reference)."""

    def test_two_flat_regions(self):
        img = torch.full((3, 12, 17), 50, dtype=torch.uint8)
        img[:, :, 7:] = torch.tensor([200, 10, 90], dtype=torch.uint8)[:, None, None]
        for fn in (graph_segment, self._reference):
            labels = fn(img, scale=1000.0, sigma=0.0, min_size=10)
            expected = torch.zeros(12, 17, dtype=torch.int64)
            expected[:, 7:] = 1
            self.assertTrue(torch.equal(labels, expected))

    def test_two_flat_regions_blurred(self):
        # the blurred boundary is a ramp 2*ceil(4 sigma) pixels wide; min_size absorbs its strips
        img = torch.full((1, 30, 40), 40, dtype=torch.uint8)
        img[:, 12:, :] = 220
        labels = graph_segment(img, scale=200.0, sigma=0.8, min_size=200)
        self.assertEqual(int(labels.max()), 1)
        self.assertTrue(bool((labels[:8] == 0).all()) and bool((labels[16:] == 1).all()))

    def test_scale_zero_joins_exactly_equal_neighbours(self):
        # k = 0, min_size <= 1: segments = 8-connected components of equal colour (zero weights)
        g = torch.Generator().manual_seed(0)
        img = random_image(3, 13, 19, "uint8-ties", g)
        for min_size in (0, 1):
            labels = graph_segment(img, scale=0.0, sigma=0.0, min_size=min_size).numpy()
            arr = img.permute(1, 2, 0).numpy()
            expected = np.zeros(arr.shape[:2], np.int64)
            offset = 0
            for colour in np.unique(arr.reshape(-1, 3), axis=0):
                comp, count = ndimage.label((arr == colour).all(-1), structure=np.ones((3, 3)))
                expected[comp > 0] = comp[comp > 0] + offset
                offset += count
            np.testing.assert_array_equal(labels, first_appearance(expected))

    def test_scale_zero_distinct_pixels(self):
        g = torch.Generator().manual_seed(1)
        img = random_image(3, 9, 11, "float", g)  # no two neighbours alike
        labels = graph_segment(img, scale=0.0, sigma=0.0, min_size=0)
        self.assertTrue(torch.equal(labels, torch.arange(99).view(9, 11)))

    def test_min_size(self):
        g = torch.Generator().manual_seed(2)
        img = random_image(3, 15, 21, "uint8", g)
        for min_size in (5, 40):
            labels = graph_segment(img, scale=1.0, sigma=0.0, min_size=min_size)
            sizes = torch.bincount(labels.flatten())
            # each segment that is still small would have merged over any edge to a neighbour
            self.assertTrue(bool((sizes >= min_size).all()), (min_size, sizes))
        # larger than the image: one segment
        labels = graph_segment(img, scale=1.0, sigma=0.0, min_size=15 * 21 + 1)
        self.assertTrue(torch.equal(labels, torch.zeros(15, 21, dtype=torch.int64)))

    def test_labels_numbered_by_first_appearance(self):
        g = torch.Generator().manual_seed(3)
        img = random_image(3, 17, 23, "uint8", g)
        labels = graph_segment(img, scale=50.0, sigma=0.8, min_size=3)
        self.assertEqual(labels.dtype, torch.int64)
        self.assertGreater(int(labels.max()), 2)
        np.testing.assert_array_equal(labels.numpy(), first_appearance(labels.numpy()))

    def test_input_forms_agree(self):
        g = torch.Generator().manual_seed(4)
        img = random_image(3, 14, 18, "uint8", g)
        labels = graph_segment(img, 100.0, 0.8, 5)
        self.assertTrue(torch.equal(labels, graph_segment(img.double(), 100.0, 0.8, 5)))
        hwc = img.permute(1, 2, 0).contiguous()
        self.assertTrue(torch.equal(labels, graph_segment(hwc.permute(2, 0, 1), 100.0, 0.8, 5)))
        # colour order does not matter (exactly so without blur: integer sums of squares)
        self.assertTrue(
            torch.equal(
                graph_segment(img, 100.0, 0.0, 5), graph_segment(img.flip(0), 100.0, 0.0, 5)
            )
        )

    def test_edge_weights(self):
        # colours (c0, c1, 0): (0,0) (3,4) (0,0) / (4,3) (0,0) (0,0)
        c0 = [[0, 3, 0], [4, 0, 0]]
        c1 = [[0, 4, 0], [3, 0, 0]]
        img = torch.tensor([c0, c1, [[0] * 3] * 2], dtype=torch.uint8)
        w = edge_weights(img, sigma=0.0)
        self.assertEqual(w.dtype, torch.float32)
        self.assertEqual(tuple(w.shape), (4, 2, 3))
        right = [[5, 5, 0], [5, 0, 0]]
        down = [[5, 5, 0], [0, 0, 0]]
        down_right = [[0, 5, 0], [0, 0, 0]]  # (0,0)-(1,1), (0,1)-(1,2)
        up_right = [[0, 0, 0], [math.sqrt(2), 0, 0]]  # (1,0)-(0,1), (1,1)-(0,2)
        expected = torch.tensor([right, down, down_right, up_right], dtype=torch.float32)
        self.assertTrue(torch.equal(w, expected))

    def test_blur_matches_scipy(self):
        g = torch.Generator().manual_seed(5)
        for (h, w), sigma in itertools.product(((20, 31), (3, 2), (1, 9)), (0.5, 0.8, 2.0)):
            img = random_image(3, h, w, "float", g).double()
            radius = math.ceil(4 * sigma)
            # scipy's radius is int(truncate * sigma + 0.5); its "reflect" repeats the edge pixel
            ref = ndimage.gaussian_filter(
                img.numpy(), sigma=(0, sigma, sigma), mode="reflect", truncate=radius / sigma
            )
            got = graph_segment_module._blur(img.float(), sigma)
            np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-3)

    def test_constant_image(self):
        img = torch.full((3, 7, 9), 128.0)
        self.assertEqual(float(edge_weights(img, 1.5).abs().max()), 0.0)
        self.assertTrue(torch.equal(graph_segment(img, 0.0, 1.5, 0), torch.zeros(7, 9).long()))

    def test_fallback_to_reference(self):
        g = torch.Generator().manual_seed(6)
        img = random_image(3, 16, 20, "uint8", g)
        with mock.patch.object(graph_segment_module, "compiled_ops_available", lambda: False):
            with mock.patch.object(
                graph_segment_module,
                "graph_segment_reference",
                wraps=graph_segment_module.graph_segment_reference,
            ) as reference:
                labels = graph_segment(img, 300.0, 0.8, 8)
                reference.assert_called_once()
        self.assertTrue(torch.equal(labels, graph_segment(img, 300.0, 0.8, 8)))

    @unittest.skipIf(not torch.cuda.is_available(), "CUDA not available")
    def test_cuda_input(self):
        g = torch.Generator().manual_seed(7)
        img = random_image(3, 16, 20, "uint8", g)
        labels = graph_segment(img.cuda(), 300.0, 0.8, 8)
        self.assertEqual(labels.device.type, "cuda")
        self.assertTrue(torch.equal(labels.cpu(), graph_segment(img, 300.0, 0.8, 8)))

    def test_bad_arguments(self):
        img = torch.zeros(3, 5, 6, dtype=torch.uint8)
        cases = [
            ((img[0],), "image"),
            ((torch.zeros(2, 5, 6),), "image"),
            ((torch.zeros(3, 0, 6),), "image"),
            ((img.int(),), "image"),
            ((torch.full((3, 5, 6), 256.0),), "image"),
            ((torch.full((3, 5, 6), -1.0),), "image"),
            ((torch.full((3, 5, 6), float("nan")),), "image"),
            ((img, -1.0), "scale"),
            ((img, float("inf")), "scale"),
            ((img, True), "scale"),
            ((img, 1.0, -0.5), "sigma"),
            ((img, 1.0, float("nan")), "sigma"),
            ((img, 1.0, 0.8, -1), "min_size"),
            ((img, 1.0, 0.8, 2.5), "min_size"),
        ]
        for args, name in cases:
            with self.assertRaisesRegex(ValueError, name, msg=str(args[1:])):
                graph_segment(*args)
        with self.assertRaisesRegex(ValueError, "sigma"):
            edge_weights(img, -1.0)

    def _reference(self, image, scale, sigma, min_size):
        return graph_segment_reference(edge_weights(image, sigma), scale, min_size)


def check_rejects_bad_weights(test, segment):
    """Errors that both the op and the reference raise, naming the offending argument."""
    w = torch.zeros(4, 3, 5)
    for bad, pattern in (
        (w.double(), "float32"),
        (w[:3], r"\(4, H, W\)"),
        (w[0], r"\(4, H, W\)"),
        (torch.zeros(4, 0, 5), "1x1"),
    ):
        with test.assertRaisesRegex(ValueError, pattern):
            segment(bad, 1.0, 0)
    for value in (float("nan"), float("inf"), -1.0):
        bad = w.clone()
        bad[2, 1, 3] = value
        with test.assertRaisesRegex(ValueError, r"finite and >= 0, got .* at \(2, 1, 3\)"):
            segment(bad, 1.0, 0)
    for scale in (-1.0, float("nan"), float("inf")):
        with test.assertRaisesRegex(ValueError, "scale"):
            segment(w, scale, 0)
    with test.assertRaisesRegex(ValueError, "min_size"):
        segment(w, 1.0, -2)


class GraphSegmentReferenceErrorsTest(unittest.TestCase):
    def test_bad_weights(self):
        check_rejects_bad_weights(self, graph_segment_reference)


@unittest.skipIf(not compiled_ops_available(), "wsis_d2._C is not built")
class GraphSegmentOpTest(unittest.TestCase):
    """The compiled op against the reference: identical labels."""

    def assertSameLabels(self, weights, scale, min_size):
        op = torch.ops.wsis_d2.graph_segment(weights, float(scale), int(min_size))
        ref = graph_segment_reference(weights, scale, min_size)
        self.assertEqual(op.dtype, torch.int64)
        msg = f"{tuple(weights.shape)} scale={scale} min_size={min_size}"
        self.assertTrue(torch.equal(op, ref), msg)

    def test_matches_reference_on_images(self):
        g = torch.Generator().manual_seed(0)
        sizes = ((1, 1), (1, 9), (9, 1), (2, 2), (7, 13), (16, 11), (23, 31))
        for (h, w), k, kind in itertools.product(sizes, (1, 3), ("uint8-ties", "uint8", "float")):
            img = random_image(k, h, w, kind, g)
            for sigma in (0.0, 0.8):
                weights = edge_weights(img, sigma)
                for scale, min_size in ((0.0, 0), (1.0, 1), (50.0, 5), (1000.0, h * w + 1)):
                    self.assertSameLabels(weights, scale, min_size)

    def test_matches_reference_larger(self):
        g = torch.Generator().manual_seed(1)
        for kind in ("uint8-ties", "uint8"):
            weights = edge_weights(random_image(3, 48, 64, kind, g), 0.8)
            for scale, min_size in ((100.0, 10), (1000.0, 20)):
                self.assertSameLabels(weights, scale, min_size)

    def test_weights_with_ties(self):
        # integer weights: most edges tie and only the edge id orders them; -0 equals 0
        g = torch.Generator().manual_seed(2)
        for h, w in ((6, 7), (13, 10)):
            weights = torch.randint(0, 4, (4, h, w), generator=g).float()
            weights[weights == 0] = -0.0
            for scale, min_size in ((0.0, 0), (2.0, 0), (2.0, 4), (30.0, 3)):
                self.assertSameLabels(weights, scale, min_size)
            positive = weights.abs()
            op = torch.ops.wsis_d2.graph_segment
            self.assertTrue(torch.equal(op(weights, 2.0, 4), op(positive, 2.0, 4)))

    def test_unused_entries_ignored(self):
        g = torch.Generator().manual_seed(3)
        weights = torch.rand(4, 9, 12, generator=g) * 10
        garbage = weights.clone()
        garbage[0, :, -1] = float("nan")  # right of the last column
        garbage[1, -1, :] = float("inf")  # below the last row
        garbage[2, -1, :] = -1.0
        garbage[2, :, -1] = float("nan")
        garbage[3, 0, :] = -5.0  # above the first row
        garbage[3, :, -1] = float("inf")
        op = torch.ops.wsis_d2.graph_segment
        self.assertTrue(torch.equal(op(garbage, 5.0, 3), op(weights, 5.0, 3)))
        self.assertTrue(torch.equal(graph_segment_reference(garbage, 5.0, 3), op(weights, 5.0, 3)))

    def test_op_errors(self):
        op = torch.ops.wsis_d2.graph_segment
        check_rejects_bad_weights(self, op)
        with self.assertRaisesRegex(ValueError, "contiguous"):
            op(torch.zeros(4, 5, 3).transpose(1, 2), 1.0, 0)
        with self.assertRaisesRegex(ValueError, "min_size"):
            op(torch.zeros(4, 3, 5), 1.0, -1)

    def test_close_to_skimage(self):
        # skimage's felzenszwalb on uint8 images uses the same k on the 0..255 scale; it breaks
        # ties differently, merges on "<" instead of "<=" and blurs with radius round(4 sigma),
        # so partitions may differ slightly: compare them by the adjusted Rand index
        from skimage.segmentation import felzenszwalb

        for seed, (scale, min_size) in itertools.product((0, 1), ((100.0, 20), (1000.0, 50))):
            image, truth = shapes_image(seed)
            theirs = felzenszwalb(image, scale, 0.8, min_size, channel_axis=-1)
            ours = graph_segment(torch.from_numpy(image).permute(2, 0, 1), scale, 0.8, min_size)
            ours = ours.numpy()
            n_ours, n_theirs = ours.max() + 1, theirs.max() + 1
            self.assertLessEqual(max(n_ours, n_theirs) / min(n_ours, n_theirs), 1.25)
            self.assertGreater(adjusted_rand_index(ours, theirs), 0.95)
            # both find the five shapes (the extra segments are thin strips along the borders)
            self.assertGreater(adjusted_rand_index(ours, truth), 0.75)

    def test_close_to_skimage_on_a_photograph(self):
        from skimage import data, transform
        from skimage.segmentation import felzenszwalb

        try:
            photo = data.astronaut()
        except Exception as e:  # not shipped with this scikit-image
            self.skipTest(f"skimage.data.astronaut unavailable: {e}")
        image = (transform.resize(photo, (160, 240), anti_aliasing=True) * 255).round()
        image = image.astype(np.uint8)
        theirs = felzenszwalb(image, 1000.0, 0.8, 10, channel_axis=-1)
        ours = graph_segment(torch.from_numpy(image).permute(2, 0, 1), 1000.0, 0.8, 10).numpy()
        n_ours, n_theirs = ours.max() + 1, theirs.max() + 1
        self.assertLessEqual(max(n_ours, n_theirs) / min(n_ours, n_theirs), 1.25)
        self.assertGreater(adjusted_rand_index(ours, theirs), 0.95)


class TestGraphSegmentScalesBadInput(unittest.TestCase):
    def test_min_sizes_per_scale(self):
        img = torch.zeros(3, 5, 6, dtype=torch.uint8)
        with self.assertRaisesRegex(
            ValueError, r"'min_sizes' must have one entry per scale \(2\), got 1"
        ):
            graph_segment_scales(img, [100.0, 300.0], 0.8, [10])


if __name__ == "__main__":
    unittest.main()
