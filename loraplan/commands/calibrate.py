"""``loraplan calibrate``: profile records -> a per-GPU calibration file (named coefficients only)."""

from __future__ import annotations

import click


@click.command("calibrate")
@click.argument("records", nargs=-1)
@click.option("--gpu", default=None, help="GPU id whose records to use (needed when the records mix GPUs)")
@click.option("--reference/--no-reference", "with_reference", default=None,
              help="Add the shipped H100 reference measurements [default: on when no RECORDS are given]")
@click.option("--only", type=click.Choice(["memory", "time", "all"]), default="all", show_default=True,
              help="Which coefficients to fit")
@click.option("--base", "base_file", type=click.Path(dir_okay=False), default=None,
              help="Start from this calibration file [default: the built-in one for the GPU]")
@click.option("--out", default=None, help="Where to write the calibration [default: calibrations/<gpu-id>.json]")
@click.option("--dry-run", is_flag=True, help="Fit and print; write nothing")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def calibrate_command(records, gpu, with_reference, only, base_file, out, dry_run, fmt):
    """Fit, per GPU, only what physics cannot know: allocator overhead, reserved/allocated
    ratio, CUDA context, kernel efficiencies and host costs of the time model.

    \b
    RECORDS: profiles/<gpu-id>.jsonl files from 'loraplan profile', folders of them, JSON
    reference files, or the word 'reference' (the shipped H100 measurements).
    Default: profiles/*.jsonl plus the reference. Coefficients the records cannot determine
    (e.g. no peak reserved or NVML data) keep their value and are listed as not fitted.
    Use the result with 'loraplan estimate --calibration FILE'.
    """
    from ..calibrate import calibrate, default_calibration_path, write_calibration
    from ..catalog import load_calibration
    from ..measurements import REFERENCE, default_sources, load_measurements, select

    sources = list(records) if records else default_sources(reference=False)
    if with_reference or (with_reference is None and not records):
        sources.append(REFERENCE)
    ms = load_measurements(sources)
    for p in ms.problems:
        click.echo(f"warning: {p}", err=True)
    chosen = select(ms, gpu)
    gid = chosen[0].gpu
    base = load_calibration(gid, base_file) if base_file else None
    parts = ("memory", "time") if only == "all" else (only,)
    res = calibrate(chosen, gid, base=base, parts=parts, sources=ms.files)
    path = None
    if not dry_run:
        path = write_calibration(res, out or default_calibration_path(gid))
    if fmt == "json":
        from ..render import to_json

        click.echo(to_json(res.to_dict()))
    else:
        _print(res, path, len(ms) - len(chosen))


def _print(res, path, skipped: int) -> None:
    from ..calibrate import METRIC_LABELS
    from ..render import console, fit_columns

    con = console()
    con.print(f"[bold]{res.gpu}[/]: {len(res.records)} successful records"
              + (f" ({skipped} other records not used)" if skipped else ""))
    cols = [("coefficient", "left", 0), ("before", "right", 1), ("after", "right", 0), ("records", "right", 2),
            ("how", "left", 3)]
    rows = [[k, _fmt(k, f.before), _fmt(k, f.after) if f.fitted else "[dim]unchanged[/]", str(f.records),
             f.method if f.fitted else f"[dim]{f.method}[/]"] for k, f in res.fits.items()]
    t, dropped = fit_columns(con, cols, rows, title="coefficients", title_justify="left")
    con.print(t)
    cols = [("metric", "left", 0), ("n", "right", 3), ("MAPE before", "right", 1), ("MAPE after", "right", 0),
            ("worst before", "right", 2), ("worst after", "right", 1)]
    rows = []
    for k, b in res.residuals_before.items():
        a = res.residuals_after[k]
        rows.append([METRIC_LABELS.get(k, k), str(b["n"]), f"{100 * b['mape']:.2f}%", f"{100 * a['mape']:.2f}%",
                     f"{100 * b['worst']:+.2f}% ({b['worst_case']})", f"{100 * a['worst']:+.2f}% ({a['worst_case']})"])
    r, more = fit_columns(con, cols, rows, title="fit residuals on these records (signed relative error)",
                          title_justify="left")
    con.print(r)
    if dropped or more:
        con.print(f"[dim]not shown at this width: {', '.join(dropped + more)} (the calibration file has them)[/]")
    if path:
        con.print(f"wrote {path}; use it with: loraplan estimate --gpu {res.gpu} --calibration {path}")


def _fmt(name: str, v: float) -> str:
    if name.endswith("_bytes"):
        return f"{v / 2**20:,.1f} MiB"
    return f"{v:.4g}"


command = calibrate_command
