"""
Helpers shared by the benchmark scripts in tools/: the configuration they all start from, the
schedule rescaling and CPU-time measurement. They train with ``WSISTrainer(cfg, evaluate=False)``:
a benchmark evaluates the trained model itself, on a chosen number of images.
"""

import os
import time

from wsis_d2 import get_wsis_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_SET = "wsis_synth_val"

__all__ = ["ROOT", "VAL_SET", "bench_cfg", "rescale_schedule", "cpu_time"]


def bench_cfg(config_file, opts, output_dir, train_set, val_set=VAL_SET):
    """A config for a CPU benchmark run: ``train_set`` / ``val_set``, no periodic evaluation."""
    cfg = get_wsis_cfg(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (train_set,)
    cfg.DATASETS.TEST = (val_set,)
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = output_dir
    return cfg


def rescale_schedule(cfg, iters):
    """Rescale the config's schedule to ``iters`` iterations (steps at the same fractions)."""
    old = max(1, cfg.SOLVER.MAX_ITER)
    steps = {int(round(s * iters / old)) for s in cfg.SOLVER.STEPS}
    cfg.SOLVER.STEPS = tuple(sorted(s for s in steps if 0 < s < iters))
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(1, iters // 10))
    if cfg.MODEL.META_ARCHITECTURE == "ImageLevelCounter":
        cfg.MODEL.LC.SPATIAL_START_ITER = int(round(cfg.MODEL.LC.SPATIAL_START_ITER * iters / old))
        cfg.MODEL.LC.DENSITY_START_ITER = int(round(cfg.MODEL.LC.DENSITY_START_ITER * iters / old))
    cfg.SOLVER.MAX_ITER = int(iters)
    cfg.SOLVER.CHECKPOINT_PERIOD = int(iters) + 1


def cpu_time(fn):
    """CPU seconds of this process spent in ``fn()`` (all threads): unlike wall time, barely
    affected by other processes sharing the machine."""
    start = time.process_time()
    fn()
    return time.process_time() - start
