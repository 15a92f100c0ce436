"""A training case as plain data: parsing, defaults, validation and grid expansion (no click).

The CLI, the Python API and the library (sweep, profile, report) share these rules. A case is
a dict keyed by the option names (``rank``, ``target_seq``, ...) whose values are raw strings
or parsed values; ``None`` means the default. Grid values are comma lists or ranges
(``512:8192:x2``, ``8:64:+8``); ``expand_grid`` yields one single-valued dict per case and
``resolve_case`` turns one into validated specs. Bad input raises ``InputError`` (one line).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import fields
from typing import Any, Callable

from .errors import InputError
from .spec import (ATTENTION, ATTN_IMPLEMENTATIONS, FLOAT_DTYPES, LOOP_OUTPUTS, LOSSES, MIXED_PRECISION, OPTIMIZERS, PADDINGS,
                   QUANTS, RECIPE_FIELDS, TRAINERS, PARALLEL_FIELDS, STRATEGIES, FSDP_SHARDINGS, FSDP_BACKWARD_PREFETCHES, DEEPSPEED_BUCKETS, QUANT_STORAGES, LoraSpec, ModelSpec, TrainSpec, check_choice, check_value)

#: default model and GPU: a common QLoRA setup (seed 001/002: Llama-2-7B, nf4 + double quant, r8 q,v)
DEFAULT_MODEL = "llama-2-7b"
DEFAULT_GPU = "h100-sxm-80gb"


def _spec_defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


_LORA, _TRAIN = _spec_defaults(LoraSpec), _spec_defaults(TrainSpec)

#: option key -> default: the LoraSpec / TrainSpec field defaults (one source for the API and the
#: CLI) plus model and GPU. alpha None: 2 x rank; targets None: PEFT's default for the family
#: (q_proj,v_proj for llama); target_seq None: --seq; int8_outlier_fraction None: measured default.
DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "quant": _TRAIN["quant"],
    "double_quant": _TRAIN["double_quant"],
    "rank": _LORA["rank"],
    "alpha": _LORA["alpha"],
    "dropout": _LORA["dropout"],
    "targets": _LORA["targets"],
    "optimizer": _TRAIN["optimizer"],
    "batch": _TRAIN["batch"],
    "seq": _TRAIN["seq"],
    "target_seq": _TRAIN["target_seq"],
    "gradient_checkpointing": _TRAIN["gradient_checkpointing"],
    "attention": _TRAIN["attention"],
    "int8_outlier_fraction": _TRAIN["int8_outlier_fraction"],
    "gpu": DEFAULT_GPU,
    # the training stack (issue 11); None: the trainer's default (loraplan.trainers)
    **{k: _TRAIN[k] for k in RECIPE_FIELDS},
    # several GPUs (issue 13)
    **{k: _TRAIN[k] for k in PARALLEL_FIELDS},
}

#: resolve_case checks the numbers in this order, so that a case with several bad values names
#: the same one in every command (the sweep's vectorized path follows it too)
CHECK_ORDER = ("rank", "batch", "seq", "target_seq", "dropout", "int8_outlier_fraction", "gradient_accumulation",
               "max_grad_norm", "checkpoint_every_n_layers")


def _int(name):
    def parse(v):
        try:
            return int(v)
        except (TypeError, ValueError):
            raise InputError(f"--{name} '{v}' is not an integer") from None
    return parse


def _float(name):
    def parse(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            raise InputError(f"--{name} '{v}' is not a number") from None
    return parse


def _finite(name):
    def parse(v):
        x = _float(name)(v)
        check_value(name.replace("-", "_"), x)  # the option --max-grad-norm checks key max_grad_norm
        return x
    return parse


def _choice(name, choices):
    def parse(v):
        v = str(v).strip().lower().replace("-", "_") if name == "optimizer" else str(v).strip().lower()
        check_choice(name, v, choices)
        return v
    return parse


def _bool(name):
    def parse(v):
        if isinstance(v, bool):
            return v
        s = str(v).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise InputError(f"--{name} '{v}' is not true/false")
    return parse


#: option key -> parser of one value
PARSERS: dict[str, Callable[[Any], Any]] = {
    "model": str,
    "quant": _choice("quant", QUANTS),
    "double_quant": _bool("double-quant"),
    "rank": _int("rank"),
    "alpha": _finite("alpha"),  # rejects nan/inf here, so the sweep's per-value parse catches them
    "dropout": _float("dropout"),
    "targets": str,
    "optimizer": _choice("optimizer", OPTIMIZERS),
    "batch": _int("batch"),
    "seq": _int("seq"),
    "target_seq": _int("target-seq"),
    "gradient_checkpointing": _bool("gradient-checkpointing"),
    "attention": _choice("attention", ATTENTION),
    "int8_outlier_fraction": _float("int8-outlier-fraction"),
    "gpu": str,
    "trainer": _choice("trainer", TRAINERS),
    "mixed_precision": _choice("mixed-precision", MIXED_PRECISION),
    "load_dtype": _choice("load-dtype", FLOAT_DTYPES),
    "prepare_kbit": _bool("prepare-kbit"),
    "compute_dtype": _choice("compute-dtype", FLOAT_DTYPES),
    "adapter_dtype": _choice("adapter-dtype", FLOAT_DTYPES),
    "gradient_accumulation": _int("gradient-accumulation"),
    "max_grad_norm": _finite("max-grad-norm"),
    "reentrant": _bool("reentrant"),
    "attn_implementation": _choice("attn-implementation", ATTN_IMPLEMENTATIONS),
    "padding": _choice("padding", PADDINGS),
    "lengths": lambda v: parse_lengths(v),
    "loss": _choice("loss", LOSSES),
    "loop_outputs": _choice("loop-outputs", LOOP_OUTPUTS),
    "checkpoint_every_n_layers": _int("checkpoint-every-n-layers"),
    "checkpoint_offload": _bool("checkpoint-offload"),
    "strategy": _choice("strategy", STRATEGIES),
    "num_gpus": _int("num-gpus"),
    "nodes": _int("nodes"),
    "fsdp_sharding": _choice("fsdp-sharding", FSDP_SHARDINGS),
    "fsdp_version": _int("fsdp-version"),
    "use_orig_params": _bool("use-orig-params"),
    "fsdp_backward_prefetch": _choice("fsdp-backward-prefetch", FSDP_BACKWARD_PREFETCHES),
    "deepspeed_buckets": _choice("deepspeed-buckets", DEEPSPEED_BUCKETS),
    "quant_storage": _choice("quant-storage", QUANT_STORAGES),
    "ram_efficient_loading": _bool("ram-efficient-loading"),
}

#: options that are one value each even in grid commands (their own commas are not grid axes)
SINGLE_VALUED = ("targets", "lengths")


def parse_lengths(v) -> tuple[int, ...]:
    """``--lengths``: token counts of the dataset's rows -> tuple of positive ints.

    Takes a comma list (``412,1830,4096``: e.g. p50, p99 and max), a sequence of ints, or the path
    of a text file with one count per line or a JSON list of counts. Raises InputError naming
    the bad value.
    """
    import json
    import os

    if isinstance(v, (list, tuple)):
        items = list(v)
    else:
        text = str(v).strip()
        if text and not text.replace(",", "").replace(" ", "").isdigit() and os.path.exists(text):
            from .inputs import read_text_file

            body = read_text_file(text, "--lengths file", "give one token count per line or a JSON list").strip()
            try:
                items = json.loads(body) if body.startswith("[") else body.split()
            except ValueError as e:
                raise InputError(f"--lengths file {text} is not a JSON list or one count per line ({e})") from None
            if not isinstance(items, list):
                raise InputError(f"--lengths file {text} must hold a list of token counts")
        else:
            items = [x for x in text.split(",") if x.strip()]
    out = []
    for x in items:
        try:
            n = int(str(x).strip())
        except ValueError:
            raise InputError(f"--lengths value '{x}' is not a whole token count; give counts like 412,1830,4096 "
                             f"or a file with one count per line") from None
        if n <= 0:
            raise InputError(f"--lengths value {n} must be a positive token count")
        out.append(n)
    if not out:
        raise InputError("--lengths is empty; give token counts like 412,1830,4096 or a file of counts")
    return tuple(out)


def split_values(key: str, raw) -> list:
    """One option's raw value -> list of parsed values (comma lists and ranges expanded)."""
    parse = PARSERS[key]
    if raw is None:
        return [DEFAULTS.get(key)]
    if key == "lengths":
        return [parse(raw)]
    if isinstance(raw, (list, tuple)):
        if key == "targets":
            return list(raw) if raw else [None]
        return [parse(v) for v in raw]
    if isinstance(raw, bool) or key == "targets":
        return [raw]
    out: list = []
    for part in str(raw).split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part and key not in ("model", "gpu"):
            out.extend(_range(key, part))
        else:
            out.append(parse(part))
    if not out:
        raise InputError(f"--{key.replace('_', '-')} is empty; give at least one value")
    return out


