"""The GPU catalog: every entry complete, sourced, plausible; ids match file names."""

import json
from pathlib import Path

import pytest

from loraplan.catalog import HERE, gpu_ids, load_calibration, load_gpu
from loraplan.errors import UnknownNameError
from loraplan.spec import GpuSpec

FILES = sorted((HERE / "gpus").glob("*.json"))


def test_catalog_has_at_least_15_gpus():
    assert len(FILES) >= 15
    assert sorted(p.stem for p in FILES) == gpu_ids()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_gpu_entry(path: Path):
    data = json.loads(path.read_text())
    assert set(data) == set(GpuSpec.__dataclass_fields__)
    g = load_gpu(data["id"])
    assert g.id == path.stem
    assert 8 * 2**30 < g.memory_bytes < 256 * 2**30
    assert 0 < g.fp32_tflops <= g.fp16_tflops
    assert 0 < g.bf16_tflops <= 3000
    assert 200 <= g.bandwidth_gb_s <= 10000
    assert g.price_usd_per_hour is None or 0 < g.price_usd_per_hour < 20
    assert g.price_date and g.source and "http" not in g.id
    # the GB number in the id is the marketing size; the driver total is a little below it
    gb = int(g.id.rsplit("-", 1)[1].removesuffix("gb"))
    assert 0.85 * gb * 1e9 < g.memory_bytes < 1.15 * gb * 1e9
    cal = load_calibration(g.id)
    assert cal.get("time_host_op_s", -1) > 0  # every GPU has time coefficients


def test_unknown_gpu_suggests_close_ids():
    with pytest.raises(UnknownNameError, match="h100-sxm-80gb"):
        load_gpu("h100-sxm")


CALIBRATIONS = sorted((HERE / "calibrations").glob("*.json"))


@pytest.mark.parametrize("path", [p for p in CALIBRATIONS if p.stem != "default"], ids=lambda p: p.stem)
def test_gpu_calibration_only_where_measured(path: Path):
    """A per-GPU calibration file exists only where something was measured on that GPU: it
    changes some default coefficient and names the records it was fitted on; priors (and the
    H100-fitted time coefficients every GPU shares) live in default.json alone."""
    data = json.loads(path.read_text())
    default = json.loads((HERE / "calibrations" / "default.json").read_text())["coefficients"]
    assert data["gpu"] == path.stem and data["gpu"] in gpu_ids()
    changed = {k for k, v in data["coefficients"].items() if default.get(k) != v}
    assert changed, f"{path.name} only repeats default.json: delete it"
    assert any("records" in (p if isinstance(p, dict) else {}) for p in data["provenance"].values()), \
        f"{path.name}: no measured records in its provenance"


def test_default_calibration_holds_every_estimator_coefficient():
    from loraplan.estimate.time import COEFFICIENTS, EFFICIENCY_COEFFICIENTS

    coef = json.loads((HERE / "calibrations" / "default.json").read_text())["coefficients"]
    # the kernel efficiencies are sourced priors per GPU generation (data/kernel-efficiency.json)
    assert not set(EFFICIENCY_COEFFICIENTS) & set(coef)
    names = set(COEFFICIENTS) - set(EFFICIENCY_COEFFICIENTS) | {"cublas_handles", "cublas_workspace_bytes_sm90", "cublas_workspace_bytes_pre_sm90",
                                 "allocator_overhead_bytes", "reserved_over_allocated_ratio", "cuda_context_bytes"}
    assert names <= set(coef), names - set(coef)
