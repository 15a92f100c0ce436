"""``loraplan profile``: short real LoRA/QLoRA training bursts, recorded as JSON lines.

Every case runs in its own worker process (clean peaks; a crash or OOM costs one case), with
the protocol of loraplan/data/h100-protocol.md, on CUDA or, for a smoke test, on the CPU.
"""

from __future__ import annotations

import sys
import time
import warnings

import click

from ..case import expand_grid
from .options import Seconds, case_options, trace_timeout_option


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


@click.command("profile")
@case_options(multi=True, gpu=False)
@click.option("--gpu", default=None,
              help="GPU id whose estimate is stored beside each record [default: the detected GPU when the "
                   "catalog has it; h100-sxm-80gb otherwise and with --device cpu]")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Where the bursts run; cpu is a smoke test (memory from a live-tensor tracker, no NVML) "
                   "and needs --model (tiny-llama: a tiny test shape)")
@click.option("--steps", type=click.IntRange(1, 10000), default=6, show_default=True, help="Training steps per case")
@click.option("--warmup", type=click.IntRange(0, 10000), default=2, show_default=True,
              help="Steps left out of the median step time")
@click.option("--timeout", type=Seconds(), default=600.0, show_default=True,
              help="Seconds one case may take (building a cached model does not count)")
@click.option("--force", is_flag=True, help="Run cases that are already recorded again (appends new records)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Records file [default: profiles/<gpu-id>.jsonl]")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where random-weight checkpoints are kept [default: ~/.cache/loraplan/models]")
@click.option("--grid", "grid_file", type=click.Path(dir_okay=False), default=None,
              help="TOML/JSON grid: option names as keys, a value or a list each; command-line options win")
@click.option("--trace/--no-trace", "trace", default=False, show_default=True,
              help="Also run the meta-device trace of each case (its CUDA step on the estimate's GPU, ~2-8 s) "
                   "and store it in the record beside the analytic estimate")
@click.option("--kernel-summary/--no-kernel-summary", "kernel_summary", default=None,
              help="Run one more step under torch.profiler and store time per kernel class (matmul, attention, "
                   "elementwise, ...) in the record's 'kernels', which 'calibrate' fits efficiencies from "
                   "[default: on with --device cuda, off on cpu]")
