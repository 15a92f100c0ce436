"""Measurements -> Calibration: fit, per GPU, only the coefficients physics cannot know.

A calibration never changes a formula; it only sets named coefficients that the formulas read
with ``Calibration.get`` (loraplan/estimate/memory.py, loraplan/estimate/time.py):

==============================  ==========================================================  =====================
coefficient                     fitted from                                                 needs
==============================  ==========================================================  =====================
allocator_overhead_bytes        measured − predicted peak allocated (least squares on        peak allocated
                                relative error; >= 0: an overhead cannot be negative, a
                                negative residual is the formulas' to explain)
reserved_over_allocated_ratio   measured peak reserved / measured peak allocated − 1          peak reserved
                                (least squares on relative error of reserved; >= 0)
cuda_context_bytes              NVML used (peak − baseline) − measured peak reserved −        NVML samples
                                predicted paged optimizer buffers (median; >= 0)
time_* (loraplan/estimate/      host costs: non-negative least squares on relative error of  step times
time.py COEFFICIENTS)           the cases the model calls host-bound; GPU efficiencies:
                                coarse grid in 0.3-0.9 of peak starting from the sourced
                                priors of the GPU's generation (data/kernel-efficiency.json),
                                kept at the prior when they do not change the fit (host-
                                bound records); below 3 records per coefficient only
                                time_host_speed (every host cost ÷ it); a record's kernel
                                summary (profile --kernel-summary) measures the matmul
                                efficiency directly and replaces the grid
==============================  ==========================================================  =====================

A coefficient the records cannot determine (no reserved / NVML / step-time data, a per-call
cost of a kind no record exercises, fewer than ``MIN_RECORDS`` records) keeps its value from
the base calibration, and the result says why. Pure Python: no torch, no numpy, no pandas.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import InputError
from .measurements import Measurement, loraplan_version
from .spec import Calibration, GpuSpec

MIN_RECORDS = 2
METRICS = ("allocated", "reserved", "device", "step")
METRIC_LABELS = {"allocated": "peak allocated", "reserved": "peak reserved",
                 "device": "device total (NVML)", "step": "step time"}
#: GPU efficiency grid (fractions of the catalog peak). time_eff_mm / time_eff_fp32 start from the
#: sourced priors of the GPU's generation (data/kernel-efficiency.json) and move only when the
#: records improve the fit by EFF_MIN_GAIN (GPU-bound records); time_eff_bw as benchmarks/fit_time_h100.py
EFF_GRID = {"time_eff_mm": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
            "time_eff_fp32": [0.3, 0.45, 0.6, 0.75, 0.9],
            "time_eff_bw": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
#: host coefficients of the time model: name(s) -> StepWork counts that multiply them
HOST_TERMS = (
    (("time_host_op_s",), ("ops", "module_calls")),
    (("time_host_gc_hook_s",), ("gc_hooks",)),
    (("time_host_lora_call_s",), ("lora_calls",)),
    (("time_host_bnb4_call_s", "time_host_int8_call_s"), ("bnb4_calls", "int8_calls")),  # one bitsandbytes call cost
    (("time_host_step_s",), ()),  # constant per step
)
#: fit every time coefficient only with at least this many step-time records per coefficient;
#: with fewer, fit only the host speed (the holdout benchmark shows the full fit overfitting 9 records)
RECORDS_PER_COEFFICIENT = 3
#: time coefficients that are durations (scale with s) and efficiencies (scale with 1/s)
_DURATION_PREFIX = ("time_host_", "time_gpu_kernel_s")
#: a GPU-efficiency change must improve the in-sample step-time MAPE by this much (0.1 point) to count
#: as determined: with host-bound records a grid search otherwise chases noise (see the holdout)
EFF_MIN_GAIN = 0.001


@dataclass(frozen=True)
class CoefficientFit:
    name: str
    before: float
    after: float
    fitted: bool
    records: int
    method: str  # how it was fitted, or why not

    def to_dict(self) -> dict:
        return {"before": self.before, "after": self.after, "fitted": self.fitted, "records": self.records,
                "method": self.method}


@dataclass
class CalibrationResult:
    gpu: str
    calibration: Calibration  # every coefficient in effect (base + fitted)
    fits: dict[str, CoefficientFit]
    residuals_before: dict[str, dict]
    residuals_after: dict[str, dict]
    records: list[str]
    sources: list[str] = field(default_factory=list)

    @property
    def fitted(self) -> dict[str, CoefficientFit]:
        return {k: f for k, f in self.fits.items() if f.fitted}

    @property
    def not_fitted(self) -> dict[str, CoefficientFit]:
        return {k: f for k, f in self.fits.items() if not f.fitted}

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "coefficients": dict(self.calibration.coefficients),
                "provenance": dict(self.calibration.provenance)}


# --------------------------------------------------------------------------------------------
# predictions vs measurements
# --------------------------------------------------------------------------------------------


def gpu_for(m: Measurement) -> GpuSpec | None:
    from .catalog import gpu_entries, load_gpu

    return load_gpu(m.gpu) if m.gpu and m.gpu in gpu_entries() else None


def predict(m: Measurement, cal: Calibration, gpu: GpuSpec | None = None, with_time: bool = True):
    """loraplan's estimate for the measured case."""
    from .estimate.api import estimate

    return estimate(m.model, m.lora, m.train, gpu if gpu is not None else gpu_for(m), cal, with_time=with_time)


