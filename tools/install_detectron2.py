#!/usr/bin/env python
"""
Install a working detectron2 into the current Python environment, unless one is already there.

Detectron2 is not published on the package registry. The registry's ``pb1-detectron2==0.6`` is a
source release whose Python code equals upstream detectron2 v0.6, but

* it lacks ``detectron2/layers/csrc``, so its ``setup.py`` cannot build ``detectron2._C``;
* v0.6 uses names removed from numpy >= 1.24 (``np.int``, ``np.float``, ``np.str``), from
  Pillow >= 10 (``Image.LINEAR``) and ``pkg_resources`` (gone from new setuptools);
* its ``setup.py`` looks for the model-zoo configs in a top-level ``configs/`` that the tarball does
  not have, so a built package would ship none.

This script downloads that tarball with pip, checks its sha256, repairs those defects in the source
(not at run time: a script that imports detectron2 without wsis_d2 works the same) and installs it.
``detectron2._C`` becomes a small pure-Python module that reports the build and raises a clear error
for the compiled ops this release cannot provide (rotated boxes, deformable convolution, fast
COCOeval). Every patch must apply exactly once, otherwise the script stops: a changed tarball is
never half-repaired.

With ``--source`` it installs an upstream detectron2 instead (a source folder or a
``git archive`` tarball, e.g. ``../shared/vendor/detectron2-main-02b5c4e.tar.gz``): built by its
own ``setup.py`` with its compiled ops (CPU-only unless ``FORCE_CUDA`` is set), with one repair
where the source still needs it: ``detectron2/model_zoo/model_zoo.py`` imports ``pkg_resources``
(upstream issue 5494), replaced by the same path lookup as for 0.6. ``make test-upstream`` uses it.

Usage: python tools/install_detectron2.py [--force] [--workdir build/detectron2]
       python tools/install_detectron2.py --source PATH [--workdir build/detectron2-upstream]
"""
import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile

PACKAGE = "pb1-detectron2==0.6"
TARBALL = "pb1-detectron2-0.6.tar.gz"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

UNAVAILABLE_C = '''\
"""
Stand-in for detectron2's compiled extension, written by wsis_d2's tools/install_detectron2.py.

This detectron2 was built from the registry's pb1-detectron2 0.6 source release, which ships without
detectron2/layers/csrc, so the compiled ops cannot be built. Pure-PyTorch / torchvision parts
(ROIAlign, NMS, ResNet, FPN, R-CNN heads, the slow COCOeval path, ...) work. Ops that exist only in
the C++/CUDA sources raise a clear error when used. Build upstream detectron2 from source for them.
"""

_REASON = (
    "detectron2._C.{name} is unavailable: this detectron2 was installed from the pb1-detectron2 0.6 "
    "source release, which lacks detectron2/layers/csrc, so its compiled ops ({what}) were not "
    "built. Install upstream detectron2 from source to use them."
)
_WHAT = {
    "box_iou_rotated": "rotated boxes",
    "nms_rotated": "rotated boxes",
    "roi_align_rotated_forward": "rotated ROIAlign",
    "roi_align_rotated_backward": "rotated ROIAlign",
    "deform_conv_forward": "deformable convolution",
    "deform_conv_backward_input": "deformable convolution",
    "deform_conv_backward_filter": "deformable convolution",
    "modulated_deform_conv_forward": "modulated deformable convolution",
    "modulated_deform_conv_backward": "modulated deformable convolution",
    "InstanceAnnotation": "fast COCOeval; use COCOEvaluator(..., use_fast_impl=False)",
    "COCOevalEvaluateImages": "fast COCOeval; use COCOEvaluator(..., use_fast_impl=False)",
    "COCOevalAccumulate": "fast COCOeval; use COCOEvaluator(..., use_fast_impl=False)",
}


class CompiledOpUnavailableError(NotImplementedError):
    """Raised when a compiled detectron2 op is used in a build without compiled ops."""


def get_compiler_version():
    return "not built (pb1-detectron2 0.6 source release without csrc)"


def get_cuda_version():
    return "not built (pb1-detectron2 0.6 source release without csrc)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise CompiledOpUnavailableError(
        _REASON.format(name=name, what=_WHAT.get(name, "rotated boxes, deformable convolution, fast COCOeval"))
    )
'''


def _sub_exactly(text, pattern, repl, count, where):
    new, n = re.subn(pattern, repl, text)
    if n != count:
        raise RuntimeError(
            f"patching {where}: expected {count} match(es) of {pattern!r}, found {n}; "
            "the detectron2 source is not the one this script knows"
        )
    return new


def _patch_file(root, rel, subs):
    path = os.path.join(root, rel)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for pattern, repl, count in subs:
        text = _sub_exactly(text, pattern, repl, count, rel)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# model_zoo.get_config_file without pkg_resources (v0.6 and main up to at least 02b5c4e)
