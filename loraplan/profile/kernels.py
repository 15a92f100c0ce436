"""Kernel summary of one burst step (issue 12): device time per kernel class from
``torch.profiler``, and the per-class efficiencies ``calibrate`` fits from such summaries.

``profile_step(step_fn, device)`` runs ``step_fn`` once (one more optimizer step after the timed
ones) under ``torch.profiler.profile`` -- CUDA activity on a GPU (each kernel's device time), CPU
activity on ``--device cpu`` (each aten op's self time; the same path, tested in CI) -- with
``with_flops=True`` (the profiler's FLOP formulas for aten mm / addmm / bmm / baddbmm), and
``summarise`` puts each kernel in a class by the ordered regular expressions of
``loraplan/data/kernel-classes.json`` (matmul, attention, elementwise, reduce, optimizer, copy,
quantization, communication, other). The record keeps it under ``kernels``
(``KERNELS_SCHEMA``; ``profile.records.check_kernels`` checks it).

``class_efficiencies(records, gpu)``: achieved FLOP/s of the matmul class (its FLOPs over its
device time) ÷ the GPU's dense peak for the matmul dtype -> the efficiency the time model's
``time_eff_mm`` means, per record and pooled (FLOP-weighted: total FLOPs over total time), with
which records pinned it. Only records with a CUDA kernel summary on that GPU count: a CPU
summary has no tensor-core peak to compare with.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterable

#: version of the ``kernels`` object a record carries
KERNELS_SCHEMA = 1
#: kernels listed by name in a summary (largest device time first)
TOP_KERNELS = 15
#: the classes a summary may name (kernel-classes.json rules + "other")
KERNEL_CLASSES = ("matmul", "attention", "elementwise", "reduce", "optimizer", "copy", "quantization",
                  "communication", "other")


@lru_cache(maxsize=1)
def kernel_rules() -> dict:
    """loraplan/data/kernel-classes.json, its patterns compiled: {"rules": [(class, regex)],
    "matmul_dtypes": [(dtype, regex)], "about", "sources"}."""
    data = json.loads(resources.files("loraplan").joinpath("data/kernel-classes.json").read_text())
    return {**data,
            "rules": [(c, re.compile(p, re.I)) for c, p in data["rules"]],
            "matmul_dtypes": [(d, re.compile(p, re.I)) for d, p in data["matmul_dtypes"]]}


def kernel_class(name: str) -> str:
    """The class of a kernel (or, on CPU, aten op) name: the first matching rule, else "other"."""
    for cls, rx in kernel_rules()["rules"]:
        if rx.search(name):
            return cls
    return "other"


def matmul_dtype(name: str, default: str | None = None) -> str | None:
    """The dtype a matmul kernel's name says (``matmul_dtypes`` rules), else ``default``."""
    for dt, rx in kernel_rules()["matmul_dtypes"]:
        if rx.search(name):
            return dt
    return default


def summarise(events: Iterable[tuple[str, float, int | None, str]], activity: str, step_wall_s: float,
              default_dtype: str | None = None) -> dict[str, Any]:
    """A kernel summary from ``(name, seconds, flops, kind)`` events. ``kind``: "kernel" (device
    time: counted in the classes' ``time_s``) or "op" (a host-side aten op: only its FLOPs, which
    the profiler knows for the matmul ops, go to its class's ``flops``). On CPU every event is an
    aten op and both (its self time and FLOPs) count. Returns {schema, activity, step_wall_s,
    device_time_s, classes: {class: {time_s, count, flops}}, matmul_by_dtype: {dtype: {time_s,
    count}}, top: [{name, class, time_s, count}], rules}."""
    classes: dict[str, dict[str, Any]] = {}
    by_dtype: dict[str, dict[str, Any]] = {}
    per_name: dict[str, list] = {}
    for name, seconds, flops, kind in events:
        cls = kernel_class(name)
        c = classes.setdefault(cls, {"time_s": 0.0, "count": 0, "flops": 0})
        if kind == "kernel":
            c["time_s"] += seconds
            c["count"] += 1
            n = per_name.setdefault(name, [cls, 0.0, 0])
            n[1] += seconds
            n[2] += 1
            if cls == "matmul":
                dt = matmul_dtype(name, default_dtype) or "unknown"
                d = by_dtype.setdefault(dt, {"time_s": 0.0, "count": 0})
                d["time_s"] += seconds
                d["count"] += 1
        if flops:
            c["flops"] += int(flops)
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
    return {
        "schema": KERNELS_SCHEMA, "activity": activity, "step_wall_s": step_wall_s,
        "device_time_s": sum(c["time_s"] for c in classes.values()),
        "classes": {k: classes[k] for k in KERNEL_CLASSES if k in classes},
        "matmul_by_dtype": by_dtype,
        "top": [{"name": n[:200], "class": v[0], "time_s": v[1], "count": v[2]} for n, v in top],
        "rules": "loraplan/data/kernel-classes.json",
    }


