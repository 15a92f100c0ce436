"""Measured cases, whatever file they come from, as one :class:`Measurement` dataclass.

Two sources are read:

- profile records (``profiles/<gpu-id>.jsonl``, written by ``loraplan profile``; one JSON object
  per line, read with :func:`loraplan.profile.records.read_records`): ``inputs`` (the keys of
  :func:`loraplan.spec.run_inputs` plus ``device`` and ``gpu_id``), ``status``, ``memory``
  (``peak_allocated_bytes``, ``peak_reserved_bytes``, per-phase peaks), ``nvml``
  (``baseline_used_bytes``, ``peak_used_bytes``), ``time.step_s_median``, ``env.versions``;
- the shipped reference file (``loraplan/data/h100-measurements.json``) or one like it: model
  configs under ``models`` and flat cases (``peak_allocated_bytes``, ``step_s_median``).

``calibrate``, ``validate`` and ``report validation`` all read measurements through
:func:`load_measurements`. Pure Python: no torch, no pandas.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError, InputError, LoraplanError
from .inputs import is_finite, is_int
from .spec import LoraSpec, ModelSpec, TrainSpec

#: what ``calibrate`` / ``validate`` read when given no files
DEFAULT_PROFILE_GLOB = "profiles/*.jsonl"
REFERENCE = "reference"  # a RECORDS argument naming the shipped reference file

VERSIONED = ("torch", "transformers", "peft", "bitsandbytes")


@dataclass(frozen=True)
class Measurement:
    """One measured case: the specs it ran and what was measured (bytes, seconds)."""

    id: str
    source: str  # file (and line) it was read from
    gpu: str | None  # catalog GPU id; "cpu" for --device cpu records
    model: ModelSpec
    lora: LoraSpec
    train: TrainSpec
    status: str = "ok"  # ok | oom | timeout | error
    peak_allocated_bytes: int | None = None  # torch.cuda.max_memory_allocated over the steps
    peak_reserved_bytes: int | None = None  # torch.cuda.max_memory_reserved over the steps
    nvml_peak_used_bytes: int | None = None  # NVML "used", largest sample
    nvml_baseline_used_bytes: int | None = None  # NVML "used" before CUDA was initialised
    #: NVML used - baseline - torch.cuda.memory_reserved, read together after the last step
    #: (profile.probes.CudaProbe.outside_allocator): the CUDA context, modules, managed pages
    outside_allocator_bytes: int | None = None
    step_s: float | None = None  # median step time after warm-up
    versions: dict[str, str | None] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # memory phase peaks / currents
    error: str | None = None
    #: the meta-device trace's predicted peak allocated (record's ``trace`` from ``profile --trace``,
    #: or ``validate --trace``); None when the record has none or its trace failed
    trace_peak_allocated_bytes: int | None = None
    trace_peak_phase: str | None = None
    trace_error: str | None = None  # why the record's trace failed
    #: the record's torch.profiler kernel summary (profile/kernels.py), or None
    kernels: dict | None = None
    #: a multi-GPU case (issue 13): "summary" (the case: worst rank's peak, mean step time) or
    #: "rank" (one rank's record, ``rank``); None for a one-GPU record. ``world_size``: its GPUs.
    record: str | None = None
    rank: int | None = None
    world_size: int = 1

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def device_used_bytes(self) -> int | None:
        """Device memory this run added (NVML peak − baseline): compare with the device total."""
        if self.nvml_peak_used_bytes is None:
            return None
        return self.nvml_peak_used_bytes - (self.nvml_baseline_used_bytes or 0)


@dataclass
class MeasurementSet:
    """Measurements read from files, and the records that could not be used (with why)."""

    measurements: list[Measurement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.measurements)

    def __iter__(self):
        return iter(self.measurements)

    @property
    def gpus(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.measurements:
            out[m.gpu or "unknown"] = out.get(m.gpu or "unknown", 0) + 1
        return out


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def default_sources(root: str | Path = ".", reference: bool = True) -> list[str]:
    """profiles/*.jsonl under ``root`` plus (``reference``) the shipped reference file."""
    files = sorted(str(p) for p in Path(root).glob(DEFAULT_PROFILE_GLOB))
    return files + ([REFERENCE] if reference else [])


def load_measurements(paths: Iterable[str | Path] | None = None) -> MeasurementSet:
    """Read every measurement in ``paths`` (files, folders of *.jsonl, or ``"reference"``).

    ``None`` reads :func:`default_sources`. A path that does not exist raises InputError; a
    record that cannot be turned into specs is skipped and listed in ``problems``.
    """
    out = MeasurementSet()
    for p in (default_sources() if paths is None else list(paths)):
        p = str(p)
        if p == REFERENCE:
            _read_reference(None, out)
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if not files:
                raise InputError(f"folder '{p}' holds no *.jsonl profile records; run 'loraplan profile' or name the files")
            for f in files:
                _read_jsonl(f, out)
        elif not path.exists():
            raise InputError(f"records file '{p}' does not exist; give profiles/<gpu-id>.jsonl files "
                             f"(from 'loraplan profile') or '{REFERENCE}' for the shipped H100 measurements")
        elif path.suffix == ".jsonl":
            _read_jsonl(path, out)
        else:
            _read_json(path, out)
    return out


def reference_measurements(path: str | Path | None = None) -> list[Measurement]:
    """The shipped H100 reference cases (or a file like it) as measurements."""
    out = MeasurementSet()
    _read_reference(path, out)
    return out.measurements


def _read_jsonl(path: Path, out: MeasurementSet) -> None:
    from .profile.records import read_records

    rf = read_records(path)
    out.files.append(str(path))
    out.problems.extend(rf.messages())
    for i, rec in enumerate(rf.records, start=1):
        try:
            out.measurements.append(measurement_from_record(rec, f"{path}#{i}"))
        except LoraplanError as e:
            out.problems.append(f"{path}: record {i} ({rec.get('label') or rec.get('key') or '?'}) skipped: {e}")


def _read_json(path: Path, out: MeasurementSet) -> None:
    from .inputs import read_json_file

    data = read_json_file(path, "records file", "give a .jsonl from 'loraplan profile' "
                                                "or a reference file with 'models' and 'cases'")
    if isinstance(data, dict) and "cases" in data and "models" in data:
        _read_reference(path, out, data)
        return
    recs = data if isinstance(data, list) else [data]
    out.files.append(str(path))
    for i, rec in enumerate(recs, start=1):
        if not isinstance(rec, dict):
            out.problems.append(f"{path}: item {i} is not a JSON object; skipped")
            continue
        try:
            out.measurements.append(measurement_from_record(rec, f"{path}#{i}"))
        except LoraplanError as e:
            out.problems.append(f"{path}: record {i} skipped: {e}")


def _read_reference(path: str | Path | None, out: MeasurementSet, data: dict | None = None) -> None:
    from .hf import spec_from_config
    from .reference import REFERENCE_FILE, REFERENCE_GPU, case_specs

    from .inputs import read_json_file

    p = Path(path) if path else REFERENCE_FILE
    hint = "give a .jsonl from 'loraplan profile' or a reference file with 'models' and 'cases'"
    if data is None:
        data = read_json_file(p, "records file", hint)
    if not (isinstance(data, dict) and isinstance(data.get("models"), dict) and isinstance(data.get("cases"), list)):
        raise ConfigError(f"records file '{p}' needs 'models' (an object) and 'cases' (a list); {hint}")
    out.files.append(str(p))
    models = {}
    for name, cfg in data["models"].items():
        try:
            models[name] = spec_from_config(cfg, name)
        except LoraplanError as e:
            out.problems.append(f"{p}: model '{name}' skipped: {e}")
    gpu = _gpu_from_name(data.get("gpu") if isinstance(data.get("gpu"), str) else None) or REFERENCE_GPU
    about = data.get("about", "")
    versions = versions_from_text(about if isinstance(about, str) else "")
    for i, c in enumerate(data["cases"], start=1):
        try:
            if not isinstance(c, dict):
                raise ConfigError(f"case is a JSON {type(c).__name__}, not an object")
            missing = [k for k in ("model", "quant", "optimizer", "batch", "seq", "rank", "alpha", "dropout",
                                   "targets", "gradient_checkpointing") if c.get(k) is None]
            if missing:
                raise ConfigError(f"case lacks {', '.join(missing)}")
            check_inputs(c)
            check_measured(c)
            c = dict(c, targets=_targets_list(c["targets"]))
        except LoraplanError as e:
            out.problems.append(f"{p}: case {i} skipped: {e}")
            continue
        model = models.get(c["model"]) if isinstance(c["model"], str) else None
        if model is None:
            out.problems.append(f"{p}: case {c.get('id')} names model '{c['model']}' that the file's 'models' lacks; skipped")
            continue
        try:
            lora, train = case_specs(c, model)
        except LoraplanError as e:
            out.problems.append(f"{p}: case {c.get('id') or i} skipped: {e}")
            continue
        out.measurements.append(Measurement(
            id=c.get("id") or c["model"], source=f"{p}#{c.get('id')}", gpu=c.get("gpu") or gpu, model=model,
            lora=lora, train=train, status=c.get("status", "ok"),
            peak_allocated_bytes=_int(c.get("peak_allocated_bytes")),
            peak_reserved_bytes=_int(c.get("peak_reserved_bytes")),
            nvml_peak_used_bytes=_int(c.get("nvml_peak_used_bytes")),
            nvml_baseline_used_bytes=_int(c.get("nvml_baseline_used_bytes")),
            step_s=_float(c.get("step_s_median", c.get("step_s"))), versions=dict(versions), **trace_fields(c)))


def versions_from_text(text: str) -> dict[str, str]:
    """'torch 2.11.0+cu130, transformers 5.17.0, ...' -> {'torch': '2.11.0+cu130', ...}."""
    out = {}
    for pkg in VERSIONED:
        m = re.search(rf"\b{pkg}\s+v?([0-9][0-9A-Za-z.+\-]*[0-9A-Za-z])", text or "")
        if m:
            out[pkg] = m.group(1)
    return out


def _int(v) -> int | None:
    return None if v is None else int(v)


def _float(v) -> float | None:
    return None if v is None else float(v)


def _gpu_from_name(name: str | None) -> str | None:
    if not name:
        return None
    from .profile.records import gpu_id_for_name

    return gpu_id_for_name(name)


def _model_for(inputs: dict, rec: dict) -> ModelSpec:
    """The record's model: an inline config, a catalog name, or a config path that exists here."""
    from .catalog import load_model, model_entries
    from .hf import spec_from_config

    name = str(inputs.get("model") or "")
    cfg = inputs.get("model_config") or rec.get("model_config")
    if not cfg and isinstance(rec.get("model"), dict):
        cfg = rec["model"].get("config")
    if isinstance(cfg, dict) and cfg:
        return spec_from_config(cfg, name or "model")
    if name.strip().lower() in model_entries() or Path(name).expanduser().exists():
        return load_model(name)
    model_dir = (rec.get("protocol") or {}).get("model_dir")
    if model_dir and (Path(model_dir) / "config.json").exists():
        spec = load_model(str(Path(model_dir) / "config.json"))
        from dataclasses import replace

        return replace(spec, name=name or spec.name)
    raise ConfigError(f"model '{name}' is neither a catalog name nor a config path on this machine; "
                      f"copy its config.json here and set the record's inputs.model to its path")


def measurement_from_record(rec: dict[str, Any], source: str = "") -> Measurement:
    """A profile record (or a flat reference-style case) -> Measurement. Raises ConfigError."""
    from .reference import case_specs

    if not isinstance(rec, dict):
        raise ConfigError(f"record is a JSON {type(rec).__name__}, not an object")
    if "inputs" in rec:
        if not isinstance(rec["inputs"], dict):
            raise ConfigError("record 'inputs' is not an object of option: value")
        inputs = dict(rec["inputs"])
    else:  # flat case: the inputs are the record itself
        inputs = dict(rec)
    missing = [k for k in ("model", "quant", "optimizer", "batch", "seq", "rank", "targets") if inputs.get(k) is None]
    if missing:
        raise ConfigError(f"record lacks inputs {', '.join(missing)}")
    check_inputs(inputs)
    check_measured(rec)
    inputs["targets"] = _targets_list(inputs["targets"])
    inputs.setdefault("alpha", 2 * int(inputs["rank"]))
    inputs.setdefault("dropout", 0.0)
    inputs.setdefault("gradient_checkpointing", True)
    model = _model_for(inputs, rec)
    lora, train = case_specs(inputs, model)
    train = _with_parallel(train, inputs)
    if model.is_encoder_decoder and train.target_seq is None:
        from dataclasses import replace

        train = replace(train, target_seq=train.seq)

    mem = rec.get("memory") or {}
    nvml = rec.get("nvml") or {}
    tm = rec.get("time") or {}
    env = rec.get("env") or {}
    device = inputs.get("device") or env.get("device")
    gpu = "cpu" if device == "cpu" else (inputs.get("gpu_id") or inputs.get("gpu") or rec.get("estimate_gpu")
                                         or _gpu_from_name(env.get("gpu_name")))
    step = tm.get("step_s_median") if isinstance(tm, dict) else None
    nv_ok = isinstance(nvml, dict) and nvml.get("available", True)
    phases = {k: dict(v) for k, v in (mem.get("phases") or {}).items() if isinstance(v, dict)}
    return Measurement(
        id=str(rec.get("id") or rec.get("label") or rec.get("key") or source),
        source=source, gpu=gpu, model=model, lora=lora, train=train,
        status=str(rec.get("status") or "ok"),
        peak_allocated_bytes=_int(mem.get("peak_allocated_bytes", rec.get("peak_allocated_bytes"))),
        peak_reserved_bytes=_int(mem.get("peak_reserved_bytes", rec.get("peak_reserved_bytes"))),
        nvml_peak_used_bytes=_int(nvml.get("peak_used_bytes")) if nv_ok else _int(rec.get("nvml_peak_used_bytes")),
        nvml_baseline_used_bytes=_int(nvml.get("baseline_used_bytes")) if nv_ok else _int(rec.get("nvml_baseline_used_bytes")),
        outside_allocator_bytes=_int(nvml.get("outside_allocator_peak_bytes")) if nv_ok else None,
        step_s=_float(step if step is not None else rec.get("step_s_median", rec.get("step_s"))),
        versions=dict(env.get("versions") or rec.get("versions") or {}),
        phases=phases, error=rec.get("error"), **trace_fields(rec), **_multi_gpu_fields(rec, train),
        kernels=rec.get("kernels") if isinstance(rec.get("kernels"), dict) else None,
    )


def _with_parallel(train: TrainSpec, inputs: dict[str, Any]) -> TrainSpec:
    """``train`` with the record's multi-GPU inputs (``spec.PARALLEL_FIELDS``: strategy, num_gpus,
    ...), so an estimate of the record is the estimate of its layout. ConfigError when one is bad."""
    from dataclasses import replace

    from .spec import PARALLEL_FIELDS

    given = {k: inputs[k] for k in PARALLEL_FIELDS if k in inputs}
    if not given:
        return train
    try:
        return replace(train, **given)
    except (InputError, TypeError, ValueError) as e:
        raise ConfigError(f"record's multi-GPU inputs {given}: {e}") from None


def _multi_gpu_fields(rec: dict[str, Any], train: TrainSpec) -> dict[str, Any]:
    """Measurement's record / rank / world_size of a profile record (records.py's multi-GPU layout)."""
    kind = rec.get("record") if rec.get("record") in ("rank", "summary") else None
    rank = rec.get("rank") if kind == "rank" else None
    if kind == "rank" and not (is_int(rank) and rank >= 0):
        raise ConfigError(f"rank record's rank = {_shown(rank)} must be a whole number >= 0")
    world = rec.get("world_size", getattr(train, "num_gpus", 1))
    if not (is_int(world) and world >= 1):
        raise ConfigError(f"world_size = {_shown(world)} must be a whole number >= 1")
    return {"record": kind, "rank": rank, "world_size": int(world)}


#: the record statuses ``loraplan profile`` writes
STATUSES = ("ok", "oom", "timeout", "error")
#: measured byte counts above this (1 PiB) are not a GPU's
MAX_MEASURED_BYTES = 1 << 50
#: a measured step longer than a day is not a training step
MAX_STEP_S = 86_400.0


def _shown(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (str, list, dict, bool)) or v is None else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _targets_list(t: str | list) -> list[str]:
    """A record's targets as a list of names ('q_proj,v_proj' is split like --targets)."""
    from .targets import parse_targets

    return list(parse_targets(t))


def check_inputs(inputs: dict[str, Any]) -> None:
    """The inputs of a record or reference case by type and range, before any spec is built.

    ConfigError (one line: key, value, what it must be) for: model not a name; quant, optimizer,
    attention, device not a known choice; rank, batch, seq, target_seq not a positive integer;
    alpha not finite; dropout outside [0, 1); int8_outlier_fraction outside [0, 1]; targets not
    a name or a list of names; gradient_checkpointing / double_quant not true/false.
    """
    from .spec import ATTENTION, DEVICES, OPTIMIZERS, QUANTS

    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"input {key} = {_shown(inputs.get(key))} must be {want}")

    if not isinstance(inputs.get("model"), str) or not inputs["model"].strip():
        raise bad("model", "a catalog name or a config path")
    for key, choices in (("quant", QUANTS), ("optimizer", OPTIMIZERS), ("attention", ATTENTION), ("device", DEVICES)):
        v = inputs.get(key)
        if v is None and key in ("attention", "device"):
            continue
        if not isinstance(v, str) or v not in choices:
            raise bad(key, f"one of {', '.join(choices)}")
    for key in ("rank", "batch", "seq", "target_seq"):
        v = inputs.get(key)
        if v is None and key == "target_seq":
            continue
        if not is_int(v) or v <= 0:
            raise bad(key, "a positive integer")
    if "alpha" in inputs and not is_finite(inputs["alpha"]):
        raise bad("alpha", "a finite number")
    if "dropout" in inputs and not (is_finite(inputs["dropout"]) and 0 <= inputs["dropout"] < 1):
        raise bad("dropout", "a number in [0, 1)")
    frac = inputs.get("int8_outlier_fraction")
    if frac is not None and not (is_finite(frac) and 0 <= frac <= 1):
        raise bad("int8_outlier_fraction", "a number in [0, 1] or null")
    t = inputs.get("targets")
    if not ((isinstance(t, str) and t.strip())
            or (isinstance(t, list) and t and all(isinstance(x, str) and x.strip() for x in t))):
        raise bad("targets", "a module name or a list of module names")
    for key in ("gradient_checkpointing", "double_quant"):
        if inputs.get(key) is not None and not isinstance(inputs[key], bool):
            raise bad(key, "true or false")


def check_measured(rec: dict[str, Any]) -> None:
    """What a record says was measured, by type and physical range (ConfigError, one line).

    status one of STATUSES; ``memory`` / ``nvml`` / ``time`` / ``env`` / ``trace`` objects when
    present; peaks (allocated, reserved, NVML used, trace) whole numbers > 0 (a zero peak is a
    failed measurement, never a pass) and below MAX_MEASURED_BYTES; NVML baseline >= 0 and below
    the NVML peak; reserved >= allocated (the caching allocator reserves what it hands out);
    step time finite, > 0 and below MAX_STEP_S.
    """
    status = rec.get("status", "ok")
    if status is not None and status not in STATUSES:
        raise ConfigError(f"status {_shown(status)} must be one of {', '.join(STATUSES)}")
    for key in ("memory", "nvml", "time", "env", "trace"):
        if rec.get(key) is not None and not isinstance(rec[key], dict):
            raise ConfigError(f"'{key}' = {_shown(rec[key])} must be an object")
    mem = rec.get("memory") or {}
    nvml = rec.get("nvml") or {}
    tm = rec.get("time") or {}
    tr = rec.get("trace") or {}

    def peak(where: str, v: Any, zero_ok: bool = False) -> int | None:
        if v is None:
            return None
        if not is_int(v) and not (is_finite(v) and float(v).is_integer()):
            raise ConfigError(f"{where} = {_shown(v)} must be a whole number of bytes")
        if v < 0 or (v == 0 and not zero_ok) or v > MAX_MEASURED_BYTES:
            raise ConfigError(f"{where} = {_shown(v)} is not a possible measurement "
                              f"(bytes {'>= 0' if zero_ok else '> 0'} and below 1 PiB); re-run 'loraplan profile'")
        return int(v)

    alloc = peak("peak_allocated_bytes", mem.get("peak_allocated_bytes", rec.get("peak_allocated_bytes")))
    reserved = peak("peak_reserved_bytes", mem.get("peak_reserved_bytes", rec.get("peak_reserved_bytes")))
    nv_peak = peak("nvml peak_used_bytes", nvml.get("peak_used_bytes", rec.get("nvml_peak_used_bytes")))
    nv_base = peak("nvml baseline_used_bytes", nvml.get("baseline_used_bytes", rec.get("nvml_baseline_used_bytes")),
                   zero_ok=True)
    peak("trace peak_allocated_bytes", tr.get("peak_allocated_bytes", rec.get("trace_peak_allocated_bytes")))
    for key in ("outside_allocator_idle_bytes", "outside_allocator_peak_bytes"):
        v = nvml.get(key)
        # NVML used - baseline - reserved: may dip below 0 when another process frees memory
        # meanwhile, so only its type and magnitude are checked
        if v is not None and (not is_int(v) or abs(v) > MAX_MEASURED_BYTES):
            raise ConfigError(f"nvml {key} = {_shown(v)} must be a whole number of bytes (NVML used - reserved); "
                              f"re-run 'loraplan profile'")
    if alloc is not None and reserved is not None and reserved < alloc:
        raise ConfigError(f"peak_reserved_bytes {reserved:,} is below peak_allocated_bytes {alloc:,}; the allocator "
                          f"reserves at least what it allocates: a corrupt record")
    if nv_peak is not None and nv_base is not None and nv_base > nv_peak:
        raise ConfigError(f"nvml baseline_used_bytes {nv_base:,} is above peak_used_bytes {nv_peak:,}: a corrupt record")
    step = tm.get("step_s_median", rec.get("step_s_median", rec.get("step_s")))
    if step is not None and not (is_finite(step) and 0 < step <= MAX_STEP_S):
        raise ConfigError(f"step time {_shown(step)} s is not a possible measurement (finite, > 0, at most a day)")
    if rec.get("kernels") is not None:
        from .profile.records import check_kernels

        check_kernels(rec["kernels"])
    for key in ("versions", "phases"):
        v = (rec.get("env") or {}).get(key) if key == "versions" else mem.get(key)
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"'{key}' = {_shown(v)} must be an object")


def trace_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """The Measurement fields of a record's trace: its ``trace`` entry, or flat keys
    ``trace_peak_allocated_bytes`` / ``trace_peak_phase``."""
    tr = rec.get("trace")
    if isinstance(tr, dict):
        if tr.get("error"):
            return {"trace_error": str(tr["error"])}
        return {"trace_peak_allocated_bytes": _int(tr.get("peak_allocated_bytes")),
                "trace_peak_phase": tr.get("peak_phase") or None}
    return {"trace_peak_allocated_bytes": _int(rec.get("trace_peak_allocated_bytes")),
            "trace_peak_phase": rec.get("trace_peak_phase") or None}


# --------------------------------------------------------------------------------------------
# selecting
# --------------------------------------------------------------------------------------------


def select(ms: MeasurementSet | list[Measurement], gpu: str | None = None, *, need_ok: bool = True,
           what: str = "records") -> list[Measurement]:
    """The measurements of one GPU (``gpu`` or the only one present); raise InputError otherwise.

    Mixed GPUs without ``gpu`` and sets without a successful case are user errors that name
    the fix.
    """
    items = list(ms)
    if not items:
        raise InputError(f"no {what} to read; run 'loraplan profile' to make profiles/<gpu-id>.jsonl, "
                         f"or pass '{REFERENCE}' for the shipped H100 measurements")
    counts: dict[str, int] = {}
    for m in items:
        counts[m.gpu or "unknown"] = counts.get(m.gpu or "unknown", 0) + 1
    if gpu is None:
        if len(counts) > 1:
            listing = ", ".join(f"{g} ({n})" for g, n in sorted(counts.items()))
            raise InputError(f"the {what} come from several GPUs: {listing}; pick one with --gpu "
                             f"(e.g. --gpu {sorted(counts)[0]})")
    else:
        gpu = gpu.strip().lower()
        items = [m for m in items if m.gpu == gpu]
        if not items:
            raise InputError(f"no {what} for --gpu {gpu}; the {what} hold: "
                             + ", ".join(f"{g} ({n})" for g, n in sorted(counts.items())))
    if need_ok:
        good = [m for m in items if m.ok and m.peak_allocated_bytes is not None]
        if not good:
            st: dict[str, int] = {}
            for m in items:
                st[m.status] = st.get(m.status, 0) + 1
            raise InputError(f"no successful case among the {len(items)} {what} ("
                             + ", ".join(f"{n} {s}" for s, n in sorted(st.items()))
                             + "); re-run 'loraplan profile' with smaller cases (batch, seq) that fit")
        return good
    return items


def version_flags(m: Measurement, expected: dict[str, str | None] | None = None) -> list[str]:
    """Library versions of ``m`` that differ (major.minor) from ``expected`` (default: the
    versions of the shipped reference, which the formulas are checked against) and the running
    loraplan."""
    exp = dict(expected if expected is not None else expected_versions())
    flags = []
    for pkg, want in exp.items():
        have = m.versions.get(pkg)
        if have and want and _minor(have) != _minor(want):
            flags.append(f"{pkg} {have} (expected {want})")
    return flags


def expected_versions() -> dict[str, str | None]:
    """Reference library versions, and the installed loraplan."""
    from .reference import REFERENCE_FILE

    try:
        out: dict[str, str | None] = versions_from_text(json.loads(REFERENCE_FILE.read_text()).get("about", ""))
    except (OSError, json.JSONDecodeError):
        out = {}
    out["loraplan"] = loraplan_version()
    return out


def loraplan_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("loraplan")
    except metadata.PackageNotFoundError:
        return None


def _minor(v: str) -> str:
    return ".".join(re.split(r"[.+]", str(v))[:2])
