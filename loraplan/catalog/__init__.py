"""Built-in catalogs as data: models/*.json (config.json values + source), gpus/*.json,
calibrations/*.json. Loaders return specs; nothing here imports torch.

Model file: {"name", "source", "config": {...the config.json values...}, "notes"?}
GPU file:   {"id", "name", "vendor", "memory_bytes", "bf16_tflops", ..., "source"}
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..errors import UnknownNameError, suggest
from ..spec import Calibration, GpuSpec, ModelSpec

HERE = Path(__file__).parent


def _read_dir(sub: str, key: str) -> dict[str, dict]:
    """Every JSON file of a catalog folder, keyed by its ``key`` field (else the file stem)."""
    out = {}
    for p in sorted((HERE / sub).glob("*.json")):
        data = json.loads(p.read_text())
        out[data.get(key) or p.stem] = data
    return out


@lru_cache(maxsize=None)
def model_entries() -> dict[str, dict]:
    """Catalog name -> model entry."""
    return _read_dir("models", "name")


@lru_cache(maxsize=None)
def gpu_entries() -> dict[str, dict]:
    """GPU id -> GPU entry."""
    return _read_dir("gpus", "id")


@lru_cache(maxsize=None)
def hub_ids() -> dict[str, str]:
    """Hugging Face repo id ("org/name", lower case) -> catalog name, from each entry's config.json
    source (https://huggingface.co/ORG/NAME/...)."""
    out = {}
    for k, e in model_entries().items():
        src = str(e.get("source", "")).lower()
        if "huggingface.co/" in src:
            parts = src.split("huggingface.co/", 1)[1].split("/")
            if len(parts) > 2 and all(parts[:2]):
                out.setdefault(f"{parts[0]}/{parts[1]}", k)
    return out


def hub_model(hub_id: str) -> str | None:
    """The catalog name whose config.json source is the Hugging Face repo ``hub_id`` ("org/name",
    any case; e.g. meta-llama/Meta-Llama-3-8B -> llama-3-8b), or None."""
    return hub_ids().get(hub_id.strip().strip("/").lower())


def hub_id_like(name: str) -> bool:
    """True for "org/name" with neither part a path word ("." / "..", "~") nor a .json file."""
    parts = name.strip().split("/")
    return (len(parts) == 2 and all(parts) and not name.endswith(".json")
            and not any(p in (".", "..") or p.startswith("~") for p in parts))


def model_names() -> list[str]:
    return sorted(model_entries())


@lru_cache(maxsize=256)
def load_model(name_or_path: str) -> ModelSpec:
    """A catalog name, a folder holding config.json, a path to a config.json, or a Hugging Face id
    whose config.json the catalog holds (``hub_model``; an existing local path of that name wins)."""
    from ..hf import load_config, spec_from_config

    entries = model_entries()
    key = _name(name_or_path, "--model", "a catalog name (see 'loraplan models') or a path to a config.json")
    if key in entries:
        e = entries[key]
        spec = spec_from_config(e["config"], e["name"])
        return _with_source(spec, e.get("source", ""))
    p = Path(name_or_path).expanduser()
    try:
        exists = p.exists()
    except OSError as e:  # e.g. a path component longer than the file system allows
        raise UnknownNameError(f"--model '{name_or_path[:60]}...' is not a usable path ({e.strerror}); "
                               f"give a catalog name (see 'loraplan models') or a path to a config.json") from None
    hub = None if exists else hub_model(name_or_path)  # a local folder wins, as from_pretrained's does
    if hub is not None:
        return load_model(hub)
    if not exists and hub_id_like(name_or_path):  # an org/name the catalog does not hold
        import difflib

        ids = hub_ids()
        close = difflib.get_close_matches(key, list(ids), n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(f'{ids[c]} ({c})' for c in close)}?" if close else ""
        raise UnknownNameError(
            f"--model '{name_or_path}' is not a file and no catalog model comes from huggingface.co/"
            f"{name_or_path}{hint}; give a catalog name (see 'loraplan models') or the path to its config.json")
    if exists or "/" in name_or_path or name_or_path.endswith(".json"):
        cfg = load_config(p)
        name = p.parent.name if p.name == "config.json" else (p.name if p.is_dir() else p.stem)
        return _with_source(spec_from_config(cfg, name), str(p))
    raise UnknownNameError(
        f"unknown model '{name_or_path}'{suggest(key, entries)} "
        f"(see 'loraplan models', or give a path to a config.json)")


#: longer names are refused before they reach the file system (PATH_MAX is 4096 on Linux)
MAX_NAME_CHARS = 4096


def _name(value, option: str, want: str) -> str:
    """A catalog key from a name option: stripped, lower case; empty or absurdly long is an InputError."""
    from ..errors import InputError

    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{option} {value!r} is empty; give {want}")
    if len(value) > MAX_NAME_CHARS:
        raise InputError(f"{option} is {len(value):,} characters long (at most {MAX_NAME_CHARS:,}); give {want}")
    return value.strip().lower()


def _with_source(spec: ModelSpec, source: str) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, source=source)


