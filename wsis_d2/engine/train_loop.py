"""
Training loops for wsis_d2 models.

detectron2's ``AMPTrainer`` runs float16 autocast with a gradient scaler and only on CUDA. CPU
training (the demos and benchmarks of this project, and users without a GPU) gains most from
bfloat16 autocast: on CPUs with AVX-512 BF16 / AMX, oneDNN runs bfloat16 convolutions 1.5-2x faster
than float32, and bfloat16 keeps float32's exponent range, so no gradient scaler is needed.
:class:`AutocastTrainer` is that loop; :func:`build_train_loop` picks the loop a config asks for.
On CPUs without native bfloat16 (AVX2 only) oneDNN emulates it and a step runs 7-18x slower than in
float32, so there the loop falls back to float32 (``SOLVER.AMP.BF16_FALLBACK``).
"""

import logging
import time

import torch

from detectron2.engine import AMPTrainer, SimpleTrainer

from ..utils.memory import retain_freed_memory

__all__ = ["AutocastTrainer", "build_train_loop", "amp_dtype", "native_bfloat16"]

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(cfg) -> torch.dtype:
    """The autocast dtype named by ``cfg.SOLVER.AMP.DTYPE`` ("float16" or "bfloat16")."""
    name = str(cfg.SOLVER.AMP.DTYPE).lower()
    if name not in _DTYPES:
        raise ValueError(
            f"SOLVER.AMP.DTYPE must be 'float16' or 'bfloat16', got {cfg.SOLVER.AMP.DTYPE!r}"
        )
    return _DTYPES[name]


def _cpu_flags() -> set:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16(device_type: str) -> bool:
    """
    Whether ``device_type`` runs bfloat16 convolutions natively: CUDA devices that support
    bfloat16, CPUs with AVX-512 BF16 or AMX (oneDNN's own check where torch exposes it, else the
    CPU flags). Elsewhere bfloat16 is emulated, much slower than float32.
    """
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return True  # no known way to ask; trust the config
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:
            pass
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


class AutocastTrainer(SimpleTrainer):
    """
    :class:`detectron2.engine.SimpleTrainer` with the forward pass (model and losses) under
    ``torch.autocast(device_type, dtype)``; backward and the optimizer step stay in the parameters'
    float32. Meant for bfloat16, which needs no loss scaling; works on CPU and CUDA.
    """

    def __init__(self, model, data_loader, optimizer, dtype: torch.dtype = torch.bfloat16):
        """
        Args:
            model, data_loader, optimizer: as for :class:`SimpleTrainer`.
            dtype: the autocast dtype (``torch.bfloat16``; float16 needs a gradient scaler,
                use detectron2's ``AMPTrainer`` for it).
        """
        if dtype != torch.bfloat16:
            raise ValueError(
                "AutocastTrainer runs bfloat16 only (float16 needs gradient scaling: use "
                "detectron2's AMPTrainer on CUDA)"
            )
        super().__init__(model, data_loader, optimizer)
        self.dtype = dtype
        device = next(iter(model.parameters()), torch.empty(0)).device
        self.device_type = device.type

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            losses = loss_dict
            loss_dict = {"total_loss": loss_dict}
        else:
            losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_train_loop(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """
    The training loop for ``cfg``:

    - ``SOLVER.AMP.ENABLED`` false: detectron2's ``SimpleTrainer`` (float32);
    - enabled with ``SOLVER.AMP.DTYPE`` "bfloat16": :class:`AutocastTrainer` (CPU or CUDA), or,
      with ``SOLVER.AMP.BF16_FALLBACK`` on a device without native bfloat16
      (:func:`native_bfloat16`), ``SimpleTrainer`` (float32) and a warning;
    - enabled with "float16": detectron2's ``AMPTrainer`` (CUDA only; a clear error on CPU).

    On CPU with ``SOLVER.CPU_RETAIN_FREED_MEMORY`` it also keeps freed memory in the process
    (:func:`wsis_d2.utils.memory.retain_freed_memory`, process-wide).
    """
    device_type = torch.device(cfg.MODEL.DEVICE).type
    if device_type == "cpu" and cfg.SOLVER.CPU_RETAIN_FREED_MEMORY:
        retain_freed_memory()
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    dtype = amp_dtype(cfg)
    if dtype == torch.bfloat16:
        if cfg.SOLVER.AMP.BF16_FALLBACK and not native_bfloat16(device_type):
            logger.warning(
                f"SOLVER.AMP.DTYPE 'bfloat16': this {device_type} has no native bfloat16 (on CPU: "
                "AVX-512 BF16 or AMX), where emulated bfloat16 trains several times slower than "
                "float32; training in float32 (SOLVER.AMP.BF16_FALLBACK False keeps bfloat16)"
            )
            return SimpleTrainer(model, data_loader, optimizer)
        return AutocastTrainer(model, data_loader, optimizer, dtype=dtype)
    if device_type != "cuda":
        raise ValueError(
            f"SOLVER.AMP.DTYPE 'float16' needs CUDA (MODEL.DEVICE is {cfg.MODEL.DEVICE!r}); "
            "use 'bfloat16' for mixed precision on CPU"
        )
    return AMPTrainer(model, data_loader, optimizer)
