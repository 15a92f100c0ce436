"""Malformed measurement records: never a crash, never silently used.

Choice (loraplan/measurements.py): a record that fails its schema or physical ranges is
*skipped with a printed, counted reason* ("<file>: record N (...) skipped: ..."), not a refusal
of the whole file — one corrupt line among hundreds must not block validating or calibrating
on the rest, and the warning names it. When nothing usable is left, the command refuses with
one line (exit 2).
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from loraplan.errors import ConfigError
from loraplan.measurements import check_inputs, check_measured, load_measurements, measurement_from_record


def _set(rec, path, value):
    d = rec
    for k in path[:-1]:
        d = d[k]
    if value is _DROP:
        d.pop(path[-1], None)
    else:
        d[path[-1]] = value


_DROP = object()

#: (what, path into the record, value): each makes the record unusable
MALFORMED = [
    ("no model", ("inputs", "model"), _DROP),
    ("no rank", ("inputs", "rank"), _DROP),
    ("rank as a string", ("inputs", "rank"), "eight"),
    ("rank -8", ("inputs", "rank"), -8),
    ("rank 0", ("inputs", "rank"), 0),
    ("rank NaN", ("inputs", "rank"), math.nan),
    ("batch a list", ("inputs", "batch"), [1]),
    ("seq true", ("inputs", "seq"), True),
    ("unknown quant q3", ("inputs", "quant"), "q3"),
    ("unknown optimizer", ("inputs", "optimizer"), "adam9"),
    ("targets empty list", ("inputs", "targets"), []),
    ("targets a number", ("inputs", "targets"), 7),
    ("dropout 1.5", ("inputs", "dropout"), 1.5),
    ("alpha inf", ("inputs", "alpha"), math.inf),
    ("inputs a list", ("inputs",), [1, 2]),
    ("zero peak", ("memory", "peak_allocated_bytes"), 0),
    ("negative peak", ("memory", "peak_allocated_bytes"), -5),
    ("NaN peak", ("memory", "peak_allocated_bytes"), math.nan),
    ("peak a string", ("memory", "peak_allocated_bytes"), "3GB"),
    ("reserved below allocated", ("memory", "peak_reserved_bytes"), 1000),
    ("memory a string", ("memory",), "lots"),
    ("negative step time", ("time", "step_s_median"), -0.1),
    ("NaN step time", ("time", "step_s_median"), math.nan),
    ("unknown status", ("status",), "great"),
    ("NVML used - reserved a fraction", ("nvml", "outside_allocator_peak_bytes"), 1.5),
    ("NVML used - reserved a string", ("nvml", "outside_allocator_idle_bytes"), "400MB"),
    ("gradient_checkpointing a string", ("inputs", "gradient_checkpointing"), "yes"),
]


@pytest.mark.parametrize("what, path, value", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_each_malformed_record_is_a_one_line_config_error(profile_record, what, path, value):
    rec = copy.deepcopy(profile_record(3 * 2**30, reserved=4 * 2**30))
    _set(rec, path, value)
    with pytest.raises(ConfigError) as e:
        measurement_from_record(rec, "x.jsonl#1")
    assert "\n" not in str(e.value)


def _mixed_file(tmp_path, profile_record, write_jsonl):
    good = [profile_record(3 * 2**30 + i * 2**26, reserved=4 * 2**30, seq=512 * (i + 1)) for i in range(3)]
    bad = []
    for what, path, value in MALFORMED:
        rec = copy.deepcopy(profile_record(3 * 2**30, reserved=4 * 2**30))
        _set(rec, path, value)
        rec["label"] = what
        bad.append(rec)
    p = tmp_path / "h100-sxm-80gb.jsonl"
    lines = [json.dumps(r) for r in good + bad] + ["{not json", "[1, 2]"]
    p.write_text("\n".join(lines) + "\n")
    return p, len(good), len(bad) + 2


def test_load_skips_and_counts_every_malformed_record(tmp_path, profile_record, write_jsonl):
    p, n_good, n_bad = _mixed_file(tmp_path, profile_record, write_jsonl)
    ms = load_measurements([p])
    assert len(ms) == n_good
    assert len(ms.problems) == n_bad


@pytest.mark.parametrize("argv", [["validate"], ["validate", "--max-error", "50"], ["calibrate", "--dry-run"],
                                  ["report", "validation", "--name", "v"]])
def test_commands_warn_and_never_crash_on_malformed_records(tmp_path, profile_record, write_jsonl, run_cli, argv):
    p, n_good, n_bad = _mixed_file(tmp_path, profile_record, write_jsonl)
    extra = ["--out", str(tmp_path / "rep")] if argv[0] == "report" else []
    code, out, err = run_cli(*argv, str(p), *extra)
    assert code in (0, 1, 2), err
    assert "Traceback" not in err
    assert err.count("skipped") == n_bad  # each one named, none silently used


def test_only_malformed_records_is_a_one_line_refusal(tmp_path, profile_record, run_cli):
    rec = profile_record(0, reserved=4 * 2**30)  # a zero peak never passes a gate
    p = tmp_path / "h100-sxm-80gb.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    code, out, err = run_cli("validate", str(p), "--max-error", "1000")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_validate_max_error_must_be_a_finite_percentage(run_cli, value):
    code, out, err = run_cli("validate", "reference", "--max-error", value)
    assert code == 2 and "--max-error" in err and len(err.strip().splitlines()) == 1


def test_reference_cases_pass_the_checks():
    data = json.loads((__import__("loraplan.reference", fromlist=["x"]).REFERENCE_FILE).read_text())
    for c in data["cases"]:
        check_inputs(c)
        check_measured(c)
    assert not load_measurements(["reference"]).problems


def test_reference_file_with_bad_cases_skips_them(tmp_path):
    from loraplan.reference import REFERENCE_FILE

    data = json.loads(REFERENCE_FILE.read_text())
    data["cases"][0]["rank"] = "x"
    data["cases"][1]["peak_allocated_bytes"] = -1
    data["cases"].append([1, 2])
    p = tmp_path / "ref.json"
    p.write_text(json.dumps(data))
    ms = load_measurements([p])
    assert len(ms) == len(data["cases"]) - 3 and len(ms.problems) == 3


def test_calibrate_never_writes_an_impossible_coefficient():
    """A fit outside the physical range keeps the prior, not fitted, with the reason."""
    from loraplan.calibrate import CoefficientFit, plausible
    from loraplan.inputs import COEFFICIENT_RANGES

    f = plausible(CoefficientFit("time_eff_mm", 0.4, 7.5, True, 9, "grid"))
    assert not f.fitted and f.after == 0.4 and "kept the prior" in f.method
    f = plausible(CoefficientFit("time_host_op_s", 2e-5, math.nan, True, 9, "nnls"))
    assert not f.fitted and f.after == 2e-5
    ok = plausible(CoefficientFit("time_eff_mm", 0.4, 0.5, True, 9, "grid"))
    assert ok.fitted and ok.after == 0.5
    assert set(COEFFICIENT_RANGES) >= {"time_eff_mm", "allocator_overhead_bytes"}


def test_calibrate_output_reads_back(tmp_path, run_cli):
    """What calibrate writes passes --calibration's checks."""
    from loraplan.catalog import load_calibration

    out = tmp_path / "cal.json"
    code, _, err = run_cli("calibrate", "reference", "--out", str(out), "--format", "json")
    assert code == 0, err
    load_calibration("h100-sxm-80gb", str(out))


def test_records_file_lines_are_depth_capped_and_fifos_refused(tmp_path, profile_record):
    import os

    from loraplan.profile.records import read_records

    p = tmp_path / "r.jsonl"
    p.write_text("[" * 100_000 + "]" * 100_000 + "\n" + json.dumps(profile_record(3 * 2**30)) + "\n")
    rf = read_records(p)
    assert len(rf.records) == 1 and "nests deeper" in rf.problems[0][1]
    fifo = tmp_path / "f.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_records(fifo)
