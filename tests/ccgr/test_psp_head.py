"""PSP head of CCGR's SS branch: shapes at odd input sizes, the ignore value, the contract."""

import unittest

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head

import wsis_d2  # noqa: F401  (registers PSPHead)
from wsis_d2 import add_wsis_config


def _head(norm="BN", in_feature="p3", balance=False):
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NAME = "PSPHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = [in_feature]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.MODEL.SEM_SEG_HEAD.NORM = norm
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 0
    cfg.MODEL.CCGR.PSP.HIDDEN_DIM = 16
    cfg.MODEL.CCGR.PSP.BALANCE_BACKGROUND = balance
    torch.manual_seed(0)
    return build_sem_seg_head(cfg, {"p3": ShapeSpec(channels=12, stride=8)})


class TestPSPHead(unittest.TestCase):
    def test_shapes_at_odd_sizes(self):
        head = _head().eval()
        # features of inputs padded to multiples of 8: (97, 131) -> (104, 136)
        for h, w in ((13, 17), (1, 1), (7, 3)):
            with self.subTest(size=(h, w)), torch.no_grad():
                logits, losses = head({"p3": torch.randn(2, 12, h, w)})
                self.assertEqual(tuple(logits.shape), (2, 5, 8 * h, 8 * w))
                self.assertEqual(losses, {})
        # C_in / 4 channels per pooled branch (PSPNet) when CONVS_DIM is 0
        self.assertEqual(head.pools[0].out_channels, 3)

    def test_loss_ignores_the_ignore_value(self):
        head = _head(norm="").train()
        head.dropout.p = 0.0  # without dropout (and norm) training and inference logits agree
        feats = {"p3": torch.randn(2, 12, 5, 7)}
        targets = torch.randint(0, 5, (2, 40, 56))
        targets[:, :20] = 255
        _, losses = head(feats, targets)
        with torch.no_grad():
            logits, _ = head.eval()(feats)
        head.train()
        # the mean over the labelled pixels only: ignored pixels change nothing
        keep = targets != 255
        manual = -torch.log_softmax(logits, 1).gather(1, targets.clamp(max=4)[:, None])[:, 0][keep]
        torch.testing.assert_close(losses["loss_sem_seg"].detach(), manual.mean())
        # all ignored: a zero loss connected to the parameters
        _, losses = head(feats, torch.full((2, 40, 56), 255))
        self.assertEqual(float(losses["loss_sem_seg"]), 0.0)
        losses["loss_sem_seg"].backward()

    def test_balanced_loss_against_numpy(self):
        head = _head(norm="", balance=True).train()
        g = torch.Generator().manual_seed(3)
        logits = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
        targets = torch.full((2, 6, 7), 4)  # background = class 4, the last
        targets[0, 1:3, 2:5] = 1
        targets[1, 4, :] = 2
        targets[1, 0, :3] = 255
        lg = logits.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
        t = targets.reshape(-1).numpy()
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        ce = -logp[np.arange(len(t)), np.minimum(t, 4)]
        expected = ce[t == 4].mean() + ce[(t != 4) & (t != 255)].mean()
        loss = head.losses(logits, targets)["loss_sem_seg"]
        self.assertAlmostEqual(float(loss), float(expected), places=10)
        # differs from the plain mean, which the unbalanced head keeps
        plain = _head(norm="").train().losses(logits, targets)["loss_sem_seg"]
        self.assertAlmostEqual(float(plain), float(ce[t != 255].mean()), places=10)
        self.assertGreater(abs(float(plain) - float(loss)), 0.1)
        # a batch without object pixels: the background mean alone
        only_bg = head.losses(logits, torch.full((2, 6, 7), 4))["loss_sem_seg"]
        self.assertAlmostEqual(float(only_bg), float((-logp[:, 4]).mean()), places=10)

    def test_targets_larger_than_the_logits_are_cropped(self):
        head = _head(norm="").train()
        head.dropout.p = 0.0
        _, losses = head({"p3": torch.randn(1, 12, 4, 4)}, torch.zeros(1, 35, 33, dtype=torch.long))
        self.assertTrue(torch.isfinite(losses["loss_sem_seg"]))

    def test_config_errors(self):
        with self.assertRaisesRegex(ValueError, "IN_FEATURES"):
            _head(in_feature="p9")


if __name__ == "__main__":
    unittest.main()
