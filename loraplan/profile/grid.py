"""``--grid FILE``: case grids in TOML or JSON.

Keys are the case option names (``seq`` or ``target-seq``/``target_seq``); values are a
scalar or a list (a list of ``targets`` is several target sets, each a comma string).
A file holds one grid (a table / object) or several: a top-level JSON list, or
``[[grid]]`` tables in TOML (``{"grid": [...]}`` in JSON). Options given on the command line
replace the same key in every grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..spec import PARALLEL_FIELDS, RECIPE_FIELDS

#: grid keys -> case option keys (see loraplan/case.py PARSERS): a profile grid takes: the case's shape, the training stack (spec.RECIPE_FIELDS;
#: without them the profile dropped --reentrant, --gradient-accumulation, ... silently) and the
#: multi-GPU layout (spec.PARALLEL_FIELDS: --strategy, --num-gpus, ...)
CASE_KEYS = ("model", "quant", "double_quant", "rank", "alpha", "dropout", "targets", "optimizer", "batch",
             "seq", "target_seq", "gradient_checkpointing", "attention", "int8_outlier_fraction") + RECIPE_FIELDS \
    + PARALLEL_FIELDS


def load_grid_file(path: str | Path) -> list[dict[str, Any]]:
    """The grids of a TOML/JSON file, case options only (no ``gpu``): see loraplan.sweep.load_grid."""
    from ..sweep import load_grid

    return load_grid(path, CASE_KEYS)


def merge_grids(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Option dicts for expand_grid, one per grid: command-line values (not None / not empty)
    replace the grid's, the rule of every grid command (``loraplan.case.merge_grid``)."""
    from ..case import merge_grid

    return [merge_grid(cli_opts, g, CASE_KEYS) for g in grids or [{}]]
