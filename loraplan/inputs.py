"""One validation layer for what users hand loraplan: files, JSON, config.json values, numbers.

Everything here raises a one-line :class:`~loraplan.errors.LoraplanError` that names the bad
value and the fix; nothing can hang or exhaust memory on a hostile input:

- :func:`read_text_file`: only regular files (a FIFO, ``/dev/zero`` or a folder is refused before
  it is opened), at most ``max_bytes``, UTF-8 (a UTF-8 byte-order mark is tolerated; UTF-16 and
  other encodings are a clear error).
- :func:`parse_json`: nesting depth capped before parsing (``json`` recurses per level), and
  ``NaN``/``Infinity``/huge exponents kept as floats so the value checks below can name them.
- :func:`check_model_config`: the config.json values loraplan reads (dimensions, head counts,
  layer counts, dropouts, flags) by type, finiteness, sign, divisibility and size — before any
  shape rule or meta-device build loops over them.
- :func:`finite`, :func:`positive_int`: option values (NaN and ±inf are never a valid number).

Pure Python; no torch.
"""

from __future__ import annotations

import json
import math
import os
import stat
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, InputError

#: the largest file loraplan reads as JSON (config.json files are a few KiB; grids and
#: calibrations tens of KiB): bigger is refused before reading
MAX_JSON_BYTES = 16 << 20
#: JSON nesting deeper than this is refused before parsing (config.json files nest 3-4 levels)
MAX_JSON_DEPTH = 64

#: config.json keys that are a positive integer when present (across the families' config classes)
DIMENSION_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_decoder_layers",
                  "ffn_dim", "word_embed_proj_dim", "n_embd", "n_head", "n_layer", "n_inner")
#: positive integers that may also be null (the config class default applies)
OPTIONAL_DIMENSION_KEYS = ("num_key_value_heads", "head_dim", "sliding_window", "num_kv_heads",
                           "max_position_embeddings", "relative_attention_num_buckets",
                           "relative_attention_max_distance")
#: layer-count keys: at most MAX_LAYERS each
LAYER_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer")
#: non-negative finite floats when present
FLOAT_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "initializer_range", "initializer_factor",
              "rope_theta", "final_logit_softcapping", "attn_logit_softcapping", "partial_rotary_factor")
#: probabilities in [0, 1) when present
DROPOUT_KEYS = ("dropout", "dropout_rate", "hidden_dropout", "attention_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop", "activation_dropout")
#: booleans when present
BOOL_KEYS = ("tie_word_embeddings", "is_encoder_decoder", "parallel_attn", "use_parallel_residual",
             "new_decoder_architecture", "multi_query", "attention_bias", "mlp_bias", "bias",
             "do_layer_norm_before", "enable_bias")

#: bounds that no real model reaches (largest public models: ~200 layers, hidden 16-25k,
#: vocab 256k-1M); beyond them a value is a typo, and loops over it would not end
MAX_LAYERS = 10_000
MAX_DIMENSION = 10_000_000
#: weights above this many bytes (1 PB) are refused before any shape rule runs
MAX_WEIGHT_BYTES = 10**15


# ------------------------------------------------------------------------------------------------
# Files and JSON
# ------------------------------------------------------------------------------------------------


