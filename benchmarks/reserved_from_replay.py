"""Peak reserved from allocator replays of traced steps, and how well the analytic model matches.

For the small-config grid of ``analytic_vs_trace.py --quick`` (every family, bf16/nf4, default and
all-linear targets, checkpointing on/off) and, with ``--full``, the H100 reference cases at full
size, traces each step on meta, replays its allocation stream through ``loraplan.allocator``
(default config and ``expandable_segments:True``) and prints per setup: traced peak allocated,
replayed peak reserved (default / expandable), reserved/allocated, fragmentation at the peak,
where the slack comes from ("weights": reserved - allocated once the model is loaded, the tails
of 20 MiB kLargeBuffer / 2 MiB kSmallBuffer segments and 2 MiB rounding; "step": the rest of
peak reserved - peak allocated, i.e. activation churn, negative when the step's tensors fill the
weights' segment tails), and the analytic reserved model
(``loraplan.estimate.reserved``) against the default replay. Summary: agreement over the grid.

    python benchmarks/reserved_from_replay.py [--full] [--families llama,t5] [--no-grid]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from analytic_vs_trace import FAMILIES, grid, small_config  # noqa: E402 - the same grid, not a copy
from trace_vs_reference import DATA, case_specs  # noqa: E402

from loraplan.catalog import load_gpu, model_entries  # noqa: E402
from loraplan.estimate.reserved import reserved_for_setup  # noqa: E402
from loraplan.hf import spec_from_config  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.targets import default_targets  # noqa: E402

MiB = 2**20


def _row(label, cfg, model, lora, train, cc):
    from loraplan.trace import emulation as em
    from loraplan.trace.run import trace_step

    t0 = time.perf_counter()
    tr = trace_step(cfg, lora, train, cc)
    a = tr["allocator"]
    alloc = tr["peak_allocated_bytes"]
    res, exp = tr["peak_reserved_bytes"], tr["peak_reserved_expandable_bytes"]
    w_slack = a["weights"]["reserved_bytes"] - a["weights"]["allocated_bytes"]
    churn = res - alloc - w_slack
    ws = em.cublas_workspace_bytes(cc)
    t1 = time.perf_counter()
    an = reserved_for_setup(model, lora, train, cc, (ws, ws) if ws else ()).peak_reserved
    t_an = time.perf_counter() - t1
    err = 100.0 * (an - res) / res
    print(f"{label:48s} alloc {alloc / MiB:9.1f}  res {res / MiB:9.1f}  exp {exp / MiB:9.1f}  "
          f"r/a {res / alloc:5.3f}  frag {tr['fragmentation_at_peak']:5.3f}  slack: weights {w_slack / MiB:7.1f} "
          f"step {churn / MiB:8.1f} MiB | analytic {an / MiB:9.1f} {err:+6.1f}% ({t_an * 1e3:4.1f} ms) "
          f"{t1 - t0:5.1f}s", flush=True)
    return dict(label=label, quant=train.quant, gc=train.gradient_checkpointing, alloc=alloc, reserved=res,
                expandable=exp, frag=tr["fragmentation_at_peak"], weights_slack=w_slack, step_slack=churn,
                analytic=an, err=err, analytic_ms=1e3 * t_an)


def quick_grid(families):
    gpu = load_gpu("h100-sxm-80gb")
    rows = []
    for fam in families:
        entry = model_entries()[FAMILIES[fam]]
        cfg = small_config(entry["config"])
        model = spec_from_config(cfg, f"{FAMILIES[fam]}-small")
        for quant, tgt, gc, opt, (b, s, r) in grid(True):
            targets = default_targets(model) if tgt == "default" else tuple(tgt.split(","))
            lora = LoraSpec(rank=r, alpha=2 * r, dropout=0.05, targets=targets)
            train = TrainSpec(quant=quant, optimizer=opt, batch=b, seq=s, gradient_checkpointing=gc,
                              target_seq=s if model.is_encoder_decoder else None)
            label = f"{fam} {quant} {tgt} gc={int(gc)} {opt} b{b} s{s} r{r}"
            try:
                rows.append(_row(label, cfg, model, lora, train, gpu.compute_capability))
            except Exception as ex:  # noqa: BLE001 - a benchmark reports, it does not stop
                print(f"{label}: failed: {str(ex)[:160]}", flush=True)
    return rows


def reference_cases():
    data = json.loads(DATA.read_text())
    rows = []
    for case in data["cases"]:
        lora, train = case_specs(case)
        cfg = data["models"][case["model"]]
        model = spec_from_config(cfg, case["model"])
        try:
            rows.append(_row(case["id"], cfg, model, lora, train, "9.0"))
        except Exception as ex:  # noqa: BLE001
            print(f"{case['id']}: failed: {str(ex)[:160]}", flush=True)
    return rows


def summarize(rows, title):
    if not rows:
        return
    errs = [abs(r["err"]) for r in rows]
    ratios = [r["reserved"] / r["alloc"] for r in rows]
    print(f"\n{title}: n={len(rows)}  reserved/allocated (replay) median {statistics.median(ratios):.3f} "
          f"min {min(ratios):.3f} max {max(ratios):.3f}; expandable/default median "
          f"{statistics.median(r['expandable'] / r['reserved'] for r in rows):.3f}")
    print(f"  analytic reserved vs replay: mean |err| {statistics.mean(errs):.2f}%  max {max(errs):.2f}%  "
          f"within 5%: {sum(e <= 5 for e in errs)}/{len(errs)}  within 10%: {sum(e <= 10 for e in errs)}/{len(errs)}"
          f"  mean {statistics.mean(r['analytic_ms'] for r in rows):.2f} ms per estimate")
    for key in sorted({(r["quant"], r["gc"]) for r in rows}):
        e = [r["err"] for r in rows if (r["quant"], r["gc"]) == key]
        print(f"  {key[0]:5s} gc={int(key[1])}: n={len(e):3d} mean |err| {statistics.mean(abs(x) for x in e):6.2f}% "
              f"min {min(e):+6.1f}% max {max(e):+6.1f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also the H100 reference cases at full size (slow)")
    ap.add_argument("--no-grid", action="store_true", help="skip the small-config grid")
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args(argv)
    if not args.no_grid:
        summarize(quick_grid(args.families.split(",")), "small-config grid (analytic_vs_trace --quick)")
    if args.full:
        summarize(reference_cases(), "H100 reference cases, full size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
