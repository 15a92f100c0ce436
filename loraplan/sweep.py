"""Evaluate a grid of setups (the product of every option's values) fast, as columns.

Library code: builds the cases, evaluates them, returns columns or rows (dicts) or writes them;
never prints. ``loraplan sweep`` adds the progress bar and the ``--yes`` guard.

Speed (well over 100,000 cases per second on two CPU cores), with the estimator's own
formulas and no copy of them here:

- the grid is kept as columns (``CaseTable``): for every option its distinct values (levels)
  and, per case, the index of its value; no dict is built per case;
- each distinct value is parsed and validated once, by ``resolve_case`` itself on a probe
  case; a case whose value is invalid (or whose targets the model lacks) becomes a row with
  ``error`` set, as before;
- cases are grouped by what is not a number (model, targets, quantization, optimizer,
  checkpointing, attention, the recipe's settings (trainer, mixed precision, dtypes, padding,
  loss, ...), the multi-GPU layout (strategy, GPU and node counts, FSDP options: a group's step
  time gains its engine's communication, ``estimate.comm.with_communication``), GPU, int8 outlier
  fraction given or not), and each group is one call of the
  estimator's functions on numpy arrays of its numbers (batch, sequence, target sequence, rank,
  dropout, outlier fraction, and the recipe's gradient_accumulation, max_grad_norm and
  checkpoint_every_n_layers: arrays where they vary within the group, else Python numbers):
  ``memory.moments`` (the ledger), ``params.count_params``, ``time.step_work`` and
  ``time.step_time``, with the recipe resolved (``trainers.resolve_recipe``) as ``estimate()``
  reads it;
- outputs are written from the columns (pandas for CSV and Parquet).

``evaluate_each`` (one ``estimate()`` per case) is the reference the vectorized path is tested
against: identical bytes, step time to 1e-9.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .case import grid_option as _as_option
from .case import CHECK_ORDER
from .errors import ConfigError, InputError
from .spec import PARALLEL_FIELDS, RECIPE_FIELDS

#: more cases than this need ``--yes`` (or ``confirm=True``)
MAX_CASES = 100_000

#: keys a grid may hold: the case options, the training stack (``spec.RECIPE_FIELDS``; ``lengths`` is
#: one value, a length distribution, not an axis: ``case.SINGLE_VALUED``), the multi-GPU layout
#: (``spec.PARALLEL_FIELDS``: ``--strategy ddp,fsdp --num-gpus 1,2,4``) and gpu
GRID_KEYS = ("model", "quant", "double_quant", "rank", "alpha", "dropout", "targets", "optimizer", "batch",
             "seq", "target_seq", "gradient_checkpointing", "attention", "int8_outlier_fraction", *RECIPE_FIELDS,
             *PARALLEL_FIELDS, "gpu")
_ALIASES = {"gc": "gradient_checkpointing", "checkpointing": "gradient_checkpointing", "gpus": "gpu"}

#: output formats by file extension
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
           ".pq": "parquet"}

COLUMNS = list(GRID_KEYS) + ["trainable_params", "total_params", "peak_allocated_bytes", "peak_reserved_bytes",
                             "device_total_bytes", "peak_moment", "gpu_memory_bytes", "fits", "headroom_bytes",
                             "step_s", "tokens_per_s", "bound", "error"]


def _grid_scalar(x: Any, key: str) -> bool:
    """A grid value: a string, a finite number or a boolean (targets: also a list of strings;
    lengths: token counts, the list being one value)."""
    if key in ("model", "gpu"):
        return isinstance(x, str)
    if key == "lengths":
        return (isinstance(x, str) or isinstance(x, int)) and not isinstance(x, bool)
    if isinstance(x, (str, bool)):
        return True
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    return key == "targets" and isinstance(x, list) and bool(x) and all(isinstance(t, str) for t in x)


def load_grid(path: str | Path, keys: tuple[str, ...] = GRID_KEYS) -> list[dict[str, Any]]:
    """A TOML or JSON grid file -> list of grids (option -> value or list of values).

    ``keys`` are the options a grid may name (profile and report take no ``gpu`` key).

    One table/object is one grid; ``[[grid]]`` tables (TOML) or a top-level list / ``{"grid":
    [...]}`` (JSON) hold several, whose cases are concatenated.
    """
    from .inputs import check_depth, parse_json, read_text_file

    p = Path(path)
    hint = "give a TOML or JSON grid of option = value(s), e.g. seq = [512, 1024]"
    text = read_text_file(p, "grid file", hint)
    if p.suffix.lower() == ".toml":
        import tomllib

        check_depth(text, "grid file", str(p), hint)  # brackets outside strings: an upper bound for TOML
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"grid file '{p}' is not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"grid file '{p}' nests too deep; {hint}") from None
    else:
        data = parse_json(text, "grid file", str(p), "a .toml file is read as TOML")
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
            if key not in keys:
                from .errors import suggest

                raise ConfigError(f"grid file '{p}': unknown option '{k}'{suggest(key, keys)}; "
                                  f"known: {', '.join(keys)}")
            if isinstance(v, dict):
                raise ConfigError(f"grid file '{p}': '{k}' must be a value or a list of values")
            if isinstance(v, list) and not v:
                raise InputError(f"grid file '{p}': '{k}' is an empty list, so the grid has no cases; "
                                 f"give at least one value or leave '{k}' out")
            for x in (v if isinstance(v, list) else [v]):
                if not _grid_scalar(x, key):
                    raise ConfigError(f"grid file '{p}': '{k}' holds {json.dumps(x)[:40]}, which is not a value "
                                      f"(a string, a finite number or true/false); fix the grid")
            norm[key] = v
        out.append(norm)
    return out


# ---------------------------------------------------------------------------------------------
# Cases as columns
# ---------------------------------------------------------------------------------------------


def _level_key(v) -> tuple:
    """Dict key of one option value: by type too, so True, 1 and 1.0 stay distinct levels."""
    try:
        hash(v)
    except TypeError:
        return ("<unhashable>", repr(v))
    return (type(v), v)


class CaseTable:
    """The cases of a sweep as columns.

    For every option of GRID_KEYS: ``levels[key]``, the values it takes, and ``codes[key]``, a
    numpy int array holding per case the index of its value. ``len()`` is the number of cases;
    iterating yields one case dict at a time (GRID_KEYS order), as ``build_cases`` lists them.
    """

    def __init__(self, levels: dict[str, list], codes: dict[str, Any], n: int):
        self.levels, self.codes, self.n = levels, codes, n

    def __len__(self) -> int:
        return self.n

    def case(self, i: int) -> dict:
        return {k: self.levels[k][int(self.codes[k][i])] for k in GRID_KEYS}

    def __iter__(self) -> Iterator[dict]:
        lv = [self.levels[k] for k in GRID_KEYS]
        for idx in zip(*(self.codes[k].tolist() for k in GRID_KEYS)):
            yield {k: l[j] for k, l, j in zip(GRID_KEYS, lv, idx)}

    def to_dicts(self) -> list[dict]:
        return list(self)

    @classmethod
    def product(cls, values: dict[str, list]) -> "CaseTable":
        """The Cartesian product of each key's values, the first key slowest (itertools.product order)."""
        import numpy as np

        sizes = [len(values[k]) for k in GRID_KEYS]
        n = math.prod(sizes)
        codes = {}
        inner = n
        for k, size in zip(GRID_KEYS, sizes):
            if n == 0:
                codes[k] = np.zeros(0, dtype=np.int32)
                continue
            inner //= size
            codes[k] = np.tile(np.repeat(np.arange(size, dtype=np.int32), inner), n // (inner * size))
        return cls({k: list(values[k]) for k in GRID_KEYS}, codes, n)

    @classmethod
    def concat(cls, tables: list["CaseTable"]) -> "CaseTable":
        """Cases of several tables, one after the other; equal values share one level."""
        import numpy as np

        if len(tables) == 1:
            return tables[0]
        levels: dict[str, list] = {}
        codes: dict[str, Any] = {}
        for k in GRID_KEYS:
            index: dict[tuple, int] = {}
            merged: list = []
            parts = []
            for t in tables:
                remap = []
                for v in t.levels[k]:
                    key = _level_key(v)
                    if key not in index:
                        index[key] = len(merged)
                        merged.append(v)
                    remap.append(index[key])
                parts.append(np.asarray(remap, dtype=np.int32)[t.codes[k]] if t.n else np.zeros(0, np.int32))
            levels[k] = merged
            codes[k] = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return cls(levels, codes, sum(t.n for t in tables))

    @classmethod
    def from_dicts(cls, cases: Iterable[dict]) -> "CaseTable":
        """Case dicts (option -> value; a missing option is None) -> a CaseTable."""
        import numpy as np

        cases = cases if isinstance(cases, list) else list(cases)
        levels: dict[str, list] = {}
        codes: dict[str, Any] = {}
        for k in GRID_KEYS:
            index: dict[tuple, int] = {}
            vals: list = []
            out = []
            for c in cases:
                v = c.get(k)
                key = _level_key(v)
                j = index.get(key)
                if j is None:
                    j = index[key] = len(vals)
                    vals.append(v)
                out.append(j)
            levels[k] = vals
            codes[k] = np.asarray(out, dtype=np.int32)
        return cls(levels, codes, len(cases))


def _grid_opts(given: dict[str, Any], g: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """One grid's options (command line merged in) and its GPU ids."""
    from .case import DEFAULTS, merge_grid

    opts = merge_grid(given, g, GRID_KEYS)  # the command line wins, as in profile --grid
    gpus_raw = opts.pop("gpu")
    if gpus_raw is None:
        gpus = [DEFAULTS["gpu"]]
    else:
        items = gpus_raw if isinstance(gpus_raw, list) else str(gpus_raw).split(",")
        gpus = [str(x).strip() for x in items if str(x).strip()]
        if not gpus:
            raise InputError("--gpu is empty; give GPU ids like 'l4-24gb,h100-sxm-80gb' (see 'loraplan gpus')")
    _check_contradictions(opts)
    return opts, gpus


def expand_cases(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None = None) -> CaseTable:
    """The grid's cases as a CaseTable (gpu the fastest-varying option). Command-line values win
    over the grid's (``loraplan.case.merge_grid``).
    Every option value is parsed once (``split_values``); unknown model and GPU names stop the
    sweep here, with suggestions, rather than one row at a time."""
    from .case import DEFAULTS, split_values

    given = {k: v for k, v in cli_opts.items() if k in GRID_KEYS and v is not None and v != ()}
    tables = []
    for g in grids or [{}]:
        opts, gpus = _grid_opts(given, g)
        values = {k: split_values(k, opts.get(k)) for k in GRID_KEYS if k != "gpu"}
        values["gpu"] = gpus
        _check_levels(values)
        tables.append(CaseTable.product(values))
    table = CaseTable.concat(tables)
    if not len(table):
        raise InputError("the grid has no cases; give at least one value for every option")
    from .catalog import load_gpu, load_model

    for gid in table.levels["gpu"]:
        load_gpu(str(gid))
    for name in {v or DEFAULTS["model"] for v in table.levels["model"]}:
        load_model(str(name))
    return table


def _check_levels(values: dict[str, list]) -> None:
    """Refuse a value that no case could use (rank 0, dropout inf, targets '*', an empty name):
    a typo in one option must stop the sweep with one line, not fill the output with error
    rows. What depends on the combination (targets a model lacks) stays a row's error."""
    from .case import CHECK_ORDER
    from .spec import check_value
    from .targets import parse_targets

    for k in CHECK_ORDER + ("alpha",) + PARALLEL_FIELDS:
        for v in values.get(k, ()):
            if v is not None:
                check_value(k, v)
    for t in values.get("targets", ()):
        if t is not None:
            parse_targets(t)
    for k in ("model", "gpu"):
        for v in values.get(k, ()):
            if v is not None and not str(v).strip():
                raise InputError(f"--{k} has an empty name; give {'catalog names' if k == 'model' else 'GPU ids'} "
                                 f"(see 'loraplan {k}s')")


def failed_cases(cols: "Columns") -> tuple[int, str | None]:
    """(number of rows with an error, the first error message)."""
    errs = [e for e in cols.values("error") if e]
    return len(errs), (errs[0] if errs else None)


def check_out_path(path: str | Path) -> Path:
    """``path`` as a sweep output: its folder exists and is a folder, and it is not itself a folder.
    InputError naming the path and the fix otherwise (checked before any case is evaluated)."""
    p = Path(path)
    if not str(path).strip():
        raise InputError("--out is empty; give a file such as grid.csv, grid.jsonl or grid.parquet")
    try:
        if p.is_dir():
            raise InputError(f"--out '{p}' is a folder; give a file in it, e.g. {p / 'grid.csv'}")
        parent = p.parent
        if not parent.exists():
            raise InputError(f"--out '{p}': folder '{parent}' does not exist; create it first or choose another path")
        if not parent.is_dir():
            raise InputError(f"--out '{p}': '{parent}' is not a folder; choose another path")
    except OSError as e:
        raise InputError(f"--out '{p}' is not a usable path ({e.strerror}); choose another path") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"--out '{p}': folder '{parent}' is not writable; choose another path")
    return p


def build_cases(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None = None) -> list[dict]:
    """Case dicts (one per grid point, gpu included): ``expand_cases`` as a list of dicts."""
    return expand_cases(cli_opts, grids).to_dicts()


def count_cases(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None = None) -> int:
    """Number of cases without building them (for the --yes guard on huge grids)."""
    from .case import split_values

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
    """An option no point of the grid uses (double quant with no 4-bit quant swept, ...):
    ``case.check_grid_options``, the rule of every grid command."""
    from .case import check_grid_options

    check_grid_options(opts)


# ---------------------------------------------------------------------------------------------
# Results as columns
# ---------------------------------------------------------------------------------------------


class Columns:
    """Sweep results: one numpy array per column of COLUMNS (object arrays hold strings / None),
    and for typed columns a mask of the cells that are None (``masks``)."""

    def __init__(self, data: dict[str, Any], masks: dict[str, Any]):
        self.data, self.masks = data, masks
        self.n = len(next(iter(data.values()))) if data else 0

    def __len__(self) -> int:
        return self.n

    def values(self, name: str) -> list:
        """One column as a list of Python values (None where masked)."""
        vals = self.data[name].tolist()
        m = self.masks.get(name)
        if m is not None and m.any():
            vals = [None if k else v for v, k in zip(vals, m.tolist())]
        return vals

    def rows(self) -> Iterator[dict]:
        cols = [self.values(c) for c in COLUMNS]
        for t in zip(*cols):
            yield dict(zip(COLUMNS, t))

    def to_frame(self, uniform: bool = False):
        """A pandas DataFrame (nullable Int64 / Float64 / boolean columns where a cell is None).

        ``uniform``: a column that mixes types (an error row's raw value, e.g. rank 'x' among
        ints) is written as strings, as Parquet needs one type per column."""
        import pandas as pd

        out = {}
        for c in COLUMNS:
            a, m = self.data[c], self.masks.get(c)
            if m is None or not m.any():
                out[c] = a
            elif a.dtype.kind == "i":
                out[c] = pd.arrays.IntegerArray(a, m)
            elif a.dtype.kind == "f":
                out[c] = pd.arrays.FloatingArray(a, m)
            elif a.dtype.kind == "b":
                out[c] = pd.arrays.BooleanArray(a, m)
            else:
                a = a.copy()
                a[m] = None
                out[c] = a
            if uniform and a.dtype == object and len({type(v) for v in a.tolist()} - {type(None)}) > 1:
                out[c] = _obj_array([None if v is None else str(v) for v in a.tolist()])
        return pd.DataFrame(out, columns=COLUMNS, copy=False)


#: the recipe's numbers (arrays in a group, as batch and seq); its other fields group the cases
_RECIPE_NUMBERS = ("gradient_accumulation", "max_grad_norm", "checkpoint_every_n_layers")
#: the recipe's other fields: one value per group, written per column after the groups
_RECIPE_CELLS = tuple(k for k in RECIPE_FIELDS if k not in _RECIPE_NUMBERS)
#: options resolved once per group (not numbers), and the numbers, in resolve_case's check order
_STRUCTURAL = ("model", "quant", "double_quant", "targets", "optimizer", "gradient_checkpointing", "attention",
               *_RECIPE_CELLS, *PARALLEL_FIELDS)
_NUMERIC = CHECK_ORDER
_INT_COLUMNS = ("rank", "batch", "seq", "target_seq", "gradient_accumulation", "checkpoint_every_n_layers",
                "num_gpus", "nodes",
                "trainable_params", "total_params", "peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes",
                "gpu_memory_bytes", "headroom_bytes")
_FLOAT_COLUMNS = ("alpha", "dropout", "int8_outlier_fraction", "max_grad_norm", "step_s", "tokens_per_s")
_BOOL_COLUMNS = ("double_quant", "gradient_checkpointing", "prepare_kbit", "reentrant", "checkpoint_offload", "fits")
_PY_TYPE = {"i": int, "f": float, "b": bool}


def evaluate_table(table: CaseTable, on_progress: Callable[[int], None] | None = None) -> Columns:
    """Every case of ``table`` -> Columns (COLUMNS), the same values ``evaluate_each`` gives.

    ``on_progress(done)`` is called after each group of cases with the number evaluated so far."""
    import numpy as np

    from .catalog import load_calibration, load_gpu, load_model
    from .case import DEFAULTS, PARSERS
    from .errors import LoraplanError

    n, L, C = len(table), table.levels, table.codes
    messages: list[str] = []
    msg_index: dict[str, int] = {}

    def msg(e: Exception) -> int:
        text = str(e)
        if text not in msg_index:
            msg_index[text] = len(messages)
            messages.append(text)
        return msg_index[text]

    # ---- each distinct value once: models, GPUs, parsing, range checks ----
    models: list = []
    model_err = []
    for lv in L["model"]:
        try:
            models.append(load_model(DEFAULTS["model"] if lv is None else str(lv)))
            model_err.append(-1)
        except LoraplanError as e:
            models.append(None)
            model_err.append(msg(e))
    gpus: list = []
    gpu_err = []
    from .estimate.time import coefficients

    for lv in L["gpu"]:
        try:
            g = load_gpu(str(lv))
            cal = load_calibration(str(lv))
            gpus.append((g, cal, coefficients(cal)))
            gpu_err.append(-1)
        except LoraplanError as e:
            gpus.append(None)
            gpu_err.append(msg(e))
    parsed: dict[str, list] = {}
    parse_err: dict[str, list] = {}
    for k in PARSERS:
        if k in ("model", "gpu") or k not in L:
            continue
        vals, errs = [], []
        for lv in L[k]:
            try:
                vals.append(DEFAULTS.get(k) if lv is None else PARSERS[k](lv))
                errs.append(-1)
            except LoraplanError as e:
                vals.append(None)
                errs.append(msg(e))
        parsed[k], parse_err[k] = vals, errs
    probe_model = next((m for m in models if m is not None), None)
    value_err: dict[str, list] = {}
    alpha_default = []  # per rank level: the alpha resolve_case gives when none is set (2 x rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in _NUMERIC:
            errs = []
            for j, lv in enumerate(L[k]):
                e_id, alpha = -1, 0.0
                if parse_err[k][j] < 0 and (lv is not None or k == "rank") and probe_model is not None:
                    try:
                        _, lora, _ = _resolve({k: lv, "targets": "all-linear"}, probe_model)
                        alpha = lora.alpha
                    except LoraplanError as e:
                        e_id = msg(e)
                errs.append(e_id)
                if k == "rank":
                    alpha_default.append(alpha)
            value_err[k] = errs

    # ---- per case: the first error in resolve order (model, GPU, parsing, ranges) ----
    err = np.full(n, -1, dtype=np.int64)
    per_level = [("model", model_err), ("gpu", gpu_err)]
    per_level += [(k, parse_err[k]) for k in PARSERS if k in parse_err]
    per_level += [(k, value_err[k]) for k in _NUMERIC]
    for k, errs in reversed(per_level):
        e = np.asarray(errs, dtype=np.int64)
        if (e >= 0).any():
            e = e[C[k]]
            hit = e >= 0
            err[hit] = e[hit]

    # ---- per level numbers (defaults for None; 0 where the value is an error) ----
    def num(k, dtype, default=0):
        return np.asarray([default if v is None else v for v in parsed[k]], dtype=dtype)

    def none_flag(k):
        return np.asarray([v is None for v in L[k]], dtype=bool)

    rank_v, batch_v, seq_v = num("rank", np.int64), num("batch", np.int64), num("seq", np.int64)
    dropout_v, alpha_v = num("dropout", np.float64), num("alpha", np.float64)
    ts_v, frac_v = num("target_seq", np.int64), num("int8_outlier_fraction", np.float64)
    alpha_none, ts_none, frac_none = none_flag("alpha"), none_flag("target_seq"), none_flag("int8_outlier_fraction")
    alpha_def = np.asarray(alpha_default, dtype=np.float64)
    # the recipe's numbers per level; max_grad_norm None (the trainer's default) is filled per group
    recipe_v = {"gradient_accumulation": num("gradient_accumulation", np.int64, 1),
                "checkpoint_every_n_layers": num("checkpoint_every_n_layers", np.int64, 1),
                "max_grad_norm": num("max_grad_norm", np.float64), "max_grad_norm_none": none_flag("max_grad_norm")}

    # ---- output columns ----
    data: dict[str, Any] = {}
    for c in COLUMNS:
        if c in _INT_COLUMNS:
            data[c] = np.zeros(n, dtype=np.int64)
        elif c in _FLOAT_COLUMNS:
            data[c] = np.zeros(n, dtype=np.float64)
        elif c in _BOOL_COLUMNS:
            data[c] = np.zeros(n, dtype=bool)
        else:
            data[c] = np.full(n, None, dtype=object)
    none = {c: np.zeros(n, dtype=bool) for c in ("target_seq", "int8_outlier_fraction")}

    # ---- groups: equal non-numeric options and GPU; one array evaluation each ----
    valid = np.flatnonzero(err < 0)
    done = 0
    if len(valid):
        key = np.zeros(len(valid), dtype=np.int64)
        span = 1
        parts = [(C[k][valid], len(L[k])) for k in _STRUCTURAL + ("gpu",) if len(L[k]) > 1]  # one level: code 0
        parts.append((frac_none[C["int8_outlier_fraction"][valid]].astype(np.int64), 2))
        for codes, size in parts:
            if span * size > 1 << 40:
                _, key = np.unique(key, return_inverse=True)
                span = int(key.max()) + 1
            key = key * size + codes
            span *= size
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        bounds = np.flatnonzero(np.diff(sorted_key)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(order)]))
        probes: dict[tuple, Any] = {}
        probe_list: list[_Group] = []
        probe_of = np.full(n, -1, dtype=np.int64)  # per case: its group's probe (the recipe cells come from it)
        for a, b_ in zip(starts.tolist(), ends.tolist()):
            idx = valid[order[a:b_]]
            i0 = int(idx[0])
            given_frac = not frac_none[C["int8_outlier_fraction"][i0]]
            skey = tuple(int(C[k][i0]) for k in _STRUCTURAL) + (given_frac,)
            probe = probes.get(skey)
            if probe is None:
                case = {k: L[k][skey[j]] for j, k in enumerate(_STRUCTURAL)}
                case["int8_outlier_fraction"] = 0.0 if given_frac else None
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        probe = _Group(*_resolve(case, models[skey[0]]))
                    probe.index = len(probe_list)
                    probe_list.append(probe)
                except LoraplanError as e:
                    probe = msg(e)
                probes[skey] = probe
            if not isinstance(probe, int):
                gpu_msg = _gpu_refusal(probe, gpus[int(C["gpu"][i0])], msg)
                if gpu_msg is not None:  # the recipe on this GPU: bf16 without bf16, FA2 below sm80
                    err[idx] = gpu_msg
                    continue
            if not isinstance(probe, int) and probe.train.attention in ("flash", "efficient", "math"):
                # an explicit sdpa kernel may run at one length and not at another (a sliding window
                # reached builds a mask): estimate()'s refusal per sequence length
                bad = _kernel_refusals(probe, gpus[int(C["gpu"][i0])][0], seq_v[C["seq"][idx]], msg)
                if bad is not None:
                    err[idx[bad >= 0]] = bad[bad >= 0]
                    idx = idx[bad < 0]
                    if not len(idx):
                        continue
            if isinstance(probe, int):
                err[idx] = probe
            else:
                probe_of[idx] = probe.index
                _evaluate_group(probe, idx, C, gpus[int(C["gpu"][i0])], data, none,
                                rank_v, batch_v, seq_v, dropout_v, alpha_v, alpha_none, alpha_def,
                                ts_v, ts_none, frac_v, recipe_v)
            done += len(idx)
            if on_progress is not None:
                on_progress(done)
        # the recipe's settings other than its numbers: one take per column over all groups
        rows_ok = np.flatnonzero(probe_of >= 0)
        if len(rows_ok):
            for k in _RECIPE_CELLS + PARALLEL_FIELDS:
                cells = [p.recipe[k] for p in probe_list]
                vals = _obj_array(cells) if data[k].dtype == object else np.asarray(cells, dtype=data[k].dtype)
                data[k][rows_ok] = vals[probe_of[rows_ok]]

    # ---- error rows: the case's own values, nothing else ----
    masks: dict[str, Any] = dict(none)
    bad = np.flatnonzero(err >= 0)
    if len(bad):
        data["error"][bad] = _obj_array(messages)[err[bad]]
        for c in COLUMNS[len(GRID_KEYS):]:
            if c != "error" and data[c].dtype != object:
                masks.setdefault(c, np.zeros(n, dtype=bool))[bad] = True
        for k in GRID_KEYS:
            _raw_values(k, data, masks, bad, L[k], C[k][bad], n)
    if on_progress is not None and done != n:
        on_progress(n)
    return Columns(data, masks)


