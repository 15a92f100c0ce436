"""``loraplan plan``: which GPUs fit a job, largest batch / sequence, time and cost of the whole job."""

from __future__ import annotations

import warnings
from dataclasses import replace

import click

from ..case import PARSERS, resolve_case
from ..errors import InputError
from ..spec import PARALLEL_FIELDS
from .options import case_options


@click.command("plan")
@case_options(gpu=False)
@click.option("--gpu", "gpu_list", default=None,
              help="Comma list of GPU ids to compare [default: every GPU in the catalog; see 'loraplan gpus']")
@click.option("--tokens", type=float, default=None, help="Job size in training tokens per epoch (packed rows of --seq tokens)")
@click.option("--examples", type=float, default=None, help="Job size in examples per epoch (one row each, padded or truncated to --seq; packed with --padding packing)")
@click.option("--tokens-per-example", type=int, default=None,
              help="Typical tokens per example; sets --seq when --seq is not given, else counts packed rows (--padding packing)")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data")
@click.option("--effective-batch", type=int, default=None,
              help="Sequences per optimizer step: the micro-batch is the largest that fits (up to this), "
                   "gradient accumulation makes up the rest. Without it --batch is the micro-batch.")
@click.option("--price", "prices", multiple=True, metavar="GPU_ID=USD",
              help="Override a GPU's on-demand price in US dollars per hour (repeatable)")
@click.option("--host-speed", type=float, default=None,
              help="Host CPU speed relative to the H100 reference host (host costs per call are divided by it) "
                   "[default: 1.0, or the calibration's]")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def plan_command(gpu_list, tokens, examples, tokens_per_example, epochs, effective_batch, prices, host_speed, fmt,
                 **opts):
    """Compare GPUs for a whole fine-tuning job: fit, largest micro-batch and sequence, hours, dollars.

    \b
    Example: loraplan plan --model llama-2-7b --examples 50000 --tokens-per-example 512 \\
             --epochs 2 --effective-batch 16 --gpu l4-24gb,a100-sxm-80gb,h100-sxm-80gb
    Marks the cheapest and the fastest GPU that fit; for a GPU where the setup does not fit it
    lists the changes that would make it fit, with their estimated memory saving. Without
    --num-gpus / --strategy it also compares 2, 4 and 8 GPUs (DDP, FSDP, ZeRO-3, device_map) of
    each type one GPU of which does not fit, ranked by fit, dollars (price x GPUs) and time; give
    --num-gpus or --strategy to compare several GPUs of every type.
    """
    from ..catalog import gpu_ids, load_gpu
    from ..plan import Job, parse_prices, plan_job, search_layouts

    tokens = _count("tokens", tokens)
    examples = _count("examples", examples)
    if tokens_per_example is not None:
        from ..inputs import positive_int

        positive_int(tokens_per_example, "--tokens-per-example", "give typical tokens per example, e.g. 512")
    if tokens_per_example is not None and opts.get("seq") is None:
        opts["seq"] = tokens_per_example
    if examples is None and tokens_per_example is not None:
        raise InputError("--tokens-per-example needs --examples N (the number of examples)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the case on one GPU; the layouts (plan.search_layouts / layout_case) put the engine on it,
        # so that --strategy fsdp alone (or --num-gpus 4 alone) is a search, not a refusal
        layout = {k: opts.pop(k, None) for k in PARALLEL_FIELDS}
        model, lora, train = resolve_case(opts)
        # each value parsed, then checked by TrainSpec on construction (spec.CHECKS)
        train = replace(train, **{k: PARSERS[k](v) for k, v in layout.items() if v is not None})
        opts.update(layout)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    ids = [g.strip() for g in gpu_list.split(",") if g.strip()] if gpu_list is not None else gpu_ids()  # '' is refused
    if not ids:
        raise InputError("--gpu is empty; give GPU ids like 'l4-24gb,h100-sxm-80gb' (see 'loraplan gpus')")
    gpus = [load_gpu(g) for g in ids]
    price_map = parse_prices(prices, gpu_ids())
    job = Job(tokens=tokens, examples=examples, tokens_per_example=tokens_per_example, epochs=epochs,
              effective_batch=effective_batch)
    from ..catalog import load_calibration, with_host_speed

    cals = {g.id: with_host_speed(load_calibration(g.id), host_speed) for g in gpus}
    # --strategy / --num-gpus given fix the configuration; otherwise 1, 2, 4, 8 GPUs of each type
    layouts = search_layouts(train, opts.get("strategy") is not None, opts.get("num_gpus") is not None)
    result = plan_job(model, lora, train, gpus, job, prices=price_map, calibrations=cals,
                      fixed_batch=effective_batch is None or opts.get("batch") is not None, layouts=layouts)
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
    """--tokens 5e6 -> 5000000; NaN, infinity, a fraction, zero or a negative count is an error."""
    from ..inputs import finite

    if v is None:
        return None
    fix = f"give a positive whole number, e.g. --{name} {'5e7' if name == 'tokens' else '50000'}"
    from ..plan import MAX_JOB_TOKENS

    v = finite(v, f"--{name}", fix)
    if v != int(v) or v <= 0:
        raise InputError(f"--{name} {v:g} is not a positive whole number; {fix}")
    if v > MAX_JOB_TOKENS:
        raise InputError(f"--{name} {v:g} is more than {MAX_JOB_TOKENS:.0e}, beyond any training job; {fix}")
    return int(v)


def _clear(clear: int, in_band: int, mark: str = "") -> str:
    """A "max batch" / "max seq" cell: the largest value with the band to spare ("-": none fits;
    0 when only values inside the band fit, which the footnote gives)."""
    return f"{clear:,}{mark}" if clear or in_band else "-"


def _hours(h) -> str:
    if h is None:
        return "-"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.2f} h"


