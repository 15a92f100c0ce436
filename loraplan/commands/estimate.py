"""``loraplan estimate``: one setup -> itemised peak memory, fit verdict, step time."""

from __future__ import annotations

import warnings

import click

from ..case import resolve_case
from ..errors import InputError
from ..estimate.result import ledger_label
from .options import case_options


@click.command("estimate")
@case_options()
@click.option("--method", type=click.Choice(["analytic", "trace"]), default="analytic", show_default=True,
              help="analytic: formulas, instant, no torch. trace: run the real transformers+peft step on the "
                   "meta device and count tensors (needs the [profile] extra, no GPU; seconds).")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration file from 'loraplan calibrate' [default: built-in for the GPU]")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def estimate_command(method, calibration_file, fmt, **opts):
    """Predict peak GPU memory (itemised ledger) and step time for one LoRA/QLoRA setup.

    \b
    What is predicted: torch.cuda.max_memory_allocated() over a short training burst of
    the plain transformers + peft + bitsandbytes loop of shared/reference/protocol.md
    (from_pretrained in bf16 + BitsAndBytesConfig, sdpa attention, use_cache=False,
    prepare_model_for_kbit_training for quantized bases, non-reentrant gradient
    checkpointing, get_peft_model, the chosen optimizer, loss = model(ids, labels=ids).loss).
    Peak reserved and device total (NVML 'used', with the CUDA context) are derived from it.
    HF Trainer / TRL, other attention kernels or library versions change the figure.
    """
    from ..catalog import load_calibration, load_gpu
    from ..estimate.api import estimate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, lora, train = resolve_case(opts)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    gpu = load_gpu(opts["gpu"]) if opts.get("gpu") is not None else None  # '' is refused, not "no GPU"
    cal = load_calibration(gpu.id if gpu else None, calibration_file)
    result = estimate(model, lora, train, gpu, cal)
    if method == "trace":
        result = _with_trace(result, model, lora, train, gpu)
    data = result.to_dict()
    if fmt == "json":
        from ..render import to_json

        click.echo(to_json(data))
    elif fmt == "csv":
        from ..render import to_csv

        click.echo(to_csv([data]), nl=False)
    else:
        _print_table(data)


def _with_trace(result, model, lora, train, gpu):
    """Replace the memory figures with a meta-device trace of the real step (subprocess)."""
    try:
        from ..trace import trace_estimate
    except ImportError:
        raise InputError("--method trace is not available in this build; use --method analytic") from None
    return trace_estimate(result, model, lora, train, gpu)


def _print_table(d: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..render import gib

    con = Console()
    inp, mem, p = d["inputs"], d["memory"], d["params"]
    q = inp["quant"] + (" + double quant" if inp.get("double_quant") else "")
    con.print(f"[bold]{inp['model']}[/] ({inp['model_type']})  {q}  LoRA r={inp['rank']} alpha={inp['alpha']:g} "
              f"dropout={inp['dropout']:g} targets={','.join(inp['targets'])}")
    con.print(f"optimizer {inp['optimizer']}  batch {inp['batch']} x seq {inp['seq']}"
              + (f" (target {inp['target_seq']})" if inp.get("target_seq") else "")
              + f"  gradient checkpointing {'on' if inp['gradient_checkpointing'] else 'off'}"
              + f"  attention {inp.get('attention_kernel', inp['attention'])}  [{d['method']}]")
    con.print(f"trainable params {p['trainable']:,} of {p['total']:,} ({p['trainable_percent']:.4f}%)")
    t = Table(title=f"Peak allocated memory at: {mem['peak_moment']}", title_justify="left")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("share", justify="right")
    total = mem["peak_allocated_bytes"]
    for k, v in sorted(mem["components"].items(), key=lambda kv: -kv[1]):
        t.add_row(ledger_label(k), gib(v), f"{100 * v / total:.1f}%" if total else "-")
    t.add_row("[bold]peak allocated[/] (torch max_memory_allocated)", f"[bold]{gib(total)}[/]", "100%")
    t.add_row("peak reserved (caching allocator)", gib(mem["peak_reserved_bytes"]), "")
    for k, v in mem["outside_allocator_bytes"].items():
        t.add_row(f"+ {k.replace('_', ' ')} (outside torch)", gib(v), "")
    t.add_row("[bold]device total[/] (NVML used)", f"[bold]{gib(mem['device_total_bytes'])}[/]", "")
    con.print(t)
    if d.get("gpu"):
        cap = d["gpu_memory_bytes"]
        verdict = "[green]FITS[/]" if d["fits"] else "[red]DOES NOT FIT[/]"
        con.print(f"{d['gpu']}: {gib(cap)} GiB -> {verdict} (headroom {gib(d['headroom_bytes'])} GiB)")
    if d.get("time"):
        tm = d["time"]
        con.print(f"step time {tm['step_s']:.3f} s, {tm['tokens_per_s']:,.0f} tokens/s"
                  + (f" ({tm['bound']}-bound)" if tm.get("bound") else ""))
    for n in mem.get("notes", []):
        con.print(f"[dim]note: {n}[/]")


command = estimate_command