def read_text_file(path: str | Path, what: str, hint: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The text of a regular file of at most ``max_bytes``, decoded as UTF-8 (BOM tolerated).

    ``what`` names the file in errors ("model config", "calibration file"); ``hint`` says what
    to do instead. Raises ConfigError for a missing path, anything that is not a regular file
    (folder, FIFO, device), a file that is too large, or one that is not UTF-8.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise ConfigError(f"cannot read {what} '{p}': {e.strerror}; {hint}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(f"{what} '{p}' is {kind}; {hint}")
    if st.st_size > max_bytes:
        raise ConfigError(f"{what} '{p}' is {st.st_size:,} bytes, more than the {max_bytes:,} a {what} can be; "
                          f"{hint}")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} '{p}': {e.strerror}; {hint}") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{what} '{p}' grew past {max_bytes:,} bytes while being read; {hint}")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        raise ConfigError(f"{what} '{p}' is UTF-16/32 encoded; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{p}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text, not counting brackets inside strings (O(n))."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best = depth
        elif ch in "]}":
            depth -= 1
    return best


def check_depth(text: str, what: str, where: str, hint: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """ConfigError when ``text`` nests brackets deeper than ``max_depth`` (JSON; an upper bound for
    TOML), before a recursive parser sees it."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ConfigError(f"{what} '{where}' nests {depth} levels deep (at most {max_depth}); {hint}")


def parse_json(text: str, what: str, where: str, hint: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with the nesting depth capped first; one-line ConfigError on bad JSON."""
    check_depth(text, what, where, hint, max_depth)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} '{where}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                          f"{hint}") from None
    except RecursionError:  # pragma: no cover - depth is capped above
        raise ConfigError(f"{what} '{where}' nests too deep; {hint}") from None


def read_json_file(path: str | Path, what: str, hint: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """:func:`read_text_file` then :func:`parse_json`."""
    return parse_json(read_text_file(path, what, hint, max_bytes), what, str(path), hint)


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


def is_number(v: Any) -> bool:
    """A real int or float (bool is not a number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    """An integer, Python's or numpy's (bool is not one here); the common case checked first."""
    return type(v) is int or (isinstance(v, Integral) and not isinstance(v, bool))


def is_finite(v: Any) -> bool:
    """A finite real number, Python's or numpy's (bool, NaN and ±inf are not)."""
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def finite(v: Any, name: str, fix: str) -> float:
    """``v`` as a finite float, else InputError naming ``name`` and ``fix``."""
    if not is_number(v) or not math.isfinite(v):
        raise InputError(f"{name} {v!r} is not a finite number; {fix}")
    return float(v)


def positive_int(v: Any, name: str, fix: str, upper: int | None = None) -> int:
    """``v`` as an int > 0 (and ≤ ``upper``), else InputError naming ``name`` and ``fix``."""
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or (upper is not None and v > upper):
        raise InputError(f"{name} {v!r} is not a positive integer{'' if upper is None else f' up to {upper:,}'}; "
                         f"{fix}")
    return v


def _describe(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (str, bool, list, dict)) or v is None else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_model_config(cfg: Any, where: str) -> None:
    """Refuse config.json values that no model can have, before any rule loops over them.

    Checks (each a one-line ConfigError naming key, value and fix): the config is a JSON object
    with a string ``model_type``; every key of DIMENSION_KEYS present is an int in
    [1, MAX_DIMENSION] (layer counts ≤ MAX_LAYERS); OPTIONAL_DIMENSION_KEYS are null or such an
    int; FLOAT_KEYS finite and ≥ 0; DROPOUT_KEYS in [0, 1); BOOL_KEYS booleans; key/value head
    counts divide the attention heads; and the weights implied by the dimensions stay under
    MAX_WEIGHT_BYTES (fp32) so nothing huge is ever enumerated.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"'{where}' holds a JSON {type(cfg).__name__}, not an object; "
                          f"a Hugging Face config.json is an object with a model_type")
    mt = cfg.get("model_type")
    if mt is None:
        raise ConfigError(f"'{where}' has no 'model_type'; a Hugging Face config.json names its model_type")
    if not isinstance(mt, str) or not mt.strip() or len(mt) > 100:
        raise ConfigError(f"'{where}': model_type {_describe(mt)} is not a model type name such as \"llama\"")

    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"'{where}': {key} = {_describe(cfg[key])} must be {want}; fix config.json")

    for key in DIMENSION_KEYS + OPTIONAL_DIMENSION_KEYS:
        if key not in cfg:
            continue
        v = cfg[key]
        if v is None and key in OPTIONAL_DIMENSION_KEYS:
            continue
        upper = MAX_LAYERS if key in LAYER_KEYS else MAX_DIMENSION
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= upper:
            want = f"a positive integer up to {upper:,}" + (" or null" if key in OPTIONAL_DIMENSION_KEYS else "")
            raise bad(key, want)
    for key in FLOAT_KEYS:
        if key in cfg and cfg[key] is not None and (not is_number(cfg[key]) or not math.isfinite(cfg[key])
                                                    or cfg[key] < 0):
            raise bad(key, "a finite number >= 0")
    for key in DROPOUT_KEYS:
        if key in cfg and cfg[key] is not None and (not is_number(cfg[key]) or not 0 <= cfg[key] < 1):
            raise bad(key, "a probability in [0, 1)")
    for key in BOOL_KEYS:
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    heads = cfg.get("num_attention_heads", cfg.get("num_heads", cfg.get("n_head")))
    for key in ("num_key_value_heads", "num_kv_heads"):
        kv = cfg.get(key)
        if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
            raise ConfigError(f"'{where}': {key} = {kv} does not divide the {heads} attention heads; "
                              f"grouped-query attention needs heads = a multiple of key/value heads")
    if _weight_bytes_bound(cfg) > MAX_WEIGHT_BYTES:
        raise ConfigError(f"'{where}': these dimensions give more than {MAX_WEIGHT_BYTES:.0e} bytes of weights; "
                          f"check num_hidden_layers, hidden_size, intermediate_size and vocab_size")


