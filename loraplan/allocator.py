"""A replay model of PyTorch's CUDA caching allocator (``DeviceCachingAllocator``).

Feed it an ordered stream of allocations and frees; it answers what
``torch.cuda.memory_allocated`` / ``memory_reserved`` / ``max_memory_allocated`` /
``max_memory_reserved`` would report, and whether (and at which event) the real allocator would
raise ``torch.OutOfMemoryError`` on a card whose allocator can hold ``capacity_bytes``.

Scope: **one device, any number of streams, no CUDA graphs / private pools, no
``record_stream``** (so no deferred frees and no cross-stream events: a block freed with
recorded stream uses goes back to its pool at once here, after the event there), no IPC,
``cudaMallocAsync`` backend not modelled. Pure Python, no torch import (the analytic estimator uses it).

Source read: pytorch/pytorch ``c10/cuda/CUDACachingAllocator.cpp`` at commit
001074d25084fdb87a799823e395a50f5ec044d3 (the ``DeviceCachingAllocator`` class), checked
against the torch 2.13 headers (``c10/core/AllocatorConfig.h``, ``c10/cuda/CUDAAllocatorConfig.h``:
constants and option defaults) and the 2.13-era ``c10/core/AllocatorConfig.cpp`` (option parsing,
``max_non_split_rounding_mb``). Every rule below names the function it copies:

- sizes: ``round_size`` -- below ``kMinBlockSize`` (512) -> 512, else a multiple of 512, or with
  ``roundup_power2_divisions`` the next of N equal steps between powers of two
  (``roundup_power2_next_division``; only when ``divisions > 1`` and ``size > 512 * divisions``).
- pools: ``get_pool`` -- rounded size <= ``kSmallSize`` (1 MiB) -> small pool, else large.
- segment size: ``get_allocation_size`` -- small -> ``kSmallBuffer`` (2 MiB); < ``kMinLargeAlloc``
  (10 MiB) -> ``kLargeBuffer`` (20 MiB); else rounded up to ``kRoundLarge`` (2 MiB).
- reuse: ``get_free_block`` -- best fit: the smallest cached block >= size, ties by lowest
  address (``BlockComparatorSize``: size, then ptr); a block >= ``max_split_size`` is never handed
  to a request < ``max_split_size``; a request >= ``max_split_size`` takes an oversize block only if
  block < request + ``max_non_split_rounding_size`` (default ``kLargeBuffer``, 20 MiB). Note that
  on a refusal it gives up, it does not try the next block.
- splitting: ``should_split`` -- small pool (or expandable segments): remainder >= 512; large
  pool: request < ``max_split_size`` and remainder > ``kSmallSize`` (strictly); ``alloc_found_block``
  puts the remainder back in the pool. Unsplit, the whole block counts as allocated.
- merging: ``free_block`` / ``try_merge_blocks`` -- a freed block absorbs free neighbours of the
  same segment (and the same mapped state).
- new memory and OOM: ``malloc`` -- no cached fit -> (``garbage_collect_cached_blocks`` if a memory
  fraction is set and ``garbage_collection_threshold`` > 0) -> ``alloc_block`` (cudaMalloc of the
  segment size) -> on failure ``release_available_cached_blocks`` (only when ``max_split_size`` is
  set: frees oversize cached blocks, the smallest one >= max(size, max_split) or else the largest
  ones down to max_split until enough) and retry -> ``release_cached_blocks`` (frees every
  unsplit cached segment of both pools, unmaps free pages of expandable segments) and retry
  (counted in ``num_alloc_retries``) -> ``OutOfMemory``.
- ``expandable_segments:True``: ``alloc_block`` -> ``try_allocate_expandable_block`` /
  ``find_expandable_block`` / ``map_block``: one virtual segment per pool (address space
  1 1/8 of device memory), grown by mapping pages of ``kSmallBuffer`` (2 MiB, small pool) or
  ``kLargeBuffer`` (20 MiB, large pool) for the *rounded request* (not the segment size), at the
  lowest address where free + unmapped space fits; free pages stay mapped (reserved) until
  ``release_cached_blocks`` (OOM retry or ``empty_cache``) -> ``release_blocks`` / ``unmap_block``
  unmaps the pages that lie wholly inside free blocks. ``get_free_block`` prefers, among fitting
  blocks, the one with the smallest size-it-could-expand-to.
- streams: every block belongs to the stream whose allocation created its segment
  (``Block::stream``; ``alloc_block`` stamps ``p.stream()``, a split remainder keeps it). The
  pools order blocks by stream first (``BlockComparatorSize``: stream, size, ptr;
  ``BlockComparatorAddress``: stream, ptr), ``get_free_block`` searches from the key
  (stream, size) and gives up when the block found is another stream's (``(*it)->stream !=
  p.stream()``), ``release_available_cached_blocks`` walks only the request's stream, and an
  expandable segment serves one stream (``ExpandableSegment::stream_``; ``find_expandable_block``
  skips the others'). A freed block returns to its own stream's pool (``free_block`` inserts it
  into ``block->pool`` ordered under ``block->stream``), whichever stream frees it, so memory
  cached by a side stream (FSDP's all-gather / reduce-scatter streams) is never handed to the
  default stream's allocations, and vice versa; only ``release_cached_blocks`` (OOM retry,
  ``empty_cache``) frees every stream's unsplit segments.
- statistics: ``increase_stat`` / ``decrease_stat`` -- allocated_bytes counts block sizes
  (rounded, incl. an unsplit remainder), reserved_bytes counts cudaMalloc'd segments plus mapped
  pages; peaks are the running maxima (``memory_allocated`` etc. read these).

Assumptions not in the source (stated, not fitted): cudaMalloc hands out increasing addresses
(only breaks ties between equal-size free blocks); a cudaMalloc/cuMemCreate succeeds iff reserved
+ the new bytes <= ``capacity_bytes`` (the real driver also needs a contiguous physical range and
has its own context memory: pass the capacity the allocator can really get); the memory fraction
applies to ``capacity_bytes``.

Example::

    a = CachingAllocator(capacity_bytes=80 * 2**30, config=AllocatorConfig.parse("expandable_segments:True"))
    h = a.malloc(3 * 2**20); a.free(h); a.reserved, a.peak_allocated
    replay([("alloc", "x", 100), ("free", "x")]).peak_reserved   # 2 MiB
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from loraplan.errors import InputError

__all__ = [
    "AllocatorConfig", "CachingAllocator", "OutOfMemory", "ReplayResult", "SegmentInfo", "replay",
    "round_size", "get_allocation_size", "roundup_power2_next_division",
    "K_MIN_BLOCK_SIZE", "K_SMALL_SIZE", "K_SMALL_BUFFER", "K_LARGE_BUFFER", "K_MIN_LARGE_ALLOC",
    "K_ROUND_LARGE",
]

MiB = 1 << 20
# c10/core/AllocatorConfig.h (torch 2.13) == c10/cuda/CUDACachingAllocator.cpp constants
K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1048576  # kSmallSize: largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2097152  # kSmallBuffer: "small" allocations are packed in 2 MiB blocks
K_LARGE_BUFFER = 20971520  # kLargeBuffer: "large" allocations may be packed in 20 MiB blocks
K_MIN_LARGE_ALLOC = 10485760  # kMinLargeAlloc: allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE = 2097152  # kRoundLarge: round up large allocations to 2 MiB
# AllocatorConfig.cpp roundup_power2_divisions(size): intervals from 1 MiB to 64 GiB
_ROUNDUP_START_LOG2 = 20  # kRoundUpPowerOfTwoStart = 1 MiB
_ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals (64 GiB = 2**36)
SIZE_MAX = (1 << 64) - 1  # max_split_size_ default: std::numeric_limits<size_t>::max()
_DEFAULT_ADDRESS_SPACE = 1 << 47  # expandable segment VA when no capacity is given


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class AllocatorConfig:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` options that change memory use (AllocatorConfig.h defaults).

    ``roundup_power2_divisions`` is one int for every size or a 16-tuple, one per power-of-two
    interval from 1 MiB (index 0 also covers everything below) to 64 GiB, as the list form
    ``[256:4,>:8]`` of the env var; 0 or 1 means plain 512-byte rounding.
    ``per_process_memory_fraction`` mirrors ``torch.cuda.set_per_process_memory_fraction``
    (``setMemoryFraction``; ``set_fraction``), of ``capacity_bytes``; garbage collection only runs
    when it is set (``malloc``: ``set_fraction && garbage_collection_threshold() > 0``).
    """

    max_split_size_bytes: int | None = None
    max_non_split_rounding_bytes: int = K_LARGE_BUFFER
    expandable_segments: bool = False
    garbage_collection_threshold: float | None = None
    roundup_power2_divisions: int | tuple[int, ...] | None = None
    per_process_memory_fraction: float | None = None

    def __post_init__(self):
        d = self.roundup_power2_divisions
        if d is not None:
            t = (int(d),) * _ROUNDUP_INTERVALS if isinstance(d, int) else tuple(int(x) for x in d)
            if len(t) != _ROUNDUP_INTERVALS:
                raise InputError(f"roundup_power2_divisions has {len(t)} entries; give one int or "
                                 f"{_ROUNDUP_INTERVALS} (one per power of two from 1 MiB to 64 GiB)")
            for x in t:
                if x != 0 and x & (x - 1):
                    raise InputError(f"roundup_power2_divisions value {x} is not a power of 2; "
                                     "use 0 (off), 1, 2, 4, 8, ...")
            object.__setattr__(self, "roundup_power2_divisions", t)
        if self.max_split_size_bytes is not None and self.max_split_size_bytes < K_LARGE_BUFFER:
            raise InputError(f"max_split_size {self.max_split_size_bytes} bytes is below 20 MiB; "
                             "torch requires max_split_size_mb >= 20")
        g = self.garbage_collection_threshold
        if g is not None and not 0.0 < g < 1.0:
            raise InputError(f"garbage_collection_threshold {g} is out of range; set it in (0.0, 1.0)")
        f = self.per_process_memory_fraction
        if f is not None and not 0.0 < f <= 1.0:
            raise InputError(f"per_process_memory_fraction {f} is out of range; set it in (0.0, 1.0]")

    @property
    def max_split_size(self) -> int:
        return SIZE_MAX if self.max_split_size_bytes is None else self.max_split_size_bytes

    def divisions_for(self, size: int) -> int:
        """``AcceleratorAllocatorConfig::roundup_power2_divisions(size)``."""
        t = self.roundup_power2_divisions
        if t is None:
            return 0
        log_size = size.bit_length() - 1
        index = log_size - _ROUNDUP_START_LOG2 if log_size > _ROUNDUP_START_LOG2 else 0
        return t[min(index, _ROUNDUP_INTERVALS - 1)]

    @classmethod
    def parse(cls, text: str) -> "AllocatorConfig":
        """Parse a ``PYTORCH_CUDA_ALLOC_CONF`` string, e.g. ``"expandable_segments:True,max_split_size_mb:128"``.

        Follows ``ConfigTokenizer`` / ``AcceleratorAllocatorConfig::parseArgs`` (whitespace ignored,
        ``True``/``False`` spelled so, ``max_split_size_mb`` and ``max_non_split_rounding_mb`` >= 20).
        Keys that do not change device memory (pinned_*, release_lock_on_cudamalloc, ...) are
        accepted and ignored; anything else raises ``InputError``.
        """
        toks = _tokenize(text or "")
        kw: dict = {}
        i, n = 0, len(toks)

        def value(j: int, key: str) -> str:
            if j + 1 >= n or toks[j] != ":" or toks[j + 1] in ",:[]":
                raise InputError(f"allocator option {key!r} has no value; write it as {key}:VALUE")
            return toks[j + 1]

        while i < n:
            key = toks[i]
            if key in ",:[]":
                raise InputError(f"allocator config {text!r} is malformed near {key!r}; "
                                 "write comma-separated key:value pairs")
            if key == "roundup_power2_divisions" and i + 2 < n and toks[i + 1] == ":" and toks[i + 2] == "[":
                kw[key], i = _parse_divisions_list(toks, i + 3, text)
            else:
                v = value(i + 1, key)
                i += 3
                kw.update(_parse_option(key, v))
            if i < n:
                if toks[i] != ",":
                    raise InputError(f"allocator config {text!r}: expected ',' after {key!r}, "
                                     f"got {toks[i]!r}; separate options with commas")
                i += 1
        return cls(**kw)


