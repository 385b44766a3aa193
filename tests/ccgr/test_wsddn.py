"""WSDDN over bags: bag scores and loss against a NumPy reference, the output layers
(losses() / inference()) and the ROI heads, which load checkpoints of the old layout."""

import unittest

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

import wsis_d2  # noqa: F401  (registers WSDDNROIHeads)
from wsis_d2 import add_wsis_config
from wsis_d2.ccgr import WSDDNOutputLayers
from wsis_d2.ccgr.wsddn_loss import wsddn_bag_scores, wsddn_loss


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def numpy_wsddn(cls_logits, det_logits, bags, labels, eps, normalization):
    """Per bag: φ = Σ_r softmax_c(x^cls_r) · softmax_{r in bag}(x^det_r), BCE vs one-hot."""
    total = 0.0
    phis = []
    for bag, label in zip(bags, labels):
        rows = [r for r in bag if r >= 0]
        sc = _softmax(cls_logits[rows], axis=1)
        sd = _softmax(det_logits[rows], axis=0)
        phi = (sc * sd).sum(axis=0)
        phis.append(phi)
        p = np.clip(phi, eps, 1 - eps)
        y = np.zeros_like(p)
        y[label] = 1
        total += -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum()
    if normalization == "bags":
        total /= len(bags)
    return np.array(phis), total


