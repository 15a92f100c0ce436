"""``loraplan plan``: which GPUs fit a job, largest batch / sequence, time and cost of the whole job."""

from __future__ import annotations

import warnings

import click

from ..case import resolve_case
from ..errors import InputError
from .options import case_options


@click.command("plan")
@case_options(gpu=False)
@click.option("--gpu", "gpu_list", default=None,
              help="Comma list of GPU ids to compare [default: every GPU in the catalog; see 'loraplan gpus']")
@click.option("--tokens", type=float, default=None, help="Job size in training tokens per epoch (packed rows of --seq tokens)")
@click.option("--examples", type=float, default=None, help="Job size in examples per epoch (one row each, padded to --seq)")
@click.option("--tokens-per-example", type=int, default=None,
              help="Typical tokens per example; sets --seq when --seq is not given")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data")
@click.option("--effective-batch", type=int, default=None,
              help="Sequences per optimizer step: the micro-batch is the largest that fits (up to this), "
                   "gradient accumulation makes up the rest. Without it --batch is the micro-batch.")
@click.option("--price", "prices", multiple=True, metavar="GPU_ID=USD",
              help="Override a GPU's on-demand price in US dollars per hour (repeatable)")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def plan_command(gpu_list, tokens, examples, tokens_per_example, epochs, effective_batch, prices, fmt, **opts):
    """Compare GPUs for a whole fine-tuning job: fit, largest micro-batch and sequence, hours, dollars.

    \b
    Example: loraplan plan --model llama-2-7b --examples 50000 --tokens-per-example 512 \\
             --epochs 2 --effective-batch 16 --gpu l4-24gb,a100-sxm-80gb,h100-sxm-80gb
    Marks the cheapest and the fastest GPU that fit; for a GPU where the setup does not fit it
    lists the changes that would make it fit, with their estimated memory saving.
    """
    from ..catalog import gpu_ids, load_gpu
    from ..plan import Job, parse_prices, plan_job

    tokens = _count("tokens", tokens)
    examples = _count("examples", examples)
    if tokens_per_example is not None and opts.get("seq") is None:
        opts["seq"] = tokens_per_example
    if examples is None and tokens is None and tokens_per_example is not None:
        raise InputError("--tokens-per-example needs --examples N (the number of examples)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, lora, train = resolve_case(opts)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    ids = [g.strip() for g in gpu_list.split(",") if g.strip()] if gpu_list is not None else gpu_ids()  # '' is refused
    if not ids:
        raise InputError("--gpu is empty; give GPU ids like 'l4-24gb,h100-sxm-80gb' (see 'loraplan gpus')")
    gpus = [load_gpu(g) for g in ids]
    price_map = parse_prices(prices, gpu_ids())
    job = Job(tokens=tokens, examples=examples, tokens_per_example=tokens_per_example, epochs=epochs,
              effective_batch=effective_batch)
    result = plan_job(model, lora, train, gpus, job, prices=price_map,
                      fixed_batch=effective_batch is None or opts.get("batch") is not None)
    data = result.to_dict()
    if fmt == "json":
        from ..render import to_json

        click.echo(to_json(data))
    elif fmt == "csv":
        from ..render import to_csv

        rows = []
        for g in data["gpus"]:
            g = dict(g)
            sugg = g.pop("suggestions")
            g["suggestions"] = "; ".join(f"{s['option']} (-{s['saving_bytes'] / 2**30:.2f} GiB"
                                         f"{', fits' if s['fits'] else ''})" for s in sugg)
            rows.append(g)
        click.echo(to_csv(rows), nl=False)
    else:
        _print_table(data)


def _count(name: str, v: float | None) -> int | None:
    """--tokens 5e6 -> 5000000; a fractional count is an error."""
    if v is None:
        return None
    if v != int(v):
        raise InputError(f"--{name} {v:g} must be a whole number")
    return int(v)


def _hours(h) -> str:
    if h is None:
        return "-"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.2f} h"


def _print_table(d: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..render import gib

    con = Console()
    if not con.is_terminal or con.width < 150:
        con = Console(width=150)
    inp, job = d["inputs"], d["job"]
    q = inp["quant"] + (" + double quant" if inp.get("double_quant") else "")
    size = (f"{job['tokens']:,} tokens" if job["tokens"] is not None else f"{job['examples']:,} examples")
    con.print(f"[bold]{inp['model']}[/]  {q}  LoRA r={inp['rank']} targets={','.join(inp['targets'])}  "
              f"optimizer {inp['optimizer']}  seq {inp['seq']}  gradient checkpointing "
              f"{'on' if inp['gradient_checkpointing'] else 'off'}")
    con.print(f"job: {size} x {job['epochs']:g} epochs"
              + (f", effective batch {job['effective_batch']}" if job.get("effective_batch") else ""))
    t = Table(title_justify="left")
    for col, just in [("GPU", "left"), ("fits", "left"), ("need GiB", "right"), ("have GiB", "right"),
                      ("micro x accum", "right"), ("max batch", "right"), ("max seq", "right"),
                      ("step", "right"), ("tokens/s", "right"), ("time", "right"), ("$/h", "right"),
                      ("total $", "right"), ("", "left")]:
        t.add_column(col, justify=just)
    for g in d["gpus"]:
        marks = " ".join(m for m, on in (("cheapest", g["cheapest"]), ("fastest", g["fastest"])) if on)
        t.add_row(
            g["gpu"], "[green]yes[/]" if g["fits"] else "[red]no[/]", gib(g["device_total_bytes"]),
            gib(g["memory_bytes"]), f"{g['micro_batch']} x {g['grad_accum']}",
            str(g["max_micro_batch"]) if g["max_micro_batch"] else "-",
            f"{g['max_seq']:,}" if g["max_seq"] else "-",
            f"{g['step_s']:.3f} s" if g["step_s"] is not None else "-",
            f"{g['tokens_per_s']:,.0f}" if g["tokens_per_s"] else "-",
            _hours(g["total_hours"]) if g["fits"] else "-",
            f"{g['price_usd_per_hour']:.2f}" if g["price_usd_per_hour"] is not None else "-",
            f"{g['total_usd']:,.2f}" if g["fits"] and g["total_usd"] is not None else "-",
            f"[bold]{marks}[/]",
        )
    con.print(t)
    for g in d["gpus"]:
        if g["fits"] or not g["suggestions"]:
            continue
        con.print(f"[red]{g['gpu']}[/] needs {gib(g['device_total_bytes'])} GiB of {gib(g['memory_bytes'])}; changes:")
        for s in g["suggestions"]:
            con.print(f"  {s['option']:<40s} {s['change']}: saves {gib(s['saving_bytes'])} GiB"
                      + (" -> [green]fits[/]" if s["fits"] else ""))
    con.print("[dim]times: analytic step-time model fitted on H100 measurements; other GPUs scaled by their "
              "specs (catalog/calibrations). Prices: catalog list prices unless --price.[/]")
