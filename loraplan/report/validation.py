"""Estimate vs measurement, case by case: the data behind ``loraplan validate`` and
``loraplan report validation``. Pure Python (no pandas).

For every measurement: predicted and measured peak allocated, peak reserved, device total
(NVML used − baseline) and step time, with signed relative errors (predicted − measured) /
measured; per-component checks where the record's phase peaks allow them; library versions that
differ from those the estimator was checked against. A summary gives MAPE and the worst case
per metric.

Where a measurement carries a meta-device trace (``profile --trace`` records, or
:func:`add_traces` for ``validate --trace``), the trace's predicted peak allocated is compared
with the same measured peak as a third view (metric ``trace``), beside the analytic one.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from typing import Callable

from ..calibrate import METRIC_LABELS, METRICS, gpu_for, metric_pairs, predict, rel_error, summarize
from ..measurements import Measurement, expected_versions, version_flags
from ..spec import Calibration

#: ledger lines resident once the model is loaded and LoRA is attached (phase "lora", current bytes)
WEIGHT_COMPONENTS = ("frozen_linear_weights", "unquantized_weights", "lora_weights")

#: the summary / per-case key of the trace's predicted peak allocated vs the measured one
TRACE = "trace"


@dataclass
class CaseValidation:
    id: str
    status: str
    gpu: str | None
    metrics: dict[str, tuple[float, float]]  # metric -> (predicted, measured)
    components: dict[str, tuple[float, float]] = field(default_factory=dict)  # component check -> (pred, meas)
    flags: list[str] = field(default_factory=list)
    peak_moment: str = ""
    predicted_components: dict[str, int] = field(default_factory=dict)
    fits: bool | None = None
    trace: tuple[float, float] | None = None  # (trace predicted, measured) peak allocated
    trace_peak_moment: str | None = None
    #: False for CPU records: the trace predicts the CUDA step, so no error is computed or summarised
    trace_comparable: bool = True

    def error(self, metric: str) -> float | None:
        if metric in self.metrics:
            return rel_error(*self.metrics[metric])
        if metric == TRACE:
            return rel_error(*self.trace) if self.trace is not None and self.trace_comparable else None
        if metric in self.components:
            return rel_error(*self.components[metric])
        return None

    def to_dict(self) -> dict:
        d = {"id": self.id, "status": self.status, "gpu": self.gpu, "peak_moment": self.peak_moment,
             "flags": list(self.flags), "fits_predicted": self.fits}
        for k, (p, y) in self.metrics.items():
            d[k] = {"predicted": p, "measured": y, "error": rel_error(p, y)}
        if self.trace is not None:
            p, y = self.trace
            d[TRACE] = {"predicted": p, "measured": y, "error": self.error(TRACE), "peak_moment": self.trace_peak_moment,
                        "comparable": self.trace_comparable}
        if self.components:
            d["components"] = {k: {"predicted": p, "measured": y, "error": rel_error(p, y)}
                               for k, (p, y) in self.components.items()}
        return d


@dataclass
class Validation:
    cases: list[CaseValidation]
    summary: dict[str, dict]  # metric -> n, mape, bias, worst, worst_case
    calibration: str
    expected_versions: dict

    @property
    def has_trace(self) -> bool:
        return any(c.trace is not None for c in self.cases)

    @property
    def component_keys(self) -> list[str]:
        """Summary keys that are ledger-component checks (neither a metric nor the trace)."""
        return [k for k in self.summary if k not in METRICS and k != TRACE]

    def worst(self, metrics=("allocated",)) -> tuple[float, str, str] | None:
        """(|error|, case, metric) of the largest error among ``metrics``."""
        best = None
        for m in metrics:
            s = self.summary.get(m)
            if not (s and s["n"]):
                continue
            for case, e in (s.get("cases") or {s["worst_case"]: s["worst"]}).items():
                size = abs(e) if math.isfinite(e) else math.inf  # an error that is not a number never passes
                if best is None or size > best[0]:
                    best = (size, case, m)
        return best

    def to_dict(self) -> dict:
        return {"calibration": self.calibration, "expected_versions": self.expected_versions,
                "summary": {k: {kk: vv for kk, vv in s.items() if kk != "cases"} for k, s in self.summary.items()},
                "cases": [c.to_dict() for c in self.cases]}


def rank_components(est, rank: int | None) -> dict[str, int] | None:
    """The estimate's ledger of one rank (``MemoryEstimate.per_gpu[rank]``, issue 13), or None."""
    per = getattr(est.memory, "per_gpu", None) or {}
    comp = per.get(rank, per.get(str(rank))) if isinstance(per, dict) else None
    return comp if isinstance(comp, dict) else None