MODEL_ZOO_PATCH = [
    (r"(?m)^import pkg_resources\n", "", 1),
    (
        r'cfg_file = pkg_resources\.resource_filename\(\n\s*"detectron2.model_zoo", '
        r'os\.path\.join\("configs", config_path\)\n\s*\)',
        'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
        1,
    ),
]
# (file, [(regex, replacement, expected number of matches)])
NUMPY_ALIASES = r"\bnp\.(int|float|str|bool)\b(?!\()"
PATCHES = {
    "setup.py": [
        # no compiled extension: the sources are not in the release
        (r"ext_modules=get_extensions\(\),", "ext_modules=[],", 1),
        # ship the model-zoo configs that live inside the package in this release
        (
            r'package_data=\{"detectron2.model_zoo": get_model_zoo_configs\(\)\},',
            'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
            1,
        ),
        # black is only used to pretty-print LazyConfig.save; the old pin does not install on 3.11+
        (r'"black==21.4b2",', '"black",', 1),
        (r'"future",  # used by caffe2\n\s*"pydot",  # used to save caffe2 SVGs\n', "", 1),
    ],
    "detectron2/data/transforms/transform.py": [(r"Image\.LINEAR\b", "Image.BILINEAR", 1)],
    "detectron2/data/build.py": [(NUMPY_ALIASES, r"\1", 2)],
    "detectron2/evaluation/sem_seg_evaluation.py": [(NUMPY_ALIASES, r"\1", 7)],
    "detectron2/data/datasets/pascal_voc.py": [(NUMPY_ALIASES, r"\1", 1)],
    "detectron2/evaluation/pascal_voc_evaluation.py": [(NUMPY_ALIASES, r"\1", 2)],
    "detectron2/structures/masks.py": [(NUMPY_ALIASES, r"\1", 3)],
    "detectron2/utils/visualizer.py": [(NUMPY_ALIASES, r"\1", 3)],
    "detectron2/utils/video_visualizer.py": [(NUMPY_ALIASES, r"\1", 1)],
    # rotated NMS goes through torch.ops, which the stand-in _C cannot register: ask _C directly
    "detectron2/layers/nms.py": [
        (
            r"return torch\.ops\.detectron2\.nms_rotated\(boxes, scores, iou_threshold\)",
            "from detectron2 import _C\n\n    return _C.nms_rotated(boxes, scores, iou_threshold)",
            1,
        )
    ],
    "detectron2/model_zoo/model_zoo.py": MODEL_ZOO_PATCH,
}


def _have_detectron2():
    return importlib.util.find_spec("detectron2") is not None


def file_sha256(path):
    """Hex SHA-256 of a file (also used by tools/fetch_mobilenet_weights.py)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    parser.add_argument("--workdir", default=None, help="build folder (default build/detectron2, "
                        "with --source build/detectron2-upstream)")
    parser.add_argument("--source", default=None,
                        help="install this upstream detectron2 source (folder or tarball) instead")
    args = parser.parse_args()
    if args.source:
        install_upstream(args.source, args.workdir or os.path.join("build", "detectron2-upstream"))
        return
    args.workdir = args.workdir or os.path.join("build", "detectron2")

    if _have_detectron2() and not args.force:
        import detectron2

        print(f"detectron2 {detectron2.__version__} already installed at "
              f"{os.path.dirname(detectron2.__file__)}; leaving it alone (use --force to replace)")
        return

    os.makedirs(args.workdir, exist_ok=True)
    tarball = os.path.join(args.workdir, TARBALL)
    if not os.path.exists(tarball) or file_sha256(tarball) != SHA256:
        # setup.py of the release imports torch, hence no build isolation
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--no-build-isolation", "-d", args.workdir, PACKAGE])
    digest = file_sha256(tarball)
    if digest != SHA256:
        raise SystemExit(f"{tarball}: sha256 {digest} != expected {SHA256}; refusing to install")

    src = os.path.join(args.workdir, "src")
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(src, filter="data")
    root = os.path.join(src, "pb1-detectron2-0.6")
    for rel, subs in PATCHES.items():
        _patch_file(root, rel, subs)
    with open(os.path.join(root, "detectron2", "_C.py"), "w", encoding="utf-8") as f:
        f.write(UNAVAILABLE_C)
    shutil.rmtree(os.path.join(root, "pb1_detectron2.egg-info"), ignore_errors=True)

    _run([sys.executable, "-m", "pip", "install", "--no-build-isolation", root])
    _check_installed()


def install_upstream(source, workdir):
    """Build and install an upstream detectron2 from ``source`` (folder or tarball) into this
    environment, whatever detectron2 it already sees, without touching its dependencies."""
    if not os.path.exists(source):
        raise SystemExit(f"--source {source}: no such file or folder")
    src = os.path.join(workdir, "src")
    shutil.rmtree(src, ignore_errors=True)
    if os.path.isdir(source):  # a checkout: copied, so that the repair never touches it
        shutil.copytree(source, os.path.join(src, "detectron2"),
                        ignore=shutil.ignore_patterns(".git", "build", "*.so", "*.egg-info"))
    else:
        with tarfile.open(source) as tar:
            tar.extractall(src, filter="data")
    tops = os.listdir(src)
    if len(tops) != 1 or not os.path.isfile(os.path.join(src, tops[0], "setup.py")):
        raise SystemExit(f"--source {source}: expected one folder holding setup.py, got {tops}")
    root = os.path.join(src, tops[0])
    rel = os.path.join("detectron2", "model_zoo", "model_zoo.py")
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        if "import pkg_resources" in f.read():
            _patch_file(root, rel, MODEL_ZOO_PATCH)
    # its dependencies are those of the 0.6 environment this one extends (see the Makefile)
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
          "--force-reinstall", root])
    _check_installed()


def _check_installed():
    # import from elsewhere than the source tree to check the installed copy
    check = (
        "import detectron2, detectron2.layers, detectron2.data, detectron2.modeling, "
        "detectron2.evaluation, detectron2.engine; "
        "from detectron2.utils.collect_env import collect_env_info; collect_env_info(); "
        "from detectron2 import model_zoo; "
        "model_zoo.get_config_file('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml'); "
        "print('detectron2', detectron2.__version__, 'OK')"
    )
    subprocess.check_call([sys.executable, "-c", check], cwd=os.path.abspath(os.sep))


if __name__ == "__main__":
    main()
