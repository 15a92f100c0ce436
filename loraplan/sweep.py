"""Evaluate a grid of setups (the product of every option's values) fast, as flat rows.

Library code: builds the case list, evaluates it, returns rows (dicts) or writes them; never
prints. ``loraplan sweep`` adds the progress bar and the ``--yes`` guard.

Speed: models are resolved once per name; the step-time work (FLOPs, bytes, calls) is counted
once per (model, LoRA, training setup) and reused for every GPU; identical cases are
evaluated once. The memory estimate is called once per (case, GPU).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import ConfigError, InputError

#: more cases than this need ``--yes`` (or ``confirm=True``)
MAX_CASES = 100_000

#: keys a grid may hold: the case options plus gpu
GRID_KEYS = ("model", "quant", "double_quant", "rank", "alpha", "dropout", "targets", "optimizer", "batch",
             "seq", "target_seq", "gradient_checkpointing", "attention", "int8_outlier_fraction", "gpu")
_ALIASES = {"gc": "gradient_checkpointing", "checkpointing": "gradient_checkpointing", "gpus": "gpu"}

#: output formats by file extension
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
           ".pq": "parquet"}


def load_grid(path: str | Path) -> list[dict[str, Any]]:
    """A TOML or JSON grid file -> list of grids (option -> value or list of values).

    One table/object is one grid; ``[[grid]]`` tables (TOML) or a top-level list / ``{"grid":
    [...]}`` (JSON) hold several, whose cases are concatenated.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read grid file '{p}': {e.strerror}") from None
    if p.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"grid file '{p}' is not valid TOML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"grid file '{p}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                              f"a .toml file is read as TOML") from None
    grids = data["grid"] if isinstance(data, dict) and isinstance(data.get("grid"), list) else (
        data if isinstance(data, list) else [data])
    if not grids:
        raise ConfigError(f"grid file '{p}' holds no grid; give option = value(s) pairs, e.g. seq = [512, 1024]")
    out = []
    for i, g in enumerate(grids, start=1):
        if not isinstance(g, dict):
            raise ConfigError(f"grid {i} in '{p}' is not a table of option = value(s)")
        norm: dict[str, Any] = {}
        for k, v in g.items():
            key = str(k).strip().lstrip("-").replace("-", "_")
            key = _ALIASES.get(key, key)
            if key not in GRID_KEYS:
                from .errors import suggest

                raise ConfigError(f"grid file '{p}': unknown option '{k}'{suggest(key, GRID_KEYS)}; "
                                  f"known: {', '.join(GRID_KEYS)}")
            if isinstance(v, dict):
                raise ConfigError(f"grid file '{p}': '{k}' must be a value or a list of values")
            if isinstance(v, list) and not v:
                raise InputError(f"grid file '{p}': '{k}' is an empty list, so the grid has no cases; "
                                 f"give at least one value or leave '{k}' out")
            norm[key] = v
        out.append(norm)
    return out


def _as_option(key: str, v: Any):
    """A grid value -> what expand_grid takes: comma string / list of strings (targets: a tuple)."""
    if key == "targets":
        if isinstance(v, list):
            return tuple(",".join(x) if isinstance(x, list) else str(x) for x in v)
        return (str(v),)
    if isinstance(v, list):
        return [x if isinstance(x, bool) else str(x) for x in v]
    return v if isinstance(v, bool) else str(v)