def _gpu_refusal(p: "_Group", gpu_entry, msg) -> int | None:
    """The message index of what estimate() refuses for this group's recipe on this GPU
    (``trainers.gpu_refusal``), or None; cached per GPU."""
    from .errors import InputError
    from .trainers import gpu_refusal

    gpu = gpu_entry[0]
    if gpu.id not in p.gpu_checks:
        why = gpu_refusal(p.train, gpu)  # an explicit --attention kernel: per length, _kernel_refusals
        if why is None:  # a multi-GPU layout the engines cannot run (on this GPU's platform)
            from .estimate.comm import check_layout

            try:
                check_layout(p.resolved, gpu)
            except InputError as e:
                why = str(e)
        p.gpu_checks[gpu.id] = None if why is None else msg(InputError(why))
    return p.gpu_checks[gpu.id]


def _kernel_refusals(p: "_Group", gpu, seqs, msg):
    """Per row of ``seqs``: the message index of estimate()'s refusal of the group's explicit
    ``--attention`` kernel at that length on ``gpu`` (``activations.check_attention_kernel``), else
    -1; None when no row is refused."""
    from dataclasses import replace

    import numpy as np

    from .estimate.activations import check_attention_kernel

    out = np.full(len(seqs), -1, dtype=np.int64)
    for v in np.unique(seqs).tolist():
        try:
            check_attention_kernel(p.model, replace(p.resolved, seq=int(v)), gpu.compute_capability)
        except InputError as e:
            out[seqs == v] = msg(e)
    return out if (out >= 0).any() else None


