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

Prints the timings (medians over --repeats runs, after one warm-up), then as its last line one JSON
object {"peaks_speedup": ..., "box_score_speedup": ...}.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wsis_d2.layers import (  # noqa: E402
    IntegralImage,
    box_sum,
    compiled_ops_available,
    find_peaks,
    find_peaks_reference,
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
    print(
        json.dumps(
            {
                "peaks_speedup": round(peaks_ref / peaks_op, 2),
                "box_score_speedup": round(box_ref / box_op, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
