"""``loraplan explain``: what dominates the peak and why, and the levers that lower it (re-estimated)."""

from __future__ import annotations

import warnings

import click

from ..case import resolve_case
from .options import case_options


@click.command("explain")
@case_options()
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration file from 'loraplan calibrate' [default: built-in for the GPU]")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def explain_command(calibration_file, fmt, **opts):
    """Explain the peak memory of one setup: what dominates it, why, and what would lower it.

    \b
    Each lever (gradient checkpointing, half the batch or sequence, another optimizer or
    quantization, a valid attention kernel, fewer targets, a smaller rank, dropout 0, and the
    recipe changes the --trainer has, e.g. --loss chunked or --mixed-precision bf16) is
    re-estimated; its saving is the difference of the two device totals, ranked, with its
    fit verdict on --gpu.
    Example: loraplan explain --model llama-3-8b --seq 4096 --no-gradient-checkpointing --gpu rtx4090-24gb
    """
    from ..catalog import load_calibration, load_gpu
    from ..explain import explain

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, lora, train = resolve_case(opts)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    gpu = load_gpu(opts["gpu"]) if opts.get("gpu") else None
    cal = load_calibration(gpu.id if gpu else None, calibration_file)
    data = explain(model, lora, train, gpu, cal).to_dict()
    if fmt == "json":
        from ..render import to_json

        click.echo(to_json(data))
    else:
        from ..render import console

        con = console()
        print_header(con, data["inputs"], "analytic")
        print_explanation(con, data)


def print_header(con, inp: dict, method: str) -> None:
    """The setup in two or three lines (rich markup escaped where it comes from data)."""
    from rich.markup import escape

    q = inp["quant"] + (" + double quant" if inp.get("double_quant") else "")
    con.print(f"[bold]{escape(inp['model'])}[/] ({escape(inp['model_type'])})  {q}  {escape('[' + method + ']')}")
    con.print(f"LoRA r={inp['rank']} alpha={inp['alpha']:g} dropout={inp['dropout']:g} "
              f"targets={escape(','.join(inp['targets']))}")
    con.print(f"optimizer {inp['optimizer']}  batch {inp['batch']} x seq {inp['seq']}"
              + (f" (target {inp['target_seq']})" if inp.get("target_seq") else "")
              + f"  checkpointing {'on' if inp['gradient_checkpointing'] else 'off'}"
              + f"  attention kernel {inp.get('attention_kernel', inp['attention'])}")  # the kernel sdpa dispatches to


def print_explanation(con, d: dict) -> None:
    """Render ``Explanation.to_dict()``: verdict, facts, drivers with their reasons, levers table."""
    from rich.markup import escape

    from ..render import VERDICT_LEGEND, bullets, fit_columns, size, verdict_line, verdict_text

    con.print(f"peak allocated {size(d['peak_allocated_bytes'])} at [bold]{d['peak_moment']}[/]; "
              f"device total {size(d['device_total_bytes'])}")
    if d.get("gpu"):
        con.print(verdict_line(d))
    bullets(con, d["facts"])
    con.print("[bold]What dominates the peak[/]")
    for dr in d["drivers"]:
        con.print(f"[bold]{escape(dr['label'])}[/]: {size(dr['bytes'])} ({100 * dr['share']:.0f}%)")
        bullets(con, dr["why"], indent=2)
    if not d["levers"]:
        con.print("No single change lowers the peak.")
    else:
        gpu = bool(d.get("gpu"))
        cols = [("option", "left", 0), ("total saved", "right", 0), ("fits?", "left", 1 if gpu else 9),
                ("change", "left", 4), ("device total", "right", 3), ("step", "right", 2 if gpu else 9)]
        rows = [[escape(lv["option"]), size(lv["saving_bytes"]), verdict_text(lv["verdict"], short=True),
                 escape(lv["change"]), size(lv["device_total_bytes"]),
                 f"{lv['step_s']:.3f} s" if lv["step_s"] is not None else "-"] for lv in d["levers"]]
        t, _ = fit_columns(con, cols, rows, title="Levers, each re-estimated (total saved: drop in device total)",
                           title_justify="left")
        con.print(t)
        if gpu:
            con.print(f"[dim]{VERDICT_LEGEND}[/]")
        fit = [lv["option"] for lv in d["levers"] if lv["verdict"] and lv["verdict"] != "does not fit"]
        if gpu and d.get("verdict") == "does not fit":
            con.print(f"alone, these make it fit on {d['gpu']}: {escape(', '.join(fit))}" if fit else
                      f"no single change makes it fit on {d['gpu']}; combine them (or try 'loraplan plan')")
    if d.get("rejected"):
        con.print("[dim]not offered:[/]")
        bullets(con, d["rejected"], indent=2)


command = explain_command
