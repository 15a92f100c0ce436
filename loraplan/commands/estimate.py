"""``loraplan estimate``: one setup -> itemised peak memory, fit verdict, step time."""

from __future__ import annotations

import warnings

import click

from ..case import resolve_case
from ..errors import InputError
from ..estimate.result import ledger_label, ledger_labels
from .options import case_options


@click.command("estimate")
@case_options(config_in_json=True)
@click.option("--method", type=click.Choice(["analytic", "trace"]), default="analytic", show_default=True,
              help="analytic: formulas, instant, no torch. trace: run the real transformers+peft step on the "
                   "meta device and count tensors (needs the [profile] extra, no GPU; seconds).")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration file from 'loraplan calibrate' [default: built-in for the GPU]")
@click.option("--host-speed", type=float, default=None,
              help="Host CPU speed relative to the H100 reference host (host costs per call are divided by it) "
                   "[default: 1.0, or the calibration's]")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--explain", "explain_", is_flag=True, default=False,
              help="Also say what dominates the peak and why, and re-estimate the levers that lower it "
                   "(as 'loraplan explain'; table or json)")
@click.option("--alloc-conf", "alloc_conf", default="", show_default=False,
              help="PYTORCH_CUDA_ALLOC_CONF of the run, for peak reserved: unset (default) or "
                   "'expandable_segments:True'")
def estimate_command(method, calibration_file, host_speed, fmt, explain_, alloc_conf, **opts):
    """Predict peak GPU memory (itemised ledger) and step time for one LoRA/QLoRA setup.

    \b
    What is predicted: torch.cuda.max_memory_allocated() over a short training burst of
    the step --trainer runs:
      loop (default): the plain transformers + peft + bitsandbytes loop of
        loraplan/data/h100-protocol.md (from_pretrained in bf16 + BitsAndBytesConfig, sdpa,
        use_cache=False, prepare_model_for_kbit_training for quantized bases, non-reentrant
        gradient checkpointing, get_peft_model, loss = model(ids, labels=ids).loss, no
        autocast, no clipping);
      hf: transformers.Trainer with TrainingArguments' defaults (max_grad_norm 1.0,
        bnb_4bit_compute_dtype fp32, the version's use_reentrant);
      trl: trl.SFTTrainer with SFTConfig's defaults (bf16 autocast, bf16 adapters on a
        quantized base, the fused chunked LM-head loss).
    A recipe option left unset (--mixed-precision, --adapter-dtype, --max-grad-norm, --loss,
    ...) takes the trainer's default (loraplan/data/trainers.json, with sources); the table's
    'recipe' line shows every resolved value. A setting the trainer does not have (e.g.
    --loss chunked with --trainer hf) is refused.
    Peak reserved: the caching allocator's closed form (the model's segments by the allocator
    rules + the step's; --alloc-conf for expandable segments); device total (NVML 'used') adds
    the CUDA context from published figures (data/cuda-context.json) and paged optimizer state.
    """
    from ..catalog import load_calibration, load_gpu, with_host_speed
    from ..estimate.api import estimate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, lora, train = resolve_case(opts)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    if explain_ and fmt == "csv":
        raise InputError("--explain has no CSV form; use --format table or --format json")
    gpu = load_gpu(opts["gpu"]) if opts.get("gpu") is not None else None  # '' is refused, not "no GPU"
    cal = with_host_speed(load_calibration(gpu.id if gpu else None, calibration_file), host_speed)
    result = estimate(model, lora, train, gpu, cal, alloc_conf=alloc_conf)
    if method == "trace":
        result = _with_trace(result, model, lora, train, gpu, alloc_conf)
    data = result.to_dict()
    explanation = None
    if explain_:
        from ..explain import explain

        explanation = explain(model, lora, train, gpu, cal).to_dict()
    if fmt == "json":
        from ..render import to_json

        config = click.get_current_context().meta.get("loraplan.config")
        if config is not None:
            data["inputs"]["config"] = config  # which keys of --config were used, ignored, defaulted

        if explanation is not None:
            data["explain"] = explanation
        click.echo(to_json(data))
    elif fmt == "csv":
        from ..render import to_csv

        click.echo(to_csv([data]), nl=False)
    else:
        labels = ledger_labels(data["memory"]["components"], train, model, data["memory"].get("peak_moment"))
        _print_table(data, labels)
        if explanation is not None:
            from ..render import console
            from .explain import print_explanation

            con = console()
            con.print()
            con.print("[bold]Explain[/]" + (" (analytic ledger)" if method == "trace" else ""))
            print_explanation(con, explanation)


