"""wsis_d2.solver.build_optimizer: SOLVER.OPTIMIZER selects detectron2's SGD or AdamW."""
import pytest
import torch
from torch import nn

from detectron2.config import get_cfg

from wsis_d2 import add_wsis_config
from wsis_d2.solver import build_optimizer


def _cfg(**solver):
    cfg = get_cfg()
    add_wsis_config(cfg)
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))


def test_default_is_detectron2_sgd():
    opt = build_optimizer(_cfg(BASE_LR=0.1), _model())
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["lr"] == pytest.approx(0.1) for g in opt.param_groups)


def test_adamw_param_groups_and_step():
    cfg = _cfg(OPTIMIZER="AdamW", BASE_LR=1e-3, WEIGHT_DECAY=0.05, WEIGHT_DECAY_NORM=0.0)
    model = _model()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    bn_params = {id(p) for p in model[1].parameters()}
    for group in opt.param_groups:
        assert group["betas"] == (0.9, 0.999)
        for p in group["params"]:
            expected = 0.0 if id(p) in bn_params else 0.05
            assert group["weight_decay"] == pytest.approx(expected)
    x = torch.randn(2, 3, 8, 8)
    before = [p.detach().clone() for p in model.parameters()]
    model(x).square().mean().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_adamw_gradient_clipping_applies():
    cfg = _cfg(OPTIMIZER="adamw", BASE_LR=1e-3)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1e-3
    model = nn.Linear(3, 1)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    (model(torch.full((4, 3), 100.0)).sum() * 1e3).backward()
    opt.step()  # the clipping wrapper rescales the gradient in place before the update
    assert float(model.weight.grad.norm()) <= 1e-3 * 1.01


@pytest.mark.parametrize(
    "field,value,match",
    [("OPTIMIZER", "Adagrad", "SOLVER.OPTIMIZER"), ("BETAS", (0.9,), "SOLVER.BETAS")],
)
def test_bad_solver_fields(field, value, match):
    cfg = _cfg(OPTIMIZER="AdamW")
    setattr(cfg.SOLVER, field, value)
    with pytest.raises(ValueError, match=match):
        build_optimizer(cfg, _model())
