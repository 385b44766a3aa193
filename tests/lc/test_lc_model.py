"""ImageLevelCounter (LC / ILC) end to end: build from config, train steps, losses against an
independent NumPy reference, both config switches, two-stage schedule, inference on odd sizes,
evaluators, DefaultPredictor, proposals, NaN handling and input validation; its components (loss,
instance decoder) built from the config, and decoder variants on a trained model's weights."""

import math
import unittest

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.structures import BoxMode, Boxes, Instances
from detectron2.utils.events import EventStorage

import wsis_d2  # noqa: F401  (registers models)
from wsis_d2.evaluation import CountingEvaluator, InstanceAPEvaluator
from wsis_d2.layers import find_peaks
from wsis_d2.lc.losses import LCLoss
from wsis_d2.lc.meta_arch import fit_lower_count_gain
from wsis_d2.lc.prm import PRMInstanceDecoder, segment_image
from wsis_d2.testing import tiny_lc_config

C = 3


def small_cfg(**overrides):
    cfg = tiny_lc_config(C)
    cfg.MODEL.LC.UPSAMPLE = 2
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def make_input(h, w, counts, count_ge=None, seed=0, name="img"):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts, dtype=torch.long)
    ge = torch.zeros(C, dtype=torch.bool) if count_ge is None else torch.tensor(count_ge)
    return {
        "image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
        "height": h,
        "width": w,
        "file_name": name,
        "image_id": name,
        "labels": (counts > 0).float(),
        "counts": counts,
        "count_ge": ge,
    }


def train_batch(mosaic=False):
    # odd sizes; S, S̃ (count only known as >= 5), S0 and an image with no object at all
    batch = [
        make_input(67, 93, [2, 0, 5], [False, False, True], seed=1, name="a"),
        make_input(81, 55, [0, 1, 0], seed=2, name="b"),
        make_input(59, 71, [0, 0, 0], seed=3, name="c"),
    ]
    if mosaic:
        # a mosaic's targets: an exact 7 (tiles 4 + 3), a lower bound 8 (tiles >= 5 and 3) and
        # an exact 2; and the same counts without "count_exact" (ILC: ranked against t̃)
        batch.append(make_input(64, 64, [7, 8, 2], [False, True, False], seed=4, name="m"))
        batch[-1]["count_exact"] = torch.tensor([True, False, True])
        batch[-1]["mosaic_tiles"] = 4
        batch.append(make_input(60, 50, [7, 8, 2], [False, True, False], seed=5, name="n"))
    return batch


# ------------------------------------------------------------------------------------------------
# independent NumPy reference of all training losses from the head's outputs


