"""``loraplan models`` and ``loraplan gpus``: the built-in catalogs as a table or JSON.

Rows are plain dicts built from the catalog loaders (``model_rows``, ``gpu_rows``); rich only
renders them. Nothing here imports torch.
"""

from __future__ import annotations

import json
import re

import click

GIB = 1024 ** 3


def _human(n: int | None) -> str:
    """6738415616 -> '6.74B'."""
    if n is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return str(n)


def _repo(url: str) -> str:
    """'https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json' -> 'meta-llama/Llama-2-7b-hf'."""
    m = re.match(r"https?://huggingface\.co/([^/]+/[^/]+)", url or "")
    return m.group(1) if m else (url or "-")


def model_rows() -> list[dict]:
    """One dict per catalog model, in name order, from its ModelSpec."""
    from ..catalog import load_model, model_names

    rows = []
    for name in model_names():
        s = load_model(name)
        rows.append({
            "name": s.name,
            "model_type": s.model_type,
            "total_params": s.total_params,
            "layers": s.num_layers,
            "encoder_layers": s.num_encoder_layers if s.is_encoder_decoder else None,
            "hidden_size": s.hidden_size,
            "heads": s.num_heads,
            "kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "intermediate_size": s.intermediate_size,
            "vocab_size": s.vocab_size,
            "max_positions": s.max_positions,
            "tie_word_embeddings": s.tie_word_embeddings,
            "source": s.source,
        })
    return rows


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*$")
_UNIT = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_size(text: str) -> float:
    """'7b' -> 7e9, '500M' -> 5e8, '1.5B' -> 1.5e9, '3e9'-style plain numbers too."""
    m = _SIZE.match(str(text))
    if m:
        return float(m.group(1)) * _UNIT[m.group(2).lower()]
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a size; give e.g. 500M, 7B or 1.5e9") from None


def filter_rows(rows: list[dict], family: tuple[str, ...] = (), min_params: float | None = None,
                max_params: float | None = None) -> list[dict]:
    """Rows of the given model_types (any of ``family``), with min <= total_params <= max."""
    fams = {f.strip().lower() for f in family if f.strip()}
    return [r for r in rows
            if (not fams or r["model_type"].lower() in fams)
            and (min_params is None or r["total_params"] >= min_params)
            and (max_params is None or r["total_params"] <= max_params)]


def gpu_rows() -> list[dict]:
    """One dict per catalog GPU, in id order; missing fields are None."""
    from ..catalog import gpu_entries
    from ..estimate.comm import interconnects

    platforms = interconnects()
    rows = []
    for gid, e in sorted(gpu_entries().items()):
        mem = e.get("memory_bytes")
        plat = platforms["platforms"].get(e.get("interconnect") or "")
        link = platforms["links"][plat["intra"]] if plat else None
        rows.append({
            "id": e.get("id", gid),
            "name": e.get("name"),
            "vendor": e.get("vendor"),
            "memory_bytes": mem,
            "memory_gib": round(mem / GIB, 1) if isinstance(mem, (int, float)) else None,
            "bf16_tflops": e.get("bf16_tflops"),
            "bandwidth_gb_s": e.get("bandwidth_gb_s"),
            "compute_capability": e.get("compute_capability"),
            "price_usd_per_hour": e.get("price_usd_per_hour"),
            "price_date": e.get("price_date"),
            "source": e.get("source"),
            # several GPUs (issue 13): the platform, its GPU-to-GPU link and NCCL ring bus bandwidth
            "interconnect": e.get("interconnect"),
            "gpu_link": plat["intra"] if plat else None,
            "gpu_link_busbw_gb_s": link["busbw_bytes_per_s"] / 1e9 if link else None,
            "gpus_per_node": plat["gpus_per_node"] if plat else None,
        })
    return rows


def _num(v, fmt: str = "{:g}") -> str:
    return "-" if v is None else fmt.format(v)


@click.command("models")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--family", multiple=True, metavar="MODEL_TYPE",
              help="Only this model_type (e.g. llama, gemma3_text, olmo2); repeat or comma-separate for several.")
@click.option("--min-params", default=None, metavar="SIZE", help="Only models with at least SIZE parameters (500M, 7B).")
@click.option("--max-params", default=None, metavar="SIZE", help="Only models with at most SIZE parameters.")
@click.option("--size", default=None, metavar="SIZE",
              help="Only models within 25 percent of SIZE parameters (e.g. 7B); combines with the bounds above.")
