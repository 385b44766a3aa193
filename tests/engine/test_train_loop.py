"""wsis_d2.engine: the training loop chosen by SOLVER.AMP (bfloat16 autocast on CPU)."""

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils.events import EventStorage

from wsis_d2 import add_wsis_config
from wsis_d2.engine import AutocastTrainer, WSISTrainer, amp_dtype, build_train_loop
from wsis_d2.engine import train_loop as train_loop_module


class _Model(nn.Module):
    """A conv net returning a loss dict; records the dtype its conv ran in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.seen_dtype = None

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        y = self.conv(x)
        self.seen_dtype = y.dtype
        return {"loss_a": y.float().square().mean(), "loss_b": 0.5 * y.float().mean().abs()}


def _loader():
    gen = torch.Generator().manual_seed(0)
    while True:
        yield [{"x": torch.randn(3, 8, 8, generator=gen)} for _ in range(2)]


def _cfg(enabled, dtype="bfloat16", device="cpu", fallback=False):
    cfg = get_cfg()
    add_wsis_config(cfg)
    cfg.SOLVER.AMP.ENABLED = enabled
    cfg.SOLVER.AMP.DTYPE = dtype
    cfg.SOLVER.AMP.BF16_FALLBACK = fallback  # off: the bfloat16 loop on any CPU
    cfg.MODEL.DEVICE = device
    return cfg


def test_build_train_loop_choice():
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = build_train_loop(_cfg(False), model, _loader(), opt)
    assert type(loop) is SimpleTrainer
    loop = build_train_loop(_cfg(True, "bfloat16"), model, _loader(), opt)
    assert isinstance(loop, AutocastTrainer) and loop.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float16.*needs CUDA"):
        build_train_loop(_cfg(True, "float16"), model, _loader(), opt)
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE"):
        amp_dtype(_cfg(True, "half"))
    assert issubclass(AutocastTrainer, SimpleTrainer) and not issubclass(
        AutocastTrainer, AMPTrainer
    )


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_falls_back_to_float32_without_native_support(native, monkeypatch, caplog):
    monkeypatch.setattr(train_loop_module, "native_bfloat16", lambda device_type: native)
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger=train_loop_module.__name__):
        loop = build_train_loop(_cfg(True, fallback=True), model, _loader(), opt)
    if native:
        assert isinstance(loop, AutocastTrainer) and not caplog.records
    else:
        assert type(loop) is SimpleTrainer
        assert "BF16_FALLBACK" in caplog.text and "float32" in caplog.text
        with EventStorage() as storage:
            loop.storage, loop.iter = storage, 0
            loop.run_step()
        assert model.seen_dtype == torch.float32
    # switched off, bfloat16 is kept whatever the device can do
    loop = build_train_loop(_cfg(True, fallback=False), model, _loader(), opt)
    assert isinstance(loop, AutocastTrainer)


def test_native_bfloat16_cpu_check(monkeypatch):
    assert isinstance(train_loop_module.native_bfloat16("cpu"), bool)
    # without oneDNN's check, the CPU flags decide
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None, raising=False)
    monkeypatch.setattr(train_loop_module, "_cpu_flags", lambda: {"avx2", "fma"})
    assert train_loop_module.native_bfloat16("cpu") is False
    monkeypatch.setattr(train_loop_module, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert train_loop_module.native_bfloat16("cpu") is True


def test_autocast_step_runs_bfloat16_and_updates_float32_weights():
    torch.manual_seed(0)
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = build_train_loop(_cfg(True), model, _loader(), opt)
    before = model.conv.weight.detach().clone()
    with EventStorage() as storage:
        loop.storage = storage
        loop.iter = 0
        loop.run_step()
        total = storage.history("total_loss").latest()
    assert model.seen_dtype == torch.bfloat16  # the conv ran under autocast
    assert model.conv.weight.dtype == torch.float32  # parameters and update stay float32
    assert not torch.equal(before, model.conv.weight)
    assert torch.isfinite(torch.tensor(total)) and total > 0


def test_autocast_trainer_rejects_float16():
    model = _Model()
    with pytest.raises(ValueError, match="bfloat16 only"):
        AutocastTrainer(
            model, _loader(), torch.optim.SGD(model.parameters(), lr=0.1), torch.float16
        )


class _CountingLoader:
    """An iterable loader that counts how often it is started (worker processes in detectron2)."""

    def __init__(self):
        self.started = 0

    def __iter__(self):
        self.started += 1
        return _loader()


def test_wsis_trainer_bfloat16_starts_the_loader_once(tmp_path):
    loader = _CountingLoader()

    class Trainer(WSISTrainer):
        @classmethod
        def build_model(cls, cfg):
            return _Model()

        @classmethod
        def build_train_loader(cls, cfg):
            return loader

    cfg = _cfg(True)
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.BASE_LR = 0.01
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, AutocastTrainer)
    assert trainer._trainer.data_loader is loader and trainer.cfg.SOLVER.AMP.ENABLED
    before = trainer.model.conv.weight.detach().clone()
    trainer.train()
    assert trainer.iter == 3 and trainer.model.seen_dtype == torch.bfloat16
    assert not torch.equal(before, trainer.model.conv.weight)
    assert loader.started == 1