def metric_pairs(m: Measurement, est) -> dict[str, tuple[float, float]]:
    """metric -> (predicted, measured), for each metric the measurement holds."""
    mem = est.memory
    out: dict[str, tuple[float, float]] = {}
    if m.peak_allocated_bytes is not None:
        out["allocated"] = (mem.peak_allocated_bytes, m.peak_allocated_bytes)
    if m.peak_reserved_bytes is not None:
        out["reserved"] = (mem.peak_reserved_bytes, m.peak_reserved_bytes)
    if m.device_used_bytes is not None:
        out["device"] = (mem.device_total_bytes, m.device_used_bytes)
    if m.step_s is not None and est.time is not None:
        out["step"] = (est.time.step_s, m.step_s)
    return out


def rel_error(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else float("nan")


def summarize(errors: dict[str, float]) -> dict:
    """{case: signed relative error} -> n, MAPE, mean signed error, worst case."""
    if not errors:
        return {"n": 0, "mape": None, "bias": None, "worst": None, "worst_case": None}
    worst = max(errors, key=lambda k: abs(errors[k]))
    return {"n": len(errors), "mape": sum(abs(e) for e in errors.values()) / len(errors),
            "bias": sum(errors.values()) / len(errors), "worst": errors[worst], "worst_case": worst,
            "cases": dict(errors)}


def residuals(measurements: list[Measurement], cal: Calibration) -> dict[str, dict]:
    """metric -> summary of signed relative errors of ``cal``'s estimates on ``measurements``."""
    errs: dict[str, dict[str, float]] = {k: {} for k in METRICS}
    for m in measurements:
        for k, (p, y) in metric_pairs(m, predict(m, cal)).items():
            errs[k][m.id] = rel_error(p, y)
    return {k: summarize(v) for k, v in errs.items() if v}


# --------------------------------------------------------------------------------------------
# memory coefficients
# --------------------------------------------------------------------------------------------


def fit_offset(pred: list[float], meas: list[float]) -> float:
    """b minimising sum(((p + b) - y) / y)^2: a constant byte offset, least squares on relative error."""
    w = [1.0 / (y * y) for y in meas]
    return sum(wi * (y - p) for wi, p, y in zip(w, pred, meas)) / sum(w)


def fit_ratio(allocated: list[float], reserved: list[float]) -> float:
    """r minimising sum((a(1 + r) - y) / y)^2 over measured (allocated, reserved) pairs."""
    num = sum(a * (y - a) / (y * y) for a, y in zip(allocated, reserved))
    den = sum(a * a / (y * y) for a, y in zip(allocated, reserved))
    return num / den


def _with(cal: Calibration, **coef) -> Calibration:
    c = dict(cal.coefficients)
    c.update(coef)
    return Calibration(gpu=cal.gpu, coefficients=c, provenance=cal.provenance)


def _prior(base: Calibration, name: str) -> float:
    """Coefficient ``name`` of ``base``, else of the default calibration (calibrations/default.json)."""
    from .catalog import load_calibration

    return base.get(name, load_calibration(None).coefficients[name])


def fit_memory(ms: list[Measurement], base: Calibration) -> dict[str, CoefficientFit]:
    fits: dict[str, CoefficientFit] = {}
    # allocator overhead: residual of peak allocated with the overhead at zero
    prior = _prior(base, "allocator_overhead_bytes")
    zero = _with(base, allocator_overhead_bytes=0)
    alloc = [m for m in ms if m.peak_allocated_bytes]
    if len(alloc) >= MIN_RECORDS:
        pred = [predict(m, zero, with_time=False).memory.peak_allocated_bytes for m in alloc]
        b = fit_offset(pred, [m.peak_allocated_bytes for m in alloc])
        how = "least squares on relative error of peak allocated, constant bytes added to every moment"
        if b < 0:
            how += f"; unconstrained {b / 2**20:+.1f} MiB clipped to 0 (an overhead cannot be negative)"
        fits["allocator_overhead_bytes"] = CoefficientFit("allocator_overhead_bytes", prior, float(max(0, round(b))),
                                                          True, len(alloc), how)
    else:
        fits["allocator_overhead_bytes"] = CoefficientFit("allocator_overhead_bytes", prior, prior, False, len(alloc),
                                                          f"not fitted: {len(alloc)} records with peak allocated (needs {MIN_RECORDS})")
    # reserved / allocated
    prior = _prior(base, "reserved_over_allocated_ratio")
    both = [m for m in ms if m.peak_allocated_bytes and m.peak_reserved_bytes]
    if len(both) >= MIN_RECORDS:
        r = fit_ratio([m.peak_allocated_bytes for m in both], [m.peak_reserved_bytes for m in both])
        fits["reserved_over_allocated_ratio"] = CoefficientFit(
            "reserved_over_allocated_ratio", prior, round(max(0.0, r), 5), True, len(both),
            "least squares on relative error of measured peak reserved = measured peak allocated x (1 + r)")
    else:
        fits["reserved_over_allocated_ratio"] = CoefficientFit(
            "reserved_over_allocated_ratio", prior, prior, False, len(both),
            f"not fitted: {len(both)} records with peak reserved (needs {MIN_RECORDS}; profile records carry it, "
            f"the shipped reference does not)")
    # CUDA context and other memory outside the allocator
    prior = _prior(base, "cuda_context_bytes")
    nv = [m for m in both if m.device_used_bytes is not None or m.outside_allocator_bytes is not None]
    if len(nv) >= MIN_RECORDS:
        rest, direct = [], 0
        for m in nv:
            outside = predict(m, base, with_time=False).memory.outside_allocator_bytes
            paged = sum(v for k, v in outside.items() if k != "cuda_context_and_libraries")
            if m.outside_allocator_bytes is not None:  # NVML used - reserved read together (probes.py)
                rest.append(m.outside_allocator_bytes - paged)
                direct += 1
            else:
                rest.append(m.device_used_bytes - m.peak_reserved_bytes - paged)
        c = statistics.median(rest)
        fits["cuda_context_bytes"] = CoefficientFit(
            "cuda_context_bytes", prior, float(max(0, round(c))), True, len(nv),
            f"median of NVML used - reserved - predicted paged optimizer buffers ({direct} records read both after "
            f"the last step, {len(nv) - direct} from NVML peak - baseline - measured peak reserved)")
    else:
        fits["cuda_context_bytes"] = CoefficientFit(
            "cuda_context_bytes", prior, prior, False, len(nv),
            f"not fitted: {len(nv)} records with NVML samples and peak reserved (needs {MIN_RECORDS})")
    return fits


# --------------------------------------------------------------------------------------------
# time coefficients
# --------------------------------------------------------------------------------------------


def _solve(A: list[list[float]], y: list[float]) -> list[float] | None:
    """Least squares by the normal equations (a few unknowns); None when singular."""
    n = len(A[0])
    M = [[sum(r[i] * r[j] for r in A) for j in range(n)] + [sum(r[i] * yi for r, yi in zip(A, y))] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(M[r][c]))
        if abs(M[p][c]) < 1e-30 * max(1.0, max(abs(v) for row in M for v in row[:n])):
            return None
        M[c], M[p] = M[p], M[c]
        for r in range(n):
            if r != c:
                f = M[r][c] / M[c][c]
                M[r] = [a - f * b for a, b in zip(M[r], M[c])]
    return [M[i][n] / M[i][i] for i in range(n)]


def nnls(A: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares by trying every active set (a handful of unknowns)."""
    n = len(A[0])
    best, best_x = float("inf"), [0.0] * n
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            x_sub = _solve([[r[c] for c in cols] for r in A], y)
            if x_sub is None or any(v < 0 for v in x_sub):
                continue
            x = [0.0] * n
            for c, v in zip(cols, x_sub):
                x[c] = v
            err = sum((sum(a * b for a, b in zip(r, x)) - yi) ** 2 for r, yi in zip(A, y))
            if err < best:
                best, best_x = err, x
    return best_x


def fit_time(ms: list[Measurement], base: Calibration) -> dict[str, CoefficientFit]:
    """Host costs by NNLS and GPU efficiencies on a grid (the method of benchmarks/fit_time_h100.py)."""
    from .estimate import time as tmod

    from .estimate.efficiency import efficiencies

    names = list(tmod.COEFFICIENTS)
    timed = [m for m in ms if m.step_s and gpu_for(m) is not None]
    # the kernel efficiencies start from the GPU generation's sourced priors unless the base sets them
    coef0 = {**(efficiencies(gpu_for(timed[0])) if timed else {}), **tmod.coefficients(base)}
    names = [k for k in names if k in coef0]

    def keep(why: str, n: int = len(timed)) -> dict[str, CoefficientFit]:
        return {k: CoefficientFit(k, coef0[k], coef0[k], False, n, f"not fitted: {why}") for k in names}

    if len(timed) < MIN_RECORDS:
        return keep(f"{len(timed)} records with step times on a catalog GPU (needs {MIN_RECORDS})")
    gpus = [gpu_for(m) for m in timed]
    # each record's attention kernel on its GPU, as estimate() prices it (time.resolve_attention)
    works = [tmod.step_work(m.model, m.lora, m.train, tmod.resolve_attention(m.model, m.train, g.compute_capability))
             for m, g in zip(timed, gpus)]
    n_free = len(HOST_TERMS) + len(EFF_GRID)
    if len(timed) < RECORDS_PER_COEFFICIENT * n_free:
        return _fit_host_speed(tmod, names, coef0, works, gpus, [m.step_s for m in timed], n_free)
    host_terms = [(ns, fs) for ns, fs in HOST_TERMS if all(n in coef0 for n in ns)]
    if not all(hasattr(works[0], f) for _, fs in host_terms for f in fs):
        return keep("the time model's StepWork lacks the counts this fit multiplies")
    cols = []  # host terms some record exercises
    for ns, fs in host_terms:
        vals = [sum(getattr(w, f) for f in fs) if fs else 1.0 for w in works]
        if any(vals):
            cols.append((ns, fs))
    meas = [m.step_s for m in timed]
    eff_names = [k for k in EFF_GRID if k in coef0]

    def host_fit(eff: dict) -> tuple[float, dict, list[float]]:
        c = dict(coef0, **eff)
        for ns, _ in cols:
            for n in ns:
                c[n] = 0.0
        gpu_s = [tmod.step_time(w, g, c).components.get("gpu_s", 0.0) for w, g in zip(works, gpus)]
        rows, ys = [], []
        for w, g_s, y in zip(works, gpu_s, meas):
            target = y - g_s if getattr(w, "syncs", False) else y
            if g_s < 0.95 * y and target > 0:
                rows.append([(sum(getattr(w, f) for f in fs) if fs else 1.0) / y for _, fs in cols])
                ys.append(target / y)
        if len(rows) >= max(len(cols), MIN_RECORDS):
            x = nnls(rows, ys)
            for (ns, _), v in zip(cols, x):
                for n in ns:
                    c[n] = v
        else:
            for ns, _ in cols:
                for n in ns:
                    c[n] = coef0[n]
        pred = [tmod.step_time(w, g, c).step_s for w, g in zip(works, gpus)]
        score = sum(abs(p - y) / y for p, y in zip(pred, meas)) / len(meas)
        return score, c, pred

    prior_eff = {k: coef0[k] for k in eff_names}
    score0, best_c, _ = host_fit(prior_eff)
    best = (score0, best_c)
    for vals in itertools.product(*(EFF_GRID[k] for k in eff_names)):
        s, c, _ = host_fit(dict(zip(eff_names, vals)))
        if s < best[0] - 1e-12:
            best = (s, c)
    eff_determined = best[0] < score0 - EFF_MIN_GAIN
    final = best[1] if eff_determined else best_c
    fitted_host = {n for ns, _ in cols for n in ns}
    n_host = len(timed)
    out = {}
    for k in names:
        if k in fitted_host:
            out[k] = CoefficientFit(k, coef0[k], float(f"{final[k]:.4g}"), True, n_host,
                                    "non-negative least squares on relative step-time error of host-bound records")
        elif k in eff_names:
            out[k] = CoefficientFit(k, coef0[k], final[k] if eff_determined else coef0[k], eff_determined, n_host,
                                    "grid 0.3-0.9 of peak, lowest step-time MAPE" if eff_determined else
                                    f"not fitted: a better efficiency improves step-time MAPE by < {100 * EFF_MIN_GAIN:.1f} points (records are host-bound)")
        else:
            why = ("no record exercises it" if any(k in ns for ns, _ in host_terms)
                   else "not identifiable from step times (fixed)")
            out[k] = CoefficientFit(k, coef0[k], coef0[k], False, n_host, f"not fitted: {why}")
    return out


#: host-speed search: factors of the base host speed, exp(k · HOST_SPEED_STEP) for |k| <= HOST_SPEED_STEPS
#: (0.22x to 4.5x in 2.5% steps)
HOST_SPEED_STEP = 0.025
HOST_SPEED_STEPS = 60


def _fit_host_speed(tmod, names, coef0, works, gpus, meas, n_free) -> dict[str, CoefficientFit]:
    """Too few records to fit each coefficient: fit only ``time_host_speed``, the host's speed
    relative to the base calibration's host (every host cost ÷ it), by the lowest step-time MAPE
    over a log grid. The GPU efficiencies keep their sourced priors and the per-call cost ratios
    their base values: a handful of mostly host-bound records pin one number, the host."""
    base = coef0.get("time_host_speed", 1.0)
    best = None
    for k in range(-HOST_SPEED_STEPS, HOST_SPEED_STEPS + 1):
        hs = base * math.exp(k * HOST_SPEED_STEP)
        c = dict(coef0, time_host_speed=hs)
        pred = [tmod.step_time(w, g, c).step_s for w, g in zip(works, gpus)]
        score = sum(abs(p - y) / y for p, y in zip(pred, meas)) / len(meas)
        if best is None or score < best[0] - 1e-12:
            best = (score, hs)
    why = (f"host speed only: lowest step-time MAPE ({100 * best[0]:.1f}%) over {len(meas)} records; "
           f"{len(meas)} < {RECORDS_PER_COEFFICIENT}x{n_free} records to fit each coefficient")
    out = {}
    for k in names:
        if k == "time_host_speed":
            out[k] = CoefficientFit(k, base, float(f"{best[1]:.4g}"), True, len(meas), why)
        else:
            out[k] = CoefficientFit(k, coef0[k], coef0[k], False, len(meas),
                                    "not fitted: too few records; the host speed carries the fit")
    return out


# --------------------------------------------------------------------------------------------
# the whole calibration
# --------------------------------------------------------------------------------------------


def calibrate(measurements: Iterable[Measurement], gpu: str, base: Calibration | None = None,
              parts: Iterable[str] = ("memory", "time"), sources: Iterable[str] = ()) -> CalibrationResult:
    """Fit the coefficients the successful ``measurements`` (one GPU) can determine."""
    from .catalog import gpu_entries, load_calibration

    measurements = list(measurements)
    ms = [m for m in calibration_measurements(measurements) if m.ok and m.peak_allocated_bytes is not None]
    if gpu == "cpu":
        raise InputError("these records were measured with --device cpu (no allocator, no NVML, no GPU time); "
                         "calibrate needs GPU records from 'loraplan profile' on a GPU")
    if gpu not in gpu_entries():
        raise InputError(f"GPU '{gpu}' of the records is not in the catalog; add catalog/gpus/{gpu}.json "
                         f"or pick a catalog GPU with --gpu (see 'loraplan gpus')")
    if not ms and any(m.world_size > 1 or m.record for m in measurements):
        raise InputError("these are multi-GPU records (--strategy/--num-gpus), which calibrate does not fit on "
                         "(engine buffers and communication are not one GPU's coefficients); check them with "
                         "'loraplan validate', and calibrate on one-GPU records")
    if not ms:
        raise InputError("no successful case to calibrate on; re-run 'loraplan profile' with cases that fit")
    bad = [m.id for m in ms if m.gpu != gpu]
    if bad:
        raise InputError(f"records {', '.join(bad[:3])} are not from {gpu}; calibrate one GPU at a time (--gpu)")
    base = base or load_calibration(gpu)
    parts = set(parts)
    fits: dict[str, CoefficientFit] = {}
    if "memory" in parts:
        fits.update(fit_memory(ms, base))
    if "time" in parts:
        fits.update(fit_time(ms, base))
        fits.update(fit_kernels(ms, base, gpu))  # a kernel summary measures what the grid guessed
    fits = {k: plausible(f) for k, f in fits.items()}
    coef = dict(base.coefficients)
    for k, f in fits.items():
        if f.fitted:
            coef[k] = f.after
    cal = Calibration(gpu=gpu, coefficients=coef, provenance={})
    before, after = residuals(ms, base), residuals(ms, cal)
    measured_versions: dict[str, list[str]] = {}
    for m in ms:
        for pkg, v in m.versions.items():
            if v and v not in measured_versions.setdefault(pkg, []):
                measured_versions[pkg].append(v)
    prov = {
        "method": "loraplan calibrate (loraplan/calibrate.py): fits only named coefficients; the formulas are unchanged",
        "date": dt.date.today().isoformat(),
        "loraplan": loraplan_version(),
        "measured_with": measured_versions,
        "records": [m.id for m in ms],
        "sources": sorted(set(sources)),
        "fitted": {k: f.to_dict() for k, f in fits.items() if f.fitted},
        "not_fitted": {k: f.method for k, f in fits.items() if not f.fitted},
        "carried_over": "every other coefficient comes from the base calibration "
                        + (base.gpu or "default") + " unchanged",
        "residuals": {"before": _strip(before), "after": _strip(after)},
    }
    cal = Calibration(gpu=gpu, coefficients=coef, provenance=prov)
    return CalibrationResult(gpu=gpu, calibration=cal, fits=fits, residuals_before=before, residuals_after=after,
                             records=[m.id for m in ms], sources=sorted(set(sources)))


def fit_kernels(ms: list[Measurement], base: Calibration, gpu: str) -> dict[str, CoefficientFit]:
    """GPU efficiencies the records' torch.profiler kernel summaries measure directly
    (``profile.kernels.kernel_fits``: matmul-class FLOPs over matmul-kernel time ÷ the GPU's
    peak), each naming the records that pinned it; none when no record carries a CUDA summary."""
    from .catalog import load_gpu
    from .estimate.efficiency import efficiencies
    from .profile.kernels import kernel_fits

    g = load_gpu(gpu)
    prior = {**efficiencies(g), **base.coefficients}  # the generation's sourced prior unless the base sets one
    return {k: CoefficientFit(k, float(prior[k]), f["value"], True, len(f["records"]), f["method"])
            for k, f in kernel_fits(ms, g).items()}


def calibration_measurements(measurements: Iterable[Measurement]) -> list[Measurement]:
    """The one-GPU measurements: the coefficients are one GPU's (allocator, kernels); a multi-GPU
    record (summary or rank, issue 13) adds engine buffers and communication, so it is validated
    (``loraplan validate``), never fitted on."""
    return [m for m in measurements if m.record is None and m.world_size == 1]


def plausible(f: CoefficientFit) -> CoefficientFit:
    """``f``, or the prior kept (not fitted, with why) when the fit left the coefficient's
    physically possible range (inputs.COEFFICIENT_RANGES): calibrate never writes a value that
    ``--calibration`` would refuse to read."""
    import math

    from .inputs import COEFFICIENT_RANGES

    if not f.fitted or f.name not in COEFFICIENT_RANGES:
        return f
    lo, hi, what = COEFFICIENT_RANGES[f.name]
    if math.isfinite(f.after) and lo <= f.after <= hi:
        return f
    return CoefficientFit(f.name, f.before, f.before, False, f.records,
                          f"not fitted: the fit gave {f.after:.4g}, not a possible {what} ({lo:g} to {hi:g}); "
                          f"kept the prior (check the records)")


def _strip(res: dict[str, dict]) -> dict[str, dict]:
    """Residual summaries rounded for the JSON file."""
    out = {}
    for k, s in res.items():
        out[k] = {"n": s["n"], "mape": _r(s["mape"]), "bias": _r(s["bias"]), "worst": _r(s["worst"]),
                  "worst_case": s["worst_case"], "cases": {c: _r(e) for c, e in (s.get("cases") or {}).items()}}
    return out


def _r(v):
    return None if v is None else round(float(v), 5)


def write_calibration(result: CalibrationResult, path: str | Path) -> Path:
    """Write the calibration JSON; InputError naming the folder when it cannot be written."""
    from .inputs import check_coefficients

    p = Path(path)
    check_coefficients(result.calibration.coefficients, str(p))  # never write what --calibration refuses
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    except OSError as e:
        raise InputError(f"cannot write calibration '{p}': {e.strerror}; choose a writable path with --out") from None
    return p


def default_calibration_path(gpu: str) -> Path:
    return Path("calibrations") / f"{gpu}.json"
