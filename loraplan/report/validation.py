"""Estimate vs measurement, case by case: the data behind ``loraplan validate`` and
``loraplan report validation``. Pure Python (no pandas).

For every measurement: predicted and measured peak allocated, peak reserved, device total
(NVML used − baseline) and step time, with signed relative errors (predicted − measured) /
measured; per-component checks where the record's phase peaks allow them; library versions that
differ from those the estimator was checked against. A summary gives MAPE and the worst case
per metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..calibrate import METRIC_LABELS, METRICS, metric_pairs, predict, rel_error, summarize
from ..measurements import Measurement, expected_versions, version_flags
from ..spec import Calibration

#: ledger lines resident once the model is loaded and LoRA is attached (phase "lora", current bytes)
WEIGHT_COMPONENTS = ("frozen_linear_weights", "unquantized_weights", "lora_weights")


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

    def error(self, metric: str) -> float | None:
        if metric in self.metrics:
            return rel_error(*self.metrics[metric])
        if metric in self.components:
            return rel_error(*self.components[metric])
        return None

    def to_dict(self) -> dict:
        d = {"id": self.id, "status": self.status, "gpu": self.gpu, "peak_moment": self.peak_moment,
             "flags": list(self.flags), "fits_predicted": self.fits}
        for k, (p, y) in self.metrics.items():
            d[k] = {"predicted": p, "measured": y, "error": rel_error(p, y)}
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

    def worst(self, metrics=("allocated",)) -> tuple[float, str, str] | None:
        """(|error|, case, metric) of the largest error among ``metrics``."""
        best = None
        for m in metrics:
            s = self.summary.get(m)
            if s and s["n"] and (best is None or abs(s["worst"]) > best[0]):
                best = (abs(s["worst"]), s["worst_case"], m)
        return best

    def to_dict(self) -> dict:
        return {"calibration": self.calibration, "expected_versions": self.expected_versions,
                "summary": {k: {kk: vv for kk, vv in s.items() if kk != "cases"} for k, s in self.summary.items()},
                "cases": [c.to_dict() for c in self.cases]}


def component_checks(m: Measurement, est) -> dict[str, tuple[float, float]]:
    """Ledger lines the record's phase peaks can check (CUDA records only):

    - ``weights``: quantized base + fp32/bf16 rest + LoRA weights vs allocated bytes at the end of
      the "lora" phase (model loaded, adapters attached, nothing else yet);
    - ``optimizer_state``: predicted optimizer state + cuBLAS workspaces vs the allocated bytes
      after the first optimizer step (gradients freed) minus those after "lora".
    """
    if m.gpu == "cpu":
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
        if m.ok:
            metrics = metric_pairs(m, est)
            comps = component_checks(m, est)
        else:
            metrics, comps = {}, {}
            if m.status == "oom" and est.fits:
                flags.append(f"measured OOM but predicted to fit ({est.memory.device_total_bytes / 2**30:.2f} GiB)")
        c = CaseValidation(m.id, m.status, m.gpu, metrics, comps, flags, est.memory.peak_moment,
                           dict(est.memory.components), est.fits)
        cases.append(c)
        for k in list(metrics) + list(comps):
            errs.setdefault(k, {})[m.id] = c.error(k)
    order = list(METRICS) + sorted(k for k in errs if k not in METRICS)
    summary = {k: summarize(errs[k]) for k in order if k in errs}
    return Validation(cases, summary, calibration_label, expected)


def label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))
