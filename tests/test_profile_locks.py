"""What a profile run does before and after its bursts, with the burst faked (no torch): the
records file checked and locked, the GPU locked, write failures kept in a recovery file, stale
temp folders removed, big models refused on the CPU."""

import json
import os
import subprocess
import sys
import time

import pytest

from loraplan.errors import HostMemoryError, ProfileBusyError, RecordsError
from loraplan.profile import locks, runner
from loraplan.profile.records import read_records, recovery_paths
from loraplan.profile.runner import DeviceInfo, build_cases, profile

CPU = DeviceInfo("cpu", "cpu")


def fake_burst(calls):
    def run_worker(spec, timeout, on_event=None, python=None, env=None):
        calls.append(spec)
        return {"status": "ok", "phase": "done", "memory": {"peak_allocated_bytes": 1000}, "time": {}}

    return run_worker


@pytest.fixture
def cases(tiny_llama_config):
    return build_cases([{"model": str(tiny_llama_config), "quant": "bf16", "optimizer": o, "seq": 16, "rank": 4}
                        for o in ("sgd", "adamw")])


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Temp folders and GPU locks of these tests in a folder of their own (others run in parallel)."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(d))
    monkeypatch.setenv("LORAPLAN_CACHE", str(tmp_path / "cache"))
    return d


