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


def model_names() -> list[str]:
    return sorted(model_entries())


@lru_cache(maxsize=256)
def load_model(name_or_path: str) -> ModelSpec:
    """A catalog name, a folder holding config.json, or a path to a config.json."""
    from ..hf import load_config, spec_from_config

    entries = model_entries()
    key = name_or_path.strip().lower()
    if key in entries:
        e = entries[key]
        spec = spec_from_config(e["config"], e["name"])
        return _with_source(spec, e.get("source", ""))
    p = Path(name_or_path).expanduser()
    if p.exists() or "/" in name_or_path or name_or_path.endswith(".json"):
        cfg = load_config(p)
        name = p.parent.name if p.name == "config.json" else (p.name if p.is_dir() else p.stem)
        return _with_source(spec_from_config(cfg, name), str(p))
    raise UnknownNameError(
        f"unknown model '{name_or_path}'{suggest(key, entries)} "
        f"(see 'loraplan models', or give a path to a config.json)")


def _with_source(spec: ModelSpec, source: str) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, source=source)


def gpu_ids() -> list[str]:
    return sorted(gpu_entries())


@lru_cache(maxsize=None)
def load_gpu(gpu_id: str) -> GpuSpec:
    entries = gpu_entries()
    key = gpu_id.strip().lower()
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
    base = dict(entries.get("default", {}).get("coefficients", {}))
    prov = {"default": entries.get("default", {}).get("provenance", {})}
    if path is not None:
        from ..errors import ConfigError

        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read calibration file '{path}': {e}; "
                              f"make one with 'loraplan calibrate'") from None
        base.update(data.get("coefficients", {}))
        return Calibration(gpu=data.get("gpu", gpu_id or ""), coefficients=base,
                           provenance={"file": str(path), **data.get("provenance", {})})
    if gpu_id and gpu_id in entries:
        base.update(entries[gpu_id].get("coefficients", {}))
        prov[gpu_id] = entries[gpu_id].get("provenance", {})
    return Calibration(gpu=gpu_id or "", coefficients=base, provenance=prov)
