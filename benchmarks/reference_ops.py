"""Speed of the float64 reference conv against torch's own float64 CPU conv, one thread each.

Usage: ``python benchmarks/reference_ops.py [--json] [--repeats N]``

Batch 8, the convolution shapes of ResNet-50. Both sides run in the same process,
interleaved repeat by repeat, so a load change on the machine hits both alike; the median
of the repeats is reported. Target: geometric mean of the time ratios (refimpl / torch)
<= 1.0, worst <= 1.5. The outputs are also checked to agree within the float64 error model.
"""

from __future__ import annotations

import os

# BLAS reads its thread count when it is loaded, so this must precede the numpy import.
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import refimpl  # noqa: E402
from refimpl.tolerance import assert_within, error_bound  # noqa: E402

BATCH = 8
#: (name, in channels, out channels, kernel, stride, padding, input size)
SHAPES = [
    ("64->64 3x3 @56", 64, 64, 3, 1, 1, 56),
    ("256->64 1x1 @56", 256, 64, 1, 1, 0, 56),
    ("64->256 1x1 @56", 64, 256, 1, 1, 0, 56),
    ("128->128 3x3 @28", 128, 128, 3, 1, 1, 28),
    ("256->256 3x3 @14", 256, 256, 3, 1, 1, 14),
    ("512->512 3x3 @7", 512, 512, 3, 1, 1, 7),
    ("3->64 7x7 s2 @224", 3, 64, 7, 2, 3, 224),
]
TARGET_GEOMEAN = 1.0
TARGET_WORST = 1.5


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_shape(name, cin, cout, k, stride, pad, size, repeats, rng):
    x = rng.standard_normal((BATCH, cin, size, size))
    w = rng.standard_normal((cout, cin, k, k)) / math.sqrt(cin * k * k)
    b = rng.standard_normal(cout)
    xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))

    def ours():
        return refimpl.conv(x, w, b, stride=stride, padding=pad)

    def theirs():
        return F.conv2d(xt, wt, bt, stride=stride, padding=pad)

    # Warm-up run of each side doubles as the correctness check.
    expected = ours()
    actual = theirs().numpy()
    magnitude = refimpl.conv(np.abs(x), np.abs(w), np.abs(b), stride=stride, padding=pad)
    assert_within(actual, expected, error_bound(magnitude, cin * k * k + 1, "float64"), what=name)

    ours_s, theirs_s = [], []
    for _ in range(repeats):
        ours_s.append(_time(ours))
        theirs_s.append(_time(theirs))
    t_ours, t_theirs = statistics.median(ours_s), statistics.median(theirs_s)
    return {"shape": name, "refimpl_ms": 1e3 * t_ours, "torch_ms": 1e3 * t_theirs, "ratio": t_ours / t_theirs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per shape (median reported)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    rows = [bench_shape(*shape, repeats=args.repeats, rng=rng) for shape in SHAPES]
    ratios = [row["ratio"] for row in rows]
    geomean = math.exp(statistics.fmean(math.log(r) for r in ratios))
    worst = max(ratios)
    met = geomean <= TARGET_GEOMEAN and worst <= TARGET_WORST
    summary = {"batch": BATCH, "threads": 1, "numpy": np.__version__, "torch": torch.__version__,
               "geomean_ratio": geomean, "worst_ratio": worst, "target_geomean": TARGET_GEOMEAN,
               "target_worst": TARGET_WORST, "target_met": met}
    if args.json:
        print(json.dumps({"results": rows, "summary": summary}, indent=2))
    else:
        print(f"refimpl.conv vs torch.nn.functional.conv2d, float64, CPU, 1 thread, batch {BATCH}, "
              f"median of {args.repeats}")
        print(f"{'shape':<20} {'refimpl ms':>11} {'torch ms':>10} {'ratio':>7}")
        for row in rows:
            print(f"{row['shape']:<20} {row['refimpl_ms']:>11.1f} {row['torch_ms']:>10.1f} {row['ratio']:>7.2f}")
        print(f"geometric mean ratio {geomean:.2f} (target <= {TARGET_GEOMEAN}), worst {worst:.2f} "
              f"(target <= {TARGET_WORST}): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