def _print_table(d: dict) -> None:
    """The plan in 80 columns: the least important columns are dropped to fit the terminal."""
    from rich.markup import escape

    from rich import box

    from ..plan import MAX_SEQ_OVER_POSITIONS
    from ..render import VERDICT_LEGEND, bullets, console, fit_columns, size, verdict_text

    con = console()
    inp, job = d["inputs"], d["job"]
    shown, hidden = _shown_rows(d["gpus"])
    sized = job["tokens"] is not None or job["examples"] is not None
    q = inp["quant"] + (" + double quant" if inp.get("double_quant") else "")
    con.print(f"[bold]{escape(inp['model'])}[/]  {q}  LoRA r={inp['rank']} targets={escape(','.join(inp['targets']))}")
    con.print(f"optimizer {inp['optimizer']}  batch {inp['batch']} x seq {inp['seq']}  checkpointing "
              f"{'on' if inp['gradient_checkpointing'] else 'off'}")
    if "trainer" in inp:
        from ..trainers import recipe_summary

        con.print("recipe " + escape(recipe_summary(inp)))
    if sized:
        size_txt = (f"{job['tokens']:,} tokens" if job["tokens"] is not None else f"{job['examples']:,} examples"
                    + (f" of {job['tokens_per_example']:,} tokens" if job.get("tokens_per_example") else ""))
        con.print(f"job: {size_txt} x {job['epochs']:g} epochs"
                  + (f", effective batch {job['effective_batch']}" if job.get("effective_batch") else ""))
    else:
        con.print("no job size: hours and $ need --tokens N or --examples N")
    accum = bool(job.get("effective_batch"))
    # (header, justify, priority: 0 always kept, higher dropped first to fit the width)
    cols = [("GPU", "left", 0), ("fits?", "left", 0), ("need", "right", 1), ("have", "right", 5),
            ("micro x acc", "right", 2), ("max batch", "right", 1), ("max seq", "right", 1),
            ("step", "right", 3 if sized else 2), ("tokens/s", "right", 6)]
    if sized:
        cols += [("time", "right", 1), ("$/h", "right", 7), ("total $", "right", 1)]
    if hidden or len(shown) != len(d["gpus"]) or any(_config(g) != g["gpu"] for g in shown):
        # configurations of several GPUs are ranked by fit, $ and time: those stay, the searches go first
        cols = [(h, j, 4 if h in ("max batch", "max seq") else p) for h, j, p in cols]
    rows = []
    for g in shown:
        row = [
            _config(g), verdict_text(g.get("verdict") or ("fits" if g["fits"] else "does not fit"), short=True),
            size(g["device_total_bytes"]), size(g["memory_bytes"]), f"{g['micro_batch']} x {g['grad_accum']}",
            # the largest that fit with the uncertainty band to spare; the in-band ones in a footnote
            _clear(g["max_micro_batch_clear"], g["max_micro_batch"]),
            _clear(g["max_seq_clear"], g["max_seq"], "*" if g.get("seq_limit") and g["max_seq_clear"] == g["max_seq"]
                   else ""),
            f"{g['step_s']:.3f} s" if g["step_s"] is not None else "-",
            f"{g['tokens_per_s']:,.0f}" if g["tokens_per_s"] else "-",
        ]
        if sized:
            row += [_hours(g["total_hours"]) if g["fits"] else "-",
                    f"{g['price_usd_per_hour']:.2f}" if g["price_usd_per_hour"] is not None else "-",
                    f"{g['total_usd']:,.2f}" if g["fits"] and g["total_usd"] is not None else "-"]
        rows.append(row)
    if not accum:  # micro x accumulation is "batch x 1": say nothing
        cols, rows = cols[:4] + cols[5:], [r[:4] + r[5:] for r in rows]
    t, dropped = fit_columns(con, cols, rows, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                             collapse_padding=True, padding=(0, 1))
    con.print(t)
    con.print(f"[dim]{VERDICT_LEGEND}[/]")
    if hidden:
        con.print(f"[dim]{hidden} more configurations (--format json or csv lists them all)[/]")
    marks = [_mark(m, [g for g in d["gpus"] if g[m]]) for m in ("cheapest", "fastest")]
    if any(marks):
        con.print("; ".join(m for m in marks if m))
    limits = [g for g in shown if g.get("seq_limit") and g["max_seq_clear"] == g["max_seq"]]
    if limits:
        lo = min(g["max_seq_memory"] for g in limits)
        hi = max(g["max_seq_memory"] for g in limits)
        top = max(g["max_positions"] for g in limits) * MAX_SEQ_OVER_POSITIONS
        span = f"{lo:,}" + (f" to {'>= ' if hi >= top else ''}{hi:,}" if hi != lo else "")
        rope = any("RoPE" in g["seq_limit"] for g in limits)
        # the mark is on the "max seq" column; when the width drops it, the footnote names the field
        star = "*" if "max seq" not in dropped else "max seq (in --format json / csv) is"
        con.print(f"{star} capped at max_position_embeddings {limits[0]['max_positions']:,}; memory alone allows "
                  f"{span} tokens" + ("; longer sequences need RoPE scaling (rope_scaling in config.json)"
                                      if rope else f"; {limits[0]['seq_limit'].split(', but ')[-1]}"))
    edge = [g for g in shown if g["max_micro_batch"] and (g["max_micro_batch_clear"] < g["max_micro_batch"]
                                                              or g["max_seq_clear"] < g["max_seq"])]
    if edge:
        more = f"; {len(edge) - 3} more" if len(edge) > 3 else ""
        con.print("max batch / max seq keep the model's uncertainty band to spare; larger ones fit only inside "
                  "the band ('yes, in band'), up to: "
                  + "; ".join(f"{_config(g)} batch {g['max_micro_batch']}, seq {g['max_seq']:,}"
                              for g in edge[:3]) + more)
    if dropped:
        con.print(f"[dim]not shown at this width: {', '.join(dropped)} "
                  f"(--format json or csv has every field)[/]")
    for g in shown:
        if g["fits"] or not g["suggestions"]:
            continue
        con.print(f"[red]{_config(g)}[/] needs {size(g['device_total_bytes'])} of {size(g['memory_bytes'])}; changes:")
        bullets(con, [f"{s['option']}: {s['change']}, saves {size(s['saving_bytes'])}" + _fits_text(s)
                      for s in g["suggestions"]], indent=2)
    for sk in d.get("skipped", []):  # GPUs that cannot run the recipe at all
        con.print(f"[yellow]{sk['gpu']}[/] not planned: {sk['reason']}")
    for n in d.get("notes", []):  # what the estimate says about this setup on every GPU
        con.print(f"{'[bold red]' if n.startswith('WARNING') else '[dim]'}note: {escape(n)}[/]")
    for g in d["gpus"]:  # bf16 emulated on a GPU without bf16 tensor cores: what fp16 gives
        if g.get("step_s_fp16") is not None:
            con.print(f"[yellow]{_config(g)}[/]: bf16 compute is emulated (no bf16 tensor cores), priced at its "
                      f"fp32 rate: {g['step_s']:.3f} s per step; {g['fp16_option']} gives {g['step_s_fp16']:.3f} s")
    hosty = [g for g in d["gpus"] if g.get("step_s_host_range")]
    if hosty:
        from ..estimate.host_costs import host_speed_range

        lo = min(g["step_s_host_range"][0] / g["step_s"] for g in hosty)
        con.print(f"[dim]note: {len(hosty)} of {len(d['gpus'])} rows depend on the host CPU's speed (priced at the "
                  f"H100 reference host's; published transformers + peft hosts ran up to "
                  f"{host_speed_range()[1]:.1f}x faster: their hours and $ down to {lo:.0%} of those shown); give "
                  f"--host-speed, or calibrate from a profile of your machine[/]")
    con.print("[dim]times: analytic step-time model: GEMM/attention efficiencies sourced per GPU generation, "
              "host costs fitted on the H100 reference host (--host-speed scales them)."
              + (" Prices: catalog list prices unless --price." if sized else "")
              + "[/]")


