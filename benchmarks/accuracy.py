"""Accuracy of the analytical memory estimate against the H100 reference measurements.

Prints, for every case of loraplan/data/h100-measurements.json: predicted and measured peak
allocated (GiB), signed error, the moment of the step where the peak is predicted; then MAPE
and the worst case. With --trace, the meta-device trace (loraplan.trace, needs the [profile]
extra) is printed beside it.

    python benchmarks/accuracy.py [--trace]
"""

from __future__ import annotations

import argparse
import sys

from loraplan.catalog import load_calibration, load_gpu
from loraplan.estimate.api import estimate
from loraplan.reference import REFERENCE_GPU, reference_cases

GiB = float(1 << 30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", action="store_true", help="also run the meta-device trace per case")
    args = ap.parse_args(argv)
    gpu = load_gpu(REFERENCE_GPU)
    cal = load_calibration(gpu.id)
    rows = []
    head = f"{'case':42s} {'measured':>9s} {'analytic':>9s} {'error':>7s}  {'peak moment':15s}"
    if args.trace:
        from loraplan.trace import run_trace_subprocess

        head += f" {'trace':>9s} {'error':>7s}"
    print(head)
    for c in reference_cases():
        e = estimate(c.model, c.lora, c.train, gpu, cal, with_time=False)
        pred = e.memory.peak_allocated_bytes
        err = 100.0 * (pred - c.peak_allocated_bytes) / c.peak_allocated_bytes
        line = (f"{c.id:42s} {c.peak_allocated_bytes / GiB:9.3f} {pred / GiB:9.3f} {err:+6.2f}%  "
                f"{e.memory.peak_moment:15s}")
        row = {"id": c.id, "err": err}
        if args.trace:
            tr = run_trace_subprocess(dict(c.model.config), c.lora, c.train, gpu.compute_capability)
            tp = tr["peak_allocated_bytes"]
            terr = 100.0 * (tp - c.peak_allocated_bytes) / c.peak_allocated_bytes
            row["trace_err"] = terr
            line += f" {tp / GiB:9.3f} {terr:+6.2f}%"
        rows.append(row)
        print(line)
    mape = sum(abs(r["err"]) for r in rows) / len(rows)
    worst = max(rows, key=lambda r: abs(r["err"]))
    print(f"\nanalytic: MAPE {mape:.2f}%  worst {worst['err']:+.2f}% ({worst['id']})  cases {len(rows)}")
    if args.trace:
        tm = sum(abs(r["trace_err"]) for r in rows) / len(rows)
        tw = max(rows, key=lambda r: abs(r["trace_err"]))
        print(f"trace:    MAPE {tm:.2f}%  worst {tw['trace_err']:+.2f}% ({tw['id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