def test_unwritable_records_file_fails_before_any_burst(tmp_path, cases, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_worker", fake_burst(calls))
    blocker = tmp_path / "profiles"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(RecordsError, match=r"cannot write the records file .*profiles/cpu\.jsonl.*--out") as ei:
        profile(cases, CPU, out=blocker / "cpu.jsonl")
    assert calls == [] and "\n" not in str(ei.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_before_any_burst(tmp_path, cases, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_worker", fake_burst(calls))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RecordsError, match="Permission denied"):
            profile(cases, CPU, out=ro / "cpu.jsonl")
    finally:
        ro.chmod(0o755)
    assert calls == []


def test_write_failure_after_a_burst_keeps_the_record_and_the_next_run_adds_it(tmp_path, cases, monkeypatch):
    import errno

    calls = []
    monkeypatch.setattr(runner, "run_worker", fake_burst(calls))
    out = tmp_path / "cpu.jsonl"

    def disk_full(path, rec):
        if os.path.abspath(path) == str(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, rec)

    real = runner.append_record
    monkeypatch.setattr(runner, "append_record", disk_full)
    with pytest.raises(RecordsError) as ei:
        profile(cases, CPU, out=out)
    msg = str(ei.value)
    kept = recovery_paths(out)[0]
    assert len(calls) == 1, "the run stops at the first record it cannot write"
    assert "No space left on device" in msg and str(kept) in msg and "next run" in msg and "\n" not in msg
    (rec,) = read_records(kept).records
    assert rec["label"] == cases[0].label and rec["memory"]["peak_allocated_bytes"] == 1000
    assert not out.exists() or read_records(out).records == []
    monkeypatch.setattr(runner, "append_record", real)
    warnings = []
    res = profile(cases, CPU, out=out, on_warning=warnings.append)
    assert len(calls) == 2, "the kept case is not measured again"
    assert [r.skipped for r in res] == [True, False] and not kept.exists()
    assert any("added 1 record(s)" in w and str(kept) in w for w in warnings)
    assert [r["label"] for r in read_records(out).records] == [c.label for c in cases]


def test_no_recovery_file_anywhere_puts_the_record_in_the_message(tmp_path, cases, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_worker", fake_burst(calls))
    monkeypatch.setattr(runner, "append_record", lambda p, r: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    monkeypatch.setattr(runner, "keep_record", lambda p, r: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(RecordsError) as ei:
        profile(cases[:1], CPU, out=tmp_path / "cpu.jsonl")
    msg = str(ei.value)
    assert "Input/output error" in msg and "Read-only file system" in msg and "\n" not in msg
    rec = json.loads(msg.split("is this record: ", 1)[1])
    assert rec["label"] == cases[0].label and rec["memory"]["peak_allocated_bytes"] == 1000


HOLD = """
import sys, time
from loraplan.profile.locks import records_lock, device_lock
with records_lock(sys.argv[1]), device_lock("GPU-test", "NVIDIA Test", root=sys.argv[2]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_run_on_one_records_file_or_gpu_is_refused(tmp_path, cases, monkeypatch, private_tmp):
    calls = []
    monkeypatch.setattr(runner, "run_worker", fake_burst(calls))
    out = tmp_path / "cpu.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(private_tmp)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ProfileBusyError) as ei:
            profile(cases, CPU, out=out)
        msg = str(ei.value)
        assert f"pid {holder.pid}" in msg and "--out another file" in msg and f"kill {holder.pid}" in msg
        assert "\n" not in msg and calls == []
        gpu = DeviceInfo("cuda", "h100-sxm-80gb", "NVIDIA Test", {"uuid": "GPU-test"})
        with pytest.raises(ProfileBusyError, match=rf"GPU NVIDIA Test is in use by .*pid {holder.pid}.*CUDA_VISIBLE_DEVICES"):
            profile(cases, gpu, out=tmp_path / "other.jsonl")
        assert calls == []
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's locks: the next run goes ahead
    profile(cases, CPU, out=out)
    assert len(calls) == 2 and not (tmp_path / "cpu.jsonl.lock").exists()


def test_lock_file_removed_under_a_waiting_run_is_not_shared(tmp_path):
    lock = tmp_path / "x.lock"
    with locks.exclusive(lock, lambda h: "busy"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ProfileBusyError, match="busy"):
            with locks.exclusive(lock, lambda h: "busy"):
                pass
    assert not lock.exists()
    with locks.exclusive(lock, lambda h: "busy"):
        assert lock.exists()


def test_device_key(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert locks.device_key(None) == "cuda0" and locks.device_key("GPU-1234") == "GPU-1234"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert locks.device_key(None) == "cuda2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-abc")
    assert locks.device_key("GPU-parent") == "MIG-abc"


def test_stale_temp_folders_removed_live_ones_kept(private_tmp):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = private_tmp / f"loraplan-profile-{dead.pid}-abc"
    live = private_tmp / f"loraplan-profile-{os.getpid()}-abc"
    legacy_old = private_tmp / "loraplan-profile-k2xcc396"
    legacy_new = private_tmp / "loraplan-profile-a0sfj5w5"
    for d in (stale, live, legacy_old, legacy_new):
        d.mkdir()
        (d / "spec.json").write_text("{}")
    old = time.time() - locks.LEGACY_TEMP_AGE_S - 60
    os.utime(legacy_old, (old, old))
    assert sorted(locks.remove_stale_temp_dirs()) == sorted([stale, legacy_old])
    assert live.exists() and legacy_new.exists() and not stale.exists()


def test_big_model_on_cpu_is_refused_before_any_burst(tmp_path, monkeypatch):
    from loraplan.profile.runner import check_host_memory, host_memory_available_bytes, host_weight_bytes

    calls = []
    monkeypatch.setattr(runner, "run_worker", fake_burst(calls))
    big = build_cases([{"model": "llama-2-7b", "quant": "nf4"}])
    assert host_weight_bytes(big[0]) == 6_738_415_616 * 2  # built in bf16 before it is quantized
    with pytest.raises(HostMemoryError, match=r"'llama-2-7b' \(6\.74B parameters\) alone need 12\.6 GiB .* 8\.0 GiB "
                                              r"is available.*--model tiny-llama"):
        check_host_memory(big, CPU, available=8 * 2**30)
    check_host_memory(big, CPU, available=16 * 2**30)
    check_host_memory(big, DeviceInfo("cuda", "h100-sxm-80gb"), available=1)  # weights go to the GPU
    monkeypatch.setattr(runner, "host_memory_available_bytes", lambda: 2**30)
    with pytest.raises(HostMemoryError):
        profile(big, CPU, out=tmp_path / "cpu.jsonl")
    assert calls == [] and not (tmp_path / "cpu.jsonl").exists()
    tiny = build_cases([{"model": "tiny-llama", "quant": "bf16"}])
    profile(tiny, CPU, out=tmp_path / "cpu.jsonl")
    assert len(calls) == 1
    avail = host_memory_available_bytes()
    assert avail is None or avail > 0


def test_cpu_without_model_is_refused(run_cli, tmp_path):
    code, out, err = run_cli("profile", "--device", "cpu", "--out", str(tmp_path / "x.jsonl"))
    assert code == 2 and "--device cpu needs --model" in err and "--model tiny-llama" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.jsonl").exists()


def test_a_zombie_is_not_alive():
    """A killed child that nobody reaped holds no files: its temp folders are stale."""
    import subprocess
    import sys

    from loraplan.profile.locks import pid_alive

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    import time

    for _ in range(100):  # exited but not waited for: a zombie
        time.sleep(0.05)
        with open(f"/proc/{p.pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
    assert not pid_alive(p.pid)
    p.wait()
    assert not pid_alive(p.pid)
    assert pid_alive(os.getpid())