class TestWSDDNLoss(unittest.TestCase):
    def test_against_numpy(self):
        rng = np.random.RandomState(0)
        cls_logits = rng.randn(9, 5) * 3
        det_logits = rng.randn(9, 5) * 3
        # a full bag, a one-proposal bag, bags sharing proposals, padding
        bags = np.array([[0, 1, 2, 3], [4, -1, -1, -1], [2, 5, 6, -1], [7, 8, 0, -1]])
        labels = np.array([1, 3, 0, 4])
        for normalization in ("bags", "none"):
            for eps in (1e-6, 1e-10):
                phi, loss = wsddn_bag_scores(
                    torch.tensor(cls_logits), torch.tensor(det_logits), torch.tensor(bags)
                )
                got = wsddn_loss(phi, torch.tensor(labels), eps, normalization)
                ref_phi, ref_loss = numpy_wsddn(
                    cls_logits, det_logits, bags, labels, eps, normalization
                )
                np.testing.assert_allclose(phi.numpy(), ref_phi, rtol=1e-12, atol=1e-15)
                self.assertAlmostEqual(float(got), ref_loss, places=10)

    def test_one_proposal_bag_is_its_class_softmax(self):
        cls_logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
        det_logits = torch.tensor([[5.0, -3.0, 0.0]], dtype=torch.float64)
        phi, contributions = wsddn_bag_scores(cls_logits, det_logits, torch.tensor([[0, -1]]))
        torch.testing.assert_close(phi[0], torch.softmax(cls_logits[0], 0))
        torch.testing.assert_close(contributions[0, 0], phi[0])
        self.assertEqual(contributions[0, 1].abs().sum().item(), 0.0)

    def test_eps_clamp_keeps_the_loss_finite(self):
        # a saturated bag: φ_c = 1 for its class, 0 elsewhere (to double precision)
        cls_logits = torch.tensor([[1000.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
        det_logits = torch.zeros(1, 3, dtype=torch.float64)
        phi, _ = wsddn_bag_scores(cls_logits, det_logits, torch.tensor([[0]]))
        for eps in (1e-6, 1e-10):
            wrong = wsddn_loss(phi, torch.tensor([1]), eps, "none")
            # label 1 has φ = 0 -> clamped to ε: −log ε, plus the other two classes
            expected = -np.log(eps) - np.log1p(-(1 - eps)) - np.log1p(-eps)
            self.assertTrue(torch.isfinite(wrong))
            self.assertAlmostEqual(float(wrong), expected, places=6)
        right = wsddn_loss(phi, torch.tensor([0]), 1e-6, "none")
        self.assertAlmostEqual(float(right), -3 * np.log1p(-1e-6), places=9)
        right.backward()
        self.assertTrue(bool(torch.isfinite(cls_logits.grad).all()))

    def test_bfloat16_logits_give_float32_scores_and_the_eps_clamp(self):
        # under bfloat16 autocast the box head's logits are bfloat16; there 1 − 1e-6 rounds to 1,
        # so φ and the loss are computed in float32
        cls_logits = torch.tensor([[1000.0, 0.0, 0.0]], dtype=torch.bfloat16)
        det_logits = torch.zeros(1, 3, dtype=torch.bfloat16)
        phi, contributions = wsddn_bag_scores(cls_logits, det_logits, torch.tensor([[0]]))
        self.assertEqual((phi.dtype, contributions.dtype), (torch.float32, torch.float32))
        loss = wsddn_loss(phi, torch.tensor([0]), 1e-6, "none")
        self.assertAlmostEqual(float(loss), -3 * np.log1p(-1e-6), places=5)

    def test_empty_and_bad(self):
        phi = torch.zeros(0, 4, requires_grad=True)
        loss = wsddn_loss(phi, torch.zeros(0, dtype=torch.long))
        self.assertEqual(float(loss), 0.0)
        with self.assertRaisesRegex(ValueError, "LOSS_NORMALIZATION"):
            wsddn_loss(phi, torch.zeros(0, dtype=torch.long), normalization="mean")
        with self.assertRaisesRegex(ValueError, "at least one proposal"):
            wsddn_bag_scores(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[-1, 0]]))


def _wsddn_cfg(**wsddn):
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 4
    for key, value in wsddn.items():
        cfg.MODEL.CCGR.WSDDN[key] = value
    return cfg


class TestWSDDNOutputLayers(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.cfg = _wsddn_cfg(LOSS_WEIGHT=0.5)
        self.layers = WSDDNOutputLayers(self.cfg, ShapeSpec(channels=6))
        # two images: 5 and 2 proposal rows; bags of K 3 and K 2 (padded to 3 together)
        self.x = torch.randn(7, 6)
        self.bags = [torch.tensor([[0, 1, -1], [2, 3, 4]]), torch.tensor([[5, 6]])]
        self.labels = [torch.tensor([1, 3]), torch.tensor([0])]

    def test_from_config(self):
        self.assertEqual(self.layers.num_classes, 4)
        self.assertEqual((self.layers.eps, self.layers.loss_normalization), (1e-6, "bags"))
        self.assertEqual(self.layers.loss_weight, 0.5)
        self.assertEqual(tuple(self.layers.cls_score.weight.shape), (4, 6))
        # a variant from a clone of the config
        other = self.cfg.clone()
        other.MODEL.CCGR.WSDDN.LOSS_NORMALIZATION = "none"
        self.assertEqual(WSDDNOutputLayers(other, 6).loss_normalization, "none")
        # box features of a head without fully connected layers are flattened
        conv = WSDDNOutputLayers(self.cfg, ShapeSpec(channels=3, height=2, width=2))
        cls_logits, det_logits = conv(torch.randn(5, 3, 2, 2))
        self.assertEqual((cls_logits.shape, det_logits.shape), ((5, 4), (5, 4)))

    def test_losses_and_inference(self):
        predictions = self.layers(self.x)
        self.assertEqual([tuple(p.shape) for p in predictions], [(7, 4), (7, 4)])
        self.assertEqual([p.dtype for p in predictions], [torch.float32, torch.float32])
        with EventStorage(0) as storage:
            losses = self.layers.losses(predictions, self.bags, self.labels)
            latest = storage.latest()
        self.assertEqual(set(losses), {"loss_mil"})
        self.assertEqual(losses["loss_mil"].shape, ())
        padded = torch.tensor([[0, 1, -1], [2, 3, 4], [5, 6, -1]])
        phi, _ = wsddn_bag_scores(*predictions, padded)
        expected = 0.5 * wsddn_loss(phi, torch.tensor([1, 3, 0]))
        torch.testing.assert_close(losses["loss_mil"], expected)
        self.assertEqual(latest["wsddn/bags_per_image"][0], 1.5)
        self.assertIn("wsddn/bag_score", latest)
        losses["loss_mil"].backward()
        self.assertIsNotNone(self.layers.cls_score.weight.grad)
        out = self.layers.inference(predictions, self.bags)
        self.assertEqual(len(out), 2)
        self.assertEqual([tuple(o["phi"].shape) for o in out], [(2, 4), (1, 4)])
        self.assertEqual([tuple(o["contributions"].shape) for o in out], [(2, 3, 4), (1, 3, 4)])
        torch.testing.assert_close(torch.cat([o["phi"] for o in out]), phi)
        # no bags at all: a zero loss, empty scores
        empty = [torch.zeros(0, 3, dtype=torch.long)]
        with EventStorage(0):
            zero = self.layers.losses(predictions, empty, [torch.zeros(0, dtype=torch.long)])
        self.assertEqual(float(zero["loss_mil"]), 0.0)
        self.assertEqual(tuple(self.layers.inference(predictions, empty)[0]["phi"].shape), (0, 4))

    def test_bad_options_name_the_config_key(self):
        for key, value in (("EPS", 0.7), ("LOSS_NORMALIZATION", "mean"), ("LOSS_WEIGHT", -1.0)):
            with self.assertRaisesRegex(ValueError, f"MODEL.CCGR.WSDDN.{key}"):
                WSDDNOutputLayers(_wsddn_cfg(**{key: value}), 6)


class TestWSDDNROIHeads(unittest.TestCase):
    def _heads(self, seed=0):
        cfg = get_cfg()
        add_wsis_config(cfg)
        cfg.MODEL.ROI_HEADS.NAME = "WSDDNROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p3", "p4"]
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 4
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
        cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
        shapes = {"p3": ShapeSpec(channels=8, stride=8), "p4": ShapeSpec(channels=8, stride=16)}
        torch.manual_seed(seed)
        return build_roi_heads(cfg, shapes)

    def test_train_and_inference(self):
        heads = self._heads()
        feats = {"p3": torch.randn(2, 8, 12, 14), "p4": torch.randn(2, 8, 6, 7)}
        boxes = [Boxes(torch.tensor([[0.0, 0, 40, 40], [10, 10, 60, 50], [5, 5, 20, 30]])),
                 Boxes(torch.tensor([[0.0, 0, 90, 80]]))]
        bags = [torch.tensor([[0, 1, -1], [2, -1, -1]]), torch.zeros(0, 3, dtype=torch.long)]
        labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long)]
        heads.train()
        with EventStorage(0):
            losses = heads(feats, boxes, bags, labels)
        losses["loss_mil"].backward()
        self.assertTrue(torch.isfinite(losses["loss_mil"]))
        self.assertIsNotNone(heads.box_predictor.det_score.weight.grad)
        heads.eval()
        with torch.no_grad():
            out = heads(feats, boxes, bags, labels)
        self.assertEqual(out[0]["phi"].shape, (2, 4))
        self.assertEqual(out[0]["contributions"].shape, (2, 3, 4))
        self.assertEqual(out[1]["phi"].shape, (0, 4))
        torch.testing.assert_close(out[0]["contributions"].sum(1), out[0]["phi"])

    def test_loads_the_old_layout(self):
        # before WSDDNOutputLayers the heads held "cls_score" and "det_score" themselves
        heads = self._heads()
        old = {k.replace("box_predictor.", ""): v for k, v in heads.state_dict().items()}
        self.assertIn("cls_score.weight", old)
        fresh = self._heads(seed=1)
        self.assertFalse(torch.equal(fresh.box_predictor.cls_score.weight,
                                     heads.box_predictor.cls_score.weight))
        fresh.load_state_dict(old)  # strict: every old key converted, none missing
        for k, v in heads.state_dict().items():
            self.assertTrue(torch.equal(fresh.state_dict()[k], v), k)

    def test_batch_without_bags_has_a_connected_zero_loss(self):
        heads = self._heads().train()
        feats = {"p3": torch.randn(1, 8, 12, 14), "p4": torch.randn(1, 8, 6, 7)}
        with EventStorage(0):
            loss = heads(feats, [Boxes(torch.zeros(0, 4))], [torch.zeros(0, 10, dtype=torch.long)],
                         [torch.zeros(0, dtype=torch.long)])["loss_mil"]
        self.assertEqual(float(loss), 0.0)
        loss.backward()  # connected to the parameters: DDP-safe


