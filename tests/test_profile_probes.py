"""NVML sampler, CUDA allocator probe (with fakes) and the CPU live-tensor tracker."""

import threading
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from loraplan.trace.tracker import LiveTensorTracker  # noqa: E402
from loraplan.profile.probes import CpuProbe, CudaProbe, NvmlSampler  # noqa: E402


class FakeNvml:
    """pynvml look-alike whose ``used`` follows a script of values (then stays at the last)."""

    def __init__(self, used):
        self.used = list(used)
        self.calls = []
        self.lock = threading.Lock()

    def nvmlInit(self):
        self.calls.append("init")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("h", i)

    def nvmlDeviceGetHandleByUUID(self, u):
        raise RuntimeError("no uuid")

    def nvmlDeviceGetMemoryInfo(self, handle):
        with self.lock:
            v = self.used.pop(0) if len(self.used) > 1 else self.used[0]
        return SimpleNamespace(used=v, total=80 * 2**30, free=80 * 2**30 - v)


def test_nvml_sampler_baseline_peak_and_phases():
    fake = FakeNvml([100, 150, 900, 300])
    s = NvmlSampler(index=0, uuid="abc", interval=0.001, pynvml=fake).start()
    assert s.baseline_used_bytes == 100
    s.begin("first_forward")
    deadline = time.time() + 2
    while s.peak_used_bytes < 900 and time.time() < deadline:
        time.sleep(0.005)
    phase_peak = s.end("first_forward")
    out = s.stop()
    assert phase_peak == 900
    assert out["available"] and out["baseline_used_bytes"] == 100 and out["peak_used_bytes"] == 900
    assert out["peak_minus_baseline_bytes"] == 800 and out["total_bytes"] == 80 * 2**30
    assert out["samples"] >= 4 and fake.calls == ["init", "shutdown"]
    assert not s._thread.is_alive()


def test_cuda_probe_reads_allocator_peaks(monkeypatch):
    stats = {"allocated_bytes.all.peak": 10, "reserved_bytes.all.peak": 20, "active_bytes.all.peak": 11,
             "requested_bytes.all.peak": 9, "allocated_bytes.all.current": 5, "reserved_bytes.all.current": 16}
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d=None: dict(stats))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("sync", d)))
    fake = FakeNvml([1000, 5000])
    nv = NvmlSampler(pynvml=fake, interval=0.5)
    p = CudaProbe(0, nv)
    p.begin("load")
    m = p.end("load")
    p.synchronize()
    assert calls == [("reset", 0), ("sync", 0)]
    assert m == {"max_allocated_bytes": 10, "max_reserved_bytes": 20, "max_active_bytes": 11,
                 "max_requested_bytes": 9, "allocated_bytes": 5, "reserved_bytes": 16,
                 "nvml_peak_used_bytes": 5000}


def test_live_tensor_tracker_counts_storages_once_and_frees():
    tr = LiveTensorTracker(device="cpu")
    w = torch.zeros(100, dtype=torch.float32)
    tr.register([w, w[:10]], label="weights")  # a view of a registered tensor counts once
    assert tr.current == 400
    probe = CpuProbe(tr)
    with tr:
        probe.begin("fwd")
        a = torch.ones(1000, dtype=torch.bfloat16)  # 2000 B
        v = a.view(10, 100)  # same storage
        b = a.float()  # 4000 B
        del a, v, b
        m = probe.end("fwd")
        probe.begin("after")
        c = torch.empty(10, dtype=torch.float64)
        m2 = probe.end("after")
    assert m == {"max_allocated_bytes": 400 + 2000 + 4000, "allocated_bytes": 400}
    assert m2["max_allocated_bytes"] == 480 and tr.peak == 6400
    del c
    assert tr.current == 400


def test_cpu_probe_with_the_shared_tracker():
    tracker_mod = pytest.importorskip("loraplan.trace.tracker")
    tr = tracker_mod.LiveTensorTracker(device="cpu")
    w = torch.zeros(100)
    probe = CpuProbe(tr)
    probe.begin("load")
    tr.register([w], label="weights")
    m0 = probe.end("load")
    with tr:
        probe.begin("fwd")
        a = torch.ones(1000)
        del a
        m1 = probe.end("fwd")
    assert m0["max_allocated_bytes"] == 400
    assert m1 == {"max_allocated_bytes": 4400, "allocated_bytes": 400}


def test_cuda_probe_outside_allocator_is_nvml_used_minus_baseline_minus_reserved(monkeypatch):
    """NVML used - baseline (other processes, before CUDA) - memory_reserved, read together."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("sync", d)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3000)
    fake = FakeNvml([1000, 1000 + 450 + 3000])  # baseline, then context 450 + reserved 3000
    nv = NvmlSampler(pynvml=fake, interval=0.5)
    nv.sample()  # the baseline, as NvmlSampler.start takes it
    p = CudaProbe(0, nv)
    assert p.outside_allocator() == 450
    assert calls == [("sync", 0)]


def test_cuda_probe_outside_allocator_without_nvml_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3000)
    assert CudaProbe(0, None).outside_allocator() is None
    nv = NvmlSampler(pynvml=FakeNvml([5]), interval=0.5)  # no baseline sampled yet
    assert CudaProbe(0, nv).outside_allocator() is None