def _with_trace(result, model, lora, train, gpu, alloc_conf: str = ""):
    """Replace the memory figures with a meta-device trace of the real step (subprocess)."""
    try:
        from ..trace import trace_estimate
    except ImportError:
        raise InputError("--method trace is not available in this build; use --method analytic") from None
    return trace_estimate(result, model, lora, train, gpu, alloc_conf=alloc_conf)


def _print_table(d: dict, labels: dict[str, str] | None = None) -> None:
    """The estimate as tables that fit an 80-column terminal; sizes in units chosen by size."""
    from rich.markup import escape
    from rich.table import Table

    from ..render import bullets, console, size, verdict_line
    from .explain import print_header

    labels = labels or {}
    con = console()
    inp, mem, p = d["inputs"], d["memory"], d["params"]
    print_header(con, inp, d["method"])
    if "trainer" in inp:
        from ..trainers import recipe_summary

        con.print("recipe " + escape(recipe_summary(inp)))
    con.print(f"trainable params {p['trainable']:,} of {p['total']:,} ({p['trainable_percent']:.4f}%)")
    if inp.get("stack"):
        con.print("stack " + ", ".join(f"{k} {v}" for k, v in inp["stack"].items()))
    t = Table(title=f"Peak allocated memory at: {mem['peak_moment']}", title_justify="left")
    t.add_column("component")
    t.add_column("size", justify="right")
    t.add_column("share", justify="right")
    total = mem["peak_allocated_bytes"]
    for k, v in sorted(mem["components"].items(), key=lambda kv: -kv[1]):
        t.add_row(escape(labels.get(k) or ledger_label(k)), size(v), f"{100 * v / total:.1f}%" if total else "-")
    t.add_row("[bold]peak allocated[/] (torch max_memory_allocated)", f"[bold]{size(total)}[/]", "100%")
    t.add_row("peak reserved (caching allocator)", size(mem["peak_reserved_bytes"]), "")
    for k, v in mem["outside_allocator_bytes"].items():
        t.add_row(f"+ {k.replace('_', ' ')} (outside torch)", size(v), "")
    t.add_row("[bold]device total[/] (NVML used)", f"[bold]{size(mem['device_total_bytes'])}[/]", "")
    con.print(t)
    from ..render import per_gpu_summary

    lines, per_table = per_gpu_summary(mem)
    if per_table is not None:
        con.print(per_table)
    for line in lines:
        con.print(escape(line))
    if d.get("gpu"):
        con.print(verdict_line(d))
    if d.get("time"):
        tm = d["time"]
        con.print(f"step time {tm['step_s']:.3f} s, {tm['tokens_per_s']:,.0f} tokens/s"
                  + (f" ({tm['bound']}-bound)" if tm.get("bound") else ""))
        comm = (d.get("detail") or {}).get("communication")
        if comm:
            con.print(escape(communication_line(comm, tm)))
        if tm.get("notes"):
            bullets(con, tm["notes"], mark="note:")
    if mem.get("notes"):
        bullets(con, mem["notes"], mark="note:")


def communication_line(comm: dict, tm: dict) -> str:
    """One line: the engine, its links, the bytes each collective kind moves per optimizer step, and
    how much of their time hides behind compute (estimate/comm.py)."""
    names = {"all_reduce": "all-reduce", "all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
             "p2p": "GPU to GPU", "h2d": "host to GPU", "d2h": "GPU to host"}
    moved = ", ".join(f"{names.get(k, k)} {v / 1e9:,.2f} GB" for k, v in comm["bytes_per_step"].items())
    where = comm["link"] + (f" + {comm['network']} between {comm['nodes']} nodes" if comm.get("network") else "")
    c = tm["components"]
    return (f"communication ({comm['strategy']}, {comm['num_gpus']} GPUs over {where}): {moved} per step; "
            f"{c['comm_s']:.3f} s on the links, {c['comm_exposed_s']:.3f} s not hidden by the "
            f"{c['compute_s']:.3f} s of compute per GPU")


command = estimate_command