def models_command(fmt, family, min_params, max_params, size):
    """List the built-in model catalog (shapes from each model's published config.json).

    Give a catalog name to --model, or a path to any config.json. Params: unique
    parameters of the base model (a tied lm_head counted once).
    """
    fams = tuple(f for item in family for f in item.split(","))
    if fams:
        from ..catalog import model_names, load_model
        from ..errors import InputError, suggest

        known = sorted({load_model(n).model_type for n in model_names()})
        for f in fams:
            if f.strip() and f.strip().lower() not in known:
                raise InputError(f"--family '{f.strip()}' is no model_type of the catalog{suggest(f.strip(), known)} "
                                 f"(families: {', '.join(known)})")
    lo = parse_size(min_params) if min_params is not None else None
    hi = parse_size(max_params) if max_params is not None else None
    if size is not None:
        target = parse_size(size)
        lo = max(lo or 0.0, 0.75 * target)
        hi = min(hi, 1.25 * target) if hi is not None else 1.25 * target
    rows = filter_rows(model_rows(), fams, lo, hi)
    if not rows and fmt == "table":
        from ..catalog import model_names, load_model

        known = sorted({load_model(n).model_type for n in model_names()})
        click.echo(f"no catalog model matches; families: {', '.join(known)}")
        return
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console

    cells = []
    for r in rows:
        layers = f"{r['encoder_layers']}+{r['layers']}" if r["encoder_layers"] is not None else str(r["layers"])
        cells.append([r["name"], r["model_type"], _human(r["total_params"]), layers, str(r["hidden_size"]),
                      f"{r['heads']}/{r['kv_heads']}", str(r["vocab_size"]),
                      "yes" if r["tie_word_embeddings"] else "no", _repo(r["source"])])
    # (header, justify, priority): at a narrow width the highest numbers are left out, never cut
    cols = (("name", "left", 0), ("type", "left", 0), ("params", "right", 0), ("layers", "right", 1),
            ("hidden", "right", 2), ("heads/kv", "right", 3), ("vocab", "right", 4), ("tied", "center", 5),
            ("source", "left", 6))
    _print_table(Console(), f"{len(rows)} models", cols, cells,
                 "layers: encoder+decoder for encoder-decoder models. 'loraplan models --format json' "
                 "gives exact counts and source URLs.")


@click.command("gpus")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def gpus_command(fmt):
    """List the built-in GPU catalog: memory, dense bf16 TFLOPs, bandwidth, on-demand price.

    Memory is the total the driver reports, in GiB (2^30 bytes). Prices are list prices as of
    the date shown; override them with 'loraplan plan --price ID=USD'.
    """
    rows = gpu_rows()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("the GPU catalog is empty (no loraplan/catalog/gpus/*.json files)")
        return
    from rich.console import Console

    cells = [[r["id"], r["name"] or "-", _num(r["memory_gib"], "{:.1f}"), _num(r["bf16_tflops"]),
              _num(r["bandwidth_gb_s"]), _num(r["price_usd_per_hour"], "{:.2f}"), r["price_date"] or "-",
              f"{r['gpu_link']} {r['gpu_link_busbw_gb_s']:g}" if r.get("gpu_link") else "-"]
             for r in rows]
    cols = (("id", "left", 0), ("name", "left", 4), ("memory\nGiB", "right", 0), ("bf16\nTFLOPs", "right", 1),
            ("bandwidth\nGB/s", "right", 2), ("$/h", "right", 1), ("price\ndate", "left", 3),
            ("GPU link\nGB/s", "left", 5))
    _print_table(Console(), f"{len(rows)} GPUs", cols, cells, "'loraplan gpus --format json' gives every field "
                 "and its source.")


def _print_table(con, title: str, cols, cells: list[list[str]], footer: str) -> None:
    """The table at the console's width: whole columns are left out by priority (render.fit_columns)
    and named, never cut short."""
    from rich import box
    from rich.markup import escape

    from ..render import fit_columns

    t, dropped = fit_columns(con, list(cols), cells, title=title, title_justify="left", box=box.SIMPLE_HEAD,
                             pad_edge=False, padding=(0, 1, 0, 0))
    con.print(t)
    if dropped:
        con.print(f"[dim]not shown at this width: {escape(', '.join(d.replace(chr(10), ' ') for d in dropped))}[/]")
    con.print(footer, style="dim", highlight=False)