#: names a tie for cheapest / fastest lists before "and N more"
MAX_TIE_NAMES = 4


def _mark(what: str, rows: list[dict]) -> str:
    """'fastest: X (options)' for one row; for rows that tie (plan.TIE_REL) 'fastest: N tie at
    2.60 h (host-bound): a, b, ...', never one of them called the fastest."""
    if not rows:
        return ""
    if len(rows) == 1:
        g = rows[0]
        return f"{what}: [bold]{_config(g)}[/]" + (f" ({g['layout_options']})" if g.get("layout_options") else "")
    at = _hours(rows[0]["total_hours"]) if what == "fastest" else f"${rows[0]['total_usd']:,.2f}"
    bounds = {g["bound"] for g in rows}
    why = f" ({bounds.pop()}-bound)" if len(bounds) == 1 and what == "fastest" else ""
    names = ", ".join(_config(g) for g in rows[:MAX_TIE_NAMES])
    more = f" and {len(rows) - MAX_TIE_NAMES} more" if len(rows) > MAX_TIE_NAMES else ""
    return f"{what}: {len(rows)} tie at {at}{why}: {names}{more}"


def _config(g: dict) -> str:
    """A row's configuration: the GPU id, with N x and the strategy on several GPUs."""
    n, strategy = g.get("num_gpus", 1), g.get("strategy", "single")
    if n == 1 and strategy == "single":
        return g["gpu"]
    return f"{n}x {g['gpu']} {strategy}"