def _range(key: str, text: str) -> list:
    """'512:8192:x2' -> 512, 1024, ..., 8192;  '8:64:+8' -> 8, 16, ..., 64 (inclusive)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[2] or parts[2][0] not in "x+*":
        raise InputError(f"--{key.replace('_', '-')} range '{text}' must look like start:stop:xFACTOR or start:stop:+STEP")
    parse = PARSERS[key]
    opt = f"--{key.replace('_', '-')}"
    start, stop = parse(parts[0]), parse(parts[1])
    try:
        step = float(parts[2][1:])
    except ValueError:
        raise InputError(f"{opt} range '{text}': step '{parts[2][1:]}' is not a number; "
                         f"use e.g. {parts[0]}:{parts[1]}:x2 or {parts[0]}:{parts[1]}:+8") from None
    if not math.isfinite(step) or not (math.isfinite(start) and math.isfinite(stop)):
        raise InputError(f"{opt} range '{text}' has a non-finite bound or step; use finite numbers, "
                         f"e.g. {opt} 8:64:x2")
    if (parts[2][0] in "x*" and step <= 1) or (parts[2][0] == "+" and step <= 0) or stop < start:
        raise InputError(f"{opt} range '{text}' never reaches its end; use a factor > 1 or a step > 0 with start <= stop")
    integer = isinstance(start, int)
    if integer and parts[2][0] == "+" and not step.is_integer():
        raise InputError(f"{opt} range '{text}': step {parts[2][1:]} is not a whole number, but {opt} takes "
                         f"integers; use a whole step such as +{max(1, round(step))}")
    vals, v = [], start
    while v <= stop + 1e-9:
        if integer and not float(v).is_integer():
            raise InputError(f"{opt} range '{text}' reaches {v:g}, which is not an integer; use a whole factor "
                             f"such as x2 or a step such as +8")
        vals.append(parse(int(v)) if integer else v)
        v = v * step if parts[2][0] in "x*" else v + step
        if len(vals) > 100000:
            raise InputError(f"{opt} range '{text}' has more than 100000 values; use a larger step or factor")
    return vals


def expand_grid(opts: dict) -> list[dict]:
    """Cartesian product of every multi-valued option -> list of single-valued case dicts.
    InputError for an option no point of the grid uses (``check_grid_options``)."""
    check_grid_options(opts)
    keys = [k for k in PARSERS if k in opts]
    values = [split_values(k, opts.get(k)) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def grid_option(key: str, v: Any):
    """A grid-file value -> what expand_grid takes: comma string / list of strings (targets: a tuple)."""
    if key == "targets":
        if isinstance(v, list):
            return tuple(",".join(x) if isinstance(x, list) else str(x) for x in v)
        return (str(v),)
    if isinstance(v, list):
        return [x if isinstance(x, bool) else str(x) for x in v]
    return v if isinstance(v, bool) else str(v)


def merge_grid(cli_opts: dict, grid: dict, keys: tuple[str, ...]) -> dict:
    """One grid of a ``--grid`` file with the command line's options -> option dict over ``keys``.

    The rule of every grid command (sweep, profile): an option given on the command line (not
    None, not an empty tuple) replaces the grid's value for that key, in every grid of the file,
    so a saved grid can be narrowed or changed without editing it; keys neither sets are None
    (the default).
    """
    opts: dict[str, Any] = {k: None for k in keys}
    opts.update((k, grid_option(k, v)) for k, v in grid.items())
    opts.update((k, v) for k, v in cli_opts.items() if k in keys and v is not None and v != ())
    return opts


#: options that act only in some setups: a 4-bit base (double quant, bnb_4bit_compute_dtype), an
#: int8 base (the outlier fraction), gradient checkpointing (its variants). Given where they do
#: nothing, the command line refuses them (``check_given_options``), a grid refuses them when no
#: point uses them (``check_grid_options``), and a config file's are listed as ignored
#: (``config_no_ops``)
NO_OP_OPTIONS = ("double_quant", "compute_dtype", "int8_outlier_fraction", "reentrant", "checkpoint_offload",
                 "checkpoint_every_n_layers")


def _asks(key: str, value: Any) -> bool:
    """Whether a parsed ``value`` of ``key`` asks for something (off, 1 and None ask for nothing:
    ``--no-double-quant`` with a bf16 base is what runs anyway)."""
    if value is None:
        return False
    if key in ("double_quant", "checkpoint_offload", "reentrant"):
        return bool(value)
    if key == "checkpoint_every_n_layers":
        return value != 1
    return True


def no_op_reason(key: str, quant: str, checkpointing: bool) -> tuple[str, str] | None:
    """(why ``key`` has no effect, the fix) with ``quant`` and gradient ``checkpointing``, or None
    where it acts. Sources: bitsandbytes reads ``bnb_4bit_use_double_quant`` and
    ``bnb_4bit_compute_dtype`` only for Linear4bit (transformers BitsAndBytesConfig;
    bitsandbytes/nn/modules.py::Linear4bit), the outlier threshold only for Linear8bitLt;
    ``use_reentrant``, every_n_layers and offload are arguments of
    ``gradient_checkpointing_enable`` (transformers modeling_utils.py), never called without it."""
    if key in ("double_quant", "compute_dtype") and quant not in ("nf4", "fp4"):
        return (f"it applies to 4-bit bases only and the base is {quant}", "use --quant nf4 (or fp4)")
    if key == "int8_outlier_fraction" and quant != "int8":
        return (f"it applies to int8 bases only and the base is {quant}", "use --quant int8")
    if key in ("reentrant", "checkpoint_offload", "checkpoint_every_n_layers") and not checkpointing:
        return ("it is a gradient checkpointing setting and checkpointing is off",
                "drop --no-gradient-checkpointing")
    return None


def _opt_text(key: str, value: Any) -> str:
    opt = "--" + key.replace("_", "-")
    return opt if isinstance(value, bool) else f"{opt} {value}"


def _parsed(case: dict, key: str) -> Any:
    return DEFAULTS.get(key) if case.get(key) is None else PARSERS[key](case[key])


def check_given_options(case: dict, given) -> None:
    """InputError (one line: both options and the fix) for an option of ``given`` (the ones the
    user typed) that the rest of the single-valued ``case`` makes a no-op (``no_op_reason``), as
    ``--quant-storage`` with a base that is not 4-bit is refused (trainers.check_parallel)."""
    quant, ckpt = _parsed(case, "quant"), _parsed(case, "gradient_checkpointing")
    for key in NO_OP_OPTIONS:
        if key not in given or not _asks(key, _parsed(case, key)):
            continue
        why = no_op_reason(key, quant, ckpt)
        if why:
            opt = _opt_text(key, _parsed(case, key))
            raise InputError(f"{opt} has no effect here: {why[0]}; drop {opt.split()[0]} or {why[1]}")


def check_grid_options(opts: dict) -> None:
    """InputError for an option of the grid ``opts`` (comma lists / ranges, ``expand_grid``'s form)
    that no point of the grid uses: ``--quant bf16,nf4 --double-quant`` is fine (the nf4 points use
    it, the bf16 points run without it, as ``resolve_case`` builds them), ``--quant bf16
    --double-quant`` is refused."""
    quants = split_values("quant", opts.get("quant"))
    ckpts = split_values("gradient_checkpointing", opts.get("gradient_checkpointing"))
    for key in NO_OP_OPTIONS:
        if opts.get(key) is None:
            continue
        asked = [v for v in split_values(key, opts[key]) if _asks(key, v)]
        if not asked:
            continue
        whys = [no_op_reason(key, q, c) for q in quants for c in ckpts]
        if all(whys):
            opt = _opt_text(key, asked[0])
            raise InputError(f"contradictory grid: {opt.split()[0]} has no effect on any point ({whys[0][0]}); "
                             f"drop {opt.split()[0]} or {whys[0][1]}")


def config_no_ops(case: dict, from_config, multi: bool = False) -> tuple[dict, list[tuple[str, str]]]:
    """``case`` without the options of ``from_config`` (set by a config file, not typed) that have no
    effect in it (a real recipe may carry ``use_reentrant`` with checkpointing off), and
    (key, reason) for each, for the config reader's "ignored" list. ``multi``: grid values, dropped
    only when no point uses them."""
    out, ignored = dict(case), []
    for key in NO_OP_OPTIONS:
        if key not in from_config or out.get(key) is None:
            continue
        if multi:
            try:
                check_grid_options({"quant": out.get("quant"), "gradient_checkpointing": out.get("gradient_checkpointing"),
                                    key: out[key]})
                continue
            except InputError:
                why = no_op_reason(key, split_values("quant", out.get("quant"))[0],
                                   split_values("gradient_checkpointing", out.get("gradient_checkpointing"))[0])
        else:
            why = no_op_reason(key, _parsed(out, "quant"), _parsed(out, "gradient_checkpointing")) \
                if _asks(key, _parsed(out, key)) else None
        if why:
            out[key] = None
            ignored.append((key, f"no effect here: {why[0]}"))
    return out, ignored


def resolve_case(case: dict, model: ModelSpec | None = None) -> tuple[ModelSpec, LoraSpec, TrainSpec]:
    """One single-valued case dict (CLI option names, values raw or parsed) -> validated specs.

    The TrainSpec keeps the recipe fields as given (None: the trainer's default); the recipe is
    resolved once here only to raise InputError for settings its trainer does not have
    (``loraplan.trainers.resolve_recipe``), so every command refuses them the same way."""
    from .catalog import load_model
    from .targets import default_targets, parse_targets, select_targets
    from .versions import parse_stack

    v = {k: (DEFAULTS.get(k) if case.get(k) is None else PARSERS[k](case[k])) for k in PARSERS}
    model = model or load_model(v["model"])
    for k in CHECK_ORDER:  # before the specs: target_seq and the int8 fraction are checked even when unused
        check_value(k, v[k])
    frac = v["int8_outlier_fraction"]
    targets = (parse_targets(v["targets"]) if v["targets"] is not None  # '' is refused
               else default_targets(model, parse_stack(case.get("stack"))))  # peft's, at --stack's version
    lora = LoraSpec(rank=v["rank"], alpha=v["alpha"], dropout=v["dropout"], targets=targets)  # alpha None: 2 x rank
    select_targets(model, targets)  # raises TargetError listing the module names that exist
    if v["target_seq"] is not None and not model.is_encoder_decoder:
        warnings.warn(f"--target-seq {v['target_seq']} is the decoder length of encoder-decoder models; "
                      f"{model.name} is decoder-only, so it is ignored (--seq sets its length)", stacklevel=2)
    if model.max_positions and v["seq"] > model.max_positions:
        warnings.warn(f"--seq {v['seq']} is longer than {model.name}'s {model.max_positions} positions; "
                      f"the estimate assumes the model can run it (e.g. with RoPE scaling)", stacklevel=2)
    train = TrainSpec(
        quant=v["quant"], double_quant=bool(v["double_quant"]) and v["quant"] in ("nf4", "fp4"),
        optimizer=v["optimizer"], batch=v["batch"], seq=v["seq"],
        target_seq=(v["target_seq"] or v["seq"]) if model.is_encoder_decoder else None,
        gradient_checkpointing=v["gradient_checkpointing"], attention=v["attention"],
        int8_outlier_fraction=frac if v["quant"] == "int8" else None,
        # --stack torch=2.11,transformers=5.17 (single-valued commands only; not a grid axis)
        stack=parse_stack(case.get("stack")),
        **{k: v[k] for k in RECIPE_FIELDS},
        **{k: v[k] for k in PARALLEL_FIELDS},
    )
    from .trainers import resolve_recipe

    recipe = resolve_recipe(train)  # a setting the trainer lacks (or the libraries refuse) stops every command here
    from .estimate.steps import check_model_loss, step_recipe

    check_model_loss(model, step_recipe(recipe))  # the fused heads patch causal LMs only
    if model.is_encoder_decoder and recipe.padding != "max-length":
        raise InputError(f"--padding {recipe.padding} is modelled for decoder-only models; {model.model_type} is "
                         f"encoder-decoder: use --padding max-length")
    return model, lora, train
