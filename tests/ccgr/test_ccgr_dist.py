"""
CCGR's stages on 2 processes (``wsis_d2.engine.launch``: gloo on CPU), on 8 synthetic images of
one size (128 x 128) with a few iterations per stage:

- 2 processes vs 1 with the same total batch (round 1, then round 2's cues). Equal within float
  tolerance: the image-level classifier and CCGRNet (MIL + SS). What makes it possible: one image
  size (a batch of 1 and of 2 pad alike), no flip, float32, no batch statistics (FrozenBN backbone,
  no norm in the LC and PSP heads) and no dropout; every stage seeded with SEED + rank, so
  detectron2's TrainingSampler shards one permutation; losses divided by counts averaged over the
  processes (``wsis_d2.utils.dist``). Then identical: the proposal, round-1 cue and pseudo-label
  files. Not equal: the IS branch (Mask R-CNN samples anchors and ROIs with each rank's own
  random stream, and normalises its losses per process), hence neither are round 2's cues;
- the inference stages given the same models: the 2-process run's proposal, cue, seed-box and
  pseudo-label files and its pseudo-label and IS-branch AP are recomputed by 1 process from its
  models and must be byte-identical / equal (each image computed once, gathered in dataset order,
  written by rank 0);
- kill and resume: rank 0 dies (os._exit) inside the IS branch's training after its checkpoint of
  iteration 1; ``--resume`` on 2 processes skips the finished stages on both ranks and continues
  the IS branch at iteration 2.
"""

import hashlib
import json
import math
import os
import shutil
import tempfile
import unittest

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

import wsis_d2  # noqa: F401  (registers everything)
from wsis_d2 import add_wsis_config
from wsis_d2.data.datasets import SyntheticSpec, register_synthetic_split
from wsis_d2.engine import launch
from wsis_d2.ccgr.dist import check_shared_output, from_main, gather_by_id, shard
from wsis_d2.ccgr.rounds import STAGE_FILE, CCGRRounds
from wsis_d2.engine import WSISTrainer
from wsis_d2.testing import config_path

DATASET = "wsis_ccgr_dist_test_128"
# deterministic inputs: one image size, no flip, float32 (no bfloat16 autocast)
SAME = ["INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.AMP.ENABLED", "False",
        "DATALOADER.ASPECT_RATIO_GROUPING", "False", "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
FAST = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.IMS_PER_BATCH", "2", "MODEL.WEIGHTS", ""] + SAME  # fmt: skip
# the inference stages' files, compared byte for byte
FILES = ["proposals/" + DATASET + ".pkl", "round1/cues/cues.pkl",
         "round1/pseudo_labels/pseudo_labels.json", "round2/cues/cues.pkl"]  # fmt: skip
INFERENCE_STAGES = ["proposals", "round1/cues", "round1/pseudo_labels", "round1/is", "round2/cues"]


def _register(root):
    if DATASET not in DatasetCatalog.list():
        spec = SyntheticSpec(num_images=8, seed=3103, min_image_size=128, max_image_size=128)
        register_synthetic_split(DATASET, "ccgr_dist_test_128", spec, root)


def _cfg(out):
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.merge_from_file(config_path("ccgr_mnv2_synthetic.yaml"))
    cfg.merge_from_list(FAST + [
        "MODEL.DEVICE", "cpu", "OUTPUT_DIR", out, "SEED", "5",
        # no batch statistics and no dropout in the PSP head: its training is deterministic
        "MODEL.SEM_SEG_HEAD.NORM", "", "MODEL.CCGR.PSP.DROPOUT", "0.0",
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "MODEL.CCGR.REFINE_STEPS", "5", "MODEL.CCGR.PEAK_RELATIVE_THRESHOLD", "0.0",
        "MODEL.CCGR.ROUNDS.NUM", "2", "MODEL.CCGR.ROUNDS.PROPOSAL_MAX", "200", "MODEL.CCGR.ROUNDS.WORKERS", "0",
        "MODEL.CCGR.ROUNDS.CLASSIFIER_CONFIG",
        config_path("demo", "ccgr_cls_mnv2_synthetic.yaml"),
        "MODEL.CCGR.ROUNDS.IS_CONFIG", config_path("mask_rcnn_mnv2_fpn_synthetic.yaml"),
        "MODEL.CCGR.ROUNDS.CLASSIFIER_OPTS", FAST + ["SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01"],
        "MODEL.CCGR.ROUNDS.IS_OPTS", FAST + ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1",
                                "DATASETS.TEST", f"('{DATASET}',)",
                                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                "TEST.DETECTIONS_PER_IMAGE", "10"],
        "MODEL.CCGR.ROUNDS.IS_SCORE_THRESHOLD", "0.0",
    ])  # fmt: skip
    cfg.freeze()
    return cfg


