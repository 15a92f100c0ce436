"""Meta-device trace vs the shared H100 reference: predicted vs measured peak allocated bytes.

Usage: python benchmarks/trace_vs_reference.py [--cases ID,ID] [--subprocess] [--json OUT]
Runs every case of loraplan/data/h100-measurements.json (model configs from its "models"),
prints predicted vs measured, signed error %, MAPE and the worst case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loraplan.spec import LoraSpec, TrainSpec

DATA = Path(__file__).resolve().parents[1] / "loraplan" / "data" / "h100-measurements.json"


def case_specs(case: dict) -> tuple[LoraSpec, TrainSpec]:
    lora = LoraSpec(rank=case["rank"], alpha=case["alpha"], dropout=case["dropout"], targets=tuple(case["targets"]))
    train = TrainSpec(quant=case["quant"], double_quant=bool(case.get("double_quant")), optimizer=case["optimizer"],
                      batch=case["batch"], seq=case["seq"], gradient_checkpointing=case["gradient_checkpointing"])
    return lora, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="", help="comma list of case ids (default: all)")
    ap.add_argument("--subprocess", action="store_true", help="run each trace in a worker process")
    ap.add_argument("--json", default="", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    data = json.loads(DATA.read_text())
    want = {c for c in args.cases.split(",") if c}
    rows = []
    print(f"{'case':42s} {'measured':>14s} {'predicted':>14s} {'err %':>8s} {'phase':>9s} {'s':>6s}")
    for case in data["cases"]:
        if want and case["id"] not in want:
            continue
        lora, train = case_specs(case)
        cfg = data["models"][case["model"]]
        t = time.perf_counter()
        if args.subprocess:
            from loraplan.trace import run_trace_subprocess

            r = run_trace_subprocess(cfg, lora, train, "9.0", timeout_s=600)
        else:
            from loraplan.trace.run import trace_step

            r = trace_step(cfg, lora, train, "9.0")
        dt = time.perf_counter() - t
        meas, pred = case["peak_allocated_bytes"], r["peak_allocated_bytes"]
        err = 100.0 * (pred - meas) / meas
        rows.append({"id": case["id"], "measured": meas, "predicted": pred, "error_pct": err,
                     "peak_phase": r["peak_phase"], "components": r["components"], "terms": r["terms"],
                     "seconds": dt})
        print(f"{case['id']:42s} {meas:14,d} {pred:14,d} {err:+8.3f} {r['peak_phase']:>9s} {dt:6.1f}", flush=True)
    if rows:
        mape = sum(abs(r["error_pct"]) for r in rows) / len(rows)
        worst = max(rows, key=lambda r: abs(r["error_pct"]))
        print(f"\nMAPE {mape:.3f}% over {len(rows)} cases; worst {worst['id']} {worst['error_pct']:+.3f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
