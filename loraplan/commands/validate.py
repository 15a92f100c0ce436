"""``loraplan validate``: loraplan's estimate vs every measured record; MAPE, worst, a gate."""

from __future__ import annotations

import click

from .options import trace_timeout_option

from ..calibrate import METRICS
from ..errors import LoraplanError


class ErrorAboveThreshold(LoraplanError):
    """An estimate misses a measurement by more than --max-error: exit status 1, not 2."""

    exit_code = 1


@click.command("validate")
@click.argument("records", nargs=-1)
@click.option("--gpu", default=None, help="Only records of this GPU id")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration file from 'loraplan calibrate' [default: built-in for each record's GPU]")
@click.option("--max-error", type=float, default=None,
              help="Exit with status 1 when any case's |error| on the --check metrics exceeds PCT percent")
@click.option("--check", default="allocated", show_default=True,
              help=f"Metrics --max-error applies to: comma list of {', '.join(METRICS)}, or 'all'")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--case", "case", default=None,
              help="Only cases whose id contains one of these comma-separated substrings (e.g. --case l2-7b-nf4-r8-qv)")
@click.option("--trace/--no-trace", "trace", default=False, show_default=True,
              help="Run the meta-device trace for records that have none (~2-8 s per case, torch needed), "
                   "so analytic, trace and measured stand side by side")
@trace_timeout_option
def validate_command(records, gpu, calibration_file, max_error, check, fmt, case, trace, trace_timeout):
    """Compare loraplan's estimate with measured records, case by case.

    \b
    RECORDS: profiles/<gpu-id>.jsonl files, folders of them, reference JSON files or the
    word 'reference' (the shipped H100 measurements) [default: profiles/*.jsonl + reference].
    Per case: predicted vs measured peak allocated, peak reserved, device total (NVML) and
    step time with signed errors ((predicted - measured) / measured); weights and optimizer
    state where the record's phase peaks allow; MAPE and worst per metric. Records taken with
    other library versions than the estimator was checked on are flagged. Records with a
    meta-device trace ('profile --trace', or --trace here) add the trace's predicted peak
    allocated and its error beside the analytic one (metric 'trace' for --check).
    """
    from ..catalog import load_calibration
    from ..errors import InputError
    from ..measurements import load_measurements, select
    from ..report.validation import TRACE, filter_cases, validate

    allowed = list(METRICS) + [TRACE]
    checks = list(METRICS) if check.strip().lower() == "all" else [c.strip().lower() for c in check.split(",") if c.strip()]
    bad = [c for c in checks if c not in allowed]
    if bad or not checks:
        raise InputError(f"--check '{check}' must be a comma list of {', '.join(allowed)} or 'all'")
    if max_error is not None and not (max_error >= 0 and max_error != float("inf")):  # NaN fails >= 0
        raise InputError(f"--max-error {max_error:g} must be a finite percentage >= 0 (e.g. 5)")
    ms = load_measurements(list(records) or None)
    for p in ms.problems:
        click.echo(f"warning: {p}", err=True)
    items = select(ms, gpu, need_ok=False)
    items = filter_cases(items, case)
    select(items, need_ok=True)  # at least one successful case, else a one-line error
    if trace:
        items = traced(items, trace_timeout)
    cache: dict = {}

    def cal_for(gid):
        if gid not in cache:
            cache[gid] = load_calibration(gid, calibration_file)
        return cache[gid]

    v = validate(items, cal_for, calibration_label=calibration_file or "built-in")
    if max_error is not None and TRACE in checks and not v.has_trace:
        raise InputError("--check trace needs records with a meta-device trace; add --trace "
                         "(or record them with 'loraplan profile --trace')")
    if fmt == "json":
        from ..render import to_json

        click.echo(to_json(v.to_dict()))
    elif fmt == "csv":
        from ..render import to_csv

        click.echo(to_csv([c.to_dict() for c in v.cases]), nl=False)
    else:
        print_table(v)
    if max_error is not None:
        worst = v.worst(checks)
        if worst and 100 * worst[0] > max_error:
            raise ErrorAboveThreshold(f"{worst[2]} error {100 * worst[0]:.2f}% on {worst[1]} exceeds --max-error "
                                      f"{max_error:g}%; fix the estimate or raise the threshold")
        click.echo(f"ok: every {', '.join(checks)} error is within {max_error:g}%", err=True)

