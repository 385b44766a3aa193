"""wsis_d2.utils.testing.datasets_root sets $DETECTRON2_DATASETS and restores it, also on error."""

import os
import unittest
from unittest import mock

from wsis_d2.utils.testing import datasets_root, device_under_test


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


if __name__ == "__main__":
    unittest.main()
