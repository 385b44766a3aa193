"""
Time and peak memory of the adaptive-σ neighbour search (``adaptive_sigmas``, k nearest points of
every point) with the k-d tree it uses against the (P, P) distance matrix it replaced
(``torch.cdist`` + ``topk``), at P = 10³, 10⁴, 10⁵ uniform points in a 1024² image.

Each measurement runs in a fresh process, so that its peak resident memory (ru_maxrss) less the
process's resident memory before the call is the search's own. The matrix is skipped where its
float64 entries alone exceed ``--max-matrix-gb``. Prints JSON.

    .venv/bin/python tools/benchmark_knn.py
"""

import argparse
import json
import os
import resource
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from wsis_d2.density.targets import adaptive_sigmas
method, num, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pts = torch.from_numpy(np.random.default_rng(0).uniform(0, 1024, (num, 2)))


def matrix(points):
    dist = torch.cdist(points.double(), points.double())
    knn = dist.topk(k + 1, dim=1, largest=False).values[:, 1:]
    return (0.3 * knn.mean(dim=1)).clamp(1.0, 20.0)


fn = matrix if method == "cdist" else (lambda p: adaptive_sigmas(p, k, 0.3, 4.0))
adaptive_sigmas(pts[:50], k, 0.3, 4.0)  # imports and first-call set-up outside the measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
sig = fn(pts)
sec = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": sec, "extra_mb": (peak - before) / 1024, "sum": float(sig.sum())}))
"""


def run(method, num, k):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(num), str(k)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--k", type=int, default=3, help="neighbours (the density configs' 3)")
    parser.add_argument("--max-matrix-gb", type=float, default=4.0)
    args = parser.parse_args()
    rows = []
    for num in args.sizes:
        row = {"points": num, "kdtree": run("kdtree", num, args.k)}
        matrix_gb = num * num * 8 / 1e9
        if matrix_gb <= args.max_matrix_gb:
            row["cdist"] = run("cdist", num, args.k)
            row["equal_sum"] = abs(row["cdist"]["sum"] - row["kdtree"]["sum"]) < 1e-6 * num
        else:
            row["cdist"] = f"skipped: the (P, P) float64 matrix alone is {matrix_gb:.0f} GB"
        rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
