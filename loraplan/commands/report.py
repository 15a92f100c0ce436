"""``loraplan report``: self-contained HTML + markdown reports (compare, validation)."""

from __future__ import annotations

import warnings

import click

from .options import case_options, trace_timeout_option


@click.group("report")
def report_command():
    """Write a self-contained HTML report (plots embedded) and its markdown twin.

    \b
    report compare     configurations side by side on several GPUs
    report validation  loraplan's estimates vs measured records
    """


@report_command.command("compare")
@case_options(multi=True)
@click.option("--grid", "grid_file", type=click.Path(dir_okay=False), default=None,
              help="Grid file (TOML/JSON) of configurations; options given here replace its keys")
@click.option("--tokens", type=float, default=1e8, show_default=True,
              help="Training tokens of the whole job, for hours and cost")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration file from 'loraplan calibrate' [default: built-in per GPU]")
@click.option("--out", default="reports", show_default=True, help="Folder to write into")
@click.option("--name", default="compare", show_default=True, help="File name stem (<out>/<name>.html, .md)")
def compare_command(grid_file, tokens, calibration_file, out, name, **opts):
    """Compare configurations: give several values to any case option (--quant nf4,bf16
    --rank 8,64 --seq 512:4096:x2) or a --grid file; GPUs with --gpu a,b,c."""
    from ..catalog import load_calibration, load_gpu
    from ..errors import InputError
    from ..report.compare import DEFAULT_GPUS, compare_document, configs_from_cases
    from ..case import expand_grid

    from ..report.document import ensure_writable, require_report_extra

    require_report_extra()
    from ..inputs import finite
    from ..plan import MAX_JOB_TOKENS

    fix = "give the job's training tokens, e.g. --tokens 1e8"
    if not 0 < finite(tokens, "--tokens", fix) <= MAX_JOB_TOKENS:  # finite() refuses NaN, which no comparison catches
        raise InputError(f"--tokens {tokens:g} is not a number of tokens from 0 to {MAX_JOB_TOKENS:.0e}; {fix}")
    ensure_writable(out, name)
    gpu_opt = opts.pop("gpu", None)
    if grid_file:
        from ..sweep import GRID_KEYS, load_grid

        grids = load_grid(grid_file, tuple(k for k in GRID_KEYS if k != "gpu"))  # the case options and the recipe
        given = {k: v for k, v in opts.items() if v not in (None, ())}
        cases = []
        for g in grids:
            merged = dict(g)
            merged.update(given)
            cases += expand_grid(_as_options(merged))
    else:
        cases = expand_grid(opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configs, _ = configs_from_cases(cases)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    gids = [g.strip() for g in (",".join(DEFAULT_GPUS) if gpu_opt is None else gpu_opt).split(",") if g.strip()]
    if not gids:
        raise InputError(f"--gpu {gpu_opt!r} names no GPU; give GPU ids like 'l4-24gb,h100-sxm-80gb' (see 'loraplan gpus')")
    gpus = [load_gpu(g) for g in gids]
    doc, _ = compare_document(configs, gpus, lambda gid: load_calibration(gid, calibration_file), tokens)
    h, m = doc.write(out, name)
    click.echo(f"wrote {h} and {m}")


def _as_options(d: dict) -> dict:
    """Grid-file values (scalars or lists) -> the raw option form expand_grid takes."""
    out = {}
    for k, v in d.items():
        k = k.replace("-", "_")
        if k == "targets":
            out[k] = tuple(v) if isinstance(v, list) else (v,)
        elif isinstance(v, list):
            out[k] = ",".join(str(x) for x in v)
        else:
            out[k] = v
    return out


@report_command.command("validation")
@click.argument("records", nargs=-1)
@click.option("--gpu", default=None, help="Only records of this GPU id (needed when they mix GPUs)")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration file from 'loraplan calibrate' [default: built-in per GPU]")
@click.option("--out", default="reports", show_default=True, help="Folder to write into")
@click.option("--name", default="validation", show_default=True, help="File name stem")
@click.option("--case", "case", default=None,
              help="Only cases whose id contains one of these comma-separated substrings")
@click.option("--trace/--no-trace", "trace", default=False, show_default=True,
              help="Run the meta-device trace for records that have none (~2-8 s per case, torch needed)")
@trace_timeout_option
def validation_command(records, gpu, calibration_file, out, name, case, trace, trace_timeout):
    """Estimates vs measured RECORDS (profiles/*.jsonl, reference files, or 'reference').

    Records with a meta-device trace ('profile --trace', or --trace here) show analytic, trace
    and measured side by side."""
    from ..catalog import load_calibration
    from ..measurements import load_measurements, select
    from ..report.document import ensure_writable, require_report_extra
    from ..report.validation import filter_cases, validate
    from ..report.validation_report import validation_document
    from .validate import traced

    require_report_extra()
    ensure_writable(out, name)
    ms = load_measurements(list(records) or None)
    for p in ms.problems:
        click.echo(f"warning: {p}", err=True)
    items = filter_cases(select(ms, gpu, need_ok=False), case)
    select(items, need_ok=True)
    if trace:
        items = traced(items, trace_timeout)
    v = validate(items, lambda gid: load_calibration(gid, calibration_file),
                 calibration_label=calibration_file or "built-in")
    doc = validation_document(v, sources=[_short_path(f) for f in ms.files])
    h, m = doc.write(out, name)
    click.echo(f"wrote {h} and {m}")


def _short_path(p: str) -> str:
    from pathlib import Path

    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        parts = Path(p).parts
        return "/".join(parts[parts.index("loraplan"):]) if "loraplan" in parts else p


command = report_command