_IGNORED_KEYS = {
    "pinned_use_background_threads", "pinned_use_cuda_host_register", "pinned_use_hip_host_register",
    "pinned_num_register_threads", "pinned_reserve_segment_size_mb", "pinned_free_catch_all",
    "pinned_max_round_threshold", "pinned_max_cached_size", "release_lock_on_cudamalloc",
    "release_lock_on_hipmalloc", "graph_capture_record_stream_reuse", "throw_on_cudamalloc_oom",
}


def _tokenize(text: str) -> list[str]:
    out, buf = [], ""
    for ch in text:
        if ch in ",:[]":
            if buf:
                out.append(buf)
                buf = ""
            out.append(ch)
        elif not ch.isspace():
            buf += ch
    if buf:
        out.append(buf)
    return out


def _to_int(key: str, v: str) -> int:
    try:
        x = int(v)
    except ValueError:
        raise InputError(f"allocator option {key}:{v} is not a whole number; e.g. {key}:128") from None
    if x < 0:
        raise InputError(f"allocator option {key}:{v} is negative; give a whole number >= 0")
    return x


def _to_float(key: str, v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise InputError(f"allocator option {key}:{v} is not a number; e.g. {key}:0.6") from None


def _parse_option(key: str, v: str) -> dict:
    if key == "max_split_size_mb":
        mb = _to_int(key, v)
        if mb < K_LARGE_BUFFER // MiB:
            raise InputError(f"max_split_size_mb:{v} is too small; torch requires >= {K_LARGE_BUFFER // MiB}")
        return {"max_split_size_bytes": min(mb, SIZE_MAX // MiB) * MiB}
    if key == "max_non_split_rounding_mb":
        mb = _to_int(key, v)
        if mb < K_LARGE_BUFFER // MiB:
            raise InputError(f"max_non_split_rounding_mb:{v} is too small; torch requires >= {K_LARGE_BUFFER // MiB}")
        return {"max_non_split_rounding_bytes": min(mb, SIZE_MAX // MiB) * MiB}
    if key == "garbage_collection_threshold":
        g = _to_float(key, v)
        if not 0.0 < g < 1.0:
            raise InputError(f"garbage_collection_threshold:{v} is out of range; set it in (0.0, 1.0)")
        return {"garbage_collection_threshold": g}
    if key == "expandable_segments":
        if v not in ("True", "False"):
            raise InputError(f"expandable_segments:{v} is not a boolean; write expandable_segments:True or :False")
        return {"expandable_segments": v == "True"}
    if key == "roundup_power2_divisions":
        d = _to_int(key, v)
        if d == 0 or d & (d - 1):
            raise InputError(f"roundup_power2_divisions:{v} is not a power of 2; use 1, 2, 4, 8, ...")
        return {"roundup_power2_divisions": d}
    if key == "per_process_memory_fraction":
        f = _to_float(key, v)
        if not 0.0 < f <= 1.0:
            raise InputError(f"per_process_memory_fraction:{v} is out of range; set it in (0.0, 1.0]")
        return {"per_process_memory_fraction": f}
    if key == "backend":
        if v != "native":
            raise InputError(f"backend:{v} is not modelled (only the native caching allocator is); "
                             "drop it or use backend:native")
        return {}
    if key in _IGNORED_KEYS:
        return {}
    known = ("max_split_size_mb, max_non_split_rounding_mb, garbage_collection_threshold, "
             "roundup_power2_divisions, expandable_segments, per_process_memory_fraction")
    raise InputError(f"unknown or unmodelled allocator option {key!r}; known: {known}")


def _parse_divisions_list(toks: list[str], i: int, text: str) -> tuple[tuple[int, ...], int]:
    """``parseRoundUpPower2Divisions`` list form ``[64:8,256:4,>:1]`` (boundaries in MiB)."""
    divs = [0] * _ROUNDUP_INTERVALS
    first, last_index, n = True, 0, len(toks)
    while i < n and toks[i] != "]":
        if i + 2 >= n or toks[i + 1] != ":":
            raise InputError(f"roundup_power2_divisions list in {text!r} is malformed; "
                             "write e.g. roundup_power2_divisions:[256:4,>:8]")
        bound, val = toks[i], _to_int("roundup_power2_divisions", toks[i + 2])
        if val != 0 and val & (val - 1):
            raise InputError(f"roundup_power2_divisions value {val} is not a power of 2; use 0, 1, 2, 4, ...")
        if bound == ">":
            for k in range(last_index + 1, _ROUNDUP_INTERVALS):
                divs[k] = val
        else:
            b = _to_int("roundup_power2_divisions", bound)
            if b == 0 or b & (b - 1):
                raise InputError(f"roundup_power2_divisions interval {bound} is not a power of 2 (MiB); "
                                 "use e.g. 64, 128, 256")
            index = min(max(b.bit_length() - 1, 0), _ROUNDUP_INTERVALS - 1)
            if first:
                for k in range(index):
                    divs[k] = val
                first = False
            divs[index] = val
            last_index = index
        i += 3
        if i < n and toks[i] == ",":
            i += 1
    if i >= n:
        raise InputError(f"roundup_power2_divisions list in {text!r} has no closing ']'; close it with ]")
    return tuple(divs), i + 1


# ---------------------------------------------------------------------------------------- sizes
def roundup_power2_next_division(size: int, divisions: int) -> int:
    """``DeviceCachingAllocator::roundup_power2_next_division``: e.g. 1200, 4 -> 1280."""
    if size & (size - 1) == 0:
        return size
    power2_floor = 1 << (size.bit_length() - 1)
    step = power2_floor >> (divisions.bit_length() - 1)
    if step == 0:
        return power2_floor << 1
    floor = size & ~(step - 1)
    return size if floor == size else floor + step


def round_size(size: int, config: AllocatorConfig | None = None) -> int:
    """``DeviceCachingAllocator::round_size``: the block size a request of ``size`` bytes gets."""
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = config.divisions_for(size) if config is not None else 0
    if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        return roundup_power2_next_division(size, divisions)
    return K_MIN_BLOCK_SIZE * ((size + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def get_allocation_size(size: int) -> int:
    """``DeviceCachingAllocator::get_allocation_size``: the cudaMalloc size for a rounded request."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


# ---------------------------------------------------------------------------------------- blocks
class _Block:
    """``struct Block`` (one device); ``stream`` is the segment's stream (``Block::stream``)."""

    __slots__ = ("size", "ptr", "small", "allocated", "mapped", "prev", "next", "seg",
                 "gc_base", "requested", "stream")

    def __init__(self, size: int, ptr: int, small: bool, seg: "_ExpSegment | None" = None,
                 mapped: bool = True, stream: int = 0):
        self.stream = stream  # Block::stream: the stream whose allocation created the segment
        self.size = size
        self.ptr = ptr
        self.small = small
        self.allocated = False
        self.mapped = mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.seg = seg
        self.gc_base = 0
        self.requested = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def splice(self, before: "_Block | None", after: "_Block | None") -> None:
        if before is not None:
            before.next = self
        self.prev = before
        if after is not None:
            after.prev = self
        self.next = after


class _ExpSegment:
    """``struct ExpandableSegment``: a VA range mapped page by page (handles_)."""

    __slots__ = ("base", "page", "n_pages", "mapped", "stream")

    def __init__(self, base: int, page: int, n_pages: int, stream: int = 0):
        self.base, self.page, self.n_pages, self.stream = base, page, n_pages, stream
        self.mapped: set[int] = set()

    @property
    def size(self) -> int:
        return self.page * self.n_pages


class _Pool:
    """``struct BlockPool``: free mapped blocks ordered by (size, ptr) and unmapped ones by ptr."""

    __slots__ = ("is_small", "keys", "by_ptr", "unmapped_keys", "unmapped", "gc_calls")

    def __init__(self, is_small: bool):
        self.is_small = is_small
        self.keys: list[tuple[int, int, int]] = []  # BlockComparatorSize order: (stream, size, ptr)
        self.by_ptr: dict[int, _Block] = {}
        self.unmapped_keys: list[tuple[int, int]] = []  # BlockComparatorAddress order: (stream, ptr)
        self.unmapped: dict[int, _Block] = {}
        self.gc_calls = 0  # get_free_blocks_call_count

    def insert(self, b: _Block) -> None:  # insert_into_blocks
        b.gc_base = self.gc_calls
        insort(self.keys, (b.stream, b.size, b.ptr))
        self.by_ptr[b.ptr] = b

    def erase(self, b: _Block) -> None:
        key = (b.stream, b.size, b.ptr)
        i = bisect_left(self.keys, key)
        assert self.keys[i] == key, "block not in pool"
        del self.keys[i]
        del self.by_ptr[b.ptr]

    def add_unmapped(self, b: _Block) -> None:
        insort(self.unmapped_keys, (b.stream, b.ptr))
        self.unmapped[b.ptr] = b

    def remove_unmapped(self, b: _Block) -> None:
        i = bisect_left(self.unmapped_keys, (b.stream, b.ptr))
        assert self.unmapped_keys[i] == (b.stream, b.ptr)
        del self.unmapped_keys[i]
        del self.unmapped[b.ptr]


# ---------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SegmentInfo:
    """One segment as ``torch.cuda.memory_snapshot()`` shows it: for expandable segments, one
    entry per contiguous mapped range. ``blocks`` are (size, allocated) in address order."""

    address: int
    total_size: int
    allocated_size: int
    is_large: bool
    is_expandable: bool
    blocks: tuple[tuple[int, bool], ...]
    stream: int = 0


class OutOfMemory(Exception):
    """The allocator would raise ``torch.OutOfMemoryError`` here; carries the state at failure."""

    def __init__(self, requested: int, alloc_size: int, allocated: int, reserved: int,
                 capacity: int | None):
        self.requested, self.alloc_size = requested, alloc_size
        self.allocated, self.reserved, self.capacity = allocated, reserved, capacity
        super().__init__(
            f"CUDA out of memory. Tried to allocate {_fmt(alloc_size)} (request {_fmt(requested)}). "
            f"Allocator capacity {_fmt(capacity or 0)}; {_fmt(allocated)} is allocated by PyTorch, "
            f"and {_fmt(reserved - allocated)} is reserved by PyTorch but unallocated.")


def _fmt(n: int) -> str:
    if n <= 1024:
        return f"{n} bytes"
    if n <= MiB:
        return f"{n / 1024:.2f} KiB"
    if n <= 1 << 30:
        return f"{n / MiB:.2f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


# ---------------------------------------------------------------------------------------- allocator
class CachingAllocator:
    """``DeviceCachingAllocator`` for one device and one stream; see the module docstring.

    ``capacity_bytes``: how much device memory cudaMalloc / cuMemCreate can hand to the allocator
    in total (None = unlimited). ``malloc`` returns an int handle, ``free`` takes it back.
    """

    def __init__(self, capacity_bytes: int | None = None, config: AllocatorConfig = AllocatorConfig()):
        if capacity_bytes is not None and capacity_bytes < 0:
            raise InputError(f"allocator capacity {capacity_bytes} bytes is negative; give bytes >= 0 or None")
        if config.per_process_memory_fraction is not None and capacity_bytes is None:
            raise InputError("per_process_memory_fraction needs a capacity; pass capacity_bytes")
        self.capacity = capacity_bytes
        self.config = config
        self._max_split = config.max_split_size
        self._set_fraction = config.per_process_memory_fraction is not None
        self._allowed_max = (int(config.per_process_memory_fraction * capacity_bytes)
                             if self._set_fraction else 0)
        self._gc = bool(self._set_fraction and config.garbage_collection_threshold)
        self._small = _Pool(True)
        self._large = _Pool(False)
        self._active: dict[int, _Block | None] = {}
        self._next_handle = 1
        self._next_addr = 1 << 32
        self._exp_segments: list[_ExpSegment] = []
        self.allocated = 0  # stats.allocated_bytes[AGGREGATE].current == memory_allocated()
        self.reserved = 0  # stats.reserved_bytes[AGGREGATE].current == memory_reserved()
        self.peak_allocated = 0  # max_memory_allocated()
        self.peak_reserved = 0  # max_memory_reserved()
        # per stream (not a torch statistic): bytes of blocks allocated from / segments owned by it
        self.allocated_by_stream: dict[int, int] = {}
        self.peak_allocated_by_stream: dict[int, int] = {}
        self.reserved_by_stream: dict[int, int] = {}
        self.peak_reserved_by_stream: dict[int, int] = {}
        self.requested = 0  # stats.requested_bytes (unrounded)
        self.segments = 0  # stats.segment (cudaMalloc'd, non-expandable)
        self.num_alloc_retries = 0
        self.num_ooms = 0
        self.num_device_alloc = 0
        self.num_device_free = 0

    # ------------------------------------------------------------------ public API
    def malloc(self, nbytes: int, stream: int = 0) -> int:
        """``DeviceCachingAllocator::malloc`` on ``stream`` (0: the default stream; any int names
        another); raises ``OutOfMemory`` like the real one would."""
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        if nbytes == 0:  # CUDACachingAllocator::allocate: size 0 -> nullptr, no block
            return self._new_handle(None)
        cfg = self.config
        size = round_size(nbytes, cfg if cfg.roundup_power2_divisions is not None else None)
        pool = self._small if size <= K_SMALL_SIZE else self._large
        alloc_size = get_allocation_size(size)
        block = self._get_free_block(pool, size, stream)
        if block is None:
            if self._gc:
                self._garbage_collect_cached_blocks()
            block = self._alloc_block(pool, size, alloc_size, False, stream)
            if block is None and self._release_available_cached_blocks(pool, size, stream):
                block = self._alloc_block(pool, size, alloc_size, False, stream)
            if block is None:
                self._release_cached_blocks()
                block = self._alloc_block(pool, size, alloc_size, True, stream)
            if block is None:
                self.num_ooms += 1
                raise OutOfMemory(nbytes, alloc_size, self.allocated, self.reserved, self.capacity)
        block = self._alloc_found_block(pool, block, size, nbytes, self._should_split(block, size))
        return self._new_handle(block)

    def _new_handle(self, block: "_Block | None") -> int:
        h = self._next_handle
        self._next_handle += 1
        self._active[h] = block
        return h

    def free(self, handle: int) -> None:
        """``DeviceCachingAllocator::free`` (no stream uses, so straight to ``free_block``)."""
        block = self._active.pop(handle)  # KeyError on a double free, like "invalid device pointer"
        if block is None:
            return
        block.allocated = False
        self.allocated -= block.size
        self.allocated_by_stream[block.stream] -= block.size
        self.requested -= block.requested
        self._free_block(block)

    def empty_cache(self) -> None:
        """``emptyCache`` -> ``release_cached_blocks``."""
        self._release_cached_blocks()

    def reset_peak_stats(self) -> None:
        """``resetPeakStats``: peaks become the current values."""
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved
        self.peak_allocated_by_stream = dict(self.allocated_by_stream)
        self.peak_reserved_by_stream = dict(self.reserved_by_stream)

    def free_block_sizes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Sizes of the cached free (mapped) blocks: (small pool, large pool), each ascending --
        what ``get_free_block`` can hand out without new device memory."""
        return tuple(sorted(k[1] for k in self._small.keys)), tuple(sorted(k[1] for k in self._large.keys))

    def block_size(self, handle: int) -> int:
        """Bytes the live allocation ``handle`` holds (its block, 0 for a zero-byte request)."""
        b = self._active[handle]
        return 0 if b is None else b.size

    @property
    def inactive_split_bytes(self) -> int:
        """Free bytes in segments that cannot be returned to CUDA (split, non-expandable)."""
        return sum(b.size for p in (self._small, self._large) for b in p.by_ptr.values()
                   if b.seg is None and b.is_split())

    def largest_free_block(self) -> int:
        """``cacheInfo``-style: the largest cached free block (0 when none)."""
        return max((k[1] for p in (self._small, self._large) for k in p.keys), default=0)

    def snapshot(self) -> list[SegmentInfo]:
        """Segments and their blocks in address order (``DeviceCachingAllocator::snapshot``)."""
        blocks = [b for b in self._active.values() if b is not None]
        for p in (self._small, self._large):
            blocks.extend(p.by_ptr.values())
        out = []
        for head in blocks:
            if head.prev is not None and head.prev.mapped:
                continue
            items, b, alloc = [], head, 0
            while b is not None and b.mapped:
                items.append((b.size, b.allocated))
                alloc += b.size if b.allocated else 0
                b = b.next
            out.append(SegmentInfo(head.ptr, sum(s for s, _ in items), alloc, not head.small,
                                   head.seg is not None, tuple(items), head.stream))
        out.sort(key=lambda s: s.address)
        return out

    # ------------------------------------------------------------------ internals
    def _new_address(self, nbytes: int) -> int:
        p = self._next_addr
        self._next_addr += -(-nbytes // K_SMALL_BUFFER) * K_SMALL_BUFFER + K_SMALL_BUFFER
        return p

    def _pool_of(self, b: _Block) -> _Pool:
        return self._small if b.small else self._large

    def _add_reserved(self, n: int, stream: int = 0) -> None:
        self.reserved += n
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        r = self.reserved_by_stream[stream] = self.reserved_by_stream.get(stream, 0) + n
        if r > self.peak_reserved_by_stream.get(stream, 0):
            self.peak_reserved_by_stream[stream] = r

    def _sub_reserved(self, n: int, stream: int) -> None:
        self.reserved -= n
        self.reserved_by_stream[stream] -= n

    def _should_split(self, block: _Block, size: int) -> bool:
        """``should_split``."""
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self._max_split and remaining > K_SMALL_SIZE

    def _get_free_block(self, pool: _Pool, size: int, stream: int = 0) -> _Block | None:
        """``get_free_block``: best fit among ``stream``'s cached blocks, with the max_split_size rules."""
        if self._gc:
            pool.gc_calls += 1
        keys = pool.keys
        i = bisect_left(keys, (stream, size, -1))
        if i == len(keys) or keys[i][0] != stream:  # get_free_block: (*it)->stream != p.stream()
            return None
        b = pool.by_ptr[keys[i][2]]
        if b.seg is not None:
            # prefer the block whose size-it-can-expand-to is smallest
            def expandable_size(x: _Block) -> int:
                return x.size + (x.next.size if x.next is not None and not x.next.mapped else 0)
            j = i + 1
            while b.seg is not None and j < len(keys) and keys[j][0] == stream:
                nb = pool.by_ptr[keys[j][2]]
                if expandable_size(nb) < expandable_size(b):
                    b, i = nb, j
                    j += 1
                else:
                    break
        ms = self._max_split
        if size < ms and b.size >= ms:  # do not return an oversized block for a small request
            return None
        if size >= ms and b.size >= size + self.config.max_non_split_rounding_bytes:
            return None
        del keys[i]
        del pool.by_ptr[b.ptr]
        return b

    def _alloc_found_block(self, pool: _Pool, block: _Block, size: int, orig: int, split: bool) -> _Block:
        """``alloc_found_block``: split off the remainder when ``should_split`` says so."""
        if split:
            remaining = block
            block = _Block(size, remaining.ptr, remaining.small, remaining.seg, stream=remaining.stream)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.ptr += size
            remaining.size -= size
            pool.insert(remaining)
        block.allocated = True
        block.requested = orig
        self.requested += orig
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        a = self.allocated_by_stream[block.stream] = self.allocated_by_stream.get(block.stream, 0) + block.size
        if a > self.peak_allocated_by_stream.get(block.stream, 0):
            self.peak_allocated_by_stream[block.stream] = a
        return block

    def _free_block(self, block: _Block) -> None:
        """``free_block``: merge with free neighbours, return to the pool."""
        pool = self._pool_of(block)
        self._try_merge_blocks(block, block.prev, pool)
        self._try_merge_blocks(block, block.next, pool)
        pool.insert(block)

    def _try_merge_blocks(self, dst: _Block, src: _Block | None, pool: _Pool) -> int:
        """``try_merge_blocks``: dst absorbs src (dst is in no pool set while this runs)."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if src.mapped:
            pool.erase(src)
        else:
            pool.remove_unmapped(src)
        if dst.prev is src:
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int, is_retry: bool,
                     stream: int = 0) -> _Block | None:
        """``alloc_block``: cudaMalloc a new segment (or map expandable pages)."""
        if is_retry:
            self.num_alloc_retries += 1
        if self._set_fraction and self.reserved + alloc_size > self._allowed_max:
            return None
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(pool, size, stream)
        if self.capacity is not None and self.reserved + alloc_size > self.capacity:
            return None  # cudaErrorMemoryAllocation
        b = _Block(alloc_size, self._new_address(alloc_size), pool.is_small, stream=stream)
        self._add_reserved(alloc_size, stream)
        self.segments += 1
        self.num_device_alloc += 1
        return b

    def _release_available_cached_blocks(self, pool: _Pool, size: int, stream: int = 0) -> bool:
        """``release_available_cached_blocks``: free oversize cached blocks, only enough for size.

        Expandable blocks are skipped (newer sources send them down the multi-block path, and
        ``release_block`` cannot cudaFree them)."""
        ms = self._max_split
        if ms == SIZE_MAX:
            return False
        key = max(size, ms)
        keys = pool.keys
        i = bisect_left(keys, (stream, key, -1))
        if i == len(keys) or keys[i][0] != stream or pool.by_ptr[keys[i][2]].seg is not None:
            if i == 0:
                return False
            total = 0
            i -= 1
            while total < key:
                b = pool.by_ptr[keys[i][2]]
                if b.size < ms or b.seg is not None or b.stream != stream:
                    break
                total += b.size
                self._release_block(b)
                if i == 0:
                    break
                i -= 1
            if total < key:
                return False
        else:
            self._release_block(pool.by_ptr[keys[i][2]])
        return True

    def _release_cached_blocks(self) -> None:
        """``release_cached_blocks``: large pool, then small pool."""
        self._release_blocks(self._large)
        self._release_blocks(self._small)

    def _release_blocks(self, pool: _Pool) -> None:
        """``release_blocks``: cudaFree unsplit blocks, unmap free pages of expandable ones."""
        to_unmap = []
        for *_, ptr in list(pool.keys):
            b = pool.by_ptr[ptr]
            if b.seg is not None:
                to_unmap.append(b)
            elif b.prev is None and b.next is None:
                self._release_block(b)
        for b in to_unmap:
            self._unmap_block(b, pool)
            if b.prev is None and b.next is None:
                self._release_expandable_segment(b, pool)

    def _release_block(self, b: _Block) -> None:
        """``release_block``: cudaFree one whole segment."""
        assert b.seg is None and not b.is_split(), "only whole cudaMalloc segments can be freed"
        self._pool_of(b).erase(b)
        self._sub_reserved(b.size, b.stream)
        self.segments -= 1
        self.num_device_free += 1

    def _garbage_collect_cached_blocks(self) -> None:
        """``garbage_collect_cached_blocks``: free old unsplit large blocks above the threshold."""
        gc_threshold = int(self.config.garbage_collection_threshold * self._allowed_max)
        if self.reserved <= gc_threshold:
            return
        target = self.reserved - gc_threshold
        pool = self._large
        total_age, count = 0, 0
        for *_, ptr in pool.keys:
            b = pool.by_ptr[ptr]
            if not b.is_split():
                total_age += pool.gc_calls - b.gc_base
                count += 1
        if count == 0:
            return
        reclaimed, freed = 0, True
        while reclaimed < target and freed and count > 0:
            age_threshold = total_age / count
            freed = False
            for *_, ptr in list(pool.keys):
                b = pool.by_ptr[ptr]
                age = pool.gc_calls - b.gc_base
                if not b.is_split() and age >= age_threshold:
                    freed = True
                    reclaimed += b.size
                    total_age -= age
                    count -= 1
                    self._release_block(b)

    # ------------------------------------------------------------------ expandable segments
    def _find_expandable_block(self, pool: _Pool, size: int, stream: int = 0) -> _Block:
        """``find_expandable_block``: lowest address of ``stream``'s segments where free + unmapped
        space fits ``size`` (``unmapped`` is ordered by stream first; a new segment per stream)."""
        for st, ptr in pool.unmapped_keys:
            if st != stream:
                continue
            c = pool.unmapped[ptr]
            if c.prev is not None and not c.prev.allocated:
                c = c.prev
            b, nbytes = c, 0
            while nbytes < size and b is not None and not b.allocated:
                nbytes += b.size
                b = b.next
            if nbytes >= size:
                return c
        page = K_SMALL_BUFFER if pool.is_small else K_LARGE_BUFFER
        total = self.capacity if self.capacity is not None else _DEFAULT_ADDRESS_SPACE
        n_pages = max(1, -(-(total + total // 8) // page))
        seg = _ExpSegment(self._new_address(n_pages * page), page, n_pages, stream)
        self._exp_segments.append(seg)
        cand = _Block(seg.size, seg.base, pool.is_small, seg, mapped=False, stream=stream)
        pool.add_unmapped(cand)
        return cand

    def _map_block(self, to_map: _Block, size: int, pool: _Pool) -> bool:
        """``map_block``: back [ptr, ptr+size) with whole pages (cuMemCreate + cuMemMap)."""
        seg = to_map.seg
        page = seg.page
        off = to_map.ptr - seg.base
        begin, end = off // page, -(-(off + size) // page)
        n = end - begin
        if n == 0:
            return False
        mapped = n * page
        if self.capacity is not None and self.reserved + mapped > self.capacity:
            return False  # cuMemCreate fails; the pages mapped so far are released again
        for k in range(begin, end):
            assert k not in seg.mapped
            seg.mapped.add(k)
        pool.remove_unmapped(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            rest = _Block(to_map.size - mapped, to_map.ptr + mapped, to_map.small, seg, mapped=False,
                          stream=to_map.stream)
            rest.splice(to_map, to_map.next)
            pool.add_unmapped(rest)
            to_map.size = mapped
        self._try_merge_blocks(to_map, to_map.prev, pool)
        self._try_merge_blocks(to_map, to_map.next, pool)
        pool.insert(to_map)
        self._add_reserved(mapped, seg.stream)
        self.num_device_alloc += 1
        return True

    def _try_allocate_expandable_block(self, pool: _Pool, size: int, stream: int = 0) -> _Block | None:
        """``try_allocate_expandable_block``."""
        cand = self._find_expandable_block(pool, size, stream)
        if not cand.mapped and not self._map_block(cand, min(cand.size, size), pool):
            return None
        while cand.size < size:
            nxt = cand.next
            if not self._map_block(nxt, min(size - cand.size, nxt.size), pool):
                return None
            cand = nxt
        pool.erase(cand)
        return cand

    def _unmap_block(self, b: _Block, pool: _Pool) -> None:
        """``unmap_block``: unmap the pages lying wholly inside the free block ``b``."""
        seg = b.seg
        page = seg.page
        off = b.ptr - seg.base
        begin, end = -(-off // page), (off + b.size) // page
        if begin >= end:
            return
        pool.erase(b)
        start = seg.base + begin * page
        unmapped = (end - begin) * page
        before = start - b.ptr
        if before > 0:
            bf = _Block(before, b.ptr, b.small, seg, stream=b.stream)
            bf.splice(b.prev, b)
            pool.insert(bf)
        after = b.size - (before + unmapped)
        if after > 0:
            af = _Block(after, start + unmapped, b.small, seg, stream=b.stream)
            af.splice(b, b.next)
            pool.insert(af)
        b.ptr, b.size, b.mapped = start, unmapped, False
        self._try_merge_blocks(b, b.prev, pool)
        self._try_merge_blocks(b, b.next, pool)
        pool.add_unmapped(b)
        for k in range(begin, end):
            seg.mapped.discard(k)
        self._sub_reserved(unmapped, b.stream)
        self.num_device_free += 1

    def _release_expandable_segment(self, b: _Block, pool: _Pool) -> None:
        """``release_expandable_segment``: the whole VA range is unmapped; drop it."""
        assert b.size == b.seg.size and not b.mapped
        pool.remove_unmapped(b)
        self._exp_segments.remove(b.seg)


# ---------------------------------------------------------------------------------------- replay
@dataclass(frozen=True)
class ReplayResult:
    """What a replay saw. Bytes throughout; ``oom_at`` is the index of the event that raised
    (the replay stops there), None when it ran to the end."""

    peak_allocated: int
    peak_reserved: int
    final_allocated: int
    final_reserved: int
    allocated_at_peak_reserved: int  # memory_allocated() when reserved reached its peak
    segments: int  # cudaMalloc'd segments (+ live expandable segments) at the end
    max_segments: int
    num_alloc_retries: int
    n_events: int
    oom_at: int | None = None
    oom_error: str | None = None
    live_at_end: int = 0  # allocations never freed
    #: per stream id (0 = default): the largest bytes of its live blocks / of its segments
    peak_allocated_by_stream: dict = field(default_factory=dict)
    peak_reserved_by_stream: dict = field(default_factory=dict)

    @property
    def fragmentation_at_peak(self) -> float:
        """Share of the peak reservation not allocated at that moment: 1 - allocated/reserved."""
        if self.peak_reserved <= 0:
            return 0.0
        return 1.0 - self.allocated_at_peak_reserved / self.peak_reserved

    @property
    def reserved_over_allocated(self) -> float:
        """peak_reserved / peak_allocated (the factor loraplan used to assume as 1.10)."""
        return self.peak_reserved / self.peak_allocated if self.peak_allocated else 0.0


Event = Sequence  # ("alloc", key, nbytes) | ("free", key) | ("empty_cache",)


def replay(events: Iterable[Event], capacity_bytes: int | None = None,
           config: AllocatorConfig | str = AllocatorConfig(),
           allocator: CachingAllocator | None = None,
           streams: Mapping | None = None) -> ReplayResult:
    """Replay ordered events through a fresh ``CachingAllocator`` (or ``allocator``).

    Events are tuples: ``("alloc", key, nbytes)`` allocates under any hashable ``key``,
    ``("free", key)`` frees it (extra items ignored), ``("empty_cache",)`` calls
    ``torch.cuda.empty_cache()``. ``config`` may be a ``PYTORCH_CUDA_ALLOC_CONF`` string.
    ``streams``: allocation key -> stream id (int) for the allocations made on a side stream;
    keys not in it are on the default stream 0 (see "streams" in the module docstring).
    On ``OutOfMemory`` the replay stops and reports the event index in ``oom_at``.
    """
    if isinstance(config, str):
        config = AllocatorConfig.parse(config)
    a = allocator if allocator is not None else CachingAllocator(capacity_bytes, config)
    handles: dict = {}
    malloc, free = a.malloc, a.free
    stream_of = (streams or {}).get
    best_res, alloc_at_best = a.peak_reserved, a.allocated
    max_segs = a.segments + len(a._exp_segments)
    oom_at = oom_err = None
    n = 0
    for idx, ev in enumerate(events):
        n = idx + 1
        op = ev[0]
        if op == "alloc":
            key = ev[1]
            if key in handles:
                raise InputError(f"event {idx}: key {key!r} allocated twice without a free; "
                                 "free it first or use a fresh key")
            try:
                handles[key] = malloc(ev[2], stream_of(key, 0))
            except OutOfMemory as e:
                oom_at, oom_err = idx, str(e)
                break
            if a.reserved > best_res:
                best_res, alloc_at_best = a.reserved, a.allocated
            segs = a.segments + len(a._exp_segments)
            if segs > max_segs:
                max_segs = segs
        elif op == "free":
            h = handles.pop(ev[1], None)
            if h is None:
                raise InputError(f"event {idx}: free of {ev[1]!r}, which is not allocated; "
                                 "check the event order")
            free(h)
        elif op == "empty_cache":
            a.empty_cache()
        else:
            raise InputError(f"event {idx}: unknown operation {op!r}; use 'alloc', 'free' or 'empty_cache'")
    return ReplayResult(
        peak_allocated=a.peak_allocated, peak_reserved=a.peak_reserved,
        final_allocated=a.allocated, final_reserved=a.reserved,
        allocated_at_peak_reserved=alloc_at_best if best_res == a.peak_reserved else a.allocated,
        segments=a.segments + len(a._exp_segments), max_segments=max_segs,
        num_alloc_retries=a.num_alloc_retries, n_events=n, oom_at=oom_at, oom_error=oom_err,
        live_at_end=len(handles), peak_allocated_by_stream=dict(a.peak_allocated_by_stream),
        peak_reserved_by_stream=dict(a.peak_reserved_by_stream))