def _resolve(case: dict, model):
    from .case import resolve_case

    return resolve_case(case, model=model)


class _Group:
    """What one group of cases shares: the specs resolved from a probe case, the adapted
    Linears and the cached memory Structure."""

    def __init__(self, model, lora, train):
        from .estimate.weights import structure
        from .targets import select_expert_targets, select_targets
        from .trainers import resolve_recipe

        self.model, self.lora, self.train = model, lora, train
        self.resolved = resolve_recipe(train)  # the trainer's defaults filled in, as estimate() reads them
        self.recipe = recipe_columns(self.resolved)  # the group's recipe cells (its numbers come per case)
        self.adapted = select_targets(model, lora.targets) + select_expert_targets(model, lora.targets, lora.dropout)
        from .storage import Dtypes

        # the recipe's dtypes and the device, as estimate()'s make_setup builds it
        from .estimate.parallel import compute_train, param_factor

        computed = compute_train(self.resolved)  # several GPUs: an fp32 base may run as a 16-bit model
        self.stored = param_factor(self.resolved, computed)
        self.structure = structure(model, self.adapted, Dtypes.of(computed), train.double_quant, train.device)
        self.targets = ",".join(lora.targets)
        self.encoder_decoder = train.target_seq is not None  # resolve_case sets it for enc-dec only
        self.kinds: dict[tuple, str] = {}
        self.params = None  # parameter counts per rank level (count_params on an array of ranks)
        self.gpu_checks: dict[str, int | None] = {}  # GPU id -> message index of its refusal (or None)
        from .estimate.comm import is_parallel

        self.parallel = is_parallel(self.resolved)  # several GPUs: the step time gains communication


