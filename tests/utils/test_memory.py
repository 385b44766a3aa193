"""wsis_d2.utils.memory: freed memory kept in the process (glibc malloc thresholds)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg

from wsis_d2 import add_wsis_config
from wsis_d2.engine import build_train_loop, train_loop
from wsis_d2.utils import memory

_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    from wsis_d2.utils.memory import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # first touch, counted in both runs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # a step's activations: allocated, written, freed
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)


def _page_faults(mode):
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(memory._glibc_mallopt() is None, reason="needs glibc")
def test_retain_freed_memory_stops_refaulting():
    # 20 blocks of 64 MiB are 327,680 pages of 4 KiB: with glibc's defaults each block is mapped
    # anew and faulted in page by page; retained, the first block's pages are reused
    default, retained = _page_faults("default"), _page_faults("retain")
    assert default > 200_000
    assert retained < 0.1 * default


def test_retain_freed_memory_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_glibc_mallopt", lambda: None)
    monkeypatch.setattr(memory, "_DONE", [False])
    assert memory.retain_freed_memory() is False


def test_build_train_loop_sets_it_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(train_loop, "retain_freed_memory", lambda: calls.append(1) or True)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = add_wsis_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    build_train_loop(cfg, model, iter([]), opt)  # off by default
    assert calls == []
    cfg.SOLVER.CPU_RETAIN_FREED_MEMORY = True
    build_train_loop(cfg, model, iter([]), opt)
    assert calls == [1]
