"""``loraplan profile`` end to end: worker subprocesses, records, resume, kill -9, timeout,
OOM from a worker, corrupt lines, and one-line errors."""

import json
import os
import signal
import subprocess
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.slow

from profile_cli_helpers import CLI, lines, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory, write_tiny_config):
    root = tmp_path_factory.mktemp("profile")
    return {"root": root, "cache": root / "models", "llama": write_tiny_config(root, "llama")}


def base_args(work, out, *extra):
    return ["--device", "cpu", "--model", work["llama"], "--steps", 2, "--warmup", 1, "--batch", 1,
            "--seq", 16, "--rank", 4, "--cache-dir", work["cache"], "--out", out, *extra]


def test_sweep_records_then_resume_skips(work):
    from loraplan.profile.runner import DeviceInfo, build_cases, case_inputs
    from loraplan.spec import run_inputs

    out = work["root"] / "sweep.jsonl"
    grid = work["root"] / "grid.json"
    grid.write_text(json.dumps({"quant": ["bf16", "int8"], "optimizer": "sgd", "gradient_checkpointing": False}))
    p = run_cli(*base_args(work, out, "--grid", grid))
    assert p.returncode == 0, p.stderr
    recs = lines(out)
    assert [r["status"] for r in recs] == ["ok", "ok"], [r.get("error") for r in recs]
    assert "measured vs estimated" in p.stdout and "2/2" in p.stderr
    dev = DeviceInfo("cpu", "cpu")
    cases = build_cases([{"model": str(work["llama"]), "quant": q, "optimizer": "sgd", "gradient_checkpointing": False,
                          "batch": 1, "seq": 16, "rank": 4} for q in ("bf16", "int8")])
    for rec, case in zip(recs, cases):
        want = run_inputs(case.model, case.lora, case.train)
        want.update(device="cpu", gpu_id="cpu")
        assert rec["inputs"] == json.loads(json.dumps(want)) == json.loads(json.dumps(case_inputs(case, dev)))
        assert rec["memory"]["peak_allocated_bytes"] > rec["memory"]["phases"]["load"]["max_allocated_bytes"] > 0
        assert len(rec["time"]["step_s"]) == 2 and rec["params"]["trainable"] > 0
        assert rec["nvml"]["available"] is False and rec["env"]["versions"]["peft"]
        assert rec["estimate"] is not None or rec["estimate_error"]
    before = out.read_bytes()
    t0 = time.time()
    p2 = run_cli(*base_args(work, out, "--grid", grid))
    assert p2.returncode == 0 and out.read_bytes() == before
    assert p2.stderr.count("already recorded") == 2 and time.time() - t0 < 30
    # a corrupt line is reported with its number and the file is left byte for byte
    corrupt = before + b'{"key": "torn\n'
    out.write_bytes(corrupt)
    p3 = run_cli(*base_args(work, out, "--grid", grid))
    assert p3.returncode == 0 and out.read_bytes() == corrupt
    assert "sweep.jsonl:3:" in p3.stderr.replace("\n", "")


def test_kill_9_leaves_whole_lines_and_rerun_resumes(work):
    out = work["root"] / "kill.jsonl"
    args = base_args(work, out, "--quant", "bf16", "--optimizer", "sgd,adamw", "--no-gradient-checkpointing")
    proc = subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= 1):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = lines(out)
    assert 1 <= len(first) <= 2
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    recs = lines(out)
    assert len(recs) == 2 and len({r["key"] for r in recs}) == 2
    assert all(r["status"] == "ok" for r in recs)


def test_timeout_record(work):
    out = work["root"] / "timeout.jsonl"
    p = run_cli(*base_args(work, out, "--quant", "bf16", "--timeout", 0.3))
    assert p.returncode == 0, p.stderr
    (rec,) = lines(out)
    assert rec["status"] == "timeout" and "--timeout 0.3s" in rec["error"] and rec["phase"]


def test_oom_in_worker_is_recorded(work, tmp_path):
    from loraplan.profile.runner import DeviceInfo, build_cases, profile

    out = tmp_path / "oom.jsonl"
    (case,) = build_cases([{"model": str(work["llama"]), "quant": "bf16", "seq": 16, "rank": 4}])
    os.environ["LORAPLAN_PROFILE_FAULT"] = "oom@first_forward"
    try:
        (res,) = profile([case], DeviceInfo("cpu", "cpu"), out=out, steps=2, warmup=1, timeout=120,
                         cache_dir=str(work["cache"]))
    finally:
        del os.environ["LORAPLAN_PROFILE_FAULT"]
    (rec,) = lines(out)
    assert rec == json.loads(json.dumps(res.record))
    assert rec["status"] == "oom" and rec["phase"] == "first_forward" and "OutOfMemoryError" in rec["error"]
    assert "prepare" in rec["memory"]["phases"]


