"""What an estimate returns: plain data (dataclasses + to_dict), never formatted text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .params import ParamCounts


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a training burst, in bytes.

    ``components`` is the itemised ledger of ``peak_allocated_bytes`` (torch.cuda.max_memory_allocated):
    its values sum exactly to it. ``peak_moment`` names the moment of the step at which the peak
    happens (e.g. "loss backward", "optimizer step"). Reserved adds allocator caching; device
    total adds the CUDA context and memory outside torch's allocator (paged optimizer buffers).
    """

    components: dict[str, int]
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int
    peak_moment: str
    moments: dict[str, int] = field(default_factory=dict)  # candidate moment -> allocated bytes
    outside_allocator_bytes: dict[str, int] = field(default_factory=dict)  # e.g. paged buffers, CUDA context
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TimeEstimate:
    step_s: float
    tokens_per_s: float
    components: dict[str, float] = field(default_factory=dict)  # seconds by part
    bound: str = ""  # what limits the step: host | compute | memory


@dataclass(frozen=True)
class Estimate:
    inputs: dict[str, Any]
    params: ParamCounts
    memory: MemoryEstimate
    gpu: str | None
    gpu_memory_bytes: int | None
    time: TimeEstimate | None = None
    method: str = "analytic"
    calibration: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)  # method-specific extras (trace phases, ...)

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_bytes is None:
            return None
        return self.memory.device_total_bytes <= self.gpu_memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.gpu_memory_bytes is None else self.gpu_memory_bytes - self.memory.device_total_bytes

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        d: dict[str, Any] = {
            "method": self.method,
            "inputs": self.inputs,
            "params": {"trainable": self.params.trainable, "total": self.params.total,
                       "trainable_percent": round(self.params.trainable_percent, 6),
                       "adapted_modules": self.params.adapted_modules},
            "memory": {
                "peak_allocated_bytes": m.peak_allocated_bytes,
                "peak_reserved_bytes": m.peak_reserved_bytes,
                "device_total_bytes": m.device_total_bytes,
                "peak_moment": m.peak_moment,
                "components": dict(m.components),
                "moments": dict(m.moments),
                "outside_allocator_bytes": dict(m.outside_allocator_bytes),
                "notes": list(m.notes),
            },
            "gpu": self.gpu,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "calibration": self.calibration,
        }
        if self.detail:
            d["detail"] = self.detail
        if self.time is not None:
            d["time"] = {"step_s": self.time.step_s, "tokens_per_s": self.time.tokens_per_s,
                         "components": dict(self.time.components), "bound": self.time.bound}
        return d
