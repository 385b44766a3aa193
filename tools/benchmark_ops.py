#!/usr/bin/env python
"""
Times the compiled ops of wsis_d2._C against their pure-PyTorch references on CPU, in one process.

Workloads:
- peaks: 16x20x112x112 float32 maps, r = 1; op = ``find_peaks`` (mask + sorted peak list),
  reference = ``find_peaks_reference`` (max-pool + nonzero + stable sorts), same outputs.
- box scoring: 2,000 random boxes (sides 8-200 px) on 4x20x512x512 float32 maps, forward;
  op = ``box_sum`` (integral images built for the call), reference = the per-box summation
  (``box_sum(..., use_reference=True)``). Also printed: scoring from integral images built
  beforehand (``IntegralImage``, one step of CCGR's box refinement) and, as the floor of any method
  that reads every scored map once, ``maps.sum()``.
- graph segmentation: scikit-image's astronaut photo resized to 160x240x3 uint8, k = 1000,
  sigma = 0.8, min_size = 10; op = ``graph_segment`` (blur + edge weights + the compiled op),
  reference = the same with ``graph_segment_reference``, same labels; also printed:
  ``skimage.segmentation.felzenszwalb`` with the same parameters.

Prints the timings (medians over --repeats runs, after one warm-up), then as its last line one JSON
object {"peaks_speedup": ..., "box_score_speedup": ..., "graph_segment_speedup": ...}.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from skimage import data, transform
from skimage.segmentation import felzenszwalb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wsis_d2.layers import (  # noqa: E402
    IntegralImage,
    box_sum,
    compiled_ops_available,
    edge_weights,
    find_peaks,
    find_peaks_reference,
    graph_segment,
    graph_segment_reference,
)


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_boxes(k, n_images, n_classes, size, generator):
    sides = torch.rand(k, 2, generator=generator) * 192 + 8
    x1 = torch.rand(k, generator=generator) * (size - sides[:, 0])
    y1 = torch.rand(k, generator=generator) * (size - sides[:, 1])
    n = torch.randint(0, n_images, (k,), generator=generator).float()
    boxes = torch.stack([n, x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], dim=1)
    classes = torch.randint(0, n_classes, (k,), generator=generator)
    return boxes, classes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed runs of each op")
    parser.add_argument("--ref-repeats", type=int, default=7, help="timed runs of each reference")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not compiled_ops_available():
        raise SystemExit("wsis_d2._C is not built: run `make install` first")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    maps = torch.randn(16, 20, 112, 112, generator=g)
    a, b = find_peaks(maps, 1), find_peaks_reference(maps, 1)
    if not all(torch.equal(x, y) for x, y in zip(a, b)):
        raise SystemExit("find_peaks and its reference disagree")
    peaks_op = median_time(lambda: find_peaks(maps, 1), args.repeats)
    peaks_ref = median_time(lambda: find_peaks_reference(maps, 1), args.ref_repeats)
    print(
        f"peaks 16x20x112x112 r=1 ({len(a.values)} peaks), {args.threads} threads: "
        f"op {peaks_op * 1e3:.2f} ms, reference {peaks_ref * 1e3:.2f} ms"
    )

    big = torch.rand(4, 20, 512, 512, generator=g)
    boxes, classes = random_boxes(2000, 4, 20, 512, g)
    s_op = box_sum(big, boxes, classes)[0]
    s_ref = box_sum(big, boxes, classes, use_reference=True)[0]
    err = ((s_op - s_ref).abs() / s_ref.abs().clamp(min=1)).max().item()
    box_op = median_time(lambda: box_sum(big, boxes, classes), args.repeats)
    box_ref = median_time(
        lambda: box_sum(big, boxes, classes, use_reference=True), args.ref_repeats
    )
    integral = IntegralImage(big)
    box_prebuilt = median_time(lambda: integral.box_sum(boxes, classes), args.repeats)
    read_floor = median_time(lambda: big.sum(), args.repeats)
    print(
        f"box scoring 2000 boxes on 4x20x512x512, {args.threads} threads: "
        f"op {box_op * 1e3:.2f} ms, reference {box_ref * 1e3:.2f} ms, "
        f"max rel. diff {err:.1e}"
    )
    print(
        f"  from prebuilt integral images: {box_prebuilt * 1e3:.3f} ms; "
        f"maps.sum() over the same maps (memory-read floor): {read_floor * 1e3:.2f} ms"
    )

    photo = transform.resize(data.astronaut(), (160, 240), anti_aliasing=True)
    photo = (photo * 255).round().astype("uint8")
    image = torch.from_numpy(photo).permute(2, 0, 1)
    seg_args = (1000.0, 0.8, 10)

    def seg_ref():
        return graph_segment_reference(edge_weights(image, seg_args[1]), seg_args[0], seg_args[2])

    labels = graph_segment(image, *seg_args)
    if not torch.equal(labels, seg_ref()):
        raise SystemExit("graph_segment and its reference disagree")
    seg_op = median_time(lambda: graph_segment(image, *seg_args), args.repeats)
    seg_ref_time = median_time(seg_ref, max(1, args.ref_repeats // 3))
    seg_skimage = median_time(
        lambda: felzenszwalb(photo, *seg_args, channel_axis=-1), args.ref_repeats
    )
    print(
        f"graph segmentation 160x240x3 ({int(labels.max()) + 1} segments), {args.threads} threads: "
        f"op {seg_op * 1e3:.2f} ms, reference {seg_ref_time * 1e3:.1f} ms, "
        f"skimage felzenszwalb {seg_skimage * 1e3:.2f} ms"
    )
    print(
        json.dumps(
            {
                "peaks_speedup": round(peaks_ref / peaks_op, 2),
                "box_score_speedup": round(box_ref / box_op, 2),
                "graph_segment_speedup": round(seg_ref_time / seg_op, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
