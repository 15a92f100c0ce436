"""The CUDA caching allocator model: each rule on a small hand-made stream whose outcome is worked
out from c10/cuda/CUDACachingAllocator.cpp, config parsing, invariants (Hypothesis), replay speed,
and the tracker's event stream."""

from __future__ import annotations

import random
import time

import pytest

try:  # the property test needs Hypothesis; everything else runs without it
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

from loraplan.allocator import (
    K_LARGE_BUFFER, K_SMALL_BUFFER, AllocatorConfig, CachingAllocator, OutOfMemory,
    get_allocation_size, replay, round_size, roundup_power2_next_division,
)
from loraplan.errors import InputError

KiB, MiB = 1 << 10, 1 << 20


def blocks(a: CachingAllocator) -> list[list[tuple[int, bool]]]:
    return [list(s.blocks) for s in a.snapshot()]


# ----------------------------------------------------------------------------- sizes
def test_round_size_and_power2_divisions():
    assert round_size(1) == round_size(100) == round_size(512) == 512  # kMinBlockSize
    assert round_size(513) == 1024
    assert roundup_power2_next_division(1200, 4) == 1280  # the source comment's example
    assert roundup_power2_next_division(4096, 4) == 4096  # powers of two stay
    cfg = AllocatorConfig(roundup_power2_divisions=4)
    assert round_size(1200, cfg) == 1536  # only used when size > 512 * divisions
    assert round_size(5000, cfg) == 5120  # 4096 + 1024
    assert round_size(int(1.2 * MiB), cfg) == 1280 * KiB  # 1 MiB + 256 KiB
    cfg = AllocatorConfig.parse("roundup_power2_divisions:[256:4,>:8]")
    assert cfg.divisions_for(3 * MiB) == 4 and cfg.divisions_for(300 * MiB) == 4
    assert cfg.divisions_for(1 << 30) == 8
    assert round_size(300 * MiB + 1, cfg) == 320 * MiB  # 256 MiB + one 64 MiB step


def test_get_allocation_size():
    assert get_allocation_size(512) == get_allocation_size(MiB) == K_SMALL_BUFFER
    assert get_allocation_size(MiB + 512) == get_allocation_size(10 * MiB - 512) == K_LARGE_BUFFER
    assert get_allocation_size(10 * MiB) == 10 * MiB
    assert get_allocation_size(11 * MiB + 512) == 12 * MiB


# ----------------------------------------------------------------------------- pools, split, merge
def test_tiny_request_gets_512_bytes_in_a_2mib_small_segment():
    a = CachingAllocator()
    a.malloc(100)
    assert (a.allocated, a.reserved, a.segments) == (512, 2 * MiB, 1)
    assert blocks(a) == [[(512, True), (2 * MiB - 512, False)]]


def test_600kib_requests_share_small_segments():
    a = CachingAllocator()
    for _ in range(3):
        a.malloc(600 * KiB)
    # 3 x 614400 = 1843200 fit in 2 MiB (each split leaves >= 512 bytes)
    assert (a.reserved, a.segments) == (2 * MiB, 1)
    a.malloc(600 * KiB)  # 253952 left is too small: a second segment
    assert (a.reserved, a.segments, a.allocated) == (4 * MiB, 2, 4 * 600 * KiB)


