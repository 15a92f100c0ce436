"""Host-cost priors of the step-time model (``loraplan/data/host-costs.json``): per-call CPU costs
measured by running the real training step with tiny widths on a CPU (benchmarks/host_costs.py),
plus the published extra host time of a CUDA launch. Not fitted on any GPU record; the shipped
calibration (catalog/calibrations/default.json) scales them by the H100 reference's host speed."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "data" / "host-costs.json"


@lru_cache(maxsize=1)
def table() -> dict:
    """The data file, parsed once."""
    return json.loads(PATH.read_text())


def host_priors() -> dict[str, float]:
    """``{time_host_op_s, time_host_lora_call_s, time_host_bnb4_call_s, time_host_int8_call_s,
    time_host_gc_hook_s, time_host_step_s}`` in seconds: the priors of a CUDA host as fast as the
    measured CPU (``time_host_speed`` 1.0)."""
    return {k: float(v) for k, v in table()["priors"].items()}


HOST_SPEEDS_PATH = PATH.parent / "host-speeds.json"


@lru_cache(maxsize=1)
def published_host_speeds() -> tuple[dict, ...]:
    """The hosts of published runs (data/host-speeds.json, benchmarks/host_speeds.py): each
    ``{source, gpu, pinned_by, hf_stack, host_speed, url}``, ``host_speed`` relative to the H100
    reference host (1.0, the shipped calibration's host)."""
    return tuple(json.loads(HOST_SPEEDS_PATH.read_text())["hosts"])


def host_speed_range() -> tuple[float, float]:
    """(slowest, fastest) host speed seen on the stack loraplan models (transformers + peft): the
    H100 reference host (1.0) and the published HF-stack hosts."""
    speeds = [1.0] + [float(h["host_speed"]) for h in published_host_speeds() if h["hf_stack"]]
    return min(speeds), max(speeds)