class _DieAt(HookBase):
    """Rank 0 exits at once, as a killed process, after the step (and checkpoint) ``iteration``."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration and comm.is_main_process():
            os._exit(3)


class _Trainer(WSISTrainer):
    """Records, per rank, the folder and first iteration of every training it starts; dies in
    the IS branch (the Mask R-CNN) after the iteration in ``$_TEST_DIE_IN_IS`` when it is set."""

    def build_hooks(self):
        hooks = super().build_hooks()
        is_branch = self.cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        if os.environ.get("_TEST_DIE_IN_IS") and is_branch:
            hooks.append(_DieAt(int(os.environ["_TEST_DIE_IN_IS"])))
        return hooks

    def train(self):
        log = os.path.join(os.path.dirname(os.path.dirname(self.cfg.OUTPUT_DIR)),
                           f"started_rank{comm.get_rank()}.jsonl")  # fmt: skip
        with open(log, "a") as f:
            f.write(json.dumps([os.path.relpath(self.cfg.OUTPUT_DIR, os.path.dirname(log)),
                                self.start_iter]) + "\n")  # fmt: skip
        return super().train()


def _run(root, out, resume=False, until="round2/cues"):
    """One process's part: register the split, seed as default_setup does, run the stages."""
    # one thread in every process of both runs: the thread count changes the order of float sums
    # (launch gives cores / N threads when OMP_NUM_THREADS is unset), and identical files need
    # identical arithmetic
    torch.set_num_threads(1)
    _register(root)
    cfg = _cfg(out)
    seed_all_rng(cfg.SEED + comm.get_rank())
    CCGRRounds(cfg, _Trainer).run(resume=resume, until=until)


def _digest(path):
    """sha256 of a file, or of a cue file with its folder of label maps (PNG)."""
    h = hashlib.sha256()
    paths = [path]
    maps = os.path.splitext(path)[0] + "_sem_seg"
    if path.endswith("cues.pkl"):
        paths += [os.path.join(maps, n) for n in sorted(os.listdir(maps))]
    for p in paths:
        with open(p, "rb") as f:
            h.update(os.path.basename(p).encode() + f.read())
    return h.hexdigest()


def _started(out, rank):
    with open(os.path.join(out, f"started_rank{rank}.jsonl")) as f:
        return [tuple(json.loads(line)) for line in f]


def _stage_metrics(out, stage):
    with open(os.path.join(out, stage, STAGE_FILE)) as f:
        return json.load(f)["metrics"]