def build_cases(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None = None) -> list[dict]:
    """Case dicts (one per grid point, gpu included). Command-line values win over the grid's,
    except that a key set differently in both is contradictory and raises InputError."""
    from .commands.options import DEFAULTS, expand_grid

    given = {k: v for k, v in cli_opts.items() if k in GRID_KEYS and v is not None and v != ()}
    grids = grids or [{}]
    cases: list[dict] = []
    for g in grids:
        opts = {k: None for k in GRID_KEYS}
        for k, v in g.items():
            if k in given:
                raise InputError(f"--{k.replace('_', '-')} is given both on the command line and in the grid "
                                 f"file ({v!r}); keep one")
            opts[k] = _as_option(k, v)
        opts.update(given)
        gpus_raw = opts.pop("gpu")
        if gpus_raw is None:
            gpus = [DEFAULTS["gpu"]]
        else:
            items = gpus_raw if isinstance(gpus_raw, list) else str(gpus_raw).split(",")
            gpus = [str(x).strip() for x in items if str(x).strip()]
            if not gpus:
                raise InputError("--gpu is empty; give GPU ids like 'l4-24gb,h100-sxm-80gb' (see 'loraplan gpus')")
        _check_contradictions(opts)
        for c in expand_grid(opts):
            for gpu in gpus:
                cases.append({**c, "gpu": gpu})
    if not cases:
        raise InputError("the grid has no cases; give at least one value for every option")
    # unknown names stop the sweep up front (one line, with suggestions), not one row at a time
    from .catalog import load_gpu, load_model

    for gid in {c["gpu"] for c in cases}:
        load_gpu(gid)
    for name in {c.get("model") or DEFAULTS["model"] for c in cases}:
        load_model(str(name))
    return cases


def count_cases(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None = None) -> int:
    """Number of cases without building them (for the --yes guard on huge grids)."""
    from .commands.options import split_values

    total = 0
    for g in grids or [{}]:
        n = 1
        for k in GRID_KEYS:
            v = cli_opts.get(k) if cli_opts.get(k) not in (None, ()) else g.get(k)
            if v is None:
                continue
            if k == "targets":
                n *= len(v) if isinstance(v, (list, tuple)) else 1
            elif k == "gpu":
                n *= len([x for x in (",".join(v) if isinstance(v, list) else str(v)).split(",") if x.strip()])
            else:
                n *= len(split_values(k, _as_option(k, v)))
        total += n
    return total


def _check_contradictions(opts: dict[str, Any]) -> None:
    from .commands.options import split_values

    quants = split_values("quant", opts.get("quant"))
    if opts.get("double_quant") not in (None, False, "false", "False") and not {"nf4", "fp4"} & set(quants):
        raise InputError(f"contradictory grid: double_quant is on but no 4-bit quant is swept "
                         f"(quant = {', '.join(quants)}); add nf4/fp4 or drop double_quant")
    if opts.get("int8_outlier_fraction") is not None and "int8" not in quants:
        raise InputError(f"contradictory grid: int8_outlier_fraction is set but int8 is not swept "
                         f"(quant = {', '.join(quants)}); add int8 or drop int8_outlier_fraction")


