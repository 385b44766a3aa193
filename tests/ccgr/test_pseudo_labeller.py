"""PseudoLabeller: built from MODEL.CCGR.* and MODEL.SEGMENTS, variants from config clones, the
functions of wsis_d2.ccgr.labels it composes, its options' errors."""

import unittest

import torch
import torch.nn.functional as F

from wsis_d2.ccgr import PseudoLabeller
from wsis_d2.ccgr.labels import (
    assign_pixels,
    component_instances,
    grabcut_masks,
    pseudo_instances,
    region_mean_scores,
)
from wsis_d2.layers import graph_segment
from wsis_d2.testing import ccgr_config


def _scene():
    """An image (3, 48, 64) with a red square and a blue disc on grey; S (3, 48, 64) of two
    classes + background that covers them loosely; the input at half size (the model input is
    resized); boxes around both objects."""
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    square = (ys >= 8) & (ys < 24) & (xs >= 8) & (xs < 28)
    disc = (ys - 30) ** 2 + (xs - 45) ** 2 <= 81
    image = torch.full((3, 48, 64), 120.0)
    image[:, square] = torch.tensor([220.0, 30.0, 30.0])[:, None]
    image[:, disc] = torch.tensor([20.0, 40.0, 230.0])[:, None]
    g = torch.Generator().manual_seed(0)
    image = (image + 10 * torch.rand(image.shape, generator=g)).round()
    blur = F.avg_pool2d(torch.stack([square, disc]).float()[None], 5, 1, 2)[0]
    s = torch.cat([0.9 * blur, 1 - 0.9 * blur.max(0, keepdim=True).values]) + 0.01
    s = s / s.sum(0, keepdim=True)
    small = F.interpolate(image[None], size=(24, 32), mode="bilinear", align_corners=False)[0]
    inp = {"image": small.round().to(torch.uint8), "height": 48, "width": 64}
    boxes = torch.tensor([[6.0, 6.0, 30.0, 26.0], [34.0, 19.0, 56.0, 41.0]])
    return s, inp, boxes, torch.tensor([0, 1]), torch.tensor([0.9, 0.8])