#: fitting configurations a table shows when a plan compares several per GPU type (JSON/CSV: all)
MAX_TABLE_ROWS = 15


def _shown_rows(gpus: list[dict]) -> tuple[list[dict], int]:
    """(rows the table shows, how many it leaves out). One configuration per GPU type (no search):
    every row. Several: the MAX_TABLE_ROWS best that fit (the plan's ranking), then, for each GPU
    type where none fits, the one that comes closest (least memory needed)."""
    if all(g.get("num_gpus", 1) == 1 and g.get("strategy", "single") == "single" for g in gpus):
        return gpus, 0
    fit = [g for g in gpus if g["fits"]]
    shown = fit[:MAX_TABLE_ROWS]
    types_fit = {g["gpu"] for g in fit}
    closest: dict[str, dict] = {}
    for g in gpus:
        if g["gpu"] in types_fit:
            continue
        c = closest.get(g["gpu"])
        if c is None or g["device_total_bytes"] - g["memory_bytes"] < c["device_total_bytes"] - c["memory_bytes"]:
            closest[g["gpu"]] = g
    shown += list(closest.values())
    return shown, len(gpus) - len(shown)


def _fits_text(s: dict) -> str:
    """' -> fits' for a suggestion whose setup fits with the uncertainty band to spare; the verdict's
    own words where it fits only inside the band or with paging; '' where it still does not fit."""
    if not s["fits"]:
        return ""
    v = s.get("verdict")
    return {"fits, within the uncertainty": " -> fits, in band", "fits with paging": " -> fits with paging"}.get(v, " -> fits")
