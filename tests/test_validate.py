import csv
import io
import json

from loraplan.calibrate import predict
from loraplan.catalog import load_calibration
from loraplan.measurements import load_measurements

GPU = "h100-sxm-80gb"


def test_table_has_every_case_and_summary(run_cli):
    code, out, err = run_cli("validate", "reference")
    assert code == 0, err
    for m in load_measurements(["reference"]):
        assert m.id in out
    assert "MAPE" in out and "worst" in out


def test_json_numbers_match_estimate(run_cli):
    code, out, _ = run_cli("validate", "reference", "--format", "json")
    assert code == 0
    d = json.loads(out)
    ms = {m.id: m for m in load_measurements(["reference"])}
    assert len(d["cases"]) == 10
    for c in d["cases"]:
        est = predict(ms[c["id"]], load_calibration(GPU))
        assert c["allocated"]["predicted"] == est.memory.peak_allocated_bytes
        assert c["allocated"]["measured"] == ms[c["id"]].peak_allocated_bytes
        assert c["step"]["predicted"] == est.time.step_s
    assert d["summary"]["allocated"]["mape"] < 0.03
    assert "reserved" not in d["summary"]  # the reference has no reserved figures


def test_csv_format(run_cli):
    code, out, _ = run_cli("validate", "reference", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 10 and "allocated.error" in rows[0]


def test_max_error_gate(run_cli):
    code, _, err = run_cli("validate", "reference", "--max-error", "5")
    assert code == 0
    # the gate names the case with the largest |error| (read from the JSON, not pinned here)
    _, out, _ = run_cli("validate", "reference", "--format", "json")
    cases = json.loads(out)["cases"]
    worst = max(cases, key=lambda c: abs(c["allocated"]["predicted"] - c["allocated"]["measured"])
                / c["allocated"]["measured"])
    code, _, err = run_cli("validate", "reference", "--max-error", "0.5")
    assert code == 1 and worst["id"] in err and "--max-error 0.5%" in err
    code, _, err = run_cli("validate", "reference", "--max-error", "5", "--check", "all")
    assert code == 1 and "step" in err
    code, _, err = run_cli("validate", "reference", "--check", "bogus")
    assert code == 2 and "--check" in err


def test_profile_records_reserved_device_components_and_version_flags(run_cli, tmp_path, profile_record, write_jsonl):
    recs = [profile_record(2 * 2**30, int(2.4 * 2**30), 3 * 2**30, seq=512),
            profile_record(3 * 2**30, int(3.3 * 2**30), 4 * 2**30, seq=1024,
                           versions={"torch": "2.9.0", "transformers": "5.17.0"}),
            profile_record(None, status="oom", seq=999999)]
    f = write_jsonl(tmp_path / "h100.jsonl", recs)
    code, out, err = run_cli("validate", str(f), "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    ok = [c for c in d["cases"] if c["status"] == "ok"]
    assert all("reserved" in c and "device" in c and "weights" in c["components"] for c in ok)
    assert ok[1]["flags"] and "torch 2.9.0" in ok[1]["flags"][0]
    assert not ok[0]["flags"]
    assert {"allocated", "reserved", "device", "step", "weights"} <= set(d["summary"])
    code, out, _ = run_cli("validate", str(f))
    assert "other library versions" in out


def test_mixed_gpus_and_no_success(run_cli, tmp_path, profile_record, write_jsonl):
    f = write_jsonl(tmp_path / "a.jsonl", [profile_record(2 * 2**30, gpu="a10g-24gb")])
    code, _, err = run_cli("validate", str(f), "reference")
    assert code == 2 and "several GPUs" in err
    g = write_jsonl(tmp_path / "b.jsonl", [profile_record(None, status="timeout")])
    code, _, err = run_cli("validate", str(g))
    assert code == 2 and "no successful case" in err
