"""
TorchScript / ONNX export of wsis_d2's models through detectron2's ``TracingAdapter``, and the
check of an exported file against the PyTorch model it came from.
"""

import importlib.util
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ._detectron2 import detectron2_export

detectron2_export()  # before the imports below: v0.6's package __init__ needs caffe2
from detectron2.export import TracingAdapter  # noqa: E402
from detectron2.export.flatten import (  # noqa: E402
    DictSchema,
    IdentitySchema,
    InstancesSchema,
    ListSchema,
    Schema,
    TensorWrapSchema,
)

from detectron2.export import scripting_with_instances  # noqa: E402
from detectron2.modeling import GeneralizedRCNN  # noqa: E402

from .adapters import RCNN_SCRIPT_FIELDS, ScriptableRCNN, inference_function  # noqa: E402

__all__ = [
    "FORMATS",
    "METHODS",
    "ExportedModel",
    "export_model",
    "load_exported",
    "flat_output_names",
    "compare_outputs",
    "median_seconds",
    "reference_outputs",
]

FORMATS = ("torchscript", "onnx")
# tracing: every model, both formats; scripting: R-CNN to TorchScript, where its backbone scripts
METHODS = ("tracing", "scripting")
# opset 17 is what the legacy (TorchScript-based) exporter of torch 2.x supports fully and what
# torchvision's roi_align (aligned=True, opset >= 16) needs
ONNX_OPSET = 17


@dataclass
class ExportedModel:
    """What :func:`export_model` wrote: the file, its format and method, the adapter that gives
    the PyTorch model's flattened outputs, and the names of the outputs the file returns (in that
    order)."""

    path: str
    fmt: str
    adapter: TracingAdapter
    output_names: List[str] = field(default_factory=list)
    method: str = "tracing"


def flat_output_names(schema: Schema, prefix: str = "") -> List[str]:
    """Dotted names of the flattened outputs of a ``TracingAdapter`` schema, in their order (the
    leading image index "0." dropped: one image per call)."""
    if isinstance(schema, InstancesSchema):
        names = []
        for key, sub in zip(schema.keys, schema.schemas):
            names += flat_output_names(sub, f"{prefix}{key}.")
        return names + [f"{prefix}image_size"]
    if isinstance(schema, DictSchema):
        names = []
        for key, sub in zip(schema.keys, schema.schemas):
            names += flat_output_names(sub, f"{prefix}{key}.")
        return names
    if isinstance(schema, ListSchema):
        names = []
        for i, sub in enumerate(schema.schemas):
            names += flat_output_names(sub, prefix if prefix == "" and i == 0 else f"{prefix}{i}.")
        return names
    if isinstance(schema, (IdentitySchema, TensorWrapSchema)):
        return [prefix.rstrip(".")]
    raise ValueError(f"unknown output schema {type(schema).__name__}")


