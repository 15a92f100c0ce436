"""The shipped H100 reference measurements (loraplan/data/h100-measurements.json) as cases.

Each case becomes (ModelSpec, LoraSpec, TrainSpec, measured) so tests, benchmarks, calibrate
and validate read the measured data the same way. The model configs come from the file itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .spec import LoraSpec, ModelSpec, TrainSpec

REFERENCE_FILE = Path(__file__).parent / "data" / "h100-measurements.json"
REFERENCE_GPU = "h100-sxm-80gb"


@dataclass(frozen=True)
class ReferenceCase:
    id: str
    model: ModelSpec
    lora: LoraSpec
    train: TrainSpec
    peak_allocated_bytes: int
    step_s_median: float | None


def case_specs(case: dict, model: ModelSpec) -> tuple[LoraSpec, TrainSpec]:
    """LoraSpec and TrainSpec from a record/case dict using the reference keys."""
    lora = LoraSpec(rank=int(case["rank"]), alpha=float(case["alpha"]), dropout=float(case["dropout"]),
                    targets=tuple(case["targets"]))
    train = TrainSpec(
        quant=case["quant"], double_quant=bool(case.get("double_quant")), optimizer=case["optimizer"],
        batch=int(case["batch"]), seq=int(case["seq"]), target_seq=case.get("target_seq"),
        gradient_checkpointing=bool(case["gradient_checkpointing"]), attention=case.get("attention", "auto"),
        int8_outlier_fraction=case.get("int8_outlier_fraction"),
        device=case.get("device") or "cuda",
    )
    return lora, train


@lru_cache(maxsize=None)
def reference_cases(path: str | None = None) -> tuple[ReferenceCase, ...]:
    from .hf import spec_from_config

    data = json.loads(Path(path or REFERENCE_FILE).read_text())
    models = {name: spec_from_config(cfg, name) for name, cfg in data["models"].items()}
    out = []
    for c in data["cases"]:
        lora, train = case_specs(c, models[c["model"]])
        out.append(ReferenceCase(c["id"], models[c["model"]], lora, train,
                                 int(c["peak_allocated_bytes"]), c.get("step_s_median")))
    return tuple(out)
