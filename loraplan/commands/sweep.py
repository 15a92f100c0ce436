"""``loraplan sweep``: estimate a grid of setups; write CSV, JSON lines or Parquet."""

from __future__ import annotations

import time

import click

from .options import case_options

#: grids at least this large get a progress bar (evaluation runs at well over 100,000 cases/s)
PROGRESS_MIN_CASES = 500_000


@click.command("sweep")
@case_options(multi=True)
@click.option("--grid", "grid_file", type=click.Path(dir_okay=False), default=None,
              help="TOML/JSON grid: option names as keys (gpu included), a value or a list each; "
                   "command-line options win")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Output file: .csv, .jsonl or .parquet (format from the extension unless --format)")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default=None,
              help="Output format [default: from the --out extension]")
@click.option("--yes", is_flag=True, help="Run grids larger than 100,000 cases")
@click.option("--quiet", is_flag=True, help="No progress bar or summary")
def sweep_command(grid_file, out, fmt, yes, quiet, **opts):
    """Estimate every combination of the given values (the Cartesian product) and write one row each.

    \b
    Example: loraplan sweep --model llama-2-7b,llama-3-8b --quant nf4,bf16 --rank 8:64:x2 \\
             --seq 512:4096:x2 --batch 1,2,4 --gpu l4-24gb,a100-sxm-80gb --out grid.parquet
    Every case option is an axis, the training-stack ones too (--trainer loop,hf,trl
    --mixed-precision no,bf16 --gradient-accumulation 1,4 ...; --lengths is one distribution).
    Rows hold the inputs (the recipe as resolved: unset settings are the trainer's defaults),
    parameter counts, peak allocated / reserved / device-total bytes, fit verdict and headroom,
    and step time; a case that cannot be estimated gets its error in 'error'.
    """
    from ..errors import InputError
    from ..sweep import (MAX_CASES, check_out_path, count_cases, evaluate_table, expand_cases, failed_cases, load_grid,
                         output_format, write_columns)

    fmt = output_format(out, fmt)
    check_out_path(out)
    grids = load_grid(grid_file) if grid_file else None
    n = count_cases(opts, grids)
    if n > MAX_CASES and not yes:
        raise InputError(f"the grid has {n:,} cases, more than {MAX_CASES:,}; narrow it or pass --yes")
    t0 = time.perf_counter()
    table = expand_cases(opts, grids)
    if quiet or len(table) < PROGRESS_MIN_CASES:
        cols = evaluate_table(table)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task("sweep", total=len(table))
            cols = evaluate_table(table, on_progress=lambda done: bar.update(task, completed=done))
    failed, first = failed_cases(cols)
    if failed and failed == len(cols):
        raise InputError(f"none of the {len(cols):,} cases can be estimated: {first}")
    written = write_columns(cols, out, fmt)
    if failed:
        click.echo(f"warning: {failed:,} of {len(cols):,} cases could not be estimated (see the 'error' column), "
                   f"e.g.: {first}", err=True)
    _summary(quiet, written, out, fmt, time.perf_counter() - t0)


def _summary(quiet: bool, written: int, out: str, fmt: str, dt: float) -> None:
    if not quiet:
        click.echo(f"wrote {written:,} rows to {out} ({fmt}) in {dt:.2f} s ({written / dt if dt else 0:,.0f} cases/s)",
                   err=True)