class TestCCGRTwoProcesses(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = os.path.join(cls.tmp.name, "data")
        _register(cls.root)
        DatasetCatalog.get(DATASET)  # generated once here, not by two processes at once

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_two_processes_equal_one(self):
        outs = {n: os.path.join(self.tmp.name, f"run{n}") for n in (1, 2)}
        for n, out in outs.items():
            launch(_run, n, dist_url="auto", args=(self.root, out), device="cpu")
        # both ranks trained every training stage, from iteration 0, on the same folders
        self.assertEqual(_started(outs[2], 0), _started(outs[2], 1))
        self.assertEqual(_started(outs[2], 0), _started(outs[1], 0))
        states = {
            n: torch.load(os.path.join(out, "round1", "classifier", "model_final.pth"),
                          weights_only=False)["model"]
            for n, out in outs.items()
        }  # fmt: skip
        # the image-level classifier and CCGRNet: the same training up to float summation order
        # (observed: classifier 0, CCGRNet 3e-7 after 2 AdamW steps)
        for stage in ("round1/classifier", "round1/mil_ss"):
            states = {
                n: torch.load(os.path.join(out, stage, "model_final.pth"),
                              weights_only=False)["model"]
                for n, out in outs.items()
            }  # fmt: skip
            self.assertEqual(states[1].keys(), states[2].keys())
            moved = 0
            for k, v in states[1].items():
                torch.testing.assert_close(
                    states[2][k], v, rtol=1e-4, atol=1e-5, msg=f"{stage} {k}"
                )
                moved += v.is_floating_point() and v.abs().sum() > 0
            self.assertGreater(moved, 0, stage)
        # so the inference stages up to the pseudo labels give the same files
        for name in FILES[:3]:
            self.assertEqual(_digest(os.path.join(outs[1], name)),
                             _digest(os.path.join(outs[2], name)), msg=name)  # fmt: skip

        # the inference stages, recomputed by 1 process from the 2-process run's models
        again = os.path.join(self.tmp.name, "again")
        shutil.copytree(outs[2], again)
        for stage in INFERENCE_STAGES:
            os.remove(os.path.join(again, stage, STAGE_FILE))
        for name in FILES:
            os.remove(os.path.join(again, name))
            if name.endswith("cues.pkl"):
                shutil.rmtree(os.path.join(again, os.path.dirname(name), "cues_sem_seg"))
        os.remove(os.path.join(again, "started_rank0.jsonl"))
        launch(_run, 1, args=(self.root, again, True), device="cpu")
        for name in FILES:
            self.assertEqual(_digest(os.path.join(again, name)),
                             _digest(os.path.join(outs[2], name)), msg=name)  # fmt: skip
        # no model was retrained: the IS branch resumes at its MAX_ITER (3) and only evaluates
        self.assertEqual(_started(again, 0), [("round1/is", 3)])
        for stage in ("round1/cues", "round1/pseudo_labels", "round1/is", "round2/cues"):
            m1, m2 = _stage_metrics(again, stage), _stage_metrics(outs[2], stage)
            self.assertEqual(sorted(m1), sorted(m2), msg=stage)
            for key in m1:
                if key.endswith("per_s") or key.endswith("seconds"):
                    continue  # timings
                if not (math.isnan(m1[key]) and math.isnan(m2[key])):
                    self.assertAlmostEqual(m1[key], m2[key], places=9, msg=f"{stage} {key}")

    def test_kill_and_resume(self):
        out = os.path.join(self.tmp.name, "killed")
        os.environ["_TEST_DIE_IN_IS"] = "1"
        try:
            with self.assertRaises(Exception):  # rank 0 exited with code 3, rank 1 was ended
                launch(_run, 2, dist_url="auto", args=(self.root, out, False, "round1/is"),
                       device="cpu")  # fmt: skip
        finally:
            del os.environ["_TEST_DIE_IN_IS"]
        for stage in ("proposals", "round1/classifier", "round1/cues", "round1/mil_ss",
                      "round1/pseudo_labels"):  # fmt: skip
            self.assertTrue(os.path.isfile(os.path.join(out, stage, STAGE_FILE)), stage)
        self.assertFalse(os.path.isfile(os.path.join(out, "round1", "is", STAGE_FILE)))
        self.assertTrue(os.path.isfile(os.path.join(out, "round1", "is", "model_0000001.pth")))
        before = {name: _digest(os.path.join(out, name)) for name in FILES[:3]}
        runs = len(_started(out, 0))

        launch(_run, 2, dist_url="auto", args=(self.root, out, True, "round1/is"), device="cpu")
        # both ranks skipped the same finished stages and continued the IS branch at iteration 2
        for rank in (0, 1):
            self.assertEqual(_started(out, rank)[runs:], [("round1/is", 2)], msg=f"rank {rank}")
        self.assertTrue(os.path.isfile(os.path.join(out, "round1", "is", STAGE_FILE)))
        for name, digest in before.items():
            self.assertEqual(_digest(os.path.join(out, name)), digest, msg=name)
        with open(os.path.join(out, "round1", "is", "last_checkpoint")) as f:
            self.assertEqual(f.read().strip(), "model_final.pth")
        self.assertIn("mAP_r50", _stage_metrics(out, "round1/is"))


class TestHelpers(unittest.TestCase):
    """The helpers in one process (world size 1): what each rank computes and what is checked."""

    def test_gather_by_id_orders_and_checks(self):
        merged = gather_by_id({3: "c", 1: "a"}, [1, 2, 3][::2], "stage x")
        self.assertEqual(list(merged.items()), [(1, "a"), (3, "c")])
        with self.assertRaisesRegex(ValueError, r"stage x: 1 training images without a result"):
            gather_by_id({1: "a"}, [1, 2], "stage x")
        with self.assertRaisesRegex(ValueError, r"stage x: .*1 results for images not in"):
            gather_by_id({1: "a", 9: "z"}, [1], "stage x")

    def test_from_main_and_shard(self):
        self.assertEqual(from_main(lambda: {"a": 1}), {"a": 1})
        with self.assertRaisesRegex(ValueError, "bad file"):
            from_main(lambda: (_ for _ in ()).throw(ValueError("bad file")))
        self.assertEqual(shard(list(range(5))), list(range(5)))
        with tempfile.TemporaryDirectory() as tmp:
            check_shared_output(tmp)  # one process: nothing to check, no error


if __name__ == "__main__":
    unittest.main()