@trace_timeout_option
def profile_command(gpu, device, steps, warmup, timeout, force, out, cache_dir, grid_file, trace, trace_timeout,
                    kernel_summary=None, **opts):
    """Run short real training bursts and record memory and time, one JSON line per case.

    Cases already in the records file are skipped (use --force to redo them). Each case runs in
    its own process with a time limit; OOM, timeout and errors are recorded with the phase
    reached. With --trace each record also holds the meta-device trace's prediction (analytic,
    trace and measured side by side; a trace failure is recorded, never fatal). The protocol is
    loraplan/data/h100-protocol.md. One run at a time per records file and per GPU (a lock); a
    record that cannot be written is kept in a recovery file that the next run adds back.

    \b
    Examples:
      loraplan profile --model qwen2.5-0.5b --quant nf4,bf16 --seq 512:2048:x2
      loraplan profile --device cpu --model tiny-llama --quant bf16,nf4   # CPU smoke run
      loraplan profile --model qwen2.5-0.5b --strategy ddp,fsdp --num-gpus 2  # torchrun, a record per rank

    With --strategy ddp|fsdp|fsdp-offload (and --num-gpus N) a case runs as a torchrun job of N
    ranks (nccl on CUDA, gloo with --device cpu) and writes one record per rank plus a summary
    record (worst rank's peak, mean step time, tokens/s over all ranks).
    """
    from ..errors import InputError
    from ..profile.grid import load_grid_file, merge_grids
    from ..profile.runner import build_cases, check_extras, check_recipes, detect_device, profile

    if warmup >= steps:
        raise InputError(f"--warmup {warmup} must be smaller than --steps {steps}; the median uses the steps after warmup")
    grids = load_grid_file(grid_file) if grid_file else None
    merged = merge_grids(opts, grids)
    if device == "cpu" and any(g.get("model") in (None, "", ()) for g in merged):
        from ..case import DEFAULT_MODEL
        from ..catalog import load_model

        gib = load_model(DEFAULT_MODEL).total_params * 2 / 2**30
        raise InputError(f"--device cpu needs --model: the default ({DEFAULT_MODEL}) would build {gib:.1f} GiB of "
                         f"random bf16 weights in host RAM; use --model tiny-llama for a CPU smoke run, or "
                         f"--model {DEFAULT_MODEL} to run it on the CPU anyway")
    case_dicts = []
    for g in merged:
        case_dicts.extend(expand_grid(g))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases = build_cases(case_dicts, gpu)
    for w in {str(w.message) for w in caught if issubclass(w.category, UserWarning)}:
        click.echo(f"warning: {w}", err=True)
    check_extras(cases, device)
    check_recipes(cases, device)
    from ..profile.distributed import check_cases

    check_cases(cases, device)
    dev = detect_device(device)
    check_cases(cases, device, cuda_count=dev.probe.get("count") if device == "cuda" else None)

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    from ..profile.records import default_out_path

    path = out or str(default_out_path(dev.gpu_id))
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                        MofNCompleteColumn(), TextColumn("[cyan]{task.fields[phase]}"), TimeElapsedColumn(),
                        TextColumn("{task.fields[peak]}"), console=err, transient=False)
    state = {"task": None, "t0": 0.0, "overall": None}

    def on_event(ev):
        kind = ev.get("ev")
        overall = state["overall"]
        if kind == "start":  # the records file is writable and locked: only now does the run show
            err.print(f"profiling {len(cases)} case(s) on {escape(str(dev.name or dev.device))} ({dev.gpu_id}) -> "
                      f"{escape(str(path))}")
            progress.start()
            state["overall"] = progress.add_task("cases", total=len(cases), phase="", peak="")
        elif kind == "skip":
            progress.console.print(f"  [dim]skip {ev['i']}/{ev['n']} {escape(ev['label'])} (already recorded; --force "
                                   f"redoes)[/]")
            progress.advance(overall)
        elif kind == "case_start":
            state["t0"] = time.monotonic()
            state["task"] = progress.add_task(f"case {ev['i']}/{ev['n']} {escape(ev['label'])}", total=None,
                                              phase="start", peak="")
        elif kind == "phase" and state["task"] is not None:
            progress.update(state["task"], phase=ev["phase"])
        elif kind in ("mem", "step") and state["task"] is not None:
            peak = (ev.get("mem") or {}).get("max_allocated_bytes") if kind == "mem" else ev.get("max_allocated_bytes")
            if peak is not None:
                progress.update(state["task"], peak=f"peak {_fmt_bytes(peak)}")
        elif kind == "case_end":
            rec = ev["record"]
            if state["task"] is not None:
                progress.remove_task(state["task"])
                state["task"] = None
            colour = {"ok": "green", "oom": "yellow", "timeout": "yellow"}.get(rec["status"], "red")
            extra = "" if rec["status"] == "ok" else f" in {rec.get('phase')}: {(rec.get('error') or '')[:160]}"
            # labels and errors are text, not markup (a gloo error names '[.../pair.cc:553]')
            progress.console.print(f"  [{colour}]{rec['status']}[/] {ev['i']}/{ev['n']} {escape(ev['label'])} "
                                   f"peak {_fmt_bytes((rec.get('memory') or {}).get('peak_allocated_bytes'))} "
                                   f"({time.monotonic() - state['t0']:.1f} s){escape(extra)}")
            progress.advance(overall)

    try:
        results = profile(cases, dev, out=path, force=force, steps=steps, warmup=warmup, timeout=timeout,
                          cache_dir=cache_dir, on_event=on_event,
                          on_warning=lambda m: err.print(f"warning: {escape(str(m))}"),
                          trace=trace, trace_timeout=trace_timeout, kernel_summary=kernel_summary)
    finally:
        progress.stop()
    _summary(results, dev, path)