def _weight_bytes_bound(cfg: Mapping[str, Any]) -> int:
    """fp32 bytes of a dense transformer with these dimensions (attention 4·h², MLP 3·h·I,
    embeddings 2·V·h per layer stack): an upper bound for every family loraplan knows."""
    def first(*keys, default=0):
        for k in keys:
            v = cfg.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return default

    h = first("hidden_size", "d_model", "n_embd", default=1)
    inner = first("intermediate_size", "d_ff", "ffn_dim", "n_inner", default=4 * h)
    heads_dim = first("num_attention_heads", "num_heads", "n_head", default=1) * first("head_dim", "d_kv", default=0)
    width = max(h, heads_dim)
    layers = sum(cfg[k] for k in LAYER_KEYS if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool))
    vocab = first("vocab_size", default=1)
    return 4 * (max(layers, 1) * (4 * width * h + 3 * h * inner) + 2 * vocab * h)


# ------------------------------------------------------------------------------------------------
# Calibration coefficients
# ------------------------------------------------------------------------------------------------

GiB = 1 << 30

#: coefficient -> (lowest, highest, what it is): the physically possible range of each named
#: coefficient a calibration may set. A value outside it is a broken file or a bad fit, never a
#: GPU's property (efficiencies are fractions of peak; host costs per call are below 0.1 s).
COEFFICIENT_RANGES: dict[str, tuple[float, float, str]] = {
    "cublas_handles": (1, 64, "cuBLAS handles (one per thread that runs matmuls)"),
    "cublas_workspace_bytes_sm90": (0, GiB, "bytes of one cuBLAS workspace on sm90+"),
    "cublas_workspace_bytes_pre_sm90": (0, GiB, "bytes of one cuBLAS workspace before sm90"),
    "allocator_overhead_bytes": (0, 16 * GiB, "bytes the allocator holds beyond the ledger"),
    "reserved_over_allocated_ratio": (0, 4, "peak reserved / peak allocated - 1"),
    "cuda_context_bytes": (0, 16 * GiB, "bytes of the CUDA context and libraries"),
    "peak_allocated_uncertainty_ratio": (0, 1, "relative uncertainty of peak allocated"),
    "reserved_over_allocated_uncertainty": (0, 4, "uncertainty of the reserved / allocated ratio"),
    "cuda_context_uncertainty_bytes": (0, 16 * GiB, "bytes of uncertainty of the CUDA context"),
    "time_eff_mm": (1e-4, 1, "achieved / peak tensor-core matmul throughput"),
    "time_eff_fp32": (1e-4, 1, "achieved / peak fp32 matmul throughput"),
    "time_eff_bw": (1e-4, 1, "achieved / peak memory bandwidth"),
    "time_gpu_kernel_s": (0, 0.01, "GPU seconds per kernel"),
    "time_host_op_s": (0, 0.01, "host seconds per dispatched op"),
    "time_host_lora_call_s": (0, 0.1, "host seconds per LoRA module call"),
    "time_host_bnb4_call_s": (0, 0.1, "host seconds per bitsandbytes 4-bit call"),
    "time_host_int8_call_s": (0, 0.1, "host seconds per bitsandbytes int8 call"),
    "time_host_step_s": (0, 60, "fixed host seconds per step"),
    "time_host_gc_hook_s": (0, 0.01, "host seconds per gradient-checkpointing saved-tensor hook call"),
    "time_host_speed": (0.01, 100, "host speed relative to the reference host (host costs are divided by it)"),
    "time_eff_attn": (1e-4, 1, "achieved / peak fused-attention throughput"),
}


def check_coefficients(coefficients: Any, where: str) -> dict[str, float]:
    """The coefficients of a calibration, each a known name with a finite number in its range.

    Raises ConfigError naming the file, the coefficient, its value and the allowed range (or the
    known names, for an unknown one). Returns them as floats.
    """
    from .errors import suggest

    if not isinstance(coefficients, Mapping):
        raise ConfigError(f"calibration '{where}': 'coefficients' must be an object of name: number; "
                          f"make one with 'loraplan calibrate'")
    out = {}
    for name, v in coefficients.items():
        if name not in COEFFICIENT_RANGES:
            raise ConfigError(f"calibration '{where}': unknown coefficient '{name}'"
                              f"{suggest(str(name), COEFFICIENT_RANGES)}; known: {', '.join(COEFFICIENT_RANGES)}")
        lo, hi, what = COEFFICIENT_RANGES[name]
        if not is_number(v) or not math.isfinite(v) or not lo <= v <= hi:
            raise ConfigError(f"calibration '{where}': {name} = {_describe(v)} is not a possible {what} "
                              f"(allowed {lo:g} to {hi:g}); fix the file or re-run 'loraplan calibrate'")
        out[name] = float(v)
    return out
