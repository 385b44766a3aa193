"""Every YAML under configs/ loads with add_wsis_config and builds its model without weights."""
import glob
import os
import unittest

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import wsis_d2  # noqa: F401  (registers models)
from wsis_d2 import add_wsis_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(path):
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.merge_from_file(path)
    return cfg


class TestConfigs(unittest.TestCase):
    def test_every_config_loads_and_builds(self):
        paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))
        self.assertGreater(len(paths), 0)
        for path in paths:
            with self.subTest(config=os.path.relpath(path, CONFIG_DIR)):
                cfg = load_config(path)
                cfg.MODEL.DEVICE = "cpu"
                if os.path.basename(path).startswith("Base-"):
                    continue  # bases may leave required keys to their leaves
                model = build_model(cfg)
                n_params = sum(p.numel() for p in model.parameters())
                self.assertGreater(n_params, 0)
                for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
                    from detectron2.data import DatasetCatalog

                    self.assertIn(name, DatasetCatalog.list(), f"{path}: unknown dataset {name}")

    def test_add_wsis_config_leaves_global_defaults_alone(self):
        before = get_cfg().dump()
        add_wsis_config(get_cfg())
        self.assertEqual(get_cfg().dump(), before)


if __name__ == "__main__":
    torch.set_num_threads(2)
    unittest.main()