def evaluate(cases: Iterable[dict], *, estimate_fn: Callable | None = None,
             on_progress: Callable[[int], None] | None = None) -> Iterator[dict]:
    """One flat row per case: inputs, parameter counts, memory, fit, time. A case that cannot be
    resolved (e.g. a target module the model lacks) yields a row with ``error`` set."""
    from .catalog import load_calibration, load_gpu, load_model
    from .commands.options import resolve_case
    from .estimate.time import coefficients, step_time, step_work

    if estimate_fn is None:
        from .estimate.api import estimate as estimate_fn
    models: dict[str, Any] = {}
    gpus: dict[str, Any] = {}
    cals: dict[str, Any] = {}
    coefs: dict[str, dict] = {}
    works: dict[tuple, Any] = {}
    done: dict[tuple, dict] = {}
    for i, case in enumerate(cases, start=1):
        key = tuple(sorted((k, str(v)) for k, v in case.items()))
        if key in done:
            row = done[key]
        else:
            row = {k: case.get(k) for k in GRID_KEYS}
            try:
                name = str(case.get("model") or "")
                if name not in models:
                    models[name] = load_model(name) if name else None
                gid = str(case["gpu"])
                if gid not in gpus:
                    gpus[gid] = load_gpu(gid)
                    cals[gid] = load_calibration(gid)
                    coefs[gid] = coefficients(cals[gid])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model, lora, train = resolve_case(case, model=models[name])
                wkey = (name, lora, train)
                if wkey not in works:
                    works[wkey] = step_work(model, lora, train)
                gpu = gpus[gid]
                est = estimate_fn(model, lora, train, gpu, cals[gid], with_time=False)
                t = step_time(works[wkey], gpu, coefs[gid])
                m = est.memory
                row.update(
                    model=model.name, quant=train.quant, double_quant=train.double_quant, rank=lora.rank,
                    alpha=lora.alpha, dropout=lora.dropout, targets=",".join(lora.targets),
                    optimizer=train.optimizer, batch=train.batch, seq=train.seq, target_seq=train.target_seq,
                    gradient_checkpointing=train.gradient_checkpointing, attention=train.attention,
                    int8_outlier_fraction=train.int8_outlier_fraction, gpu=gpu.id,
                    trainable_params=est.params.trainable, total_params=est.params.total,
                    peak_allocated_bytes=m.peak_allocated_bytes, peak_reserved_bytes=m.peak_reserved_bytes,
                    device_total_bytes=m.device_total_bytes, peak_moment=m.peak_moment,
                    gpu_memory_bytes=gpu.memory_bytes, fits=m.device_total_bytes <= gpu.memory_bytes,
                    headroom_bytes=gpu.memory_bytes - m.device_total_bytes,
                    step_s=t.step_s, tokens_per_s=t.tokens_per_s, bound=t.bound, error=None,
                )
            except Exception as e:  # noqa: BLE001 - a bad case is a row, not the end of the sweep
                from .errors import LoraplanError

                if not isinstance(e, LoraplanError):
                    raise
                row["error"] = str(e)
            done[key] = row
        if on_progress is not None:
            on_progress(i)
        yield row


COLUMNS = list(GRID_KEYS) + ["trainable_params", "total_params", "peak_allocated_bytes", "peak_reserved_bytes",
                             "device_total_bytes", "peak_moment", "gpu_memory_bytes", "fits", "headroom_bytes",
                             "step_s", "tokens_per_s", "bound", "error"]


def output_format(path: str | Path, fmt: str | None = None) -> str:
    if fmt:
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"cannot tell the format of '{path}' from its extension; use .csv, .jsonl or .parquet, "
                         f"or give --format csv|jsonl|parquet")
    return FORMATS[suffix]


def write_rows(rows: Iterable[dict], path: str | Path, fmt: str) -> int:
    """Write rows to ``path`` as csv, jsonl or parquet (parquet needs pandas + pyarrow). Returns the count."""
    p = Path(path)
    if fmt == "parquet":
        try:
            import pandas as pd
        except ModuleNotFoundError:
            raise InputError("writing Parquet needs pandas and pyarrow: pip install 'loraplan[report]' pyarrow; "
                             "or write .csv / .jsonl") from None
        df = pd.DataFrame(list(rows), columns=COLUMNS)
        try:
            df.to_parquet(p, index=False)
        except ImportError as e:
            raise InputError(f"writing Parquet needs pyarrow or fastparquet ({e}); pip install pyarrow, "
                             f"or write .csv / .jsonl") from None
        return len(df)
    n = 0
    with p.open("w", newline="") as f:
        if fmt == "csv":
            import csv

            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow(r)
                n += 1
        elif fmt == "jsonl":
            for r in rows:
                f.write(json.dumps({k: r.get(k) for k in COLUMNS}) + "\n")
                n += 1
        else:
            raise InputError(f"--format '{fmt}' is not one of csv, jsonl, parquet")
    return n


def sweep(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None = None, *, confirm: bool = False,
          limit: int = MAX_CASES) -> list[dict]:
    """Build and evaluate the grid; refuses more than ``limit`` cases unless ``confirm``."""
    n = count_cases(cli_opts, grids)
    if n > limit and not confirm:
        raise InputError(f"the grid has {n:,} cases, more than {limit:,}; narrow it or pass --yes")
    return list(evaluate(build_cases(cli_opts, grids)))


def rate_per_s(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.inf