def export_model(
    model: torch.nn.Module, image: torch.Tensor, fmt: str, output_dir: str, method: str = "tracing"
) -> ExportedModel:
    """
    Trace ``model`` (eval mode) on one image and write ``model.ts`` (TorchScript) or
    ``model.onnx`` (ONNX, dynamic height and width) into ``output_dir``; or, with ``method``
    "scripting", script a GeneralizedRCNN with ``scripting_with_instances`` (no image needed for
    the file; ``image`` then only sets the reference outputs' schema).

    Args:
        model: a DensityCounter, ImageLevelCounter or GeneralizedRCNN (see ``adapters``).
        image: (3, H, W) float32 in ``cfg.INPUT.FORMAT``, as the model's mapper gives it.
        fmt: "torchscript" or "onnx".
        method: "tracing" or "scripting".

    Returns:
        ExportedModel.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if method == "scripting" and (fmt != "torchscript" or not isinstance(model, GeneralizedRCNN)):
        raise ValueError(
            "--method scripting exports a GeneralizedRCNN to --format torchscript only, got "
            f"{type(model).__name__} to {fmt}"
        )
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    model.eval()
    adapter = TracingAdapter(model, [{"image": image}], inference_function(model)).eval()
    adapter(image)  # one eager call records the outputs' schema
    names = flat_output_names(adapter.outputs_schema)
    os.makedirs(output_dir, exist_ok=True)
    if method == "scripting":
        path = os.path.join(output_dir, "model.ts")
        scripted = scripting_with_instances(ScriptableRCNN(model).eval(), RCNN_SCRIPT_FIELDS)
        torch.jit.save(scripted, path)
        # a scripted model returns the fields of each image's Instances, not its image size
        names = [n for n in names if n != "instances.image_size"]
    elif fmt == "torchscript":
        path = os.path.join(output_dir, "model.ts")
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
        torch.jit.save(traced, path)
    else:
        if importlib.util.find_spec("onnx") is None:
            raise ValueError("--format onnx needs the onnx package (requirements.txt)")
        path = os.path.join(output_dir, "model.onnx")
        torch.onnx.export(
            adapter,
            (image,),
            path,
            dynamo=False,  # the TorchScript-based exporter: detectron2's models are traced
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=names,
            dynamic_axes={"image": {1: "height", 2: "width"}},
        )
    return ExportedModel(path, fmt, adapter, names, method)


def load_exported(
    path: str, fmt: str, threads: int = 1, method: str = "tracing", output_names=()
) -> Callable:
    """
    A function image (3, H, W) float32 tensor -> tuple of float/int numpy arrays (the flattened
    outputs) that runs the exported file: ``torch.jit.load`` or an onnxruntime CPU session with
    ``threads`` intra-op threads. A scripted R-CNN returns fields by name: ``output_names``
    ("instances.<field>", :attr:`ExportedModel.output_names`) give their order.
    """
    if not os.path.isfile(path):
        raise ValueError(f"exported model file {path!r} does not exist")
    if fmt == "torchscript" and method == "scripting":
        scripted = torch.jit.load(path, map_location="cpu")
        fields = [n.split(".", 1)[1] for n in output_names]

        def run_scripted(image):
            with torch.no_grad():
                out = scripted(({"image": image},))[0]
            return tuple(out[f].numpy() for f in fields)

        return run_scripted
    if fmt == "torchscript":
        module = torch.jit.load(path, map_location="cpu")

        def run_ts(image):
            with torch.no_grad():
                out = module(image)
            out = out if isinstance(out, (tuple, list)) else (out,)
            return tuple(o.numpy() for o in out)

        return run_ts
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ValueError(
                "checking an ONNX export needs onnxruntime (requirements.txt)"
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run_ort(image):
            return tuple(session.run(None, {input_name: image.numpy()}))

        return run_ort
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def compare_outputs(
    names: Sequence[str], reference: Sequence[torch.Tensor], exported: Sequence[np.ndarray]
) -> Dict[str, Tuple[float, float]]:
    """
    Per named output: (largest absolute difference, largest absolute reference value), the
    second to judge the first (a count summed over 10⁵ float32 pixels differs more than a pixel).
    The difference is NaN where the shapes differ (e.g. a detector that kept another number of
    boxes).
    """
    if len(reference) != len(exported):
        raise ValueError(f"{len(reference)} PyTorch outputs but {len(exported)} exported ones")
    diffs = {}
    for name, ref, got in zip(names, reference, exported):
        ref = ref.detach().cpu().numpy().astype(np.float64)
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        if ref.shape != got.shape:
            diffs[name] = (float("nan"), scale)
        elif ref.size == 0:
            diffs[name] = (0.0, scale)
        else:
            diffs[name] = (float(np.abs(ref - got.astype(np.float64)).max()), scale)
    return diffs


def median_seconds(fn: Callable, runs: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_outputs(exported: ExportedModel, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The PyTorch model's flattened outputs on ``image``, in the exported file's order."""
    with torch.no_grad():
        outputs = exported.adapter(image)
    named = dict(zip(flat_output_names(exported.adapter.outputs_schema), outputs))
    return tuple(named[n] for n in exported.output_names)
