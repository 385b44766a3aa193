"""Every YAML under configs/ loads with add_wsis_config and builds its model without weights."""
import glob
import os
import tempfile
import unittest

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import wsis_d2  # noqa: F401  (registers models)
from wsis_d2 import add_wsis_config

from wsis_d2.testing import config_path

CONFIG_DIR = config_path()

# keys of earlier versions and their names now: a user's old YAML or opts must fail naming the new
RENAMED = {
    "CCGR.ROUNDS": "MODEL.CCGR.ROUNDS.NUM",
    "CCGR.IS_CONFIG": "MODEL.CCGR.ROUNDS.IS_CONFIG",
    "CCGR.HEALTH.MIN_ITERS": "MODEL.CCGR.HEALTH.MIN_ITERS",
    "MODEL.WSDDN.EPS": "MODEL.CCGR.WSDDN.EPS",
    "MODEL.PSP.BINS": "MODEL.CCGR.PSP.BINS",
    "MODEL.CCGR.CUES_FILE": "INPUT.CCGR.CUES_FILE",
    "MODEL.CCGR.SEGMENT_SCALE": "MODEL.SEGMENTS.SCALE",
    "MODEL.LC.PRM.SEGMENT_MIN_SIZE": "MODEL.SEGMENTS.MIN_SIZE",
    "MODEL.LC.MOSAIC_PROB": "INPUT.LC.MOSAIC_PROB",
    "MODEL.LC.LOWER_COUNT_SUPERVISION": "INPUT.LC.LOWER_COUNT_SUPERVISION",
}


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

    def test_old_keys_name_their_new_names(self):
        values = {"CCGR.IS_CONFIG": "x.yaml", "MODEL.CCGR.CUES_FILE": "c.pkl",
                  "MODEL.WSDDN.EPS": "1e-5", "MODEL.PSP.BINS": "[1, 2]",
                  "MODEL.CCGR.SEGMENT_SCALE": "100.0", "MODEL.LC.MOSAIC_PROB": "0.5",
                  "MODEL.LC.LOWER_COUNT_SUPERVISION": "False"}
        for old, new in RENAMED.items():
            value = values.get(old, "1")
            with self.subTest(opts=old):
                cfg = add_wsis_config(get_cfg())
                with self.assertRaisesRegex(KeyError, f"{old} was renamed to {new}"):
                    cfg.merge_from_list([old, value])
                # the new name takes the value
                cfg.merge_from_list([new, values.get(old, "1")])
            with self.subTest(yaml=old), tempfile.TemporaryDirectory() as d:
                parts = old.split(".")
                text = "".join("  " * i + f"{p}:\n" for i, p in enumerate(parts[:-1]))
                text += "  " * (len(parts) - 1) + f"{parts[-1]}: {value}\n"
                path = os.path.join(d, "old.yaml")
                with open(path, "w") as f:
                    f.write(text)
                # a whole node that moved is named by the node (e.g. the top-level CCGR)
                with self.assertRaisesRegex(KeyError, "was renamed to"):
                    load_config(path)

    def test_add_wsis_config_leaves_global_defaults_alone(self):
        before = get_cfg().dump()
        add_wsis_config(get_cfg())
        self.assertEqual(get_cfg().dump(), before)


if __name__ == "__main__":
    torch.set_num_threads(2)
    unittest.main()