def rank_metric_pairs(m: Measurement, est) -> tuple[dict[str, tuple[float, float]], str | None]:
    """(metric -> (predicted, measured), why none) for a rank record: its peak allocated against
    the sum of its rank's ledger; reserved, device and step time are the summary's to check."""
    comp = rank_components(est, m.rank)
    if comp is None:
        return {}, "the estimate has no per-GPU ledger for this rank (memory.per_gpu); not compared"
    if m.peak_allocated_bytes is None:
        return {}, None
    return {"allocated": (float(sum(comp.values())), m.peak_allocated_bytes)}, None


def component_checks(m: Measurement, est) -> dict[str, tuple[float, float]]:
    """Ledger lines the record's phase peaks can check (CUDA records only):

    - ``weights``: quantized base + fp32/bf16 rest + LoRA weights vs allocated bytes at the end of
      the "lora" phase (model loaded, adapters attached, nothing else yet);
    - ``optimizer_state``: predicted optimizer state + cuBLAS workspaces vs the allocated bytes
      after the first optimizer step (gradients freed) minus those after "lora".
    """
    if m.gpu == "cpu" or m.world_size > 1:  # the one-GPU ledger lines do not describe a rank
        return {}
    ph = m.phases
    comps = est.memory.components  # frozen weights, LoRA weights, optimizer state, workspaces: in every moment
    out = {}
    after_lora = (ph.get("lora") or {}).get("allocated_bytes")
    if after_lora:
        out["weights"] = (sum(comps.get(k, 0) for k in WEIGHT_COMPONENTS), after_lora)
    after_opt = (ph.get("first_optimizer_step") or {}).get("allocated_bytes")
    if after_lora and after_opt and after_opt > after_lora:
        out["optimizer_state"] = (comps.get("optimizer_state", 0) + comps.get("cuda_workspaces", 0),
                                  after_opt - after_lora)
    return out


