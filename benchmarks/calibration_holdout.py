"""Does calibration help on cases it has not seen? Leave-one-out on the measured records.

    python benchmarks/calibration_holdout.py [RECORDS...] [--gpu ID]

For each record: calibrate on all the others (loraplan.calibrate.calibrate), starting from the
*uncalibrated* coefficients (catalog/calibrations/default.json and the time model's neutral
defaults: the shipped per-GPU time coefficients were fitted on these very records, so starting
from them would leak the held-out case), then compare the held-out record's error before
(uncalibrated) and after (calibrated on the rest). Default records: the 10 shipped H100 cases
(peak allocated and step time; they hold no reserved or NVML figures, so those coefficients are
not fitted and not scored).
"""

from __future__ import annotations

import argparse
import sys

from loraplan.calibrate import METRIC_LABELS, calibrate, metric_pairs, predict, rel_error
from loraplan.catalog import load_calibration
from loraplan.measurements import load_measurements, select


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="*", default=["reference"])
    ap.add_argument("--gpu", default=None)
    a = ap.parse_args(argv)
    ms = select(load_measurements(a.records), a.gpu)
    gpu = ms[0].gpu
    base = load_calibration(None)  # uncalibrated: default.json only
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
    print(f"leave-one-out on {len(ms)} {gpu} records; base: uncalibrated (default.json + neutral time defaults)")
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
