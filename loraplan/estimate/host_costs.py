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
