"""A storage-level live-tensor memory tracker (device-agnostic, works on meta, CPU and CUDA).

``LiveTensorTracker`` is a ``TorchDispatchMode``: every tensor an ATen op returns is looked at,
and its *storage* (``tensor.untyped_storage()``, keyed on ``storage._cdata``) is counted once,
so views, ``as_strided`` results and in-place ops cost nothing extra. A ``weakref.finalize``
on the Python storage object subtracts the bytes when the storage dies: torch preserves the
Python storage object exactly as long as the C++ storage lives (also while only autograd
holds it), so the count follows the real lifetime of the memory.

What it gives:

- ``current`` / ``peak`` bytes, optionally with every storage rounded up to ``round_to`` bytes
  (512 mimics the CUDA caching allocator's block size, i.e. ``torch.cuda.max_memory_allocated``);
- per-phase peaks: ``with tracker.phase("forward"): ...`` (phases nest; the innermost names the
  allocations, and every enclosing phase's peak is updated too);
- ``register(tensors, label=...)`` for tensors made before the mode was entered (parameters,
  buffers, inputs); ``label(tensor, name)`` to re-tag a live storage (e.g. gradients, optimizer
  state) so a breakdown can map it to a ledger category;
- ``snapshot(at="peak")``: what was live at the peak (or at a phase's peak), grouped by
  (phase at creation, producing op, dtype, shape, label), largest first. It is computed from an
  allocation log after the fact (each record keeps its allocation and free sequence numbers), so
  keeping it costs O(1) per allocation.

Tensors created outside the mode (before ``__enter__`` or by code that bypasses dispatch, e.g.
memory allocated inside a custom kernel) are invisible unless registered by hand. Nothing here
imports anything beyond torch; it is used by the meta-device trace and by the CPU profiler.

Example::

    tr = LiveTensorTracker(round_to=512)
    tr.register(model.parameters(), label="weights")
    with tr:
        with tr.phase("forward"):
            loss = model(x).sum()
        with tr.phase("backward"):
            loss.backward()
    tr.peak, tr.phase_peaks, tr.snapshot()[:5]
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorTracker", "LiveGroup", "round_up"]


def round_up(nbytes: int, block: int | None) -> int:
    """``nbytes`` rounded up to a multiple of ``block`` (no rounding when block is falsy)."""
    if not block or nbytes <= 0:
        return max(nbytes, 0)
    return -(-nbytes // block) * block


@dataclass(frozen=True)
class LiveGroup:
    """Storages live at one moment that share phase, producing op, dtype, shape and label."""

    phase: str
    op: str
    dtype: str
    shape: tuple
    label: str
    context: str
    count: int
    bytes: int

    def to_dict(self) -> dict:
        return {"phase": self.phase, "op": self.op, "dtype": self.dtype, "shape": list(self.shape),
                "label": self.label, "context": self.context, "count": self.count, "bytes": self.bytes}


# record layout (plain list for speed): see _track; _PATH / _FPATH: the whole phase stack
# ("step1/forward") at allocation / at free, for saying where a replayed OOM happens
# _STREAM: the stream the allocation was made on (``stream_fn``; 0 = the default stream)
_BYTES, _PHASE, _OP, _DTYPE, _SHAPE, _LABEL, _ALLOC, _FREE, _CTX, _PATH, _FPATH, _STREAM = range(12)


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages; see the module docstring.

    Args:
        round_to: round every storage up to this many bytes (512 = CUDA caching allocator block);
            None or 0 counts exact ``nbytes``.
        device: count only storages on this device type ("meta", "cpu", "cuda"); None counts all.
        context_fn: optional callable returning a short string recorded with each allocation
            (e.g. the name of the module currently running); it shows in snapshots.
        on_new: optional callable ``(func, tensor)`` run for every newly tracked storage.
        op_hook: optional callable ``(tracker, func, args, kwargs, out)`` run after every op, once
            its outputs are tracked; it may call ``tracker.transient(...)`` for memory the op's
            kernel uses internally (invisible to dispatch).

    ``stream_fn`` (attribute, default None = every allocation on stream 0): a callable returning
    the id (int, 0 = default) of the stream current at an allocation; the CUDA caching allocator
    keeps each stream's blocks apart (``loraplan.allocator``), so ``allocation_streams`` hands
    the ids to the replay. The multi-GPU trace sets it (trace/distributed.py).
    """

    def __init__(self, round_to: int | None = None, device: str | None = None,
                 context_fn: Callable[[], str] | None = None,
                 on_new: Callable[[Any, torch.Tensor], None] | None = None,
                 op_hook: Callable[..., None] | None = None):
        super().__init__()
        self.op_hook = op_hook
        self.failed_op: str | None = None  # name of the last op that raised inside the mode
        self.paused = False
        self.peak_transient: tuple[str, int] | None = None  # (name, bytes) if the peak is a transient
        self.transient_peaks: dict[str, int] = {}  # transient name -> largest bytes seen
        self.round_to = round_to
        self.device = device
        self.context_fn = context_fn
        self.on_new = on_new
        self.current = 0
        self.peak = 0
        self.peak_seq = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase_peak_seq: dict[str, int] = {}
        self._phase_stack: list[str] = []
        self._records: list[list] = []
        self._live: dict[int, int] = {}  # storage _cdata -> record index
        self._ignored: set[int] = set()  # storage _cdata never counted (see ignore)
        self._seq = 0
        self.n_allocations = 0
        #: allocator events that are not storages: (seq, order, kind, key, bytes, phase path);
        #: transients (alloc + free at one moment) and persistent allocations (see ``persistent``)
        self._extra: list[tuple] = []
        self.n_resizes = 0
        self.stream_fn: Callable[[], int] | None = None
        self._extra_streams: dict = {}  # key of a transient / persistent allocation -> stream (non-zero)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            out = func(*args, **(kwargs or {}))
        except Exception:
            self.failed_op = _op_name(func)
            raise
        name = None
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if name is None:
                    name = _op_name(func)
                self._track(t, name, None)
        # in-place / out= ops may resize an existing storage (e.g. resize_ on an empty tensor)
        if getattr(func, "_schema", None) is not None and func._schema.is_mutable:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    self._resync(t)
        if self.op_hook is not None:
            self.op_hook(self, func, args, kwargs or {}, out)
        return out

    # ------------------------------------------------------------------ public API
    @property
    def phase_name(self) -> str:
        return self._phase_stack[-1] if self._phase_stack else ""

    @property
    def phases(self) -> tuple[str, ...]:
        """The enclosing phases, outermost first (e.g. ("step2", "backward"))."""
        return tuple(self._phase_stack)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Name the allocations made inside; record this phase's own peak in ``phase_peaks``."""
        self._phase_stack.append(name)
        self._bump_phase(name)
        try:
            yield self
        finally:
            self._phase_stack.pop()

    def register(self, tensors: torch.Tensor | Iterable[torch.Tensor] | None, label: str = "",
                 op: str = "registered") -> int:
        """Count tensors made before the mode (params, buffers, inputs). Returns bytes newly added.

        Already-tracked storages are not counted twice; ``label`` is applied to new ones only.
        """
        if tensors is None:
            return 0
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        before = self.current
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t, op, label or None)
        return self.current - before

    def label(self, tensor: torch.Tensor, label: str) -> bool:
        """Re-tag the live storage of ``tensor``. True if it is tracked (use ``register`` for
        tensors made outside the mode)."""
        st = _storage(tensor)
        if st is None:
            return False
        idx = self._live.get(st._cdata)
        if idx is None:
            return False
        self._records[idx][_LABEL] = label
        return True

    def transient(self, nbytes: int, name: str = "transient") -> None:
        """Memory a kernel holds for a moment without dispatch seeing it (e.g. a dequantized
        weight inside a custom op): ``current + nbytes`` becomes a peak candidate now."""
        nbytes = round_up(int(nbytes), self.round_to)
        if nbytes <= 0:
            return
        key = ("transient", name, len(self._extra))
        path = self.phase_path
        self._note_stream(key)
        self._extra.append((self._seq, len(self._extra), "alloc", key, nbytes, path))
        self._extra.append((self._seq, len(self._extra), "free", key, 0, path))
        self.transient_peaks[name] = max(self.transient_peaks.get(name, 0), nbytes)
        cand = self.current + nbytes
        if cand > self.peak:
            self.peak, self.peak_seq, self.peak_transient = cand, self._seq, (name, nbytes)
        for p in self._phase_stack:
            if cand > self.phase_peaks.get(p, -1):
                self.phase_peaks[p] = cand
                self._phase_peak_seq[p] = self._seq

    def persistent(self, nbytes: int, name: str = "persistent") -> None:
        """Log, for the allocator stream only, an allocation made now outside dispatch and never
        freed (e.g. a cuBLAS workspace, cached per handle for the life of the process). It does
        not change ``current`` / ``peak``: callers that count it in their peak add it as a term."""
        nbytes = round_up(int(nbytes), self.round_to)
        if nbytes > 0:
            key = ("persistent", name, len(self._extra))
            self._note_stream(key)
            self._extra.append((self._seq, len(self._extra), "alloc", key, nbytes, self.phase_path))

    @property
    def phase_path(self) -> str:
        """The whole phase stack, outermost first: "step1/forward"."""
        return "/".join(self._phase_stack)

    @contextlib.contextmanager
    def pause(self):
        """Do not track storages created inside (e.g. memory outside the allocator being modelled)."""
        old, self.paused = self.paused, True
        try:
            yield self
        finally:
            self.paused = old

    def ignore(self, tensor: torch.Tensor) -> None:
        """Never count this tensor's storage (stops counting it if already tracked), e.g. memory
        that the modelled allocator does not own (CUDA managed memory of paged optimizers)."""
        st = _storage(tensor)
        if st is None:
            return
        key = st._cdata
        idx = self._live.get(key)
        if idx is not None:
            self._on_free(key, idx)
        if key not in self._ignored:
            self._ignored.add(key)
            weakref.finalize(st, _unignore, weakref.ref(self), key)

    def is_tracked(self, tensor: torch.Tensor) -> bool:
        st = _storage(tensor)
        return st is not None and st._cdata in self._live

    def reset_peak(self) -> None:
        """Forget peaks so far (``peak`` = ``current``), e.g. after building the model."""
        self.peak = self.current
        self.peak_seq = self._seq
        self.peak_transient = None
        self.transient_peaks.clear()
        self.phase_peaks.clear()
        self._phase_peak_seq.clear()
        for p in self._phase_stack:
            self._bump_phase(p)

    def live_bytes(self, label: str | None = None) -> int:
        """Bytes live now, optionally only those with ``label``."""
        if label is None:
            return self.current
        return sum(self._records[i][_BYTES] for i in self._live.values() if self._records[i][_LABEL] == label)

    def snapshot(self, at: str = "peak", top: int | None = None) -> list[LiveGroup]:
        """Groups of storages live at the overall peak (``at="peak"``), at a phase's peak
        (``at=<phase name>``) or now (``at="now"``), largest total first."""
        if at == "now":
            seq = None
        elif at == "peak":
            seq = self.peak_seq
        else:
            if at not in self._phase_peak_seq:
                raise KeyError(f"no phase named {at!r}; phases: {', '.join(self._phase_peak_seq)}")
            seq = self._phase_peak_seq[at]
        groups: dict[tuple, list[int]] = {}
        for r in self._records:
            if seq is None:
                alive = r[_FREE] is None
            else:
                alive = r[_ALLOC] <= seq and (r[_FREE] is None or r[_FREE] > seq)
            if not alive:
                continue
            key = (r[_PHASE], r[_OP], r[_DTYPE], r[_SHAPE], r[_LABEL] or "", r[_CTX] or "")
            g = groups.setdefault(key, [0, 0])
            g[0] += 1
            g[1] += r[_BYTES]
        out = [LiveGroup(k[0], k[1], k[2], k[3], k[4], k[5], v[0], v[1]) for k, v in groups.items()]
        out.sort(key=lambda g: -g.bytes)
        return out[:top] if top else out

    def records_live_at(self, at: str = "peak") -> list[dict]:
        """Every storage live at ``at`` (see ``snapshot``) as a dict, without grouping."""
        seq = self.peak_seq if at == "peak" else self._phase_peak_seq[at]
        keys = ("bytes", "phase", "op", "dtype", "shape", "label", "alloc", "free", "context")
        return [dict(zip(keys, r)) for r in self._records
                if r[_ALLOC] <= seq and (r[_FREE] is None or r[_FREE] > seq)]

    def allocation_events(self, free_live_at_end: bool = False, start_seq: int | None = None,
                          with_phase: bool = False) -> list[tuple]:
        """The allocation log as the ordered stream ``loraplan.allocator.replay`` takes:
        ``("alloc", key, bytes)`` and ``("free", key)``, in sequence order (a storage's key is its
        record index; transients and persistent allocations have tuple keys).

        Bytes are the record's (already rounded to ``round_to`` when set; the allocator model
        rounds again, which is idempotent for 512). A storage resized in place is two records
        (see ``_resync_storage``). Zero-byte storages are skipped (the CUDA allocator hands out
        no block for them). ``transient(...)`` memory is an alloc and a free right after the op
        that reported it; ``persistent(...)`` memory is an alloc at the moment it was logged.
        Storages still live at the end get no free event unless ``free_live_at_end``, which
        frees them, in allocation order, after everything else.

        ``start_seq``: begin the stream at that moment: what is live then is allocated first,
        in allocation order (e.g. the weights as the model was built, without the setup's
        churn), then the events after it. ``with_phase``: append the phase path at the event
        ("step1/backward") as the last item (``replay`` ignores extra items).
        """
        timed = []
        live = []
        prefix = []
        s0 = -1 if start_seq is None else start_seq
        for idx, r in enumerate(self._records):
            if r[_BYTES] <= 0:
                continue
            if r[_ALLOC] <= s0:
                if r[_FREE] is not None and r[_FREE] <= s0:
                    continue
                prefix.append((r[_ALLOC], 0, 0, "alloc", idx, r[_BYTES], r[_PATH]))
            else:
                timed.append((r[_ALLOC], 0, 0, "alloc", idx, r[_BYTES], r[_PATH]))
            if r[_FREE] is not None:
                timed.append((r[_FREE], 0, 0, "free", idx, 0, r[_FPATH]))
            else:
                live.append(idx)
        for seq, order, kind, key, nb, path in self._extra:
            if seq > s0:
                timed.append((seq, 1, order, kind, key, nb, path))
            elif kind == "alloc" and key[0] == "persistent":
                prefix.append((seq, 1, order, kind, key, nb, path))
        prefix.sort(key=lambda e: e[:3])
        timed.sort(key=lambda e: e[:3])
        events = [("alloc", key, nb, path) if kind == "alloc" else ("free", key, path)
                           for _, _, _, kind, key, nb, path in prefix + timed]
        if free_live_at_end:
            events.extend(("free", idx, "end") for idx in live)
        if not with_phase:
            events = [e[:-1] for e in events]
        return events

    def allocation_streams(self) -> dict:
        """``{allocation key: stream id}`` of the ``allocation_events`` keys made on a stream other
        than the default (``stream_fn``); what ``loraplan.allocator.replay`` takes as ``streams``."""
        out = {idx: r[_STREAM] for idx, r in enumerate(self._records) if r[_STREAM]}
        out.update(self._extra_streams)
        return out

    # ------------------------------------------------------------------ internals
    def _stream(self) -> int:
        return self.stream_fn() if self.stream_fn is not None else 0

    def _note_stream(self, key) -> None:
        s = self._stream()
        if s:
            self._extra_streams[key] = s

    def _bump_phase(self, name: str) -> None:
        if self.current > self.phase_peaks.get(name, -1):
            self.phase_peaks[name] = self.current
            self._phase_peak_seq[name] = self._seq

    def _track(self, t: torch.Tensor, op: str, label: str | None) -> None:
        if self.paused:
            return
        if _is_wrapper_subclass(t):  # a DTensor (FSDP2's sharded parameters): its inner tensors are the memory
            return
        st = _storage(t)
        if st is None:
            return
        if self.device is not None and st.device.type != self.device:
            return
        key = st._cdata
        if key in self._live:
            self._resync_storage(st)
            return
        if key in self._ignored:
            return
        nbytes = round_up(st.nbytes(), self.round_to)
        self._seq += 1
        ctx = None
        if self.context_fn is not None:
            try:
                ctx = self.context_fn()
            except Exception:  # a context is a nicety, never a failure
                ctx = None
        rec = [nbytes, self.phase_name, op, str(t.dtype).replace("torch.", ""), tuple(t.shape),
               label, self._seq, None, ctx, self.phase_path, None, self._stream()]
        idx = len(self._records)
        self._records.append(rec)
        self._live[key] = idx
        self.n_allocations += 1
        weakref.finalize(st, _free, weakref.ref(self), key, idx)
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_seq = self._seq
            self.peak_transient = None
        for p in self._phase_stack:
            if self.current > self.phase_peaks.get(p, -1):
                self.phase_peaks[p] = self.current
                self._phase_peak_seq[p] = self._seq
        if self.on_new is not None:
            self.on_new(op, t)

    def _resync(self, t: torch.Tensor) -> None:
        st = _storage(t)
        if st is not None and st._cdata in self._live:
            self._resync_storage(st)

    def _resync_storage(self, st) -> None:
        """Follow an in-place resize of a tracked storage (``resize_``, ``out=`` ops).

        In the allocator's stream it becomes what ``resize_bytes_cuda`` (aten/src/ATen/native/
        cuda/Resize.cpp) does: allocate the new size, copy, then free the old block
        (``set_data_ptr_noswap`` drops it); resizing to 0 bytes only frees. The storage gets a
        new record (same phase/op/label), the old one is closed.
        """
        key = st._cdata
        idx = self._live[key]
        rec = self._records[idx]
        nbytes = round_up(st.nbytes(), self.round_to)
        if nbytes == rec[_BYTES]:
            return
        self.n_resizes += 1
        self._seq += 1  # the new block (a 0-byte record when resized to 0: never in the stream)
        new = list(rec)
        new[_BYTES], new[_ALLOC], new[_FREE], new[_PATH], new[_FPATH] = nbytes, self._seq, None, self.phase_path, None
        new[_STREAM] = self._stream()  # resize_bytes_cuda allocates on the current stream
        self._live[key] = len(self._records)
        self._records.append(new)
        weakref.finalize(st, _free, weakref.ref(self), key, len(self._records) - 1)
        self._seq += 1
        rec[_FREE], rec[_FPATH] = self._seq, self.phase_path
        self.current += nbytes - rec[_BYTES]  # the alloc-then-free overlap is not a peak here
        if self.current > self.peak:
            self.peak, self.peak_seq, self.peak_transient = self.current, self._seq, None
        for p in self._phase_stack:
            if self.current > self.phase_peaks.get(p, -1):
                self.phase_peaks[p] = self.current
                self._phase_peak_seq[p] = self._seq

    def _on_free(self, key: int, idx: int) -> None:
        if self._live.get(key) != idx:
            return
        del self._live[key]
        rec = self._records[idx]
        self._seq += 1
        rec[_FREE] = self._seq
        rec[_FPATH] = self.phase_path
        self.current -= rec[_BYTES]


