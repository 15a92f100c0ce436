"""Live-tensor memory accounting for CPU bursts (CPU has no caching-allocator statistics).

A ``TorchDispatchMode`` that sees every tensor an op returns, keys it by its storage
(``untyped_storage()._cdata``: views share one storage and count once) and subtracts the
storage's bytes when the Python storage object dies (``weakref.finalize``; torch keeps that
object alive exactly as long as the storage). Tensors made before the mode (model weights)
are registered by hand with :meth:`register`. It records the overall peak and a peak per
named phase. Its figure is live tensor bytes, the CPU analogue of
``torch.cuda.max_memory_allocated`` without allocator rounding.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phase: str | None = None
        self.phase_peaks: dict[str, int] = {}

    # ---- accounting -------------------------------------------------------------------
    def register(self, *tensors) -> None:
        """Count tensors that exist already (parameters, buffers, inputs)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)

    def register_module(self, module: torch.nn.Module) -> None:
        self.register(*module.parameters(), *module.buffers())

    def _track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
            key = st._cdata
            nbytes = int(st.nbytes())
        except Exception:  # tensors without storage (sparse, some subclasses)
            return
        with self._lock:
            if key in self.live:
                return
            self.live[key] = nbytes
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current
            if self.phase is not None and self.current > self.phase_peaks.get(self.phase, 0):
                self.phase_peaks[self.phase] = self.current
        try:
            weakref.finalize(st, self._free, key)
        except TypeError:  # not weak-referenceable: never subtracted (counted as kept)
            pass

    def _free(self, key: int) -> None:
        with self._lock:
            n = self.live.pop(key, 0)
            self.current -= n

    def begin_phase(self, name: str) -> None:
        """Start a named phase: its peak starts at what is live now."""
        with self._lock:
            self.phase = name
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)

    def end_phase(self) -> None:
        with self._lock:
            self.phase = None

    # ---- dispatch ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
