"""Kernel-class efficiencies (achieved / dense peak) per GPU generation, from
``loraplan/data/kernel-efficiency.json``: published measurements with their source, never fitted.

The step-time model (``estimate/time.py``) prices three kernel classes with them: half-precision
tensor-core GEMMs (``gemm_half``), fp32 CUDA-core GEMMs (``gemm_fp32``) and fused attention
(``attention``). A calibration that sets ``time_eff_mm`` / ``time_eff_fp32`` / ``time_eff_attn``
(fitted on GPU-bound records of its GPU) overrides the prior (``time.coefficients``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError
from ..spec import GpuSpec

PATH = Path(__file__).resolve().parent.parent / "data" / "kernel-efficiency.json"
#: kernel class in the data file -> the time coefficient a calibration may override it with
CLASS_COEFFICIENT = {"gemm_half": "time_eff_mm", "gemm_fp32": "time_eff_fp32", "attention": "time_eff_attn"}
#: vendor -> generation key for GPUs without a CUDA compute capability
VENDOR_GENERATION = {"amd": "cdna3"}


@lru_cache(maxsize=1)
def table() -> dict:
    """The data file, parsed once."""
    return json.loads(PATH.read_text())


def generation(gpu: GpuSpec) -> str:
    """The generation key of ``gpu``: ``sm`` + compute capability without the dot ("9.0" ->
    "sm90"), or the vendor's key (``VENDOR_GENERATION``); a ConfigError names a GPU the data lack."""
    gens = table()["generations"]
    if gpu.compute_capability:
        key = "sm" + str(gpu.compute_capability).replace(".", "")
    else:
        key = VENDOR_GENERATION.get(gpu.vendor, "")
    if key not in gens:
        raise ConfigError(f"GPU '{gpu.id}' (generation '{key or gpu.vendor}') has no entry in {PATH.name}; "
                          f"add one with its source (known: {', '.join(sorted(gens))})")
    return key


def efficiencies(gpu: GpuSpec) -> dict[str, float]:
    """``{time_eff_mm, time_eff_fp32, time_eff_attn}`` priors of ``gpu``'s generation."""
    entry = table()["generations"][generation(gpu)]
    return {coef: float(entry[cls]["value"]) for cls, coef in CLASS_COEFFICIENT.items()}