def _free(ref, key, idx):
    tr = ref()
    if tr is not None:
        tr._on_free(key, idx)


def _unignore(ref, key):
    tr = ref()
    if tr is not None:
        tr._ignored.discard(key)


def _is_wrapper_subclass(t: torch.Tensor) -> bool:
    """A traceable wrapper subclass (DTensor, ...: torch/utils/_python_dispatch.py::
    is_traceable_wrapper_subclass) holds no memory of its own: ``_make_wrapper_subclass`` gives it
    a data-less storage of the *global* size, while the local shard it wraps is an ordinary
    tensor, tracked when made."""
    return type(t) is not torch.Tensor and is_traceable_wrapper_subclass(t)


def _storage(t: torch.Tensor):
    """The storage that holds ``t``'s memory; for a tensor subclass that wraps one inner tensor
    (a DTensor of FSDP2 / DDP, torch/distributed/tensor/_api.py: ``_local_tensor``), the inner
    tensor's: the wrapper itself owns no memory."""
    if type(t) is not torch.Tensor and is_traceable_wrapper_subclass(t):
        inner = [x for x in (getattr(t, n) for n in t.__tensor_flatten__()[0]) if isinstance(x, torch.Tensor)]
        if len(inner) == 1:
            return _storage(inner[0])
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None  # sparse, nested or wrapper tensors without a plain storage


def _op_name(func) -> str:
    try:
        return func.overloadpacket.__name__
    except AttributeError:
        return str(func)