def _np_peaks(m):
    """3x3 local maxima (outside = -inf) of a (h, w) map that reach its lower median."""
    h, w = m.shape
    pad = np.pad(m, 1, constant_values=-np.inf)
    win = np.max([pad[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)
    flat = np.sort(m.ravel())
    median = flat[(flat.size - 1) // 2]  # torch.median: the lower of the two middle values
    return (m >= win) & (m >= median)


def _ls(x):
    return -np.logaddexp(0.0, -x)


def reference_losses(model, m, d, batch, image_sizes, iteration=0):
    m = m.detach().double().numpy()
    d = d.detach().double().numpy()
    n = len(batch)
    stride = model.feature_stride / model.head.upsample
    t_tilde = model.criterion.lower_count
    stage1 = iteration < model.criterion.spatial_start_iter
    l_cls = l_pos = l_neg = l_count = l_rank = 0.0
    pooled_pos, pooled_neg = [], []
    for i, inp in enumerate(batch):
        h, w = (math.ceil(s / stride) for s in image_sizes[i])
        counts = inp["counts"].numpy()
        ge = inp["count_ge"].numpy()
        labels = inp["labels"].numpy()
        exact_given = inp.get("count_exact", torch.zeros(C, dtype=torch.bool)).numpy() & ~ge
        bound = np.where(ge, np.maximum(counts, t_tilde), t_tilde)
        present = labels > 0.5
        beyond = present & (ge | ((counts >= t_tilde) & ~exact_given))
        exact = present & ~beyond & (counts >= 1)
        absent = ~present
        s = np.zeros(C)
        pos_terms, neg_terms, t_hat = [], [], np.zeros(C)
        for c in range(C):
            mc, dc = m[i, c, :h, :w], d[i, c, :h, :w]
            pk = _np_peaks(mc)
            s[c] = mc[pk].mean()
            t_hat[c] = dc.sum() if model.count_mode == "paper" else dc.mean()
            if exact[c]:
                vals = np.sort(mc[pk])[::-1]
                h_c = vals[min(counts[c], vals.size) - 1]
                b = pk & (mc >= h_c)
                pos_terms.append(-(_ls(dc[b])).sum() / b.sum())
                pooled_pos.extend(-(_ls(dc[b])))
            if absent[c]:
                neg_terms.append(-(_ls(-dc)).sum() / (h * w))
                pooled_neg.extend(-(_ls(-dc)).ravel())
        l_cls += -(labels * _ls(s) + (1 - labels) * _ls(-s)).mean() / n
        if pos_terms:
            l_pos += np.mean(pos_terms) / n
        if neg_terms:
            l_neg += np.mean(neg_terms) / n
        sel = (exact | absent) if (model.criterion.count_absent and not stage1) else exact
        if sel.any():
            l_count += np.mean((t_hat[sel] - counts[sel]) ** 2) / n / inp.get("mosaic_tiles", 1)
        if beyond.any():
            l_rank += np.mean(np.maximum(0.0, bound[beyond] - t_hat[beyond])) / n
    if model.criterion.spatial_mode == "official":
        l_pos = float(np.mean(pooled_pos)) if pooled_pos else 0.0
        l_neg = float(np.mean(pooled_neg)) if pooled_neg else 0.0
    if stage1:
        l_pos = l_neg = 0.0
    return {
        "loss_cls": l_cls,
        "loss_sp_pos": l_pos,
        "loss_sp_neg": l_neg,
        "loss_count": l_count,
        "loss_rank": model.criterion.rank_loss_weight * l_rank,
    }


def run_losses(model, batch, iteration=0):
    captured = {}
    hook = model.head.register_forward_hook(lambda mod, inp, out: captured.update(out=out))
    with EventStorage(iteration) as storage:
        losses = model(batch)
    hook.remove()
    images = model.preprocess_image(batch)
    return losses, captured["out"], images.image_sizes, storage


class TestTraining(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)

    def test_losses_match_reference_for_every_switch(self):
        combos = [
            ("paper", "paper", True, 0),
            ("official", "official", True, 0),
            ("paper", "official", False, 0),
            ("official", "paper", True, 10),  # official two-stage schedule, still in stage 1
        ]
        batch = train_batch()
        for count_mode, spatial_mode, absent, start in combos:
            with self.subTest(count=count_mode, spatial=spatial_mode, absent=absent, start=start):
                cfg = small_cfg(
                    **{
                        "MODEL.LC.COUNT_MODE": count_mode,
                        "MODEL.LC.SPATIAL_MODE": spatial_mode,
                        "MODEL.LC.COUNT_ABSENT": str(absent),
                        "MODEL.LC.SPATIAL_START_ITER": str(start),
                    }
                )
                torch.manual_seed(0)
                model = build_model(cfg).train()
                losses, (m, d), sizes, storage = run_losses(model, batch, iteration=0)
                ref = reference_losses(model, m, d, batch, sizes, iteration=0)
                self.assertEqual(set(losses), set(ref))
                for key in ref:
                    self.assertAlmostEqual(float(losses[key]), ref[key], places=4, msg=key)
                if start:
                    self.assertEqual(float(losses["loss_sp_pos"]), 0.0)
                    self.assertEqual(storage.latest()["lc/stage"][0], 1.0)
                else:
                    self.assertGreater(float(losses["loss_sp_pos"]), 0.0)
                    self.assertGreater(float(losses["loss_sp_neg"]), 0.0)
                self.assertGreater(float(losses["loss_rank"]), 0.0)

    def test_density_start_iter_trains_the_classification_alone_before_it(self):
        batch = train_batch()
        cfg = small_cfg(**{"MODEL.LC.DENSITY_START_ITER": "5"})
        torch.manual_seed(0)
        model = build_model(cfg).train()
        before, (m, d), sizes, _ = run_losses(model, batch, iteration=4)
        after, _, _, _ = run_losses(model, batch, iteration=5)
        ref = reference_losses(model, m, d, batch, sizes, iteration=5)
        for key in ("loss_sp_pos", "loss_sp_neg", "loss_count", "loss_rank"):
            self.assertEqual(float(before[key]), 0.0, key)
            self.assertAlmostEqual(float(after[key]), ref[key], places=4, msg=key)
            self.assertGreater(float(after[key]), 0.0, key)
        self.assertAlmostEqual(float(before["loss_cls"]), ref["loss_cls"], places=5)
        # before the start only the classification branch (and the backbone) get gradients
        model.zero_grad()
        sum(before.values()).backward()
        density = [p.grad for n, p in model.named_parameters() if "density_branch" in n]
        self.assertTrue(all(g is None or float(g.abs().max()) == 0.0 for g in density))
        cls = [p.grad for n, p in model.named_parameters() if "cls_branch" in n]
        self.assertTrue(any(g is not None and float(g.abs().max()) > 0 for g in cls))

    def test_mosaic_targets_exact_beyond_t_tilde_and_larger_bounds(self):
        # "count_exact" moves a count >= t̃ from the ranking (S̃) to the MSE and the guidance (S);
        # a lower bound above t̃ replaces t̃ in the hinge
        batch = train_batch(mosaic=True)
        for count_mode in ("paper", "official"):
            with self.subTest(count=count_mode):
                torch.manual_seed(0)
                model = build_model(small_cfg(**{"MODEL.LC.COUNT_MODE": count_mode})).train()
                losses, (m, d), sizes, _ = run_losses(model, batch)
                ref = reference_losses(model, m, d, batch, sizes)
                for key in ref:
                    self.assertAlmostEqual(float(losses[key]), ref[key], places=4, msg=key)
                # the same maps without the flag: the exact 7 is ranked, which changes the losses
                plain = [dict(x) for x in batch]
                plain[3].pop("count_exact")
                plain[3].pop("mosaic_tiles")
                ref_plain = reference_losses(model, m, d, plain, sizes)
                self.assertNotAlmostEqual(ref_plain["loss_count"], ref["loss_count"], places=4)
                self.assertNotAlmostEqual(ref_plain["loss_sp_pos"], ref["loss_sp_pos"], places=4)

    def test_train_steps_and_backward(self):
        torch.manual_seed(0)
        model = build_model(small_cfg()).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batch = train_batch()
        with EventStorage(0) as storage:
            for _ in range(3):
                losses = model(batch)
                total = sum(losses.values())
                self.assertTrue(torch.isfinite(total))
                opt.zero_grad()
                total.backward()
                for name in ("backbone.stem.conv1.weight", "head.cls_branch.1.weight"):
                    grad = dict(model.named_parameters())[name].grad
                    self.assertGreater(float(grad.abs().sum()), 0.0, name)
                self.assertGreater(float(model.head.density_branch[1].weight.grad.abs().sum()), 0.0)
                opt.step()
                storage.step()
            for key in ("lc/cls_accuracy", "lc/count_mae_S", "lc/num_peaks_per_map"):
                self.assertIn(key, storage.latest())

    def test_channels_last_and_bfloat16_autocast(self):
        # MODEL.CHANNELS_LAST gives the float32 model's losses up to rounding; under bfloat16
        # autocast the maps reaching the peak op and the losses are contiguous float32
        torch.manual_seed(0)
        model = build_model(small_cfg()).train()
        torch.manual_seed(0)
        model_cl = build_model(small_cfg(**{"MODEL.CHANNELS_LAST": "True"})).train()
        model_cl.load_state_dict(model.state_dict())
        stem = model_cl.backbone.stem.conv1.weight
        self.assertTrue(stem.is_contiguous(memory_format=torch.channels_last))
        batch = train_batch()
        with EventStorage(0):
            ref = model(batch)
            out = model_cl(batch)
        for key in ref:
            self.assertAlmostEqual(float(out[key]), float(ref[key]), places=3, msg=key)
        with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
            images = model_cl.preprocess_image(batch)
            m, d = model_cl.predict_maps(images.tensor)
            losses = model_cl(batch)
        for t in (m, d):
            self.assertEqual(t.dtype, torch.float32)
            self.assertTrue(t.is_contiguous())
        total = sum(losses.values())
        self.assertTrue(torch.isfinite(total))
        total.backward()
        self.assertGreater(float(stem.grad.abs().sum()), 0.0)

    def test_nan_stops_simple_trainer(self):
        model = build_model(small_cfg()).train()
        with torch.no_grad():
            model.head.density_branch[1].bias.fill_(float("nan"))
        batch = train_batch()
        trainer = SimpleTrainer(model, [batch] * 2, torch.optim.SGD(model.parameters(), lr=0.01))
        with self.assertRaises(FloatingPointError):
            trainer.train(0, 1)

    def test_bad_inputs_name_file_and_field(self):
        model = build_model(small_cfg()).train()
        bad = make_input(40, 40, [1, 0, 0], name="broken.jpg")
        bad["counts"] = torch.tensor([1, 0])
        with EventStorage(0):
            with self.assertRaisesRegex(ValueError, "broken.jpg.*counts"):
                model([bad])
            del bad["counts"], bad["labels"]
            with self.assertRaisesRegex(ValueError, "broken.jpg"):
                model([bad])


def decoder_variant(cfg, **overrides):
    """The instance decoder of ``cfg`` with ``overrides`` (KEY=VALUE), built from a clone."""
    cfg = cfg.clone()
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return PRMInstanceDecoder(cfg)


class TestComponents(unittest.TestCase):
    def test_built_from_config_without_state(self):
        cfg = small_cfg(
            **{
                "MODEL.LC.LOWER_COUNT": "4",
                "MODEL.LC.SPATIAL_MODE": "official",
                "MODEL.LC.PRM.MASK_MODE": "segments",
                "MODEL.LC.PRM.DENSITY_WEIGHT": "0.5",
                "MODEL.LC.COUNT_MODE": "official",
            }
        )
        model = build_model(cfg)
        self.assertIsInstance(model.criterion, LCLoss)
        self.assertIsInstance(model.decoder, PRMInstanceDecoder)
        self.assertEqual(
            (model.criterion.lower_count, model.criterion.spatial_mode), (4, "official")
        )
        self.assertEqual((model.decoder.mask_mode, model.decoder.density_weight), ("segments", 0.5))
        self.assertEqual(model.count_mode, "official")
        # parameterless components: the checkpoint keys are the backbone's, the head's, count_gain
        roots = {key.split(".")[0] for key in model.state_dict()}
        self.assertEqual(roots, {"backbone", "head", "count_gain"})

    def test_bad_options_name_the_key(self):
        for key, value in (
            ("MODEL.LC.COUNT_MODE", "sum"),
            ("MODEL.LC.SPATIAL_MODE", "sum"),
            ("MODEL.LC.LOWER_COUNT", "1"),
            ("MODEL.LC.PRM.MASK_THRESHOLD", "1.5"),
            ("MODEL.LC.PRM.PEAK_PROMINENCE", "-0.1"),
        ):
            with self.subTest(key=key), self.assertRaisesRegex(ValueError, key):
                build_model(small_cfg(**{key: value}))


def _count_bias(model, value):
    """Make every class present with t̂ = value (official mode: mean of D)."""
    with torch.no_grad():
        model.head.density_branch[1].weight.zero_()
        model.head.density_branch[1].bias.fill_(value)
        model.head.cls_branch[1].bias.fill_(10.0)


class TestInference(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cfg = small_cfg(**{"MODEL.LC.COUNT_MODE": "official"})
        cls.cfg = cfg
        cls.model = build_model(cfg).eval()
        _count_bias(cls.model, 2.2)

    def _check(self, inp, out):
        inst = out["instances"]
        self.assertEqual(inst.image_size, (inp["height"], inp["width"]))
        self.assertEqual(out["counts"].tolist(), [2.0] * C)
        self.assertEqual(tuple(inst.pred_masks.shape[1:]), (inp["height"], inp["width"]))
        per_class = torch.bincount(inst.pred_classes, minlength=C)
        self.assertTrue(bool((per_class <= 2).all()))
        self.assertGreater(len(inst), 0)
        self.assertTrue(bool(inst.pred_masks.flatten(1).any(dim=1).all()))
        expected_boxes = BoxMode.convert(
            _mask_boxes(inst.pred_masks), BoxMode.XYXY_ABS, BoxMode.XYXY_ABS
        )
        torch.testing.assert_close(inst.pred_boxes.tensor, expected_boxes)
        self.assertTrue(bool(((inst.scores > 0) & (inst.scores <= 1)).all()))
        # display outputs: density maps per class, retained peaks (<= counts) inside the image
        self.assertEqual(out["density"].dim(), 3)
        self.assertEqual(out["density"].shape[0], C)
        peaks = out["peaks"]
        self.assertEqual(peaks.shape[1], 3)
        self.assertGreaterEqual(len(peaks), len(inst))
        self.assertTrue(bool((torch.bincount(peaks[:, 0].long(), minlength=C) <= 2).all()))
        self.assertTrue(bool(((peaks[:, 1] >= 0) & (peaks[:, 1] <= inp["height"])).all()))
        self.assertTrue(bool(((peaks[:, 2] >= 0) & (peaks[:, 2] <= inp["width"])).all()))

    def test_odd_sizes_resized_outputs_and_evaluators(self):
        # image 0: network input 61x87 shown at 122x174 (a resize by the mapper); image 1: 75x49
        inputs = [
            make_input(61, 87, [0] * C, seed=5, name="x0"),
            make_input(75, 49, [0] * C, seed=6),
        ]
        inputs[0]["height"], inputs[0]["width"] = 122, 174
        inputs[1]["image_id"] = "x1"
        with torch.no_grad():
            outputs = self.model(inputs)
        for inp, out in zip(inputs, outputs):
            self._check(inp, out)
        name = "_test_lc_eval"
        if name not in DatasetCatalog.list():
            records = [
                {
                    "file_name": "x0",
                    "image_id": "x0",
                    "height": 122,
                    "width": 174,
                    "class_counts": [1, 0, 0],
                    "annotations": [_square_annotation(20, 30, 40, 0)],
                },
                {
                    "file_name": "x1",
                    "image_id": "x1",
                    "height": 75,
                    "width": 49,
                    "class_counts": [0, 0, 0],
                    "annotations": [],
                },
            ]
            DatasetCatalog.register(name, lambda: records)
            MetadataCatalog.get(name).set(
                thing_classes=["a", "b", "c"], evaluator_type="wsis_instance"
            )
        results = {}
        for ev in (
            CountingEvaluator(name, distributed=False),
            InstanceAPEvaluator(name, distributed=False),
        ):
            ev.reset()
            ev.process(inputs, outputs)
            results.update(ev.evaluate())
        self.assertTrue(np.isfinite(results["counting"]["mRMSE"]))
        # image 0 over-counts class 0 by 1 and every other class by 2, image 1 by 2 everywhere
        rmse = [math.sqrt((1 + 4) / 2), 2.0, 2.0]
        self.assertAlmostEqual(results["counting"]["mRMSE"], float(np.mean(rmse)), places=5)
        self.assertIn("mAP_r50", results["wsis_instance"])

    def test_default_predictor_on_odd_image(self):
        cfg = self.cfg.clone()
        predictor = DefaultPredictor(cfg)
        _count_bias(predictor.model, 2.2)
        image = np.random.default_rng(0).integers(0, 256, (53, 77, 3), dtype=np.uint8)
        out = predictor(image)
        self._check({"height": 53, "width": 77}, out)

    def test_peaks_get_masks_in_one_batched_pass_and_groups_agree(self):
        torch.manual_seed(0)
        inp = make_input(96, 96, [0] * C, seed=7)
        exact = self.model([inp])[0]["instances"]
        # finite but never reached: still one peak per vector
        grouped = decoder_variant(self.cfg, **{"MODEL.LC.PRM.GROUP_DISTANCE": "1e9"})
        same = self.model.inference([inp], decoder=grouped)[0]["instances"]
        self.assertTrue(torch.equal(exact.pred_masks, same.pred_masks))

    def test_peaks_in_output_pixels(self):
        inp = make_input(61, 87, [0] * C, seed=5)
        small = self.model.inference_single(dict(inp))
        inp["height"], inp["width"] = 122, 174
        large = self.model.inference_single(inp)
        self.assertGreater(len(small["peaks"]), 0)
        self.assertTrue(torch.equal(small["peaks"][:, 0], large["peaks"][:, 0]))
        torch.testing.assert_close(large["peaks"][:, 1:], 2 * small["peaks"][:, 1:])
        torch.testing.assert_close(large["density"], small["density"])

    def test_counts_only(self):
        counts_only = decoder_variant(self.cfg, **{"MODEL.LC.PRM.ENABLED": "False"})
        out = self.model.inference([make_input(45, 61, [0] * C)], decoder=counts_only)[0]
        self.assertNotIn("instances", out)
        self.assertEqual(out["counts"].tolist(), [2.0] * C)
        self.assertEqual(out["density"].shape[0], C)
        self.assertTrue(bool((torch.bincount(out["peaks"][:, 0].long(), minlength=C) <= 2).all()))

    def test_given_counts_choose_the_retained_peaks(self):
        inp = make_input(64, 80, [0] * C, seed=3)
        out = self.model.inference_single(inp, counts=torch.tensor([3.0, 0.0, 1.0]))
        self.assertEqual(out["counts"].tolist(), [3.0, 0.0, 1.0])
        classes = out["instances"].pred_classes.tolist()
        self.assertLessEqual(classes.count(0), 3)
        self.assertLessEqual(classes.count(2), 1)
        self.assertNotIn(1, classes)
        self.assertGreater(len(classes), 0)
        with self.assertRaisesRegex(ValueError, "inference counts"):
            self.model.inference_single(inp, counts=torch.tensor([1.0, -1.0, 0.0]))
        with self.assertRaisesRegex(ValueError, "inference counts"):
            self.model.inference_single(inp, counts=torch.tensor([1.0, 1.0]))

    def test_extra_peaks_follow_the_counted_ones(self):
        # the counted instances are unchanged; the next peaks of present classes follow with
        # their scores × the factor; counts and displayed peaks stay the counted ones
        inp = make_input(64, 80, [0] * C, seed=3)
        counts = torch.tensor([1.0, 0.0, 1.0])
        base = self.model.inference_single(inp, counts=counts)
        extra = decoder_variant(
            self.cfg,
            **{"MODEL.LC.PRM.EXTRA_PEAKS": "2", "MODEL.LC.PRM.EXTRA_SCORE_FACTOR": "0.5"},
        )
        more = self.model.inference_single(inp, counts=counts, decoder=extra)
        for key in ("counts", "density", "peaks"):
            self.assertTrue(torch.equal(base[key], more[key]), key)
        b, m = base["instances"], more["instances"]
        self.assertGreater(len(m), len(b))
        # the present classes are those of σ(s_c) > threshold here, the given counts aside
        classes = m.pred_classes.tolist()
        for c in range(C):
            self.assertLessEqual(classes.count(c), int(counts[c]) + 2)
        # the same peaks, all counted: row for row the same masks, the extras' scores doubled
        total = counts + 2  # every class is present for this model and image
        every = self.model.inference_single(inp, counts=total)["instances"]
        self.assertEqual(every.pred_classes.tolist(), classes)
        self.assertTrue(torch.equal(every.pred_masks, m.pred_masks))
        rank = torch.tensor([classes[:i].count(c) for i, c in enumerate(classes)])
        counted = rank < counts[m.pred_classes].long()
        self.assertEqual(int(counted.sum()), len(b))
        self.assertTrue(torch.equal(m.pred_masks[counted], b.pred_masks))
        self.assertTrue(torch.equal(m.scores[counted], b.scores))
        self.assertTrue(torch.allclose(m.scores[~counted], every.scores[~counted] * 0.5))

    def test_prominent_peaks_first(self):
        ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")

        def bump(y, x, height, spread):
            return height * torch.exp(-((ys - y) ** 2 + (xs - x) ** 2) / spread)

        # class 0: a large object with two maxima on a shallow saddle, a second object lower
        maps = torch.zeros(1, C, 20, 30)
        maps[0, 0] = bump(8, 6, 1.0, 30) + bump(8, 16, 0.95, 30) + bump(16, 26, 0.8, 4)
        found = find_peaks(maps, 1, None)
        counts = torch.tensor([2.0] + [0.0] * (C - 1))
        by_value = self.model.decoder.retained_peaks(maps, found.indices, counts, (20, 30))
        self.assertEqual(by_value[:, 2:].tolist(), [[8, 6], [8, 15]])  # two parts of one
        prominent = decoder_variant(self.cfg, **{"MODEL.LC.PRM.PEAK_PROMINENCE": "0.2"})
        kept = prominent.retained_peaks(maps, found.indices, counts, (20, 30))
        self.assertEqual(kept[:, 2:].tolist(), [[8, 6], [16, 26]])  # two objects
        # beyond the prominent peaks, the others by value
        counts[0] = 3.0
        three = prominent.retained_peaks(maps, found.indices, counts, (20, 30))
        self.assertEqual(three[:, 2:].tolist(), [[8, 6], [16, 26], [8, 15]])

    def test_segment_masks(self):
        inp = make_input(64, 80, [0] * C, seed=9)
        inp["height"], inp["width"] = 96, 120
        segments = decoder_variant(self.cfg, **{"MODEL.LC.PRM.MASK_MODE": "segments"})
        out = self.model.inference([inp], decoder=segments)[0]
        self._check(inp, out)
        # every mask is a union of whole regions of the input image's segmentation
        seg = torch.nn.functional.interpolate(
            segment_image(
                inp["image"],
                segments.segment_scale,
                segments.segment_sigma,
                segments.segment_min_size,
            )[None, None].float(),
            size=(96, 120),
            mode="nearest",
        )[0, 0].long()
        for mask in out["instances"].pred_masks:
            inside = torch.unique(seg[mask])
            self.assertTrue(bool(torch.isin(seg, inside)[mask].all()))
            for r in inside:
                self.assertTrue(bool(mask[seg == r].all()), "a region is cut by a mask")
        cfg = self.cfg.clone()
        cfg.MODEL.LC.PRM.MASK_MODE = "blobs"
        with self.assertRaisesRegex(ValueError, "MASK_MODE"):
            build_model(cfg)

    def test_decoder_variant_equals_a_model_built_with_it(self):
        # a benchmark's other mask settings: a decoder from a cfg clone on the same weights
        # gives what a model built from that cfg (and the same checkpoint) gives
        cfg = self.cfg.clone()
        cfg.MODEL.LC.PRM.MASK_MODE = "segments"
        cfg.MODEL.LC.PRM.GROUP_DISTANCE = 16.0
        cfg.MODEL.LC.PRM.PEAK_PROMINENCE = 0.1
        cfg.MODEL.LC.PRM.DENSITY_WEIGHT = 0.5
        built = build_model(cfg).eval()
        built.load_state_dict(self.model.state_dict())
        inp = make_input(64, 80, [0] * C, seed=9)
        inp["height"], inp["width"] = 96, 120
        ours = self.model.inference_single(inp, decoder=PRMInstanceDecoder(cfg))
        theirs = built.inference_single(inp)
        self.assertEqual(self.model.decoder.mask_mode, "threshold")  # the model is unchanged
        self.assertGreater(len(ours["instances"]), 0)
        for key in ("counts", "density", "peaks"):
            self.assertTrue(torch.equal(ours[key], theirs[key]), key)
        for field in ("pred_masks", "scores", "pred_classes"):
            a, b = ours["instances"].get(field), theirs["instances"].get(field)
            self.assertTrue(torch.equal(a, b), field)

    def test_proposals_choose_boxes(self):
        inp = make_input(64, 80, [0] * C, seed=8)
        props = Instances((64, 80))
        props.proposal_boxes = Boxes(
            torch.tensor(
                [[0.0, 0.0, 40.0, 32.0], [40.0, 32.0, 80.0, 64.0], [10.0, 10.0, 70.0, 50.0]]
            )
        )
        props.objectness_logits = torch.zeros(3)
        inp["proposals"] = props
        out = self.model([inp])[0]["instances"]
        self.assertGreater(len(out), 0)
        for box in out.pred_boxes.tensor:
            self.assertTrue(any(torch.allclose(box, p) for p in props.proposal_boxes.tensor))
        inside = _mask_boxes(out.pred_masks)
        for b, m in zip(out.pred_boxes.tensor, inside):
            self.assertTrue(bool((m[:2] >= b[:2]).all() and (m[2:] <= b[2:]).all()))


def _mask_boxes(masks):
    boxes = torch.zeros(masks.shape[0], 4)
    for i, m in enumerate(masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if ys.numel():
            boxes[i] = torch.tensor(
                [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32
            )
    return boxes


def _square_annotation(x, y, size, cls):
    import pycocotools.mask as mask_util

    m = np.zeros((122, 174), dtype=np.uint8, order="F")
    m[y : y + size, x : x + size] = 1
    rle = mask_util.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "bbox": [x, y, x + size, y + size],
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": cls,
        "segmentation": rle,
        "point": [x + size / 2, y + size / 2],
        "iscrowd": 0,
    }


def _censored_objective(alpha, p, t, ge):
    """Σ_S (α·t̂ − t)² + Σ_S̃ max(0, t − α·t̂)² over present images, NumPy (one class)."""
    p = np.clip(p, 0, None)
    present = t >= 1
    exact, bound = present & ~ge, present & ge
    f = ((alpha * p[exact] - t[exact]) ** 2).sum()
    return f + (np.clip(t[bound] - alpha * p[bound], 0, None) ** 2).sum()


class TestCountGain(unittest.TestCase):
    def test_exact_counts_give_least_squares_gain(self):
        rng = np.random.default_rng(0)
        t = rng.integers(0, 5, (40, 3)).astype(float)
        p = t * np.array([0.5, 1.0, 2.0]) + rng.normal(0, 0.2, t.shape)
        gain = fit_lower_count_gain(torch.tensor(p), torch.tensor(t), torch.zeros(40, 3, dtype=bool))
        present = t >= 1
        for c in range(3):
            pc, tc = np.clip(p[present[:, c], c], 0, None), t[present[:, c], c]
            self.assertAlmostEqual(float(gain[c]), (pc * tc).sum() / (pc * pc).sum(), places=12)

    def test_lower_bounds_minimise_the_censored_objective(self):
        rng = np.random.default_rng(1)
        grid = np.linspace(0.05, 6.0, 59501)
        for trial in range(20):
            n = int(rng.integers(3, 30))
            true = rng.integers(0, 12, n).astype(float)
            p = true * rng.uniform(0.3, 1.5) + rng.normal(0, 0.7, n)  # some t̂ < 0
            ge = true >= 5
            t = np.where(ge, 5.0, true)
            alpha = float(fit_lower_count_gain(torch.tensor(p[:, None]), torch.tensor(t[:, None]),
                                               torch.tensor(ge[:, None]))[0])
            f_star = _censored_objective(alpha, p, t, ge)
            f_grid = np.array([_censored_objective(a, p, t, ge) for a in grid])
            if (t >= 1).sum() == 0 or (np.clip(p, 0, None)[t >= 1] == 0).all():
                self.assertEqual(alpha, 1.0)
                continue
            self.assertLessEqual(f_star, f_grid.min() + 1e-9, (trial, alpha, grid[f_grid.argmin()]))

    def test_bounds_only_and_met_bounds(self):
        # only lower bounds: the smallest α meeting all of them (a flat minimum)
        p = torch.tensor([[2.0], [4.0], [1.0]])
        t = torch.tensor([[5.0], [5.0], [5.0]])
        ge = torch.ones(3, 1, dtype=torch.bool)
        self.assertAlmostEqual(float(fit_lower_count_gain(p, t, ge)[0]), 5.0, places=12)
        # a bound that the exact least-squares gain already meets changes nothing
        p = torch.tensor([[1.0], [2.0], [9.0]])
        t = torch.tensor([[1.0], [2.0], [5.0]])
        ge = torch.tensor([[False], [False], [True]])
        self.assertAlmostEqual(float(fit_lower_count_gain(p, t, ge)[0]), 1.0, places=12)
        # absent class and class predicted 0 everywhere: identity
        p = torch.tensor([[1.0, 0.0], [2.0, -1.0]])
        t = torch.tensor([[0.0, 3.0], [0.0, 2.0]])
        self.assertEqual(fit_lower_count_gain(p, t, torch.zeros(2, 2, dtype=bool)).tolist(), [1.0, 1.0])
        with self.assertRaisesRegex(ValueError, "count_ge"):
            fit_lower_count_gain(p, t, torch.zeros(2, 3, dtype=bool))

    def test_gain_scales_inference_and_old_checkpoints_load(self):
        torch.manual_seed(0)
        model = build_model(small_cfg(**{"MODEL.LC.COUNT_MODE": "official"})).eval()
        _count_bias(model, 2.2)
        inp = make_input(61, 87, [0] * C, seed=5)
        with torch.no_grad():
            raw = model.raw_counts(inp)
        torch.testing.assert_close(raw, torch.full((C,), 2.2), rtol=1e-5, atol=1e-5)
        model.set_count_gain(torch.tensor([1.0, 2.0, 0.5]))
        out = model([inp])[0]
        self.assertEqual(out["counts"].tolist(), [2.0, 4.0, 1.0])
        torch.testing.assert_close(out["density"].mean(dim=(1, 2)), torch.tensor([2.2, 4.4, 1.1]))
        for bad in (0.0, -1.0, float("nan")):
            with self.assertRaisesRegex(ValueError, "gains"):
                model.set_count_gain(bad)
        state = {k: v for k, v in model.state_dict().items() if k != "count_gain"}
        fresh = build_model(small_cfg(**{"MODEL.LC.COUNT_MODE": "official"}))
        fresh.set_count_gain(3.0)
        fresh.load_state_dict(state)  # strict: a checkpoint from before the calibration
        self.assertEqual(fresh.count_gain.tolist(), [1.0] * C)
        fresh.load_state_dict(model.state_dict())
        self.assertEqual(fresh.count_gain.tolist(), [1.0, 2.0, 0.5])


if __name__ == "__main__":
    unittest.main()