def test_device_cuda_without_cuda_is_a_one_line_error(work, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = run_cli("--model", work["llama"], "--quant", "bf16", "--out", tmp_path / "x.jsonl")
    assert p.returncode == 2
    assert "use --device cpu" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_missing_extra_names_the_pip_command(monkeypatch, work):
    import importlib.util

    from loraplan.errors import MissingExtraError
    from loraplan.profile.runner import build_cases, check_extras

    cases = build_cases([{"model": str(work["llama"]), "quant": "nf4"}])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("bitsandbytes", "pynvml") else real(n, *a))
    with pytest.raises(MissingExtraError, match=r"pip install 'loraplan\[profile\]'") as ei:
        check_extras(cases, "cuda")
    assert "bitsandbytes" in str(ei.value) and "nvidia-ml-py" in str(ei.value)


def test_bad_options_exit_2(work, tmp_path):
    p = run_cli("--device", "cpu", "--model", work["llama"], "--steps", 2, "--warmup", 2, "--out", tmp_path / "x.jsonl")
    assert p.returncode == 2 and "--warmup 2 must be smaller" in p.stderr
    p = run_cli("--device", "cpu", "--model", work["llama"], "--targets", "nope", "--out", tmp_path / "x.jsonl")
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr


def test_t5_and_qwen2_configs_resolve_to_cases(tmp_path, write_tiny_config):
    from loraplan.profile.runner import build_cases

    t5 = write_tiny_config(tmp_path, "t5")
    q = write_tiny_config(tmp_path, "qwen2")
    (c5,) = build_cases([{"model": str(t5), "quant": "bf16", "targets": "q,v", "seq": 32, "target_seq": 16}])
    assert c5.model.model_type == "t5" and c5.train.target_seq == 16 and c5.lora.targets == ("q", "v")
    (cq,) = build_cases([{"model": str(q), "quant": "nf4", "targets": "all-linear"}])
    assert cq.model.model_type == "qwen2" and cq.train.double_quant is True


def test_profile_trace_stores_the_trace_beside_the_measurement(work):
    out = work["root"] / "trace.jsonl"
    t0 = time.time()
    p = run_cli(*base_args(work, out, "--quant", "bf16", "--optimizer", "sgd", "--trace"))
    assert p.returncode == 0, p.stderr
    (rec,) = lines(out)
    assert rec["status"] == "ok" and rec["memory"]["peak_allocated_bytes"] > 0
    tr = rec["trace"]
    assert "error" not in tr, tr
    assert tr["peak_allocated_bytes"] > 0 and tr["peak_phase"] in ("forward", "backward", "optimizer")
    assert sum(tr["components"].values()) == tr["peak_allocated_bytes"]
    assert tr["phase_peaks"] and tr["versions"]["torch"] and tr["elapsed_s"] >= 0
    assert tr["gpu"] == "h100-sxm-80gb" and tr["gpu_compute_capability"] == "9.0"
    # a CPU burst: the trace (and any CUDA figure) is marked as not comparable with it
    assert tr["comparable_with_measurement"] is False and "not comparable" in rec["comparable"]
    assert "peak trace" in p.stdout and "n/c" in p.stdout
    from loraplan.measurements import measurement_from_record

    assert measurement_from_record(rec).trace_peak_allocated_bytes == tr["peak_allocated_bytes"]
    assert time.time() - t0 < 60


def test_trace_failure_never_loses_the_measurement(work, tmp_path, monkeypatch):
    from loraplan.profile import runner
    from loraplan.profile.runner import DeviceInfo, build_cases, profile

    def boom(*a, **k):
        from loraplan.errors import TraceError

        raise TraceError("the meta-device trace failed at op 'aten::x'")

    import loraplan.trace

    monkeypatch.setattr(loraplan.trace, "run_trace_subprocess", boom)
    (case,) = build_cases([{"model": str(work["llama"]), "quant": "bf16", "optimizer": "sgd", "seq": 16, "rank": 4}])
    out = tmp_path / "fail.jsonl"
    (res,) = profile([case], DeviceInfo("cpu", "cpu"), out=out, steps=2, warmup=1, timeout=120,
                     cache_dir=str(work["cache"]), trace=True)
    (rec,) = lines(out)
    assert rec["status"] == "ok" and rec["memory"]["peak_allocated_bytes"] > 0
    assert "aten::x" in rec["trace"]["error"] and runner.traced_peak(rec) is None


