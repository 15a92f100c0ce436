import json

import pytest

from loraplan.calibrate import calibrate, fit_offset, fit_ratio, nnls
from loraplan.catalog import load_calibration
from loraplan.errors import InputError
from loraplan.measurements import load_measurements, measurement_from_record, select

GPU = "h100-sxm-80gb"


def profile_record(alloc, reserved=None, nvml_peak=None, status="ok", gpu=GPU, seq=512, versions=None):
    """A record shaped like loraplan/profile/runner.make_record writes."""
    return {"schema": 1, "key": f"k{seq}{status}{gpu}", "label": f"qwen2.5-0.5b s{seq}",
            "inputs": {"model": "qwen2.5-0.5b", "model_type": "qwen2", "quant": "bf16", "double_quant": None,
                       "optimizer": "adamw", "batch": 1, "seq": seq, "target_seq": None,
                       "gradient_checkpointing": True, "attention": "auto", "int8_outlier_fraction": None,
                       "rank": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"],
                       "device": "cuda", "gpu_id": gpu},
            "status": status,
            "memory": {"peak_allocated_bytes": alloc, "peak_reserved_bytes": reserved,
                       "phases": {"lora": {"allocated_bytes": 1_000_000_000}}},
            "nvml": ({"available": True, "baseline_used_bytes": 10 * 2**20, "peak_used_bytes": nvml_peak}
                     if nvml_peak else {"available": False}),
            "time": {"step_s_median": 0.1} if status == "ok" else {},
            "env": {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
                    "versions": versions or {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0",
                                             "bitsandbytes": "0.50.2", "loraplan": "0.1.0"}}}


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


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


def test_reserved_and_context_fitted_from_profile_records():
    recs = [profile_record(a, int(a * 1.2), int(a * 1.2) + 10 * 2**20 + 600 * 2**20, seq=s)
            for a, s in ((2 * 2**30, 512), (3 * 2**30, 1024), (4 * 2**30, 2048))]
    ms = [measurement_from_record(r) for r in recs]
    res = calibrate(ms, GPU, parts=["memory"])
    assert res.fits["reserved_over_allocated_ratio"].after == pytest.approx(0.2, abs=1e-4)
    assert res.fits["cuda_context_bytes"].after == pytest.approx(600 * 2**20, rel=1e-6)


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


def test_mixed_gpus_need_gpu_option(run_cli, tmp_path):
    f = write_jsonl(tmp_path / "a10g.jsonl", [profile_record(2 * 2**30, gpu="a10g-24gb")])
    code, _, err = run_cli("calibrate", str(f), "reference", "--dry-run")
    assert code == 2 and "several GPUs" in err and "--gpu" in err and err.count("\n") == 1
    code, _, err = run_cli("calibrate", str(f), "reference", "--dry-run", "--gpu", GPU)
    assert code == 0, err


def test_no_successful_case(run_cli, tmp_path):
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


def test_cpu_records_refused():
    r = profile_record(2 * 2**30)
    r["inputs"]["device"] = "cpu"
    with pytest.raises(InputError, match="device cpu"):
        calibrate([measurement_from_record(r)], "cpu")
