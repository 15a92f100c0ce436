"""Analytic, trace and measured side by side: records with a ``trace`` entry (``profile --trace``)
in ``validate`` (table, JSON, CSV) and ``report validation``; ``--case``; ``validate --trace``."""

import csv
import io
import json

import pytest

from loraplan.measurements import load_measurements, measurement_from_record

GiB = 2**30


@pytest.fixture
def traced_records(profile_record):
    """Three records: a traced one, one whose trace failed, one without a trace."""
    a = profile_record(2 * GiB, int(2.4 * GiB), 3 * GiB, seq=512)
    a["trace"] = {"peak_allocated_bytes": int(2.1 * GiB), "peak_phase": "backward", "components": {"other": 1},
                  "phase_peaks": {"backward": int(2.1 * GiB)}, "versions": {"torch": "2.11.0"}, "elapsed_s": 3.0}
    b = profile_record(3 * GiB, seq=1024)
    b["trace"] = {"error": "TraceError: the meta-device trace failed at op 'x'"}
    c = profile_record(3 * GiB, seq=2048)  # no trace at all
    return [a, b, c]


def test_measurement_reads_the_trace(traced_records):
    a, b, c = traced_records
    ma, mb, mc = (measurement_from_record(r) for r in (a, b, c))
    assert ma.trace_peak_allocated_bytes == int(2.1 * GiB) and ma.trace_peak_phase == "backward"
    assert mb.trace_peak_allocated_bytes is None and "meta-device" in mb.trace_error
    assert mc.trace_peak_allocated_bytes is None and mc.trace_error is None
    flat = dict(c, trace_peak_allocated_bytes=123)
    assert measurement_from_record(flat).trace_peak_allocated_bytes == 123
    assert all(m.trace_peak_allocated_bytes is None for m in load_measurements(["reference"]))


def test_validate_shows_the_trace_column(run_cli, tmp_path, write_jsonl, traced_records):
    f = write_jsonl(tmp_path / "h100.jsonl", traced_records)
    code, out, err = run_cli("validate", str(f))
    assert code == 0, err
    assert "peak allocated (analytic)" in out and "trace" in out and "+5.00%" in out
    assert "peak allocated (trace)" in out and "peak allocated (trace): MAPE 5.00%" in out
    assert "trace failed" in out

    code, out, _ = run_cli("validate", str(f), "--format", "json")
    d = json.loads(out)
    a, b, c = d["cases"]
    assert a["trace"]["predicted"] == int(2.1 * GiB) and a["trace"]["measured"] == 2 * GiB
    assert a["trace"]["error"] == pytest.approx(0.05) and a["trace"]["peak_moment"] == "backward"
    assert "trace" not in b and "trace" not in c and any("trace failed" in x for x in b["flags"])
    assert d["summary"]["trace"]["n"] == 1 and d["summary"]["trace"]["mape"] == pytest.approx(0.05)
    assert a["allocated"]["measured"] == 2 * GiB  # the analytic view is still there

    code, out, _ = run_cli("validate", str(f), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 3 and "trace.error" in rows[0] and "allocated.error" in rows[0]
    assert float(rows[0]["trace.predicted"]) == int(2.1 * GiB) and rows[2]["trace.predicted"] == ""

    code, _, err = run_cli("validate", str(f), "--max-error", "4", "--check", "trace")
    assert code == 1 and "trace error 5.00%" in err
    code, _, err = run_cli("validate", str(f), "--max-error", "6", "--check", "trace")
    assert code == 0, err


def test_validate_without_trace_is_unchanged(run_cli, tmp_path, profile_record, write_jsonl):
    f = write_jsonl(tmp_path / "h100.jsonl", [profile_record(2 * GiB, seq=512)])
    code, out, _ = run_cli("validate", str(f))
    assert code == 0 and "trace" not in out and "(analytic)" not in out
    code, out, _ = run_cli("validate", str(f), "--format", "json")
    assert "trace" not in json.loads(out)["summary"]
    code, _, err = run_cli("validate", str(f), "--max-error", "5", "--check", "trace")
    assert code == 2 and "--trace" in err


def test_cpu_record_trace_is_shown_but_not_compared(run_cli, tmp_path, profile_record, write_jsonl):
    r = profile_record(300_000, seq=16)
    r["inputs"]["device"] = "cpu"
    r["trace"] = {"peak_allocated_bytes": 67_000_000, "peak_phase": "backward", "comparable_with_measurement": False}
    f = write_jsonl(tmp_path / "cpu.jsonl", [r])
    code, out, err = run_cli("validate", str(f), "--format", "json")
    assert code == 0, err
    (c,) = json.loads(out)["cases"]
    assert c["trace"]["predicted"] == 67_000_000 and c["trace"]["error"] is None and c["trace"]["comparable"] is False
    assert "trace" not in json.loads(out)["summary"]
    assert any("not comparable" in x for x in c["flags"])


def test_case_filter(run_cli):
    code, out, err = run_cli("validate", "reference", "--case", "l2-7b-nf4-r8-qv-adamw-s512", "--format", "json")
    assert code == 0, err
    assert [c["id"] for c in json.loads(out)["cases"]] == ["l2-7b-nf4-r8-qv-adamw-s512-gc"]
    code, out, _ = run_cli("validate", "reference", "--case", "ol3b,INT8", "--format", "json")
    assert sorted(c["id"] for c in json.loads(out)["cases"]) == ["l2-7b-int8-r8-qv-adamw-s512-gc",
                                                                "ol3b-nf4-r8-qv-adamw-b4-s512-gc"]
    code, _, err = run_cli("validate", "reference", "--case", "nope")
    assert code == 2 and "--case 'nope'" in err


def test_validation_report_shows_the_trace(run_cli, tmp_path, write_jsonl, traced_records):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    f = write_jsonl(tmp_path / "h100.jsonl", traced_records)
    code, _, err = run_cli("report", "validation", str(f), "--out", str(tmp_path), "--name", "v")
    assert code == 0, err
    md = (tmp_path / "v.md").read_text()
    html = (tmp_path / "v.html").read_text()
    assert "peak allocated trace (GiB)" in md and "peak allocated trace error" in md
    row = next(line for line in md.splitlines() if line.startswith("| qwen2.5-0.5b s512 |"))
    assert "2.100" in row and "+5.00%" in row
    assert "| peak allocated (trace) | 1 | 5.00% |" in md and "Three views" in md
    assert "peak allocated trace (GiB)" in html and html.count("data:image/png;base64") == 3
    assert "crosses meta-device trace" in md


@pytest.mark.slow
def test_validate_reference_trace_one_case(run_cli):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    code, out, err = run_cli("validate", "reference", "--case", "ol3b", "--trace", "--format", "json")
    assert code == 0, err
    (c,) = json.loads(out)["cases"]
    assert c["id"] == "ol3b-nf4-r8-qv-adamw-b4-s512-gc" and "trace 1/1" in err
    assert abs(c["trace"]["error"]) < 0.03 and abs(c["allocated"]["error"]) < 0.03
    assert c["trace"]["measured"] == c["allocated"]["measured"]