class TestWSDDNLossBadInput(unittest.TestCase):
    def test_names_the_argument(self):
        phi = torch.full((2, 3), 0.3)
        with self.assertRaisesRegex(
            ValueError, r"'bag_labels' must lie in 0..2 \(C of phi\), got 0..3"
        ):
            wsddn_loss(phi, torch.tensor([0, 3]))
        with self.assertRaisesRegex(TypeError, "'bag_labels' must have an integer dtype"):
            wsddn_loss(phi, torch.tensor([0.0, 1.0]))
        with self.assertRaisesRegex(ValueError, r"'bag_labels' must have shape \(2,\), got \(3,\)"):
            wsddn_loss(phi, torch.tensor([0, 1, 2]))
        with self.assertRaisesRegex(ValueError, "'phi' must not contain NaN"):
            wsddn_loss(torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]))
        logits = torch.zeros(4, 3)
        with self.assertRaisesRegex(ValueError, "'bags' must index the R = 4 proposal rows"):
            wsddn_bag_scores(logits, logits, torch.tensor([[0, 4]]))
        with self.assertRaisesRegex(TypeError, "'bags' must have an integer dtype"):
            wsddn_bag_scores(logits, logits, torch.tensor([[0.0, 1.0]]))


if __name__ == "__main__":
    unittest.main()