class TestPseudoLabeller(unittest.TestCase):
    def test_from_config_and_variants(self):
        cfg = ccgr_config()
        labeller = PseudoLabeller(cfg)
        self.assertEqual((labeller.mask_threshold, labeller.nms_threshold), (0.5, 0.5))
        self.assertEqual((labeller.score_mode, labeller.mask_refine), ("regions", "grabcut"))
        self.assertEqual((labeller.grabcut_iters, labeller.context_scale), (3, 1.5))
        s = cfg.MODEL.SEGMENTS
        self.assertEqual(labeller.segment_params, (s.SCALE, s.SIGMA, s.MIN_SIZE))
        other = cfg.clone()
        other.MODEL.CCGR.SCORE_MODE = "pixels"
        other.MODEL.CCGR.MASK_REFINE = "none"
        other.MODEL.SEGMENTS.SCALE = 50.0
        variant = PseudoLabeller(other)
        self.assertEqual((variant.score_mode, variant.mask_refine), ("pixels", "none"))
        self.assertEqual(variant.segment_params[0], 50.0)
        self.assertEqual(labeller.score_mode, "regions")

    def test_composes_the_label_functions(self):
        s, inp, boxes, classes, scores = _scene()
        plain = PseudoLabeller(ccgr_config(SCORE_MODE="pixels", MASK_REFINE="none"))
        got = plain(s, boxes, classes, scores)  # reads no input
        expected = pseudo_instances(s[:-1], boxes, classes, scores)
        self.assertGreater(len(expected), 0)
        self.assertTrue(torch.equal(got.pred_masks, expected.pred_masks))
        # "regions": S averaged over the graph regions of the input, resized to S's size
        regions_only = PseudoLabeller(ccgr_config(MASK_REFINE="none"))
        regions = graph_segment(inp["image"].float(), *regions_only.segment_params)
        regions = F.interpolate(regions[None, None].float(), size=(48, 64), mode="nearest")
        s_bar = region_mean_scores(s[:-1], regions[0, 0].long())
        got = regions_only(s, boxes, classes, scores, inp)
        expected = pseudo_instances(s_bar, boxes, classes, scores)
        self.assertTrue(torch.equal(got.pred_masks, expected.pred_masks))
        self.assertTrue(torch.equal(regions_only.score_maps(s[:-1], inp), s_bar))
        # "grabcut": the masks re-labelled on the image at S's size, the pixels assigned again
        grabcut = PseudoLabeller(ccgr_config(SCORE_MODE="pixels", GRABCUT_ITERS=2))
        got = grabcut(s, boxes, classes, scores, inp)
        expected = pseudo_instances(s[:-1], boxes, classes, scores)
        image = F.interpolate(
            inp["image"][None].float(), size=(48, 64), mode="bilinear", align_corners=False
        )[0]
        expected.pred_masks = grabcut_masks(
            image, expected.pred_boxes.tensor, expected.pred_masks, iterations=2, context_scale=1.5
        )
        expected = assign_pixels(expected)
        self.assertEqual(len(got), len(expected))
        self.assertTrue(torch.equal(got.pred_masks, expected.pred_masks))
        for labeller in (regions_only, grabcut):
            with self.assertRaisesRegex(ValueError, "need the input"):
                labeller(s, boxes, classes, scores)

    def test_grabcut_at_most_upscale_times_the_input(self):
        # masks at 2x the input: with GRABCUT_MAX_UPSCALE 1 GrabCut runs at the input's size on
        # the input image itself, the masks it changed brought back to 2x
        s, inp, boxes, classes, scores = _scene()
        opts = dict(SCORE_MODE="pixels", GRABCUT_ITERS=2)
        full = PseudoLabeller(ccgr_config(**opts))
        small = PseudoLabeller(ccgr_config(GRABCUT_MAX_UPSCALE=1.0, **opts))
        self.assertEqual(full.grabcut_size((24, 32), (48, 64)), (48, 64))  # 48 <= 4 x 24
        self.assertEqual(small.grabcut_size((24, 32), (48, 64)), (24, 32))
        self.assertEqual(small.grabcut_size((24, 32), (24, 40)), (24, 40))
        off = PseudoLabeller(ccgr_config(GRABCUT_MAX_UPSCALE=0.0, **opts))
        self.assertEqual(off.grabcut_size((24, 32), (480, 640)), (480, 640))
        got = small(s, boxes, classes, scores, inp)
        expected = pseudo_instances(s[:-1], boxes, classes, scores)
        masks = F.interpolate(expected.pred_masks[:, None].float(), size=(24, 32), mode="area")
        masks = masks[:, 0] >= 0.5
        refined = grabcut_masks(
            inp["image"].float(), expected.pred_boxes.tensor / 2, masks, iterations=2,
            context_scale=1.5,
        )
        self.assertTrue(bool((refined != masks).flatten(1).any(dim=1).all()))  # both changed
        up = F.interpolate(refined[:, None].float(), size=(48, 64), mode="bilinear")[:, 0] >= 0.5
        expected.pred_masks = up
        expected = assign_pixels(expected)
        self.assertTrue(torch.equal(got.pred_masks, expected.pred_masks))
        self.assertTrue(torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor))
        # close to GrabCut at the full size
        ref = full(s, boxes, classes, scores, inp)
        inter = (got.pred_masks & ref.pred_masks).flatten(1).sum(1).float()
        union = (got.pred_masks | ref.pred_masks).flatten(1).sum(1).float()
        self.assertGreater(float((inter / union).min()), 0.8)

    def test_component_instances_without_cues(self):
        s, _, _, _, _ = _scene()
        got = PseudoLabeller(ccgr_config()).component_instances(s)
        expected = component_instances(s, torch.tensor([1.0, 1.0]))
        self.assertEqual(len(got), 2)
        self.assertTrue(torch.equal(got.pred_masks, expected.pred_masks))

    def test_bad_options_name_the_config_key(self):
        for key, value in (
            ("SCORE_MODE", "boxes"),
            ("MASK_REFINE", "crf"),
            ("GRABCUT_ITERS", 0),
            ("MASK_THRESHOLD", 1.5),
            ("NMS_THRESHOLD", -0.1),
            ("CONTEXT_SCALE", 0.5),
            ("GRABCUT_MAX_UPSCALE", -1.0),
        ):
            with self.assertRaisesRegex(ValueError, f"MODEL.CCGR.{key}"):
                PseudoLabeller(ccgr_config(**{key: value}))


if __name__ == "__main__":
    unittest.main()