# ---- kill -9, a second run, a kill during the model build: nothing lost, nothing left over -----

def _wait_for(cond, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _run_dirs(tmp):
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("loraplan-profile-"))


def test_kill_9_mid_case_loses_nothing_and_the_next_run_cleans_up_and_resumes(work, tmp_path):
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    out = tmp_path / "k9.jsonl"
    one = base_args(work, out, "--quant", "bf16", "--optimizer", "sgd", "--no-gradient-checkpointing")
    both = base_args(work, out, "--quant", "bf16", "--optimizer", "sgd,adamw", "--no-gradient-checkpointing")
    assert run_cli(*one, env=env).returncode == 0
    first = out.read_bytes()
    # the second case hangs in its burst; kill -9 the run there (its worker dies with it)
    proc = subprocess.Popen(CLI + [str(a) for a in both], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, LORAPLAN_PROFILE_FAULT="sleep@first_forward", **env))
    _wait_for(lambda: any((tmp / d / "spec.json").exists() for d in _run_dirs(tmp)), "the second case's worker")
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == first, "the finished record is untouched, no partial line"
    left = _run_dirs(tmp)  # kill -9 gave the run no chance to remove its temp folder
    assert left and all(n.startswith(f"loraplan-profile-{proc.pid}-") for n in left)
    assert (tmp_path / "k9.jsonl.lock").exists()  # left too, but its flock died with the run: it blocks nothing
    p = run_cli(*both, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("already recorded") == 1, "resume skips exactly the finished case"
    recs = lines(out)
    assert len(recs) == 2 and len({r["key"] for r in recs}) == 2 and all(r["status"] == "ok" for r in recs)
    assert out.read_bytes().startswith(first)
    assert _run_dirs(tmp) == [] and not (tmp_path / "k9.jsonl.lock").exists()


def test_second_run_on_the_same_file_is_refused_and_sigterm_cleans_up(work, tmp_path):
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    out = tmp_path / "two.jsonl"
    args = base_args(work, out, "--quant", "bf16", "--optimizer", "sgd")
    proc = subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, LORAPLAN_PROFILE_FAULT="sleep@first_forward", **env))
    try:
        _wait_for(lambda: any((tmp / d / "spec.json").exists() for d in _run_dirs(tmp)), "the first run's worker")
        p = run_cli(*args, env=env)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
        assert f"in use by another 'loraplan profile' run (pid {proc.pid}" in p.stderr and "--out another file" in p.stderr
    finally:
        proc.send_signal(signal.SIGTERM)  # ends through the normal exit path
        rc = proc.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in proc.stderr.read()
    assert _run_dirs(tmp) == [] and not (tmp_path / "two.jsonl.lock").exists() and not out.exists()


def test_kill_9_during_model_build_leaves_no_entry_a_later_run_trusts(work, tmp_path):
    from loraplan.catalog import load_model
    from loraplan.profile.burst import model_cache_path

    cache = tmp_path / "models"
    out = tmp_path / "build.jsonl"
    args = ["--device", "cpu", "--model", "tiny-llama", "--quant", "bf16", "--optimizer", "sgd", "--steps", 2,
            "--warmup", 1, "--batch", 1, "--seq", 16, "--rank", 4, "--cache-dir", cache, "--out", out]
    entry = model_cache_path("tiny-llama", dict(load_model("tiny-llama").config), cache)
    proc = subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, LORAPLAN_PROFILE_FAULT="sleep@build", TMPDIR=str(tmp_path)))
    building = lambda: [d for d in cache.glob(f".{entry.name}.tmp-*") if (d / "model.safetensors").exists()]  # noqa: E731
    _wait_for(lambda: cache.is_dir() and building(), "the model build")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not entry.exists() and building() and not out.exists()
    p = run_cli(*args, env={"TMPDIR": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    (rec,) = lines(out)
    assert rec["status"] == "ok" and rec["protocol"]["model_dir"] == str(entry)
    assert [d.name for d in cache.iterdir()] == [entry.name]


def test_profile_kernel_summary_flag_stores_it_in_the_record(work):
    out = work["root"] / "kernels.jsonl"
    p = run_cli(*base_args(work, out, "--quant", "bf16", "--optimizer", "sgd", "--kernel-summary"))
    assert p.returncode == 0, p.stderr
    (rec,) = lines(out)
    assert rec["status"] == "ok" and rec["kernels"]["activity"] == "cpu"
    assert rec["kernels"]["classes"]["matmul"]["flops"] > 0
    from loraplan.measurements import measurement_from_record

    assert measurement_from_record(rec).kernels == rec["kernels"]  # schema-checked on read