def _summary(results, dev, path: str | None = None) -> None:
    """The measured-vs-estimated table; ``path``: the records file (named when columns drop)."""
    from rich.console import Console
    from rich.markup import escape

    from ..profile.runner import estimated_peak, measured_peak, traced_peak
    from ..render import fit_columns

    con = Console(file=sys.stdout)
    if not con.is_terminal:
        con = Console(file=sys.stdout, width=80)
    with_trace = any("trace" in (r.record or {}) for r in results)
    title = ("measured vs estimated" + (" (CPU run: not comparable with a GPU estimate)" if dev.device == "cpu" else "")
             + ("; trace: CUDA figure, n/c = not comparable with the CPU measurement"
                if dev.device == "cpu" and with_trace else ""))
    # (header, justify, priority: 0 always kept; the highest is dropped first to fit the width)
    cols = [("case", "left", 0), ("status", "left", 1), ("peak measured", "right", 0), ("peak estimated", "right", 0),
            ("diff", "right", 0)]
    if with_trace:
        cols += [("peak trace", "right", 4), ("trace diff", "right", 3)]
    cols += [("step measured", "right", 2), ("step estimated", "right", 5), ("tokens/s", "right", 6)]
    rows = []
    for r in results:
        rec = r.record or {}
        m, e = measured_peak(rec), estimated_peak(rec)
        diff = f"{(e - m) / m * 100:+.1f}%" if m and e else "-"
        tm = (rec.get("time") or {}).get("step_s_median")
        te = ((rec.get("estimate") or {}).get("time") or {}).get("step_s")
        tps = (rec.get("time") or {}).get("tokens_per_s")
        status = rec.get("status", "?") + (" (recorded)" if r.skipped else "")
        row = [r.case.label, status, _fmt_bytes(m), _fmt_bytes(e), diff]
        if with_trace:
            tp = traced_peak(rec)
            if "trace" not in rec:
                row += ["-", ""]
            elif tp is None:
                row += ["failed", ""]
            else:
                row += [_fmt_bytes(tp), "n/c" if dev.device == "cpu" else f"{(tp - m) / m * 100:+.1f}%" if m else "-"]
        row += [_fmt_s(tm), _fmt_s(te), f"{tps:,.0f}" if tps else "-"]
        rows.append(row)
        for rk in rec.get("ranks") or []:  # a multi-GPU case: its ranks under its summary
            pm = rk.get("peak_allocated_bytes")
            per = ((rec.get("estimate") or {}).get("memory") or {}).get("per_gpu") or {}
            comp = per.get(str(rk.get("rank")), per.get(rk.get("rank"))) if isinstance(per, dict) else None
            pe = sum(comp.values()) if isinstance(comp, dict) else None
            rows.append([f"  rank {rk.get('rank')}", rk.get("status", "?"), _fmt_bytes(pm), _fmt_bytes(pe),
                         f"{(pe - pm) / pm * 100:+.1f}%" if pm and pe else "-"]
                        + (["", ""] if with_trace else []) + ["", "", ""])
    t, dropped = fit_columns(con, cols, rows, title=title)
    con.print(t)
    if dropped:
        where = escape(str(path)) if path else "the records file"
        con.print(f"[dim]not shown at this width: {', '.join(dropped)} (the records in {where} have them)[/]")
    why = {rec.get("estimate_error") for rec in (r.record or {} for r in results) if rec.get("estimate_error")}
    for w in sorted(why)[:3]:
        con.print(f"[dim]no estimate: {escape(str(w))}[/]")
    tr_why = {(rec.get("trace") or {}).get("error") for rec in (r.record or {} for r in results)} - {None}
    for w in sorted(tr_why)[:3]:
        con.print(f"[dim]no trace: {escape(str(w))}[/]")


command = profile_command