def profile_step(step_fn: Callable[[], None], device: str, default_dtype: str | None = None) -> dict[str, Any]:
    """Run ``step_fn()`` once under ``torch.profiler.profile`` and summarise it (``summarise``).

    CUDA: ``ProfilerActivity.CUDA`` kernels (device time, ``FunctionEvent.time_range``) and the
    CPU-side aten ops' FLOPs; CPU: the aten ops' self CPU time and FLOPs (``aten::`` events
    only: the others are Python / autograd wrappers whose time is host overhead). The step is
    synchronised before and after (``torch.cuda.synchronize``) so its wall time is the step's."""
    import time

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=acts, with_flops=True, record_shapes=False) as prof:
        t0 = time.perf_counter()
        step_fn()
        sync()
        wall = time.perf_counter() - t0
    events = []
    for e in prof.events():
        if e.device_type == DeviceType.CPU:
            if not e.name.startswith("aten::"):
                continue
            if cuda:
                if e.flops:
                    events.append((e.name, 0.0, e.flops, "op"))
            else:
                events.append((e.name, e.self_cpu_time_total * 1e-6, e.flops, "kernel"))
        elif cuda and e.device_type == DeviceType.CUDA:
            events.append((e.name, e.time_range.elapsed_us() * 1e-6, None, "kernel"))
    return summarise(events, "cuda" if cuda else "cpu", wall, default_dtype)


def wanted(option: bool | None, device: str) -> bool:
    """Whether a burst records a kernel summary: ``--kernel-summary`` / ``--no-kernel-summary``
    when given, else on CUDA only (on CPU the summary measures the host's aten ops, useful only
    to test the path; the profiler's overhead is one extra step, after the timed ones)."""
    return bool(option) if option is not None else device == "cuda"


# ----------------------------------------------------------------------------- calibration
#: the time model's coefficient a matmul efficiency of each dtype sets (estimate/time.py COEFFICIENTS)
MATMUL_COEFFICIENT = {"bf16": "time_eff_mm", "fp16": "time_eff_mm", "fp32": "time_eff_fp32"}


def kernel_fits(measurements, gpu) -> dict[str, dict[str, Any]]:
    """What the records' kernel summaries pin: {coefficient: {"value", "records", "method",
    "per_record"}} from ``class_efficiencies`` (the matmul class -> ``MATMUL_COEFFICIENT`` of its
    dtype). ``measurements``: ``loraplan.measurements.Measurement`` (``kernels``, ``train``, ``id``)
    of one GPU, ``gpu`` its GpuSpec. Empty when no record has a CUDA summary with matmul work."""
    from ..storage import Dtypes

    rows = []
    for m in measurements:
        if not m.kernels:
            continue
        try:
            dt = Dtypes.of(m.train).frozen_matmul
        except Exception:  # noqa: BLE001 - a record whose recipe does not resolve pins nothing
            continue
        rows.append((m.id, m.kernels, dt))
    out = {}
    for cls, fit in class_efficiencies(rows, gpu).items():
        name = MATMUL_COEFFICIENT.get(fit["dtype"]) if cls == "matmul" else None
        if name:
            out[name] = {"value": fit["efficiency"], "records": fit["records"], "per_record": fit["per_record"],
                         "method": f"measured: {fit['source']} (records {', '.join(fit['records'][:5])}"
                                   f"{' ...' if len(fit['records']) > 5 else ''})"}
    return out


def _peak_flops(gpu, dtype: str) -> float | None:
    tf = {"bf16": gpu.bf16_tflops, "fp16": gpu.fp16_tflops, "fp32": gpu.fp32_tflops}.get(dtype)
    return tf * 1e12 if tf else None


def class_efficiencies(records: Iterable[tuple[str, dict, str]], gpu) -> dict[str, Any]:
    """Matmul efficiency from kernel summaries: per record ``flops / time_s / peak`` of its
    matmul class (peak: ``gpu``'s dense TFLOPS for the matmul dtype the summary's kernels name,
    the dtype with most matmul time; FLOPs of every matmul dtype over the time of all matmul
    kernels), and pooled over the records (Σ flops / Σ time / peak) when they share a dtype.

    ``records``: (record id, kernels summary, frozen-matmul dtype of the run). Only CUDA
    summaries with matmul FLOPs and time count. Returns {"matmul": {"efficiency", "dtype",
    "records": [ids], "per_record": {id: efficiency}, "source"}} or {} when none pins it."""
    per: dict[str, float] = {}
    pinned: list[str] = []
    tot_f = tot_t = 0.0
    dtypes: set[str] = set()
    for rid, k, run_dtype in records:
        if not isinstance(k, dict) or k.get("activity") != "cuda":
            continue
        mm = (k.get("classes") or {}).get("matmul") or {}
        flops, t = float(mm.get("flops") or 0), float(mm.get("time_s") or 0)
        if flops <= 0 or t <= 0:
            continue
        by = k.get("matmul_by_dtype") or {}
        dt = max(by, key=lambda d: by[d].get("time_s", 0)) if by else run_dtype
        if dt in (None, "unknown"):
            dt = run_dtype
        peak = _peak_flops(gpu, dt)
        if not peak:
            continue
        per[rid] = flops / t / peak
        pinned.append(rid)
        dtypes.add(dt)
        tot_f += flops
        tot_t += t
    if not pinned or len(dtypes) != 1:
        return {}
    dt = dtypes.pop()
    return {"matmul": {"efficiency": tot_f / tot_t / _peak_flops(gpu, dt), "dtype": dt, "records": pinned,
                       "per_record": per,
                       "source": f"torch.profiler kernel summaries (records' 'kernels'): matmul-class FLOPs "
                                 f"(profiler with_flops on aten mm/addmm/bmm/baddbmm) over matmul-kernel device "
                                 f"time, / {gpu.id} dense {dt} peak"}}
