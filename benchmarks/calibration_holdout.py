"""Does calibration help on cases it has not seen? Leave-one-out on the measured records.

    python benchmarks/calibration_holdout.py [RECORDS...] [--gpu ID] [--start neutral|priors]

For each record: calibrate on all the others (loraplan.calibrate.calibrate), starting from the
*uncalibrated* coefficients (catalog/calibrations/default.json with its time coefficients
replaced by the start: ``neutral`` (default), the round placeholders ``NEUTRAL_TIME``, or ``priors``,
the measured / sourced host-cost priors of data/host-costs.json at host speed 1.0; the shipped time
coefficients were scaled on these very records, so starting from them would leak the held-out
case), then compare the held-out record's error before
(uncalibrated) and after (calibrated on the rest). Default records: the 10 shipped H100 cases
(peak allocated and step time; they hold no reserved or NVML figures, so those coefficients are
not fitted and not scored).
"""

from __future__ import annotations

import argparse
import sys

from dataclasses import replace

from loraplan.calibrate import METRIC_LABELS, calibrate, metric_pairs, predict, rel_error
from loraplan.catalog import load_calibration
from loraplan.measurements import load_measurements, select

#: a deliberately uninformed start for the time model (round placeholder values, not fitted on
#: anything): the experiment measures what calibration recovers from them
#: (the GEMM / attention / bandwidth efficiencies are not here: their priors are sourced (per GPU generation,
#: data/kernel-efficiency.json; time_eff_bw in default.json) and were never fitted on these records)
NEUTRAL_TIME = {"time_gpu_kernel_s": 3e-6,
                "time_host_op_s": 1.5e-5, "time_host_lora_call_s": 4e-4, "time_host_bnb4_call_s": 2e-4,
                "time_host_int8_call_s": 2e-4, "time_host_step_s": 5e-3, "time_host_gc_hook_s": 0.0}


def start_coefficients(start: str) -> dict:
    """The uncalibrated time coefficients: the data priors (host speed 1.0) or NEUTRAL_TIME."""
    if start == "neutral":
        return dict(NEUTRAL_TIME)
    from loraplan.estimate.host_costs import host_priors

    return {"time_gpu_kernel_s": NEUTRAL_TIME["time_gpu_kernel_s"], **host_priors(), "time_host_speed": 1.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="*", default=["reference"])
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--start", choices=("priors", "neutral"), default="neutral")
    a = ap.parse_args(argv)
    ms = select(load_measurements(a.records), a.gpu)
    gpu = ms[0].gpu
    default = load_calibration(None)
    base = replace(default, coefficients={**default.coefficients, **start_coefficients(a.start)})  # uncalibrated
    rows = []
    fitted_names: set[str] = set()
    for i, held in enumerate(ms):
        rest = ms[:i] + ms[i + 1:]
        res = calibrate(rest, gpu, base=base)
        fitted_names |= set(res.fitted)
        before = metric_pairs(held, predict(held, base))
        after = metric_pairs(held, predict(held, res.calibration))
        rows.append((held.id, {k: (rel_error(*before[k]), rel_error(*after[k])) for k in before}, res))
    metrics = [k for k in METRIC_LABELS if any(k in r[1] for r in rows)]
    print(f"leave-one-out on {len(ms)} {gpu} records; base: uncalibrated (default.json + {a.start} time start)")
    print(f"coefficients fitted in at least one fold: {', '.join(sorted(fitted_names)) or 'none'}")
    head = f"{'held-out case':40s}" + "".join(f"{METRIC_LABELS[k] + ' before':>22s}{'after':>9s}" for k in metrics)
    print(head)
    for cid, errs, _ in rows:
        line = f"{cid:40s}"
        for k in metrics:
            b, af = errs.get(k, (None, None))
            line += f"{_pct(b):>22s}{_pct(af):>9s}"
        print(line)
    print()
    for k in metrics:
        bs = [abs(r[1][k][0]) for r in rows if k in r[1]]
        afs = [abs(r[1][k][1]) for r in rows if k in r[1]]
        print(f"{METRIC_LABELS[k]:16s} held-out MAPE {100 * sum(bs) / len(bs):6.2f}% -> {100 * sum(afs) / len(afs):6.2f}%"
              f"   worst {100 * max(bs):6.2f}% -> {100 * max(afs):6.2f}%   (n={len(bs)})")
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.2f}%"


if __name__ == "__main__":
    sys.exit(main())