def validate(measurements: list[Measurement], cal_for, expected: dict | None = None,
             calibration_label: str = "built-in") -> Validation:
    """Compare every measurement with loraplan's estimate. ``cal_for(gpu_id) -> Calibration``."""
    expected = expected if expected is not None else expected_versions()
    cases = []
    errs: dict[str, dict[str, float]] = {}
    for m in measurements:
        cal: Calibration = cal_for(m.gpu if m.gpu != "cpu" else None)
        est = predict(m, cal)
        flags = version_flags(m, expected)
        if m.gpu == "cpu":
            flags.append("cpu record: live tensor bytes, no allocator")
        trace = None
        if m.record == "rank":  # one rank of a multi-GPU case: shown, checked against its own ledger, not summarised
            metrics, why = rank_metric_pairs(m, est) if m.ok else ({}, None)
            flags.append(f"rank {m.rank} of {m.world_size}: " + (why or "compared with the estimate's ledger of this "
                                                                       "rank; its summary record is the case"))
            cases.append(CaseValidation(m.id, m.status, m.gpu, metrics, {}, flags, est.memory.peak_moment,
                                        dict(rank_components(est, m.rank) or {}), est.fits, None, None,
                                        m.gpu != "cpu"))
            continue
        if m.record == "summary":
            flags.append(f"{m.world_size} GPUs ({m.train.strategy}): the worst rank's peak vs the estimate's worst rank")
        if m.ok:
            metrics = metric_pairs(m, est)
            comps = component_checks(m, est)
            if m.trace_peak_allocated_bytes is not None and m.peak_allocated_bytes is not None:
                trace = (m.trace_peak_allocated_bytes, m.peak_allocated_bytes)
            if m.trace_error:
                flags.append(f"trace failed: {m.trace_error[:200]}")
            elif trace and m.gpu == "cpu":
                flags.append("trace: CUDA figure, not comparable with a CPU measurement")
        else:
            metrics, comps = {}, {}
            if m.status == "oom" and est.fits:
                flags.append(f"measured OOM but predicted to fit ({est.memory.device_total_bytes / 2**30:.2f} GiB)")
        c = CaseValidation(m.id, m.status, m.gpu, metrics, comps, flags, est.memory.peak_moment,
                           dict(est.memory.components), est.fits, trace, m.trace_peak_phase, m.gpu != "cpu")
        cases.append(c)
        for k in list(metrics) + ([TRACE] if c.error(TRACE) is not None else []) + list(comps):
            errs.setdefault(k, {})[m.id] = c.error(k)
    order = list(METRICS) + [TRACE] + sorted(k for k in errs if k not in METRICS and k != TRACE)
    summary = {k: summarize(errs[k]) for k in order if k in errs}
    return Validation(cases, summary, calibration_label, expected)


def label(metric: str) -> str:
    if metric == TRACE:
        return "peak allocated (trace)"
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def filter_cases(measurements: list[Measurement], case: str | None) -> list[Measurement]:
    """Measurements whose id contains one of ``case``'s comma-separated substrings (case-insensitive);
    all of them when ``case`` is empty. No match raises InputError listing the ids."""
    from ..errors import InputError

    subs = [x.strip().lower() for x in (case or "").split(",") if x.strip()]
    if not subs:
        return list(measurements)
    out = [m for m in measurements if any(x in m.id.lower() for x in subs)]
    if not out:
        ids = [m.id for m in measurements]
        raise InputError(f"--case '{case}' matches none of the {len(ids)} records ("
                         + ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "") + "); give a substring of a case id")
    return out


def add_traces(measurements: list[Measurement], timeout_s: float = 300.0, jobs: int | None = None,
               on_done: Callable[[Measurement, int, int], None] | None = None) -> list[Measurement]:
    """Run the meta-device trace (``loraplan.trace.run_trace_subprocess``, one worker process per
    case, ``jobs`` at a time) for every successful measurement that has no trace peak yet, on its
    GPU's compute capability (9.0 when the GPU is not in the catalog, e.g. CPU records). A failing
    trace sets ``trace_error`` (shown as a flag), never stops the others. Order is kept.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from ..errors import require_extra
    from ..trace import run_trace_subprocess

    todo = [i for i, m in enumerate(measurements) if m.ok and m.trace_peak_allocated_bytes is None]
    if todo:
        for mod in ("torch", "transformers", "peft"):
            require_extra(mod)
    out = list(measurements)

    def one(i: int) -> Measurement:
        m = measurements[i]
        gpu = gpu_for(m)
        cc = (gpu.compute_capability if gpu is not None else None) or "9.0"
        try:
            tr = run_trace_subprocess(dict(m.model.config), m.lora, m.train, cc, timeout_s=timeout_s)
            return replace(m, trace_peak_allocated_bytes=int(tr["peak_allocated_bytes"]),
                           trace_peak_phase=tr.get("peak_phase") or None, trace_error=None)
        except Exception as e:  # noqa: BLE001 - one failing trace must not stop the validation
            return replace(m, trace_error=f"{type(e).__name__}: {e}")

    jobs = max(1, jobs or min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(one, i): i for i in todo}
        from concurrent.futures import as_completed

        for k, f in enumerate(as_completed(futures), start=1):
            i = futures[f]
            out[i] = f.result()
            if on_done:
                on_done(out[i], k, len(todo))
    return out
