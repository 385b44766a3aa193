"""wsis_d2.testing: datasets_root sets $DETECTRON2_DATASETS and restores it, also on error;
the checkout's configs and tools; the device of the end-to-end tests."""

import os
import unittest
from unittest import mock

from wsis_d2.testing import (
    ccgr_config,
    config_path,
    datasets_root,
    device_under_test,
    get_config,
    load_tool,
    repo_root,
    tiny_density_config,
    tiny_lc_config,
)


class TestDatasetsRoot(unittest.TestCase):
    def test_set_and_restored(self):
        with mock.patch.dict(os.environ, {"DETECTRON2_DATASETS": "/before"}):
            with datasets_root("/inside") as path:
                self.assertEqual(path, "/inside")
                self.assertEqual(os.environ["DETECTRON2_DATASETS"], "/inside")
            self.assertEqual(os.environ["DETECTRON2_DATASETS"], "/before")

    def test_unset_again_after_an_error(self):
        with mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop("DETECTRON2_DATASETS", None)
            with self.assertRaises(KeyError):
                with datasets_root("/inside"):
                    raise KeyError("boom")
            self.assertNotIn("DETECTRON2_DATASETS", os.environ)


class TestDeviceUnderTest(unittest.TestCase):
    def test_cpu_by_default_and_from_the_variable(self):
        with mock.patch.dict(os.environ, {"WSIS_TEST_DEVICE": ""}):
            self.assertEqual(device_under_test(), "cpu")
        with mock.patch.dict(os.environ, {"WSIS_TEST_DEVICE": "cpu"}):
            self.assertEqual(device_under_test(), "cpu")

    def test_cuda_without_a_gpu_is_an_error(self):
        with mock.patch.dict(os.environ, {"WSIS_TEST_DEVICE": "cuda"}):
            with mock.patch("torch.cuda.is_available", return_value=False):
                with self.assertRaisesRegex(RuntimeError, "WSIS_TEST_DEVICE.*no GPU"):
                    device_under_test()


class TestCheckout(unittest.TestCase):
    def test_configs_and_tools_of_this_checkout(self):
        root = repo_root()
        self.assertEqual(os.path.realpath(root), os.path.realpath(os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..")))
        self.assertTrue(os.path.isfile(config_path("Base-LC.yaml")))
        cfg = get_config("density_unet_cells.yaml", ["MODEL.DENSITY.SIGMA", "2.5"], device="cpu")
        self.assertEqual((cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.DENSITY.SIGMA), ("DensityCounter", 2.5))
        self.assertEqual(cfg.MODEL.DEVICE, "cpu")
        tool = load_tool("train_net")
        self.assertTrue(callable(tool.main) and callable(tool.setup))
        # the checkout's script, not detectron2's tools/train_net.py of the same name
        self.assertEqual(os.path.realpath(tool.__file__), os.path.realpath(os.path.join(root, "tools", "train_net.py")))

    def test_tiny_configs_build_their_models(self):
        from detectron2.modeling import build_model

        lc = build_model(tiny_lc_config(4))
        self.assertEqual((type(lc).__name__, lc.num_classes), ("ImageLevelCounter", 4))
        density = build_model(tiny_density_config("density_fcrn_a_cells.yaml"))
        self.assertEqual(type(density).__name__, "DensityCounter")
        self.assertLess(sum(p.numel() for p in density.parameters()), 20_000)

    def test_ccgr_config_sets_the_keywords(self):
        cfg = ccgr_config(BAG_SIZE=3, SEED_IN_BAG=False)
        self.assertEqual((cfg.MODEL.CCGR.BAG_SIZE, cfg.MODEL.CCGR.SEED_IN_BAG), (3, False))
        self.assertEqual(ccgr_config().MODEL.CCGR.BAG_SIZE, 10)
        # yacs asserts on a key the config lacks
        with self.assertRaisesRegex(AssertionError, "MODEL.CCGR.NO_SUCH_KEY"):
            ccgr_config(NO_SUCH_KEY=1)

    def test_missing_tool_is_named(self):
        with self.assertRaisesRegex(FileNotFoundError, "no_such_tool"):
            load_tool("no_such_tool")


if __name__ == "__main__":
    unittest.main()
