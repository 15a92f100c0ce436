"""``--grid FILE``: case grids in TOML or JSON.

Keys are the case option names (``seq`` or ``target-seq``/``target_seq``); values are a
scalar or a list (a list of ``targets`` is several target sets, each a comma string).
A file holds one grid (a table / object) or several: a top-level JSON list, or
``[[grid]]`` tables in TOML (``{"grid": [...]}`` in JSON). Options given on the command line
replace the same key in every grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: grid keys -> case option keys (see loraplan/commands/options.py PARSERS)
CASE_KEYS = ("model", "quant", "double_quant", "rank", "alpha", "dropout", "targets", "optimizer", "batch",
             "seq", "target_seq", "gradient_checkpointing", "attention", "int8_outlier_fraction")


def load_grid_file(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read grid file '{p}': {e.strerror}") from None
    if p.suffix.lower() == ".toml":
        try:
            import tomllib  # type: ignore[import-not-found]
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ConfigError(f"reading '{p}' needs Python 3.11+ or 'pip install tomli'; or write the grid as JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"grid file '{p}' is not valid TOML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"grid file '{p}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("grid"), list):
        grids = data["grid"]
    elif isinstance(data, list):
        grids = data
    else:
        grids = [data]
    out = []
    for i, g in enumerate(grids, start=1):
        if not isinstance(g, dict):
            raise ConfigError(f"grid {i} in '{p}' is not a table of option = value(s)")
        norm = {}
        for k, v in g.items():
            key = str(k).strip().lstrip("-").replace("-", "_")
            if key in ("gc", "checkpointing"):
                key = "gradient_checkpointing"
            if key not in CASE_KEYS:
                raise ConfigError(f"grid file '{p}': unknown option '{k}'; known: {', '.join(CASE_KEYS)}")
            if isinstance(v, dict):
                raise ConfigError(f"grid file '{p}': '{k}' must be a value or a list of values")
            norm[key] = v
        out.append(norm)
    return out


def merge_grids(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Option dicts for expand_grid: CLI values (not None / not empty) override grid values."""
    given = {k: v for k, v in cli_opts.items() if k in CASE_KEYS and v is not None and v != ()}
    if not grids:
        return [{k: cli_opts.get(k) for k in CASE_KEYS}]
    out = []
    for g in grids:
        d = {k: None for k in CASE_KEYS}
        for k, v in g.items():
            d[k] = tuple(str(x) for x in v) if k == "targets" and isinstance(v, list) else (
                list(v) if isinstance(v, list) else v)
        d.update(given)
        out.append(d)
    return out