def traced(items, timeout_s: float):
    """``add_traces`` with one progress line per case on stderr."""
    from ..report.validation import add_traces

    n = sum(1 for m in items if m.ok and m.trace_peak_allocated_bytes is None)
    if n:
        click.echo(f"tracing {n} case(s) on the meta device ...", err=True)

    def done(m, k, total):
        what = f"{m.trace_peak_allocated_bytes / 2**30:.3f} GiB" if m.trace_error is None else f"failed: {m.trace_error[:160]}"
        click.echo(f"  trace {k}/{total} {m.id}: {what}", err=True)

    return add_traces(items, timeout_s=timeout_s, on_done=done)


def _pair(p: float, y: float) -> str:
    """'4.68 / 4.70 GiB': both in the unit the larger one takes (render.size)."""
    from ..render import size

    unit = size(max(abs(p), abs(y))).split()[-1]
    scale = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10, "B": 1}[unit]
    return f"{p / scale:,.2f} / {y / scale:,.2f} {unit}"


def print_table(v) -> None:
    from ..render import bullets, console, fit_columns, size
    from ..report.validation import TRACE, label

    con = console()
    metrics = [m for m in METRICS if m in v.summary]
    with_trace = v.has_trace

    def head(m):
        return "peak allocated (analytic)" if m == "allocated" and with_trace else label(m)

    con.print(f"estimate vs measurement (calibration: {v.calibration}; error = (pred - meas) / meas)"
              + ("; trace = meta-device trace of the real step" if with_trace else ""))
    # (header, justify, priority: 0 always kept; the highest is dropped first to fit the width)
    cols = [("case", "left", 0), ("status", "left", 5)]
    for i, m in enumerate(metrics):
        cols += [(f"{head(m)}\npred / meas", "right", 2 + 2 * i), ("error" if i == 0 else f"{label(m)}\nerror", "right", 0 if i == 0 else 3 + i)]
        if m == "allocated" and with_trace:
            cols += [("trace\npred", "right", 6), ("trace\nerror", "right", 2)]
    rows = []
    for c in v.cases:
        row = [c.id, c.status]
        for m in metrics:
            if m in c.metrics:
                p, y = c.metrics[m]
                row += [(f"{p:.3f} / {y:.3f}" if m == "step" else _pair(p, y)), f"{100 * c.error(m):+.2f}%"]
            else:
                row += ["-", ""]
            if m == "allocated" and with_trace:
                e = c.error(TRACE)
                row += [size(c.trace[0]), "n/c" if e is None else f"{100 * e:+.2f}%"] if c.trace else ["-", ""]
        rows.append(row)
    t, dropped = fit_columns(con, cols, rows)
    con.print(t)
    flagged_cases = [f"{c.id}: {'; '.join(c.flags)}" for c in v.cases if c.flags]
    if flagged_cases:
        con.print("flags:")
        bullets(con, flagged_cases, indent=2)
    if dropped:
        con.print("[dim]not shown at this width: " + ", ".join(d.replace("\n", " ") for d in dropped)
                  + " (--format json has every field)[/]")
    comps = v.component_keys
    if comps:
        cols = [("case", "left", 0), ("component", "left", 0), ("predicted", "right", 1), ("measured", "right", 1),
                ("error", "right", 0)]
        rows = [[c.id, k.replace("_", " "), size(p), size(y), f"{100 * c.error(k):+.2f}%"]
                for c in v.cases for k, (p, y) in c.components.items()]
        ct, _ = fit_columns(con, cols, rows, title="ledger components checked from phase peaks", title_justify="left")
        con.print(ct)
    for k, s in v.summary.items():
        con.print(f"{head(k)}: MAPE {100 * s['mape']:.2f}%, bias {100 * s['bias']:+.2f}%, cases {s['n']}, "
                  f"worst {100 * s['worst']:+.2f}% ({s['worst_case']})")
    flagged = [c.id for c in v.cases if any("expected" in f for f in c.flags)]
    if flagged:
        con.print(f"[yellow]{len(flagged)} record(s) from other library versions than "
                  + ", ".join(f"{k} {x}" for k, x in v.expected_versions.items() if x) + "[/]")

command = validate_command
