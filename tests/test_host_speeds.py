"""The host-speed range (issue 12): published hosts' speeds as data, and the step-time note and
range that estimate and plan give when the user's host is unknown. No torch."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraplan.catalog import host_speed_known, load_calibration, load_gpu, with_host_speed
from loraplan.cli import cli
from loraplan.estimate.api import estimate
from loraplan.estimate.host_costs import published_host_speeds, host_speed_range
from loraplan.case import resolve_case

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HOST_BOUND = ["--model", "llama-2-7b", "--quant", "nf4", "--rank", "8", "--targets", "q_proj,v_proj",
              "--batch", "1", "--seq", "512", "--gradient-checkpointing"]


def test_shipped_host_speeds_match_the_published_cases():
    """data/host-speeds.json is what benchmarks/host_speeds.py computes from published-speed.json
    with the shipped calibration (rerun it after a refit or a new pinning row)."""
    sys.path.insert(0, str(BENCH))
    import host_speeds

    assert host_speeds.main(["--check"]) == 0
    assert all(h["url"].startswith("https://") for h in published_host_speeds())


def test_range_covers_the_reference_host():
    lo, hi = host_speed_range()
    assert lo <= 1.0 <= hi and hi > lo


def _est(cal=None, **case):
    m, l, t = resolve_case(case)
    gpu = load_gpu("a100-sxm-80gb")
    return estimate(m, l, t, gpu, cal or load_calibration(gpu.id))


def test_host_bound_step_gets_the_range_and_a_note():
    case = dict(model="llama-2-7b", quant="nf4", rank=8, targets="q_proj,v_proj", batch=1, seq=512,
                gradient_checkpointing=True)
    e = _est(**case)
    fast, slow = e.time.step_s_host_range
    assert fast < slow
    if host_speed_range()[0] == 1.0:  # the shipped (reference) host is the slowest seen: the slow end
        assert slow == pytest.approx(e.time.step_s)
    assert fast >= e.time.components["gpu_s"] - 1e-12  # never below the GPU's own time
    assert any("--host-speed" in n for n in e.time.notes)
    # the user's host given: no range
    known = with_host_speed(load_calibration("a100-sxm-80gb"), 2.0)
    assert host_speed_known(known) and not host_speed_known(load_calibration("a100-sxm-80gb"))
    e2 = _est(known, **case)
    assert e2.time.step_s_host_range is None and not e2.time.notes


def test_gpu_bound_step_has_no_note():
    e = _est(model="llama-2-7b", quant="bf16", rank=8, batch=8, seq=4096, gradient_checkpointing=True)
    assert e.time.bound != "host" and e.time.step_s_host_range is None and not e.time.notes


def test_calibration_file_counts_as_a_known_host(tmp_path):
    p = tmp_path / "cal.json"
    p.write_text(json.dumps({"gpu": "a100-sxm-80gb", "coefficients": {"time_host_speed": 1.7}}))
    assert host_speed_known(load_calibration("a100-sxm-80gb", str(p)))


def test_cli_estimate_and_plan_say_it():
    r = CliRunner().invoke(cli, ["estimate", *HOST_BOUND, "--gpu", "a100-sxm-80gb", "--format", "json"])
    assert r.exit_code == 0, r.output
    t = json.loads(r.output)["time"]
    assert t["step_s_host_range"][0] < t["step_s"] and t["notes"]
    r = CliRunner().invoke(cli, ["plan", *HOST_BOUND, "--gpu", "a100-sxm-80gb", "--gpu", "h100-sxm-80gb", "--tokens", "1000000"])
    assert r.exit_code == 0, r.output
    assert "depend on the host CPU's speed" in " ".join(r.output.split())
    r = CliRunner().invoke(cli, ["plan", *HOST_BOUND, "--gpu", "a100-sxm-80gb", "--tokens", "1000000",
                                 "--host-speed", "2"])
    assert r.exit_code == 0 and "depend on the host CPU's speed" not in " ".join(r.output.split())