def _recipe_numbers(p: "_Group", idx, C, recipe_v) -> dict[str, Any]:
    """The group's recipe numbers (gradient_accumulation, max_grad_norm, checkpoint_every_n_layers):
    a numpy array per field, or one Python number where every case of the group has the same
    value; max_grad_norm left unset is the group's trainer default (``resolve_recipe``)."""
    import numpy as np

    out: dict[str, Any] = {}
    for k in _RECIPE_NUMBERS:
        if len(recipe_v[k]) == 1:  # one value in the whole sweep (the usual case): no per-case arrays
            none = k == "max_grad_norm" and recipe_v["max_grad_norm_none"][0]
            out[k] = p.resolved.max_grad_norm if none else recipe_v[k].item(0)
            continue
        codes = C[k][idx]
        v = recipe_v[k][codes]
        if k == "max_grad_norm":
            v = np.where(recipe_v["max_grad_norm_none"][codes], p.resolved.max_grad_norm, v)
        out[k] = v.item(0) if (v == v[0]).all() else v
    return out


def _evaluate_group(p: _Group, idx, C, gpu_entry, data, none, rank_v, batch_v, seq_v, dropout_v, alpha_v,
                    alpha_none, alpha_def, ts_v, ts_none, frac_v, recipe_v) -> None:
    """Evaluate one group (``idx``: its case positions) on arrays and fill the output columns.

    The estimator's functions get the resolved recipe (``trainers.resolve_recipe``), its numbers
    as Python numbers (a group whose cases differ in them is split: the step structure branches on them)."""
    from dataclasses import replace

    import numpy as np

    from .estimate.activations import Shape, choose_attention
    from .estimate.memory import global_attention, moments
    from .estimate.params import count_params
    from .estimate.time import step_time, step_work

    gpu, cal, coef = gpu_entry
    rc = C["rank"][idx]
    r = rank_v[rc]
    b = batch_v[C["batch"][idx]]
    s = seq_v[C["seq"][idx]]
    d = dropout_v[C["dropout"][idx]]
    ac = C["alpha"][idx]
    alpha = np.where(alpha_none[ac], alpha_def[rc], alpha_v[ac])
    if p.encoder_decoder:
        tc = C["target_seq"][idx]
        ts = np.where(ts_none[tc], s, ts_v[tc])
    else:
        ts = None
    frac = frac_v[C["int8_outlier_fraction"][idx]] if p.train.int8_outlier_fraction is not None else None
    nums = _recipe_numbers(p, idx, C, recipe_v)
    varying = [k for k, v in nums.items() if isinstance(v, np.ndarray)]
    if varying:
        # the step structure (estimate/steps.py) branches on these numbers: one sub-group per
        # combination of them, each evaluated with Python numbers
        combos = np.stack([nums[k] for k in varying], axis=1)
        _, which = np.unique(combos, axis=0, return_inverse=True)
        which = which.reshape(-1)
        for j in range(int(which.max()) + 1):
            _evaluate_group(p, idx[which == j], C, gpu_entry, data, none, rank_v, batch_v, seq_v, dropout_v, alpha_v,
                            alpha_none, alpha_def, ts_v, ts_none, frac_v, recipe_v)
        return
    if p.resolved.padding != "max-length":
        # the worst batch of a length distribution (estimate.memory.sequence_shape) is laid out
        # per case: these groups are evaluated one case at a time, with Python numbers
        if len(idx) > 1:
            for i in idx:
                _evaluate_group(p, np.asarray([i]), C, gpu_entry, data, none, rank_v, batch_v, seq_v, dropout_v,
                                alpha_v, alpha_none, alpha_def, ts_v, ts_none, frac_v, recipe_v)
            return
        _evaluate_sequence_case(p, idx, gpu_entry, data, none, r.item(0), alpha.item(0), d.item(0), b.item(0),
                                s.item(0), None if frac is None else frac.item(0), nums)
        return
    lora = replace(p.lora, rank=r, alpha=alpha, dropout=d)
    train = replace(p.resolved, batch=b, seq=s, target_seq=ts, int8_outlier_fraction=frac, **nums)

    # memory and time: the attention kernel per case (it can change with the sequence length)
    cc = gpu.compute_capability
    seqs, inv = np.unique(s, return_inverse=True)
    kinds = []
    for v in seqs.tolist():
        kk = (v, cc)
        if kk not in p.kinds:
            p.kinds[kk] = choose_attention(p.model, replace(p.resolved, seq=v), cc)
        kinds.append(p.kinds[kk])
    case_kinds = np.asarray(kinds, dtype=object)[inv] if len(set(kinds)) > 1 else kinds[0]

    # step time and parameter counts: the scalar functions, on arrays (the ledger's kernel)
    t = step_time(step_work(p.model, lora, train, case_kinds), gpu, coef)
    if p.parallel:  # + the engine's exposed communication (estimate/comm.py), as estimate() adds it
        from .estimate.comm import with_communication

        t, _ = with_communication(p.model, lora, train, gpu, t, p.adapted)
    if p.params is None:
        pc = count_params(p.model, replace(p.lora, rank=rank_v), p.adapted)
        p.params = (np.broadcast_to(pc.trainable, rank_v.shape), np.broadcast_to(pc.total, rank_v.shape))
    trainable, total = p.params[0][rc], p.params[1][rc]

    # memory: the ledger's moments per attention kernel
    peak = np.empty(len(idx), dtype=np.int64)
    reserved = np.empty(len(idx), dtype=np.int64)
    device = np.empty(len(idx), dtype=np.int64)
    paged = np.empty(len(idx), dtype=np.int64)
    moment = np.empty(len(idx), dtype=object)
    tseq = ts if p.encoder_decoder else s
    glob = global_attention(p.model, p.resolved, cc)  # gemma3: the global layers' kernel (memory.make_setup)
    for kind in dict.fromkeys(kinds):
        if len(set(kinds)) == 1:
            sel = slice(None)
        else:
            sel = np.asarray([k == kind for k in kinds])[inv]
        x = Shape(b=b[sel], seq=s[sel], tseq=tseq[sel], r=r[sel], dropout=d[sel], global_attention=glob)
        tr = replace(train, batch=x.b, seq=x.seq, target_seq=None if ts is None else ts[sel],
                     int8_outlier_fraction=None if frac is None else frac[sel])
        ms = moments(p.structure, tr, kind, x, gpu, cal)
        peak[sel], moment[sel], reserved[sel], device[sel], paged[sel] = _memory_totals(
            p.structure, tr, x, ms, cal, kind, gpu, p.stored)
    t = _with_paging(t, device, paged, gpu)  # "fits with paging": + the paging time, as estimate()

    nums = {k: getattr(train, k) for k in _RECIPE_NUMBERS}  # the other recipe cells: evaluate_table, per column
    row = case_row(p.model, lora, train, gpu, trainable, total, peak, reserved, device, moment, t, recipe=nums)
    for c, v in row.items():
        if v is None:
            if c in none:  # a typed column's None is a mask; an object column holds None already
                none[c][idx] = True
        else:
            data[c][idx] = v


