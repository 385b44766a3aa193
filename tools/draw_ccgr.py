#!/usr/bin/env python
"""
Draw CCGR's pseudo labels on training images (the paper's Fig. 1 and 3): for each bag the MIL
branch's box (dashed), its context ring before refinement (thin), the refined box (solid) and its
context ring (dotted), the peak, and the pseudo masks; next to it the SS branch's class scores.

    python tools/draw_ccgr.py --config-file configs/ccgr_mnv2_synthetic.yaml \\
        --weights output/benchmark_ccgr_labels/ccgr/model_final.pth \\
        --cues output/benchmark_ccgr_labels/round1/cues.pkl \\
        --proposals output/benchmark_ccgr_labels/proposals/wsis_synth_train.pkl \\
        --images 0 1 2 --output docs/ccgr_example.png
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetFromList, MetadataCatalog  # noqa: E402
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import wsis_d2  # noqa: E402,F401  (registers datasets, models and mappers)
from wsis_d2 import get_wsis_cfg  # noqa: E402
from wsis_d2.data import build_dataset_mapper  # noqa: E402
from wsis_d2.layers import context_boxes  # noqa: E402


def _ring(ax, box, scale, **style):
    from matplotlib.patches import Rectangle

    c = context_boxes(torch.as_tensor([[0.0, *box]]), scale)[0, 1:].tolist()
    ax.add_patch(Rectangle((c[0], c[1]), c[2] - c[0], c[3] - c[1], fill=False, **style))


def draw_panel(ax_img, ax_seg, image_rgb, output, class_names, context_scale=1.5, title=""):
    """One image: boxes before / after refinement with their context rings, peaks and masks on
    the left; the SS branch's best class score on the right."""
    from matplotlib.patches import Rectangle

    ax_img.imshow(image_rgb)
    colours = [np.array(c) for c in ([0.9, 0.2, 0.2], [0.2, 0.6, 1.0], [1.0, 0.8, 0.1],
                                     [0.3, 0.9, 0.3], [0.9, 0.4, 0.9], [0.2, 0.9, 0.9],
                                     [1.0, 0.5, 0.1], [0.6, 0.6, 0.6])]
    inst = output["instances"]
    overlay = np.zeros(image_rgb.shape[:2] + (4,))
    for m, c in zip(inst.pred_masks.numpy(), inst.pred_classes.tolist()):
        overlay[m, :3] = colours[c % len(colours)]
        overlay[m, 3] = 0.45
    ax_img.imshow(overlay)
    info = output.get("ccgr")
    if info is not None:
        for before, after, c, peak in zip(info["mil_boxes"].tolist(), info["refined_boxes"].tolist(),
                                          info["classes"].tolist(), info["peaks"].tolist()):
            col = colours[c % len(colours)]
            ax_img.add_patch(Rectangle((before[0], before[1]), before[2] - before[0],
                                       before[3] - before[1], fill=False, ls="--", lw=1.0,
                                       ec="white"))
            _ring(ax_img, before, context_scale, ls="-", lw=0.5, ec="white")
            ax_img.add_patch(Rectangle((after[0], after[1]), after[2] - after[0],
                                       after[3] - after[1], fill=False, lw=1.6, ec=col))
            _ring(ax_img, after, context_scale, ls=":", lw=1.0, ec=col)
            ax_img.plot([peak[1]], [peak[2]], marker="+", ms=8, mew=2, color=col)
            ax_img.text(after[0], after[1] - 1, class_names[c], color=col, fontsize=6, va="bottom")
    ax_img.set_title(title or "dashed: MIL box, solid: refined (dotted: its context ring)",
                     fontsize=7)
    sem = output["sem_seg"][:-1].max(dim=0).values.numpy()
    ax_seg.imshow(sem, cmap="magma", vmin=0, vmax=1)
    ax_seg.set_title("SS branch: best class score S_c", fontsize=7)
    for ax in (ax_img, ax_seg):
        ax.set_axis_off()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--cues", required=True, help="the round's cues file")
    parser.add_argument("--proposals", required=True, help="proposal file of the dataset")
    parser.add_argument("--dataset", default="", help="default: the config's DATASETS.TRAIN[0]")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="output/ccgr_example.png")
    args = parser.parse_args(argv)
    cfg = get_wsis_cfg(args.config_file)
    dataset = args.dataset or cfg.DATASETS.TRAIN[0]
    cfg.merge_from_list([
        "MODEL.WEIGHTS", args.weights, "INPUT.CCGR.CUES_FILE", args.cues,
        "DATASETS.TEST", f"('{dataset}',)", "DATASETS.PROPOSAL_FILES_TEST", f"('{args.proposals}',)",
        "MODEL.DEVICE", "cpu",
    ])
    cfg.freeze()
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(args.weights)
    figure(model, cfg, dataset, args.images, args.output)
    print(f"wrote {args.output}")


def figure(model, cfg, dataset, indices, path):
    """Run the model on the chosen images of ``dataset`` and save the panels as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from detectron2.data.build import load_proposals_into_dataset

    dicts = DatasetCatalog.get(dataset)
    chosen = load_proposals_into_dataset(
        [dict(dicts[i]) for i in indices], cfg.DATASETS.PROPOSAL_FILES_TEST[0]
    )
    loader = build_detection_test_loader(
        DatasetFromList(chosen, copy=False), mapper=build_dataset_mapper(cfg, False), num_workers=0
    )
    names = MetadataCatalog.get(dataset).thing_classes
    fig, axes = plt.subplots(len(chosen), 2, figsize=(7.0, 3.2 * len(chosen)), dpi=130,
                             squeeze=False)
    with torch.no_grad():
        for row, batch in enumerate(loader):
            out = model(batch)[0]
            out = {k: (v.to("cpu") if hasattr(v, "to") else v) for k, v in out.items()}
            if "ccgr" in out:
                out["ccgr"] = {k: (v.cpu() if torch.is_tensor(v) else v)
                               for k, v in out["ccgr"].items()}
            from PIL import Image

            image = np.asarray(Image.open(batch[0]["file_name"]).convert("RGB"))
            draw_panel(axes[row, 0], axes[row, 1], image, out, names, cfg.MODEL.CCGR.CONTEXT_SCALE)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
