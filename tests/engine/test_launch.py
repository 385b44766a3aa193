"""
Multi-process training on CPU: tools/train_net.py's ``main`` run by ``wsis_d2.engine.launch`` in 2
processes (gloo, DistributedDataParallel on a CPU module, evaluation gathered across processes)
equals the 1-process run with the same total batch.

How equality is made possible: the image-level classifier (``MODEL.LC.IMAGE_LABELS_ONLY``, its
loss a mean over images, no batch norm in the head, FrozenBN backbone) with SGD and float32,
images of one size (so that padding a batch of 2 or of 4 gives the same pixels), no flip and no
aspect-ratio grouping. detectron2's TrainingSampler then feeds rank r the images r, r + 2, ... of
the same shuffled stream, so the two processes' batches of 2 are the 1-process batch of 4, and the
all-reduced gradient is its gradient up to float summation order.
"""
import atexit
import json
import os
import tempfile
import unittest

import torch
from detectron2.data import DatasetCatalog
from detectron2.utils import comm

from wsis_d2.data.datasets import SyntheticSpec, register_synthetic_split
from wsis_d2.engine import check_device, launch
from wsis_d2.testing import config_path, load_tool, repo_root

REPO = repo_root()
CONFIG = config_path("demo", "ccgr_cls_mnv2_synthetic.yaml")
DATASET = "wsis_launch_test_128"


def _register(root):
    spec = SyntheticSpec(num_images=8, seed=7007, min_image_size=128, max_image_size=128)
    if DATASET not in DatasetCatalog.list():
        register_synthetic_split(DATASET, "launch_test_128", spec, root)


class _Args:
    def __init__(self, opts):
        self.config_file = CONFIG
        self.opts = opts
        self.resume = False
        self.eval_only = False
        self.num_gpus = 1


def _train(root, out):
    """Run in every process: register the test split, then tools/train_net.py's main."""
    _register(root)
    train_net = load_tool("train_net")
    opts = [
        "OUTPUT_DIR", out, "SEED", "3",
        "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", f"('{DATASET}',)",
        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01", "SOLVER.CHECKPOINT_PERIOD", "100",
        "SOLVER.AMP.ENABLED", "False", "TEST.WSIS_COCO_EVAL", "False",
        "INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN",
        "128", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.ASPECT_RATIO_GROUPING", "False",
    ]
    train_net.main(_Args(opts))


def _record_gloo_threads_at_exit(out):
    """Run in every process: use detectron2's gathers (which cache a group), then write the names
    of this process's gloo threads still alive at interpreter exit, i.e. after launch's teardown."""
    comm.all_gather(comm.get_rank())
    path = os.path.join(out, f"gloo_threads_rank{comm.get_rank()}.txt")

    def record():
        names = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        with open(path, "w") as f:
            f.write("\n".join(n for n in names if "gloo" in n))

    atexit.register(record)


def _last_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    merged = {}
    for row in rows:
        merged.update(row)
    return merged


class TestCPULaunch(unittest.TestCase):
    def test_two_processes_equal_one_with_the_same_total_batch(self):
        with tempfile.TemporaryDirectory() as tmp:
            _register(tmp)
            DatasetCatalog.get(DATASET)  # generated once here, not by two processes at once
            outs = {n: os.path.join(tmp, f"run{n}") for n in (1, 2)}
            for n, out in outs.items():
                launch(_train, n, dist_url="auto", args=(tmp, out), device="cpu")
            states = {
                n: torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["model"]
                for n, out in outs.items()
            }
            metrics = {n: _last_metrics(out) for n, out in outs.items()}
        self.assertEqual(states[1].keys(), states[2].keys())
        imagenet = torch.load(
            os.path.join(REPO, "weights", "mobilenet_v2_imagenet.pth"), weights_only=False
        )["model"]
        moved = 0
        for k, v in states[1].items():
            torch.testing.assert_close(states[2][k], v, rtol=1e-4, atol=1e-6, msg=k)
            moved += k in imagenet and not torch.equal(imagenet[k], v)
        self.assertGreater(moved, 0, "training changed no ImageNet weight: the test is vacuous")
        self.assertEqual(metrics[1]["iteration"], metrics[2]["iteration"])
        self.assertAlmostEqual(metrics[1]["total_loss"], metrics[2]["total_loss"], places=5)
        # the evaluation of the 2-process run gathers both halves of the test split
        for key in ("counting/mRMSE", "counting/MAE"):
            self.assertIn(key, metrics[2])
            self.assertAlmostEqual(metrics[1][key], metrics[2][key], places=6, msg=key)

    @unittest.skipUnless(os.path.isdir("/proc/self/task"), "reads thread names from Linux /proc")
    def test_no_gloo_thread_outlives_the_teardown(self):
        # a group object still held after destroy_process_group kept its threads until interpreter
        # exit, where they could abort the process after a finished training (SIGABRT)
        with tempfile.TemporaryDirectory() as tmp:
            launch(_record_gloo_threads_at_exit, 2, dist_url="auto", args=(tmp,), device="cpu")
            for rank in (0, 1):
                with open(os.path.join(tmp, f"gloo_threads_rank{rank}.txt")) as f:
                    self.assertEqual(f.read().split(), [], f"rank {rank}")


class TestDeviceCheck(unittest.TestCase):
    @unittest.skipIf(torch.cuda.is_available(), "this machine has a GPU")
    def test_cuda_config_without_gpu_fails_at_start_with_the_fix(self):
        with self.assertRaises(RuntimeError) as ctx:
            launch(lambda: self.fail("must not run"), 1, device="cuda")
        message = str(ctx.exception)
        self.assertIn("MODEL.DEVICE is 'cuda'", message)
        self.assertIn("MODEL.DEVICE cpu", message)
        check_device("cpu")  # no error

    def test_bad_process_counts(self):
        with self.assertRaisesRegex(ValueError, "--num-gpus"):
            launch(lambda: None, 0, device="cpu")


if __name__ == "__main__":
    unittest.main()
