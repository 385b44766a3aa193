"""
The export table of docs/benchmarks.md: every exportable model family to TorchScript and ONNX with
tools/export_model.py on real images, the largest difference to PyTorch and the median CPU latency
of both (one thread). Density models on three VGG cells test images (256×256), LC and the Mask
R-CNN on three fruit photographs (resized by the config's MIN_SIZE_TEST). Prints a markdown table
and writes the JSON of every check to ``--output``.

    DETECTRON2_DATASETS=../shared/datasets .venv/bin/python tools/benchmark_export.py \
        --weights unet=<pth> fcrn_a=<pth> lc=<pth> mask_rcnn=<pth> [--configs lc=<yaml> ...]

A model without ``--weights`` is randomly initialised (the table says which).
"""

import argparse
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VGG_IMAGES = ["101cell.png", "150cell.png", "200cell.png"]
FRUIT_IMAGES = ["train_apple_1.png", "train_banana_1.jpg", "train_orange_1.png"]
# name -> (config, images folder under the datasets root, images, extra options)
MODELS = {
    "unet": (
        "configs/density_unet_vgg_cells.yaml",
        "vgg_cells",
        VGG_IMAGES,
    ),
    "fcrn_a": (
        "configs/density_fcrn_a_vgg_cells.yaml",
        "vgg_cells",
        VGG_IMAGES,
    ),
    "fcrn_b": (
        "configs/density_fcrn_b_cells.yaml",
        "vgg_cells",
        VGG_IMAGES,
    ),
    "lc": (
        "configs/real/lc_mnv2_real.yaml",
        "fruits3_train/images",
        FRUIT_IMAGES,
    ),
    "mask_rcnn": (
        "configs/real/mask_rcnn_mnv2_fpn_real.yaml",
        "fruits3_train/images",
        FRUIT_IMAGES,
    ),
}
# one forward per image: the VGG configs average 8 flips / transposes at test time
OPTS = {
    "unet": ["MODEL.DENSITY.TEST_DIHEDRAL", "False"],
    "fcrn_a": ["MODEL.DENSITY.TEST_DIHEDRAL", "False"],
    "fcrn_b": ["MODEL.DENSITY.TEST_DIHEDRAL", "False"],
}


def _pairs(values, flag):
    out = {}
    for item in values or []:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS:
            raise ValueError(f"{flag} takes NAME=PATH with NAME in {sorted(MODELS)}, got {item!r}")
        out[name] = path
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=os.environ.get("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--weights", nargs="*", help="NAME=checkpoint.pth")
    parser.add_argument("--configs", nargs="*", help="NAME=config.yaml (e.g. the one beside it)")
    parser.add_argument("--output", default="output/benchmark_export")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    weights, configs = _pairs(args.weights, "--weights"), _pairs(args.configs, "--configs")
    spec = importlib.util.spec_from_file_location(
        "wsis_export", os.path.join(ROOT, "tools", "export_model.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = []
    for name, (config, folder, files) in MODELS.items():
        images = [os.path.join(args.datasets, folder, f) for f in files]
        missing = [p for p in images if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{missing[0]} not found: set --datasets / DETECTRON2_DATASETS")
        for fmt in ("torchscript", "onnx"):
            cli = [
                "--config-file",
                configs.get(name, os.path.join(ROOT, config)),
                "--weights",
                weights.get(name, ""),
                "--format",
                fmt,
                "--output",
                os.path.join(args.output, f"{name}_{fmt}"),
                "--runs",
                str(args.runs),
                "--images",
                *images,
                "--opts",
                *OPTS.get(name, []),
            ]
            report = tool.main(tool.argument_parser().parse_args(cli))
            imgs = report["images"]
            rows.append(
                {
                    "model": name,
                    "format": fmt,
                    "trained": bool(weights.get(name)),
                    "ok": report["ok"],
                    "sizes": [r["size"] for r in imgs],
                    "max_abs_diff": report["max_abs_diff"],
                    # each output's difference relative to max(1, its largest |value|), as --tolerance
                    "max_rel_diff": max(
                        d / max(1.0, r["max_abs_value"][k])
                        for r in imgs
                        for k, d in r["max_abs_diff"].items()
                    ),
                    "pytorch_ms": sum(r["pytorch_ms"] for r in imgs) / len(imgs),
                    "exported_ms": sum(r["exported_ms"] for r in imgs) / len(imgs),
                    "outputs": report["outputs"],
                }
            )
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| model | weights | format | max diff / max(1, abs value) | PyTorch ms | exported ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {'trained' if r['trained'] else 'random'} | {r['format']} | "
            f"{r['max_rel_diff']:.1e} | {r['pytorch_ms']:.1f} | {r['exported_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