def _evaluate_sequence_case(p: _Group, idx, gpu_entry, data, none, rank, alpha, dropout, batch, seq, frac,
                            nums) -> None:
    """One decoder-only case whose rows are padded to the batch's longest, packed or flattened:
    the ledger's shape is the worst batch (``estimate.memory.sequence_shape``), as ``estimate()``
    lays it out; scalar inputs, written to row ``idx`` (one element)."""
    from dataclasses import replace

    from .estimate.activations import choose_attention
    from .estimate.memory import moments, sequence_shape, with_global_attention
    from .estimate.params import count_params
    from .estimate.time import step_time, step_work

    gpu, cal, coef = gpu_entry
    lora = replace(p.lora, rank=rank, alpha=alpha, dropout=dropout)
    train = replace(p.resolved, batch=batch, seq=seq, int8_outlier_fraction=frac, **nums)
    cc = gpu.compute_capability
    kind = choose_attention(p.model, train, cc)
    t = step_time(step_work(p.model, lora, train, kind), gpu, coef)
    if p.parallel:
        from .estimate.comm import with_communication

        t, _ = with_communication(p.model, lora, train, gpu, t, p.adapted)
    pc = count_params(p.model, lora, p.adapted)
    x = with_global_attention(p.model, train, cc, sequence_shape(p.model, train, lora, cc))
    ms = moments(p.structure, train, kind, x, gpu, cal)
    peak, moment, reserved, device, paged = _memory_totals(p.structure, train, x, ms, cal, kind, gpu, p.stored)
    t = _with_paging(t, device, paged, gpu)
    row = case_row(p.model, lora, train, gpu, pc.trainable, pc.total, peak, reserved, device, moment, t,
                   recipe={k: getattr(train, k) for k in _RECIPE_NUMBERS})
    for c, v in row.items():
        if v is None:
            if c in none:
                none[c][idx] = True
        else:
            data[c][idx] = v