def gpu_ids() -> list[str]:
    return sorted(gpu_entries())


@lru_cache(maxsize=None)
def load_gpu(gpu_id: str) -> GpuSpec:
    entries = gpu_entries()
    key = _name(gpu_id, "--gpu", "a GPU id such as h100-sxm-80gb (see 'loraplan gpus')")
    if key not in entries:
        raise UnknownNameError(f"unknown GPU '{gpu_id}'{suggest(key, entries)} (see 'loraplan gpus')")
    e = entries[key]
    fields = GpuSpec.__dataclass_fields__
    return GpuSpec(**{k: e.get(k) for k in fields})


@lru_cache(maxsize=None)
def calibration_entries() -> dict[str, dict]:
    return _read_dir("calibrations", "gpu")


def load_calibration(gpu_id: str | None, path: str | None = None) -> Calibration:
    """The calibration in ``path``, else the built-in one for the GPU, else the default one.

    The default (``calibrations/default.json``) holds the values fitted on the H100
    reference with their provenance; a GPU-specific file overrides it name by name.
    """
    entries = calibration_entries()
    base = dict(_checked(entries.get("default", {}).get("coefficients", {}), "default"))
    prov = {"default": entries.get("default", {}).get("provenance", {})}
    if path is not None:
        from ..errors import ConfigError
        from ..inputs import check_coefficients, read_json_file

        hint = "make one with 'loraplan calibrate'"
        data = read_json_file(path, "calibration file", hint)
        if not isinstance(data, dict):
            raise ConfigError(f"calibration file '{path}' holds a JSON {type(data).__name__}, not an object "
                              f"with 'coefficients'; {hint}")
        if "coefficients" not in data:
            raise ConfigError(f"calibration file '{path}' has no 'coefficients'; {hint}")
        gpu = data.get("gpu", gpu_id or "")
        if gpu is not None and not isinstance(gpu, str):
            raise ConfigError(f"calibration file '{path}': 'gpu' must be a GPU id string; {hint}")
        prov_file = data.get("provenance") or {}
        if not isinstance(prov_file, dict):
            raise ConfigError(f"calibration file '{path}': 'provenance' must be an object; {hint}")
        check_coefficients(data["coefficients"], str(path))
        base.update(data["coefficients"])  # the values as written (ints stay ints): checked above
        return Calibration(gpu=gpu or gpu_id or "", coefficients=base,
                           provenance={"file": str(path), **prov_file})
    if gpu_id and gpu_id in entries:
        base.update(_checked(entries[gpu_id].get("coefficients", {}), gpu_id))
        prov[gpu_id] = entries[gpu_id].get("provenance", {})
    return Calibration(gpu=gpu_id or "", coefficients=base, provenance=prov)


@lru_cache(maxsize=None)
def _check_builtin(name: str) -> None:
    from ..inputs import check_coefficients

    check_coefficients(calibration_entries()[name].get("coefficients", {}), str(HERE / "calibrations" / f"{name}.json"))


def _checked(coefficients: dict, name: str) -> dict:
    """A built-in calibration's coefficients as written, range-checked once (inputs.check_coefficients)."""
    if name in calibration_entries():
        _check_builtin(name)
    return dict(coefficients)


def with_host_speed(cal: Calibration, host_speed: float | None) -> Calibration:
    """``cal`` with ``time_host_speed`` set (the host CPU's speed relative to the H100 reference
    host: host costs are divided by it); ``None`` leaves ``cal`` as it is. A value outside
    inputs.COEFFICIENT_RANGES is an InputError naming it."""
    from dataclasses import replace

    from ..errors import InputError
    from ..inputs import COEFFICIENT_RANGES, is_finite

    if host_speed is None:
        return cal
    lo, hi, _ = COEFFICIENT_RANGES["time_host_speed"]
    if not is_finite(host_speed) or not lo <= host_speed <= hi:
        raise InputError(f"--host-speed {host_speed!r} is not a speed relative to the reference host; "
                         f"give a number from {lo:g} to {hi:g} (1.0: the H100 reference host, 2.0: twice as fast)")
    return replace(cal, coefficients={**cal.coefficients, "time_host_speed": float(host_speed)},
                   provenance={**cal.provenance, "host_speed": "--host-speed: set by the user"})


def host_speed_known(cal: Calibration) -> bool:
    """True when ``cal``'s host speed describes the user's machine: set with --host-speed
    (``with_host_speed``) or read from a calibration file (``loraplan calibrate`` fits it from the
    user's records); False for the shipped calibration (the H100 reference host's)."""
    return "host_speed" in cal.provenance or "file" in cal.provenance