def test_1_5mib_takes_a_20mib_segment_whose_remainder_serves_5mib():
    a = CachingAllocator()
    a.malloc(3 * MiB // 2)
    assert a.reserved == K_LARGE_BUFFER  # 1 MiB < size < 10 MiB -> kLargeBuffer
    a.malloc(5 * MiB)
    assert (a.reserved, a.segments, a.allocated) == (20 * MiB, 1, 13 * MiB // 2)
    assert blocks(a) == [[(3 * MiB // 2, True), (5 * MiB, True), (27 * MiB // 2, False)]]


def test_12mib_gets_its_own_segment_rounded_to_2mib():
    a = CachingAllocator()
    a.malloc(12 * MiB)
    assert a.reserved == 12 * MiB
    h = a.malloc(11 * MiB + 1)  # 11 MiB + 512 -> a 12 MiB segment (kRoundLarge) ...
    assert (a.reserved, a.segments) == (24 * MiB, 2)
    # ... and the 1 MiB - 512 remainder is not > kSmallSize: unsplit, all 12 MiB count as allocated
    assert a.block_size(h) == 12 * MiB and a.allocated == 24 * MiB


def test_free_merges_neighbours_back_into_one_block():
    a = CachingAllocator()
    x, y, z = a.malloc(512), a.malloc(512), a.malloc(512)
    a.free(y)  # both neighbours allocated: stays alone
    assert blocks(a) == [[(512, True), (512, False), (512, True), (2 * MiB - 1536, False)]]
    a.free(x)  # merges with y
    assert blocks(a) == [[(1024, False), (512, True), (2 * MiB - 1536, False)]]
    a.free(z)  # merges both sides: one unsplit block
    assert blocks(a) == [[(2 * MiB, False)]]
    assert a.allocated == 0 and a.reserved == 2 * MiB
    a.empty_cache()
    assert a.reserved == 0 and a.segments == 0 and a.snapshot() == []


def test_large_pool_splits_only_when_remainder_exceeds_1mib():
    a = CachingAllocator()
    a.free(a.malloc(12 * MiB))
    h = a.malloc(11 * MiB)  # remainder exactly 1 MiB: not > kSmallSize -> whole block
    assert a.allocated == 12 * MiB and a.block_size(h) == 12 * MiB
    a.free(h)
    h = a.malloc(10 * MiB)  # remainder 2 MiB -> split
    assert a.allocated == 10 * MiB and blocks(a) == [[(10 * MiB, True), (2 * MiB, False)]]
    assert a.reserved == 12 * MiB and a.inactive_split_bytes == 2 * MiB


def test_small_pool_splits_at_512_and_best_fit_picks_the_smallest_block():
    a = CachingAllocator()
    a.malloc(MiB)  # 2 MiB segment, 1 MiB free
    a.malloc(MiB - 1024)  # remainder 1024 >= 512 -> split
    assert blocks(a) == [[(MiB, True), (MiB - 1024, True), (1024, False)]]
    a.malloc(512)  # goes into the 1024 block, split again
    assert a.segments == 1
    assert blocks(a) == [[(MiB, True), (MiB - 1024, True), (512, True), (512, False)]]


def test_best_fit_smallest_block_then_lowest_address():
    a = CachingAllocator()
    h30, h14a, h14b = a.malloc(30 * MiB), a.malloc(14 * MiB), a.malloc(14 * MiB)
    for h in (h30, h14b, h14a):
        a.free(h)
    h = a.malloc(13 * MiB)  # smallest fit is 14 MiB; remainder 1 MiB -> no split
    assert a.block_size(h) == 14 * MiB and a.reserved == 58 * MiB
    seg = [s for s in a.snapshot() if s.allocated_size][0]
    assert seg.address == min(s.address for s in a.snapshot() if s.total_size == 14 * MiB)


# ----------------------------------------------------------------------------- max_split_size
def test_without_max_split_a_big_cached_block_is_split():
    a = CachingAllocator()
    a.free(a.malloc(100 * MiB))
    a.malloc(30 * MiB)
    assert a.reserved == 100 * MiB and a.allocated == 30 * MiB


def test_max_split_size_keeps_oversize_blocks_whole_and_the_20mib_slack_rule():
    cfg = AllocatorConfig.parse("max_split_size_mb:64")
    a = CachingAllocator(config=cfg)
    a.free(a.malloc(100 * MiB))
    h = a.malloc(30 * MiB)  # small request never gets an oversize block: new 30 MiB segment
    assert a.reserved == 130 * MiB and a.block_size(h) == 30 * MiB
    a.free(h)
    h = a.malloc(90 * MiB)  # >= max_split and 100 < 90 + 20: reused whole, not split
    assert a.block_size(h) == 100 * MiB and a.reserved == 130 * MiB
    a.free(h)
    h = a.malloc(70 * MiB)  # 100 >= 70 + 20: refused -> new segment
    assert a.block_size(h) == 70 * MiB and a.reserved == 200 * MiB
    b = CachingAllocator(config=AllocatorConfig.parse("max_split_size_mb:64,max_non_split_rounding_mb:40"))
    b.free(b.malloc(100 * MiB))
    assert b.block_size(b.malloc(70 * MiB)) == 100 * MiB  # 100 < 70 + 40


# ----------------------------------------------------------------------------- OOM path
def test_failed_cudamalloc_frees_the_cache_and_retries():
    a = CachingAllocator(capacity_bytes=100 * MiB)
    a.free(a.malloc(60 * MiB))
    a.malloc(80 * MiB)  # 60 + 80 > 100 -> release_cached_blocks -> retry succeeds
    assert (a.reserved, a.allocated, a.num_alloc_retries, a.num_ooms) == (80 * MiB, 80 * MiB, 1, 0)
    assert a.peak_reserved == 80 * MiB


def test_release_available_cached_blocks_frees_only_one_oversize_block():
    a = CachingAllocator(capacity_bytes=300 * MiB, config=AllocatorConfig(max_split_size_bytes=64 * MiB))
    hs = [a.malloc(n * MiB) for n in (100, 150, 30)]
    for h in hs:
        a.free(h)
    assert a.reserved == 280 * MiB
    a.malloc(70 * MiB)  # get_free_block refuses 100 (>= 70 + 20); 280 + 70 > 300;
    # the smallest oversize block >= 70 MiB (100) is freed, then cudaMalloc works
    assert a.reserved == 250 * MiB and a.num_alloc_retries == 0
    assert sorted(s.total_size for s in a.snapshot()) == [30 * MiB, 70 * MiB, 150 * MiB]


def test_release_available_cached_blocks_gives_up_then_everything_is_freed():
    a = CachingAllocator(capacity_bytes=200 * MiB, config=AllocatorConfig(max_split_size_bytes=64 * MiB))
    a.free(a.malloc(100 * MiB))
    a.malloc(120 * MiB)  # releasing 100 < 120 is "not enough" -> release_cached_blocks -> retry
    assert a.reserved == 120 * MiB and a.num_alloc_retries == 1


def test_real_oom_raises_with_state_and_replay_reports_the_event():
    a = CachingAllocator(capacity_bytes=100 * MiB)
    a.malloc(60 * MiB)
    with pytest.raises(OutOfMemory) as e:
        a.malloc(50 * MiB)
    assert (e.value.allocated, e.value.reserved, e.value.alloc_size) == (60 * MiB, 60 * MiB, 50 * MiB)
    assert "Tried to allocate 50.00 MiB" in str(e.value) and a.num_ooms == 1
    r = replay([("alloc", "w", 60 * MiB), ("alloc", "a", 10 * MiB), ("free", "a"),
                ("alloc", "b", 50 * MiB), ("alloc", "c", 1)], capacity_bytes=100 * MiB)
    assert r.oom_at == 3 and r.n_events == 4 and "out of memory" in r.oom_error
    assert r.peak_reserved == 70 * MiB and r.live_at_end == 1
    assert replay([("alloc", "w", 60 * MiB)], capacity_bytes=100 * MiB).oom_at is None


def test_garbage_collection_frees_the_oldest_cached_block_first():
    # gc runs only with a memory fraction set (set_fraction) and a threshold
    cfg = AllocatorConfig.parse("garbage_collection_threshold:0.5,per_process_memory_fraction:1.0")
    ev = [("alloc", "A", 30 * MiB), ("free", "A"), ("alloc", "B", 40 * MiB), ("free", "B"),
          ("alloc", "C", 44 * MiB)]
    # at C: 70 MiB cached > 50 MiB threshold; ages A=2, B=1, mean 1.5 -> A (30 MiB) goes
    assert replay(ev, 100 * MiB, cfg).final_reserved == 84 * MiB
    # without gc: 70 + 44 > 100 -> everything cached is freed and the malloc retried
    r = replay(ev, 100 * MiB)
    assert r.final_reserved == 44 * MiB and r.num_alloc_retries == 1


# ----------------------------------------------------------------------------- expandable segments
def test_expandable_maps_2mib_pages_small_and_20mib_pages_large():
    cfg = AllocatorConfig(expandable_segments=True)
    a = CachingAllocator(config=cfg)
    a.malloc(100)
    assert a.reserved == 2 * MiB
    a.malloc(25 * MiB)  # the rounded request, not get_allocation_size: 2 pages of 20 MiB
    assert a.reserved == 2 * MiB + 40 * MiB
    a.malloc(10 * MiB)  # fits in the 15 MiB left in the mapped pages
    assert a.reserved == 42 * MiB and a.allocated == 512 + 35 * MiB


def test_expandable_growing_sizes_reserve_close_to_allocated():
    ev = [e for i in range(20) for e in (("alloc", i, (12 + 2 * i) * MiB), ("free", i))]
    default = replay(ev)
    exp = replay(ev, config="expandable_segments:True")
    # default: every size is new, none fits a cached one -> 12 + 14 + ... + 50 MiB
    assert default.peak_reserved == 620 * MiB and default.max_segments == 20
    # expandable: the free block at the end of the mapped range grows page by page
    assert exp.peak_reserved == 60 * MiB and exp.peak_allocated == 50 * MiB
    assert exp.segments == 1


def test_expandable_empty_cache_unmaps_only_whole_free_pages():
    a = CachingAllocator(config=AllocatorConfig(expandable_segments=True))
    x = a.malloc(30 * MiB)  # pages 0-1 mapped: [x 30][free 10]
    y = a.malloc(30 * MiB)  # free 10 + one more page: [x 30][y 30]
    assert a.reserved == 60 * MiB
    a.free(x)
    a.empty_cache()  # [0, 30) free: page 0 unmaps, [20, 30) shares page 1 with y
    assert a.reserved == 40 * MiB and a.allocated == 30 * MiB
    a.free(y)
    a.empty_cache()
    assert a.reserved == 0 and a.segments == 0


def test_expandable_segments_avoid_an_oom_the_default_allocator_hits():
    # pin pattern: a big block is freed, a half-size tensor that outlives it reuses its start
    # (split), the next big one is bigger: default segments pile up with unusable halves
    ev, i = [], 0
    for i in range(8):
        s = (40 + 8 * i) * MiB
        ev += [("alloc", f"big{i}", s), ("free", f"big{i}"), ("alloc", f"half{i}", s // 2)]
    default = replay(ev)
    exp = replay(ev, config="expandable_segments:True")
    assert exp.peak_reserved < default.peak_reserved / 1.5
    cap = (exp.peak_reserved + default.peak_reserved) // 2
    assert replay(ev, cap).oom_at is not None
    assert replay(ev, cap, "expandable_segments:True").oom_at is None


# ----------------------------------------------------------------------------- config parsing
def test_parse_config():
    c = AllocatorConfig.parse(" expandable_segments:True, max_split_size_mb:128 ")
    assert c.expandable_segments and c.max_split_size_bytes == 128 * MiB
    assert AllocatorConfig.parse("") == AllocatorConfig()
    assert AllocatorConfig.parse("pinned_use_background_threads:True,backend:native") == AllocatorConfig()
    assert AllocatorConfig.parse("roundup_power2_divisions:4").divisions_for(5 * MiB) == 4


@pytest.mark.parametrize("text,needle", [
    ("expandable_segments:true", "expandable_segments:true"),
    ("max_split_size_mb:10", "max_split_size_mb:10"),
    ("max_split_size_mb:abc", "max_split_size_mb:abc"),
    ("garbage_collection_threshold:1.5", "garbage_collection_threshold:1.5"),
    ("roundup_power2_divisions:3", "roundup_power2_divisions:3"),
    ("backend:cudaMallocAsync", "backend:cudaMallocAsync"),
    ("max_split_mb:128", "max_split_mb"),
    ("expandable_segments", "expandable_segments"),
    ("expandable_segments:True max_split_size_mb:128", "expandable_segments"),
])
def test_parse_config_errors_name_the_key_and_the_fix(text, needle):
    with pytest.raises(InputError) as e:
        AllocatorConfig.parse(text)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and ";" in msg


def test_replay_rejects_bad_streams():
    with pytest.raises(InputError, match="not allocated"):
        replay([("free", "x")])
    with pytest.raises(InputError, match="twice"):
        replay([("alloc", "x", 1), ("alloc", "x", 1)])
    with pytest.raises(InputError, match="unknown operation"):
        replay([("malloc", "x", 1)])


# ----------------------------------------------------------------------------- invariants
if given is None:  # pragma: no cover
    def test_invariants():
        pytest.skip("hypothesis is not installed")
else:
    SIZES = st.one_of(st.integers(0, 4096), st.integers(4096, 2 * MiB), st.integers(MiB, 30 * MiB),
                      st.integers(30 * MiB, 300 * MiB))
    CONFIGS = [AllocatorConfig(), AllocatorConfig(expandable_segments=True),
               AllocatorConfig(max_split_size_bytes=64 * MiB), AllocatorConfig(roundup_power2_divisions=4)]


    @settings(max_examples=150, deadline=None)
    @given(ops=st.lists(st.tuples(st.booleans(), SIZES, st.integers(0, 10 ** 6)), max_size=80),
           cfg=st.sampled_from(CONFIGS), cap=st.sampled_from([None, 200 * MiB, 1 << 30]))
    def test_invariants(ops, cfg, cap):
        a = CachingAllocator(capacity_bytes=cap, config=cfg)
        live: list[int] = []
        last_pa = last_pr = 0
        for is_alloc, size, pick in ops:
            if is_alloc or not live:
                try:
                    live.append(a.malloc(size))
                except OutOfMemory as e:
                    assert cap is not None and e.reserved <= cap
            else:
                a.free(live.pop(pick % len(live)))
            assert a.reserved >= a.allocated >= 0
            assert cap is None or a.reserved <= cap
            assert a.allocated == sum(a.block_size(h) for h in live)
            assert a.reserved == sum(s.total_size for s in a.snapshot())
            assert a.peak_allocated >= max(a.allocated, last_pa)
            assert a.peak_reserved >= max(a.reserved, last_pr)
            last_pa, last_pr = a.peak_allocated, a.peak_reserved
        for h in live:
            a.free(h)
        assert a.allocated == 0
        a.empty_cache()
        assert a.reserved == 0 and a.segments == 0 and a.snapshot() == []
        assert (a.peak_allocated, a.peak_reserved) == (last_pa, last_pr)


# ----------------------------------------------------------------------------- speed
@pytest.mark.parametrize("cfg", ["", "expandable_segments:True"])
def test_replay_of_1e5_events_is_fast(cfg):
    rng = random.Random(0)
    ev, live, k = [], [], 0
    while len(ev) < 100_000:
        if live and (len(live) > 300 or rng.random() < 0.5):
            ev.append(("free", live.pop(rng.randrange(len(live)))))
        else:
            size = rng.choice([rng.randrange(1, MiB), rng.randrange(MiB, 64 * MiB)])
            ev.append(("alloc", k, size))
            live.append(k)
            k += 1
    t0 = time.perf_counter()
    r = replay(ev, config=cfg)
    dt = time.perf_counter() - t0
    assert r.n_events == 100_000 and r.peak_reserved >= r.peak_allocated
    assert dt < 3.0, f"replay of 1e5 events took {dt:.2f} s"


# ----------------------------------------------------------------------------- tracker stream
def test_tracker_allocation_events_in_order():
    torch = pytest.importorskip("torch")
    from loraplan.trace.tracker import LiveTensorTracker

    tr = LiveTensorTracker(device="cpu")
    with tr:
        a = torch.empty(100)  # record 0, 400 bytes
        b = torch.empty(1000)  # record 1, 4000 bytes
        del a
        c = torch.empty(10, dtype=torch.float64)  # record 2, 80 bytes
        d = torch.empty(0)  # zero bytes: skipped
        del b
    ev = tr.allocation_events()
    assert ev == [("alloc", 0, 400), ("alloc", 1, 4000), ("free", 0), ("alloc", 2, 80), ("free", 1)]
    assert tr.allocation_events(free_live_at_end=True)[-1] == ("free", 2)
    r = replay(ev)
    assert r.peak_allocated == 2 * 512 + 4096 - 512 and r.live_at_end == 1  # 512 + 4096, then 4096 + 512
    assert r.final_allocated == 512 and r.peak_reserved == 2 * MiB
    del c, d


# ----------------------------------------------------------------------------- streams
def test_a_block_freed_on_one_stream_is_not_reused_by_another():
    # get_free_block: the search key is (stream, size); a cached block of stream 1 is
    # (*it)->stream != p.stream() for stream 0, so stream 0 gets a new segment
    a = CachingAllocator()
    h = a.malloc(12 * MiB, stream=1)
    a.free(h)
    assert (a.allocated, a.reserved) == (0, 12 * MiB)
    a.malloc(12 * MiB, stream=0)
    assert (a.allocated, a.reserved, a.segments) == (12 * MiB, 24 * MiB, 2)
    assert a.peak_reserved_by_stream == {1: 12 * MiB, 0: 12 * MiB}
    a.malloc(12 * MiB, stream=1)  # the same stream reuses its own cached block
    assert a.reserved == 24 * MiB and a.peak_allocated_by_stream == {1: 12 * MiB, 0: 12 * MiB}


def test_the_remainder_of_a_split_side_stream_segment_stays_that_streams():
    # alloc_found_block: the remainder keeps the block's stream; a small pool request of
    # another stream opens its own 2 MiB segment
    a = CachingAllocator()
    a.malloc(100 * KiB, stream=7)
    a.malloc(100 * KiB, stream=0)
    assert a.reserved == 4 * MiB and [s.stream for s in a.snapshot()] == [7, 0]
    a.malloc(100 * KiB, stream=7)  # fits the stream-7 remainder
    assert a.reserved == 4 * MiB and blocks(a)[0][:2] == [(100 * KiB, True), (100 * KiB, True)]


def test_a_block_returns_to_its_own_streams_pool_whoever_frees_it():
    # free_block inserts into block->pool under block->stream: a free needs no stream
    a = CachingAllocator()
    hs = [a.malloc(30 * MiB, stream=2) for _ in range(2)]
    for h in hs:
        a.free(h)
    a.malloc(30 * MiB, stream=0)
    a.malloc(30 * MiB, stream=2)
    assert a.reserved == 90 * MiB
    assert replay([("alloc", "g", 30 * MiB), ("free", "g"), ("alloc", "x", 30 * MiB)],
                  streams={"g": 1}).peak_reserved == 60 * MiB
    assert replay([("alloc", "g", 30 * MiB), ("free", "g"), ("alloc", "x", 30 * MiB)],
                  streams={"g": 1, "x": 1}).peak_reserved == 30 * MiB


def test_oom_retry_frees_every_streams_cached_segments():
    # malloc: release_cached_blocks frees unsplit segments of all streams before the retry
    a = CachingAllocator(capacity_bytes=60 * MiB)
    a.free(a.malloc(40 * MiB, stream=1))
    a.malloc(40 * MiB, stream=0)
    assert (a.reserved, a.num_alloc_retries, a.reserved_by_stream) == (40 * MiB, 1, {1: 0, 0: 40 * MiB})


def test_release_available_cached_blocks_walks_only_the_requests_stream():
    # the key (stream 0, 40 MiB) lands on stream 1's 44 MiB block: not this stream's, so it
    # walks down stream 0's oversize blocks (24 + 24 >= 40) and leaves stream 1's alone
    cfg = AllocatorConfig(max_split_size_bytes=20 * MiB)
    a = CachingAllocator(capacity_bytes=130 * MiB, config=cfg)
    h1 = a.malloc(44 * MiB, stream=1)
    h0 = [a.malloc(24 * MiB, stream=0) for _ in range(2)]
    for h in [h1, *h0]:
        a.free(h)
    a.malloc(40 * MiB, stream=0)
    assert a.reserved_by_stream == {1: 44 * MiB, 0: 40 * MiB} and a.num_alloc_retries == 0


def test_expandable_segments_are_per_stream():
    a = CachingAllocator(capacity_bytes=1 << 30, config=AllocatorConfig(expandable_segments=True))
    a.free(a.malloc(30 * MiB, stream=1))
    a.malloc(30 * MiB, stream=0)  # stream 1's mapped free pages are not stream 0's
    assert a.reserved == 80 * MiB and {s.stream for s in a.snapshot()} == {0, 1}