def recipe_columns(resolved) -> dict[str, Any]:
    """The recipe and multi-GPU layout cells of a row from a resolved TrainSpec (``lengths`` as a
    comma string)."""
    recipe = {k: getattr(resolved, k) for k in RECIPE_FIELDS + PARALLEL_FIELDS}
    recipe["lengths"] = None if resolved.lengths is None else ",".join(str(n) for n in resolved.lengths)
    return recipe


def case_row(model, lora, train, gpu, trainable, total, peak, reserved, device, moment, t,
             recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one row schema (COLUMNS but ``error``) of an evaluated case, from the resolved specs,
    parameter counts, memory totals and TimeEstimate ``t``. Values are numbers for one case
    (``evaluate_each``) or numpy arrays for a group (``evaluate_table``); None marks a cell
    that does not apply (target_seq of a decoder-only model, an int8 fraction not given). The
    recipe columns hold the resolved recipe (the trainer's defaults filled in), as the
    estimate's ``inputs`` do: ``recipe`` (``recipe_columns``) when the caller has them, else
    from ``resolve_recipe(train)``."""
    if recipe is None:
        from .trainers import resolve_recipe

        recipe = recipe_columns(resolve_recipe(train))
    return dict(
        model=model.name, quant=train.quant, double_quant=train.double_quant, rank=lora.rank,
        alpha=lora.alpha, dropout=lora.dropout, targets=",".join(lora.targets), optimizer=train.optimizer,
        batch=train.batch, seq=train.seq, target_seq=train.target_seq,
        gradient_checkpointing=train.gradient_checkpointing, attention=train.attention,
        int8_outlier_fraction=train.int8_outlier_fraction, **recipe, gpu=gpu.id,
        trainable_params=trainable, total_params=total, peak_allocated_bytes=peak, peak_reserved_bytes=reserved,
        device_total_bytes=device, peak_moment=moment, gpu_memory_bytes=gpu.memory_bytes,
        fits=device <= gpu.memory_bytes, headroom_bytes=gpu.memory_bytes - device,
        step_s=t.step_s, tokens_per_s=t.tokens_per_s, bound=t.bound,
    )


def _memory_totals(st, train, x, ms, cal, kind, gpu, stored: float = 1):
    """``estimate_memory``'s totals for arrays of cases from the ledger's moments ``ms``: (peak
    allocated, peak moment names, peak reserved, device total), by the same functions
    (``memory.peak_of``, ``memory.reserved_and_band``, ``memory.device_totals``)."""
    import numpy as np

    from .estimate.memory import context_and_band, device_totals, first_layer_input, peak_of, reserved_and_band
    from .estimate.weights import paged_optimizer_state

    from .estimate.parallel import paged_per_rank, rank_moments, worst_rank_peak

    # several GPUs: the worst rank's ledger (estimate.parallel; single: the one-GPU moments)
    rms = rank_moments(ms, st, train, x.r, stored, first_layer_input(st, x)) if train.strategy != "single" else None
    peak, moment = worst_rank_peak(rms) if rms is not None else peak_of(ms)
    peak = np.broadcast_to(peak, np.shape(x.b))
    paged = paged_optimizer_state(st, x.r, train.optimizer)
    paged = int(paged) if isinstance(paged, (int, float)) else np.asarray(paged).astype(np.int64)
    paged = paged_per_rank(paged, train)
    reserved, _ = reserved_and_band(st, x, kind, peak, gpu, cal, train.stack, one_gpu=train.strategy in ("single", "ddp"),
                                    train=train, rank_ledgers=rms[0] if rms else None)
    context, _ = context_and_band(gpu, cal, train.stack)
    reserved, device, _ = device_totals(peak, paged, cal, reserved, context)
    return peak, np.broadcast_to(moment, np.shape(x.b)), reserved, device, np.broadcast_to(paged, np.shape(x.b))


def _with_paging(t, device, paged, gpu):
    """``t`` with the paging time of the cases whose verdict is "fits with paging" (the device total
    over the card, but not once the paged optimizer state is evicted: ``result._verdict``), as
    ``estimate()`` adds it (``api.with_paging_time``, ``reserved.paging_seconds``); as is otherwise."""
    import numpy as np

    from .estimate.api import with_paging_time
    from .estimate.reserved import paging_seconds

    if not gpu.host_link:
        return t
    over = np.asarray(device, dtype=np.float64) - gpu.memory_bytes
    paged = np.asarray(paged, dtype=np.float64)
    pages = (over > 0) & (paged > 0) & (over <= paged)
    if not pages.any():
        return t
    secs = np.where(pages, paging_seconds(np.where(pages, over, 0), gpu.host_link), 0.0)
    if np.ndim(t.step_s) == 0:
        return with_paging_time(t, float(secs.reshape(-1)[0]))
    return with_paging_time(t, secs.reshape(np.shape(t.step_s)))


def _obj_array(values: list):
    """A 1-d object array of ``values`` (numpy would make tuples into a 2-d array)."""
    import numpy as np

    a = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        a[i] = v
    return a


def _raw_values(k: str, data, masks, rows, levels: list, codes, n: int) -> None:
    """Put the cases' own (unresolved) values of option ``k`` into the error ``rows``."""
    import numpy as np

    col = data[k]
    used = [levels[j] for j in np.unique(codes).tolist()]
    if col.dtype == object:
        col[rows] = _obj_array(levels)[codes]
        return
    want = _PY_TYPE[col.dtype.kind]
    if all(v is None or type(v) is want for v in used):
        vals = np.asarray([0 if v is None else v for v in levels], dtype=col.dtype)
        isnone = np.asarray([v is None for v in levels], dtype=bool)
        col[rows] = vals[codes]
        m = masks.get(k)
        if isnone[codes].any() or m is not None:
            m = masks.setdefault(k, np.zeros(n, dtype=bool))
            m[rows] = isnone[codes]
        return
    # mixed types (e.g. a raw string where the column holds ints): an object column
    obj = col.astype(object)
    m = masks.pop(k, None)
    if m is not None:
        obj[m] = None
    obj[rows] = _obj_array(levels)[codes]
    data[k] = obj


def evaluate(cases: Iterable[dict] | CaseTable, *, estimate_fn: Callable | None = None,
             on_progress: Callable[[int], None] | None = None) -> Iterator[dict]:
    """One flat row (dict, COLUMNS) per case: inputs, parameter counts, memory, fit, time. A case
    that cannot be resolved (e.g. a target module the model lacks) yields a row with ``error``.

    Vectorized (``evaluate_table``); with a custom ``estimate_fn`` or without numpy, one call
    per case (``evaluate_each``)."""
    if estimate_fn is not None:
        yield from evaluate_each(cases, estimate_fn=estimate_fn, on_progress=on_progress)
        return
    table = cases if isinstance(cases, CaseTable) else CaseTable.from_dicts(cases)
    yield from evaluate_table(table, on_progress=on_progress).rows()


def evaluate_each(cases: Iterable[dict], *, estimate_fn: Callable | None = None,
                  on_progress: Callable[[int], None] | None = None) -> Iterator[dict]:
    """The reference path: ``estimate()`` (memory) and ``step_time`` once per case (slow: about
    700 cases/s). ``evaluate_table`` must give the same rows."""
    from .catalog import load_calibration, load_gpu, load_model
    from .case import resolve_case
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
                gpu = gpus[gid]
                est = estimate_fn(model, lora, train, gpu, cals[gid], with_time=False)
                kind = est.inputs.get("attention_kernel")  # the ledger's kernel: the time prices it
                wkey = (name, lora, train, kind)
                if wkey not in works:
                    works[wkey] = step_work(model, lora, train, kind)
                t = step_time(works[wkey], gpu, coefs[gid])
                if train.strategy != "single":  # several GPUs: + the exposed communication, as estimate()
                    from .estimate.comm import with_communication

                    t, _ = with_communication(model, lora, train, gpu, t)
                if "paging" in est.detail:  # "fits with paging": + the paging time, as estimate()
                    from .estimate.api import with_paging_time

                    t = with_paging_time(t, est.detail["paging"]["seconds_per_step"])
                m = est.memory
                row.update(case_row(model, lora, train, gpu, est.params.trainable, est.params.total,
                                    m.peak_allocated_bytes, m.peak_reserved_bytes, m.device_total_bytes,
                                    m.peak_moment, t), error=None)
            except Exception as e:  # noqa: BLE001 - a bad case is a row, not the end of the sweep
                from .errors import LoraplanError

                if not isinstance(e, LoraplanError):
                    raise
                row["error"] = str(e)
            done[key] = row
        if on_progress is not None:
            on_progress(i)
        yield row


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def output_format(path: str | Path, fmt: str | None = None) -> str:
    if fmt:
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"cannot tell the format of '{path}' from its extension; use .csv, .jsonl or .parquet, "
                         f"or give --format csv|jsonl|parquet")
    return FORMATS[suffix]


def _need_pandas(what: str):
    try:
        import pandas as pd
    except ModuleNotFoundError:
        raise InputError(f"writing {what} needs pandas: pip install 'loraplan[report]'; "
                         f"or write .jsonl") from None
    return pd


def write_columns(cols: Columns, path: str | Path, fmt: str) -> int:
    """Write sweep columns to ``path`` as csv, jsonl or parquet. Returns the number of rows.

    The text formats are byte for byte what ``write_rows`` writes for the same rows (the
    ``csv`` module's quoting, ``json.dumps`` of each row): each column's values are formatted
    once per distinct value (``repr`` for floats) and pyarrow joins them into lines; without
    pyarrow, ``write_rows`` does it row by row."""
    try:
        return _write_columns(cols, Path(path), fmt)
    except OSError as e:
        raise InputError(f"cannot write '{path}': {e.strerror}; choose a writable path with --out") from None


def _write_columns(cols: Columns, p: Path, fmt: str) -> int:
    if fmt == "parquet":
        _need_pandas("Parquet")
        try:
            cols.to_frame(uniform=True).to_parquet(p, index=False)
        except ImportError as e:
            raise InputError(f"writing Parquet needs pyarrow or fastparquet ({e}); pip install pyarrow, "
                             f"or write .csv / .jsonl") from None
        return len(cols)
    if fmt not in ("csv", "jsonl"):
        raise InputError(f"--format '{fmt}' is not one of csv, jsonl, parquet")
    try:
        import pyarrow  # noqa: F401
    except ModuleNotFoundError:
        return write_rows(cols.rows(), p, fmt)
    with p.open("wb") as f:
        if fmt == "csv":
            f.write((",".join(COLUMNS) + "\n").encode())
        for start in range(0, len(cols), _CHUNK):
            f.write(_text_lines(cols, fmt, slice(start, start + _CHUNK)))
    return len(cols)


#: rows formatted at once by write_columns
_CHUNK = 65_536


def _text_lines(cols: Columns, fmt: str, rows: slice):
    """Rows ``rows`` of ``cols`` as CSV or JSON lines (a bytes-like object), built column by column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def S(text):  # a large_string scalar (the tokens are large_string)
        return pa.scalar(text, pa.large_string())

    js = fmt == "jsonl"
    parts = []
    for j, name in enumerate(COLUMNS):
        m = cols.masks.get(name)
        masked = m is not None and m[rows].any()
        const = None if masked else _constant_cell(cols.data[name][rows], js)
        if const is not None:  # one value in every row (e.g. a recipe setting): a scalar, no per-row tokens
            tok = S(const)
        else:
            tok = _tokens(cols.data[name][rows], fmt)
        if masked:
            tok = pc.if_else(pa.array(m[rows]), S("null" if js else ""), tok)
        # the line's start and end go on its first and last cell (small arrays, not whole lines)
        head = ("{" if js and j == 0 else "") + (json.dumps(name) + ": " if js else "")
        tail = ("}" if js else "") + "\n" if j == len(COLUMNS) - 1 else ""
        if head or tail:
            tok = pc.binary_join_element_wise(S(head), tok, S(tail), S(""))
        parts.append(tok)
    lines = pc.binary_join_element_wise(*parts, S(", " if js else ","))
    if isinstance(lines, pa.Scalar):  # every column constant: one line, repeated
        n = len(cols.data[COLUMNS[0]][rows])
        lines = pa.array([lines.as_py()] * n, pa.large_string())
    if not len(lines):
        return b""
    _, off, data = lines.buffers()
    off = np.frombuffer(off, dtype=np.int64)[lines.offset:lines.offset + len(lines) + 1]
    return memoryview(data)[int(off[0]):int(off[-1])]


def _constant_cell(a, js: bool) -> str | None:
    """The cell text when every value of column ``a`` is the same (as ``_tokens`` writes it), else None."""
    import numpy as np

    if not len(a):
        return None
    v = a[0]
    if a.dtype == object:
        if not (v is None or type(v) is str) or not (a == v).all():  # a str equals only equal strs
            return None
        return _cell(v, js)
    if not (a == v).all() or (a.dtype.kind == "f" and not np.isfinite(v)):
        return None
    if a.dtype == bool:
        return ("true" if v else "false") if js else ("True" if v else "False")
    if a.dtype.kind == "f":
        return str(np.asarray([v]).astype(str)[0])  # the float text _tokens writes (Python's repr)
    return str(int(v))


def _tokens(a, fmt: str):
    """One column's cells as text (a pyarrow string array): ``str`` / ``repr`` as the csv module
    writes them (quoted where needed), or ``json.dumps`` for JSON lines."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    js = fmt == "jsonl"
    if a.dtype == bool:
        words = ["false", "true"] if js else ["False", "True"]
        return pc.take(pa.array(words, pa.large_string()), pa.array(a.astype(np.int8)))
    if a.dtype.kind == "i":
        return pc.cast(pa.array(a), pa.large_string())
    if a.dtype.kind == "f":
        uniq, inv = np.unique(a, return_inverse=True)
        words = uniq.astype(str).tolist()  # numpy's float str is Python's repr
        if js and not np.isfinite(uniq).all():
            words = [json.dumps(v) for v in uniq.tolist()]
        return pc.take(pa.array(words, pa.large_string()), pa.array(inv.reshape(-1)))
    # object: strings (and None, or a case's raw values in error rows)
    try:
        enc = pa.array(a, type=pa.large_string(), from_pandas=True).dictionary_encode()
        values = enc.dictionary.to_pylist()
        idx = enc.indices
        null = idx.is_null()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        index: dict[tuple, int] = {}
        values, codes = [], []
        for v in a.tolist():
            k = _level_key(v)
            j = index.get(k)
            if j is None:
                j = index[k] = len(values)
                values.append(v)
            codes.append(j)
        idx, null = pa.array(codes, pa.int32()), None
    words = [_cell(v, js) for v in values]
    out = pc.take(pa.array(words, pa.large_string()), idx)
    if null is not None and null.true_count:
        out = pc.if_else(null, pa.scalar("null" if js else "", pa.large_string()), out)
    return out


def _cell(v, js: bool) -> str:
    """One value as ``json.dumps`` or the csv module (QUOTE_MINIMAL, lineterminator \\n) writes it."""
    if js:
        return json.dumps(v)
    if v is None:
        return ""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([v, ""])
    return buf.getvalue()[:-2]


def write_rows(rows: Iterable[dict] | Columns, path: str | Path, fmt: str) -> int:
    """Write rows (dicts) to ``path`` as csv, jsonl or parquet (parquet needs pandas + pyarrow).
    Returns the count. Columns go to ``write_columns``."""
    if isinstance(rows, Columns):
        return write_columns(rows, path, fmt)
    p = Path(path)
    if fmt == "parquet":
        pd = _need_pandas("Parquet")
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
    return list(sweep_columns(cli_opts, grids, confirm=confirm, limit=limit).rows())


def sweep_columns(cli_opts: dict[str, Any], grids: list[dict[str, Any]] | None = None, *, confirm: bool = False,
                  limit: int = MAX_CASES) -> Columns:
    """``sweep`` as Columns (the fast form for large grids; needs numpy)."""
    n = count_cases(cli_opts, grids)
    if n > limit and not confirm:
        raise InputError(f"the grid has {n:,} cases, more than {limit:,}; narrow it or pass --yes")
    return evaluate_table(expand_cases(cli_opts, grids))


def rate_per_s(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.inf
