import json

import pytest

from loraplan.calibrate import calibrate, fit_offset, fit_ratio, nnls
from loraplan.catalog import load_calibration
from loraplan.errors import InputError
from loraplan.measurements import load_measurements, measurement_from_record, select

GPU = "h100-sxm-80gb"


def test_small_fits_are_exact():
    assert fit_offset([10.0, 20.0], [11.0, 21.0]) == pytest.approx(1.0)
    assert fit_ratio([100.0, 200.0], [110.0, 220.0]) == pytest.approx(0.1)
    x = nnls([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [2.0, 3.0, 5.0])
    assert x == pytest.approx([2.0, 3.0])
    assert min(nnls([[1.0, 1.0], [1.0, 2.0]], [1.0, -1.0])) >= 0


def test_reference_fits_only_what_it_can_determine():
    ms = select(load_measurements(["reference"]))
    res = calibrate(ms, GPU)
    assert res.fits["allocator_overhead_bytes"].fitted
    for name in ("reserved_over_allocated_ratio", "cuda_context_bytes"):
        f = res.fits[name]
        assert not f.fitted and "not fitted" in f.method
        assert res.calibration.coefficients[name] == load_calibration(GPU).coefficients[name]
    assert res.residuals_after["allocated"]["mape"] <= res.residuals_before["allocated"]["mape"] + 1e-9
    d = res.to_dict()
    assert d["gpu"] == GPU and set(d["provenance"]) >= {"records", "date", "loraplan", "residuals", "fitted"}
    assert len(d["provenance"]["records"]) == 10


def test_reserved_and_context_fitted_from_profile_records(profile_record):
    recs = [profile_record(a, int(a * 1.2), int(a * 1.2) + 10 * 2**20 + 600 * 2**20, seq=s)
            for a, s in ((2 * 2**30, 512), (3 * 2**30, 1024), (4 * 2**30, 2048))]
    ms = [measurement_from_record(r) for r in recs]
    res = calibrate(ms, GPU, parts=["memory"])
    assert res.fits["reserved_over_allocated_ratio"].after == pytest.approx(0.2, abs=1e-4)
    assert res.fits["cuda_context_bytes"].after == pytest.approx(600 * 2**20, rel=1e-6)


def test_context_prefers_nvml_used_minus_reserved_read_together(profile_record):
    """Records whose probe read NVML used - reserved after the last step (probes.CudaProbe.outside_allocator)
    calibrate the context from it, not from NVML peak - peak reserved (which need not coincide)."""
    recs = []
    for a, s in ((2 * 2**30, 512), (3 * 2**30, 1024), (4 * 2**30, 2048)):
        r = profile_record(a, int(a * 1.2), int(a * 1.2) + 10 * 2**20 + 900 * 2**20, seq=s)
        r["nvml"]["outside_allocator_peak_bytes"] = 500 * 2**20
        r["nvml"]["outside_allocator_idle_bytes"] = 420 * 2**20
        recs.append(r)
    ms = [measurement_from_record(r) for r in recs]
    assert ms[0].outside_allocator_bytes == 500 * 2**20
    res = calibrate(ms, GPU, parts=["memory"])
    f = res.fits["cuda_context_bytes"]
    assert f.after == pytest.approx(500 * 2**20, rel=1e-6) and "3 records read both" in f.method


def test_fitted_context_replaces_the_published_one_in_estimate(profile_record):
    from dataclasses import replace

    from loraplan.catalog import load_gpu, load_model
    from loraplan.estimate.api import estimate
    from loraplan.estimate.context import cuda_context
    from loraplan.spec import LoraSpec, TrainSpec

    recs = [profile_record(a, int(a * 1.2), int(a * 1.2) + 10 * 2**20 + 600 * 2**20, seq=s)
            for a, s in ((2 * 2**30, 512), (3 * 2**30, 1024), (4 * 2**30, 2048))]
    res = calibrate([measurement_from_record(r) for r in recs], GPU, parts=["memory"])
    gpu = load_gpu(GPU)
    model, lora, train = load_model("qwen2.5-0.5b"), LoraSpec(), TrainSpec(quant="bf16")
    before = estimate(model, lora, train, gpu, load_calibration(GPU), with_time=False).memory
    after = estimate(model, lora, train, gpu, res.calibration, with_time=False).memory
    assert before.outside_allocator_bytes["cuda_context_and_libraries"] == cuda_context(gpu.compute_capability).bytes
    assert after.outside_allocator_bytes["cuda_context_and_libraries"] == 600 * 2**20
    # the calibrated reserved ratio (measured max_memory_reserved) replaces the allocator's closed form
    assert after.peak_reserved_bytes == int(after.peak_allocated_bytes * 1.2)
    assert replace(after, notes=()) != replace(before, notes=())


def test_calibrate_cli_writes_file_used_by_estimate(run_cli, tmp_path):
    out = tmp_path / "cal.json"
    code, stdout, err = run_cli("calibrate", "reference", "--out", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["gpu"] == GPU and data["coefficients"]["allocator_overhead_bytes"] > 0
    assert "time_host_op_s" in data["coefficients"]  # carried over, not lost
    code, stdout, _ = run_cli("estimate", "--calibration", str(out), "--format", "json")
    assert code == 0
    est = json.loads(stdout)
    assert est["memory"]["components"]["allocator_overhead"] == data["coefficients"]["allocator_overhead_bytes"]


def test_mixed_gpus_need_gpu_option(run_cli, tmp_path, profile_record, write_jsonl):
    f = write_jsonl(tmp_path / "a10g.jsonl", [profile_record(2 * 2**30, gpu="a10g-24gb")])
    code, _, err = run_cli("calibrate", str(f), "reference", "--dry-run")
    assert code == 2 and "several GPUs" in err and "--gpu" in err and err.count("\n") == 1
    code, _, err = run_cli("calibrate", str(f), "reference", "--dry-run", "--gpu", GPU)
    assert code == 0, err


def test_no_successful_case(run_cli, tmp_path, profile_record, write_jsonl):
    f = write_jsonl(tmp_path / "h.jsonl", [profile_record(None, status="oom"), profile_record(None, status="error", seq=9)])
    code, _, err = run_cli("calibrate", str(f), "--dry-run")
    assert code == 2 and "no successful case" in err and "1 oom" in err


def test_missing_records_file(run_cli, tmp_path):
    code, _, err = run_cli("calibrate", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "does not exist" in err


def test_unwritable_output(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli("calibrate", "reference", "--out", str(blocker / "cal.json"))
    assert code == 2 and "cannot write" in err and "--out" in err


def test_cpu_records_refused(profile_record):
    r = profile_record(2 * 2**30)
    r["inputs"]["device"] = "cpu"
    with pytest.raises(InputError, match="device cpu"):
        calibrate([measurement_from_record(r)], "cpu")


def test_priors_come_from_the_default_calibration():
    """A base calibration without the memory coefficients falls back to default.json, not to copies."""
    from loraplan.calibrate import fit_memory
    from loraplan.spec import Calibration

    fits = fit_memory([], Calibration(gpu="bare", coefficients={}, provenance={}))
    default = load_calibration(None).coefficients
    for name in ("allocator_overhead_bytes", "reserved_over_allocated_ratio", "cuda_context_bytes"):
        assert fits[name].before == fits[name].after == default[name]
