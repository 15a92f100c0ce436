"""Memory probes used inside a burst: CUDA caching-allocator statistics, an NVML sampler
thread, and the CPU live-tensor tracker behind the same small interface.

A probe is used as ``probe.begin(phase)`` ... ``probe.end(phase) -> dict``; the dict holds the
peaks of that phase (bytes). Peaks are reset at every ``begin``, so the maximum over
consecutive phases is the peak over their union.
"""

from __future__ import annotations

import threading
from typing import Any

#: torch.cuda.memory_stats keys -> record names
CUDA_PEAK_KEYS = {
    "allocated_bytes.all.peak": "max_allocated_bytes",
    "reserved_bytes.all.peak": "max_reserved_bytes",
    "active_bytes.all.peak": "max_active_bytes",
    "requested_bytes.all.peak": "max_requested_bytes",
}
CUDA_CURRENT_KEYS = {
    "allocated_bytes.all.current": "allocated_bytes",
    "reserved_bytes.all.current": "reserved_bytes",
}


class CudaProbe:
    """Phase peaks from ``torch.cuda.memory_stats`` (max allocated / reserved / active / requested)."""

    source = "torch.cuda.memory_stats"

    def __init__(self, device: int = 0, nvml: "NvmlSampler | None" = None) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.nvml = nvml

    def begin(self, phase: str) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)
        if self.nvml is not None:
            self.nvml.begin(phase)

    def end(self, phase: str) -> dict[str, Any]:
        stats = self.torch.cuda.memory_stats(self.device)
        out = {name: int(stats.get(k, 0)) for k, name in CUDA_PEAK_KEYS.items()}
        out.update({name: int(stats.get(k, 0)) for k, name in CUDA_CURRENT_KEYS.items()})
        if self.nvml is not None:
            peak = self.nvml.end(phase)
            if peak is not None:
                out["nvml_peak_used_bytes"] = peak
        return out

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def outside_allocator(self) -> int | None:
        """Device memory this process holds outside torch's caching allocator, now: NVML used -
        NVML baseline (before CUDA was initialised: other processes) - ``torch.cuda.memory_reserved``,
        read together after a synchronize. It is the CUDA context, the kernel modules loaded so far,
        NCCL buffers and resident managed (paged optimizer) pages. None without NVML."""
        if self.nvml is None or self.nvml.baseline_used_bytes is None:
            return None
        self.synchronize()
        reserved = int(self.torch.cuda.memory_reserved(self.device))
        try:
            used = self.nvml.sample()
        except Exception:  # noqa: BLE001 - NVML failing mid-run: no figure, not a failed burst
            return None
        return used - self.nvml.baseline_used_bytes - reserved


class CpuProbe:
    """Phase peaks of live tensor bytes from ``loraplan.trace.tracker.LiveTensorTracker``
    (no allocator on CPU)."""

    source = "live-tensor tracker (storage bytes of live tensors)"

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self._open = None

    def begin(self, phase: str) -> None:
        self._open = self.tracker.phase(phase)
        self._open.__enter__()

    def end(self, phase: str) -> dict[str, Any]:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
        peak = int(self.tracker.phase_peaks.get(phase, self.tracker.current))
        return {"max_allocated_bytes": peak, "allocated_bytes": int(self.tracker.current)}

    def synchronize(self) -> None:
        pass


class NvmlSampler:
    """Device memory ``used`` from NVML, sampled every ``interval`` seconds in a daemon thread.

    ``baseline_used_bytes`` is the first sample (taken in :meth:`start`, before the model);
    ``peak_used_bytes`` the largest since. NVML counts the whole device: the CUDA context,
    everything the caching allocator holds, cudaMallocManaged (paged optimizer) pages while
    resident, and other processes.
    """

    def __init__(self, index: int = 0, uuid: str | None = None, interval: float = 0.002, pynvml=None) -> None:
        if pynvml is None:
            import pynvml  # from nvidia-ml-py
        self.nv = pynvml
        self.interval = interval
        self.nv.nvmlInit()
        handle = None
        if uuid:
            try:
                handle = self.nv.nvmlDeviceGetHandleByUUID(
                    uuid if str(uuid).startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
            except Exception:
                handle = None
        self.handle = handle if handle is not None else self.nv.nvmlDeviceGetHandleByIndex(index)
        self.baseline_used_bytes: int | None = None
        self.peak_used_bytes = 0
        self.total_bytes: int | None = None
        self.samples = 0
        self._phase: str | None = None
        self._phase_peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        info = self.nv.nvmlDeviceGetMemoryInfo(self.handle)
        used = int(info.used)
        with self._lock:
            self.samples += 1
            if self.total_bytes is None:
                self.total_bytes = int(info.total)
            if self.baseline_used_bytes is None:
                self.baseline_used_bytes = used
            if used > self.peak_used_bytes:
                self.peak_used_bytes = used
            if self._phase is not None and used > self._phase_peak:
                self._phase_peak = used
        return used

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:
                pass
            self._stop.wait(self.interval)

    def start(self) -> "NvmlSampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="loraplan-nvml", daemon=True)
        self._thread.start()
        return self

    def begin(self, phase: str) -> None:
        with self._lock:
            self._phase, self._phase_peak = phase, 0
        try:
            self.sample()
        except Exception:
            pass

    def end(self, phase: str) -> int | None:
        try:
            self.sample()
        except Exception:
            pass
        with self._lock:
            peak = self._phase_peak if self._phase == phase else None
            self._phase = None
        return peak

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        try:
            self.sample()
        except Exception:
            pass
        try:
            self.nv.nvmlShutdown()
        except Exception:
            pass
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {"available": True, "interval_s": self.interval, "samples": self.samples,
                "baseline_used_bytes": self.baseline_used_bytes, "peak_used_bytes": self.peak_used_bytes,
                "peak_minus_baseline_bytes": (self.peak_used_bytes - self.baseline_used_bytes
                                              if self.baseline_used_bytes is not None else None),
                "total_bytes": self.total_bytes}
