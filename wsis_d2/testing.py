"""Helpers for wsis_d2's tests (as ``detectron2.utils.testing``): the checkout's configs and tools,
the datasets root, the device of the end-to-end tests."""

import contextlib
import importlib.util
import os
from types import ModuleType

from .config import get_wsis_cfg

__all__ = [
    "ccgr_config",
    "config_path",
    "datasets_root",
    "device_under_test",
    "get_config",
    "load_tool",
    "repo_root",
    "tiny_density_config",
    "tiny_lc_config",
]


def repo_root() -> str:
    """
    The checkout that holds this package, its ``configs/`` and ``tools/`` (the tests run from a
    checkout; an installed wheel has neither folder, which raises a RuntimeError).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "configs")):
        raise RuntimeError(f"{root} is not a wsis_d2 checkout (no configs/ folder)")
    return root


def config_path(*parts: str) -> str:
    """The path of a config of the checkout, e.g. ``config_path("demo", "lc_demo.yaml")``."""
    return os.path.join(repo_root(), "configs", *parts)


def get_config(config: str, opts=(), device: str = ""):
    """
    ``get_wsis_cfg`` of the checkout's ``configs/<config>`` with ``opts`` ("KEY VALUE" list) merged
    and ``MODEL.DEVICE`` set to ``device`` (default :func:`device_under_test`); not frozen.
    """
    cfg = get_wsis_cfg(config_path(config), opts)
    cfg.MODEL.DEVICE = device or device_under_test()
    return cfg


def ccgr_config(**keys):
    """The default config (not frozen) with ``MODEL.CCGR.<KEY>`` = value for each keyword, e.g.
    ``ccgr_config(BAG_SIZE=5)``."""
    opts = [x for key, value in keys.items() for x in (f"MODEL.CCGR.{key}", value)]
    return get_wsis_cfg(opts=opts)


def tiny_lc_config(num_classes: int = 3, opts=(), device: str = "cpu"):
    """``configs/Base-LC.yaml`` on an R-18 trunk read at res4 with ``num_classes`` classes: an LC
    model that builds and steps in well under a second on a CPU (random weights)."""
    return get_config("Base-LC.yaml", [
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.RESNETS.OUT_FEATURES", "['res4']", "MODEL.LC.IN_FEATURE", "res4",
        "MODEL.LC.NUM_CLASSES", str(num_classes), *opts,
    ], device)


def tiny_density_config(config: str = "density_unet_cells.yaml", opts=(), device: str = "cpu"):
    """A density config with FCRN / U-Net blocks 4-8-8 wide (mid 8): the model's structure at a
    size that trains in seconds on a CPU."""
    return get_config(config, [
        "MODEL.FCRN.CHANNELS", "[4, 8, 8]", "MODEL.FCRN.MID_CHANNELS", "8",
        "MODEL.UNET.CHANNELS", "[4, 8, 8]", "MODEL.UNET.MID_CHANNELS", "8", *opts,
    ], device)


def load_tool(name: str) -> ModuleType:
    """
    The checkout's ``tools/<name>.py`` as a module (its ``main``, ``setup``, argument parser …):
    the tools are scripts, not a package (detectron2's wheel installs a top-level ``tools`` package
    of its own, so ``import tools`` would find that one).
    """
    path = os.path.join(repo_root(), "tools", f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tool {name!r}: {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"wsis_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def datasets_root(path: str):
    """
    Point ``$DETECTRON2_DATASETS`` (where the builtin datasets are read and the synthetic splits
    generated) at ``path`` inside the block, then restore it (or unset it again). In a
    ``unittest.TestCase``: ``cls.enterClassContext(datasets_root(...))`` in ``setUpClass`` or
    ``self.enterContext(...)`` in a test.
    """
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("DETECTRON2_DATASETS", None)
        else:
            os.environ["DETECTRON2_DATASETS"] = old


def device_under_test() -> str:
    """
    The ``MODEL.DEVICE`` of the end-to-end tests (training, CCGR stages and rounds): "cpu" unless
    ``$WSIS_TEST_DEVICE`` names another (``WSIS_TEST_DEVICE=cuda make test`` on a GPU machine runs
    them on CUDA; the op tests have their own CUDA classes, run whenever a GPU is visible).
    """
    device = os.environ.get("WSIS_TEST_DEVICE", "cpu") or "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"$WSIS_TEST_DEVICE is {device!r} but torch sees no GPU")
    return device
