"""Does the caching allocator's release-and-retry let a step fit below its unconstrained peak reserved?

    python benchmarks/min_capacity.py [--cases ID,ID]

When cudaMalloc fails, torch's allocator frees its cached blocks and retries
(c10/cuda/CUDACachingAllocator.cpp ``malloc``: ``release_available_cached_blocks``, then
``release_cached_blocks``) before raising OutOfMemoryError. So a step may run on a card smaller than
its unconstrained peak reserved, which the fit verdict compares with the card. For every H100
reference case this traces the step on meta (``trace_step``), replays its allocation stream through
``loraplan.allocator`` without a capacity (the peak reserved the estimate reports) and
binary-searches (16 MiB) the smallest capacity at which the replay runs without OOM. Prints peak
allocated A, unconstrained reserved R and the minimum capacity M, with (M - A)/A and (R - A)/A: where
M is close to R, the verdict's use of R loses nothing to the retry path. A full-size 7B trace takes
~20 s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from trace_vs_reference import DATA, case_specs  # noqa: E402

GiB = float(1 << 30)
STEP = 16 << 20


def min_capacity(events, lo: int, hi: int) -> int:
    """Smallest capacity (to STEP) in [lo, hi] at which the default-config replay does not OOM."""
    from loraplan.trace.run import replay_allocations

    while hi - lo > STEP:
        mid = (lo + hi) // 2
        if replay_allocations(events, mid)["default"]["oom"]:
            lo = mid
        else:
            hi = mid
    return hi


def main(argv=None) -> int:
    from loraplan.trace.run import replay_allocations, trace_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="", help="comma list of reference case ids (default: all)")
    args = ap.parse_args(argv)
    want = {c for c in args.cases.split(",") if c}
    data = json.loads(DATA.read_text())
    print(f"{'case':40s} {'A GiB':>7s} {'R GiB':>7s} {'M GiB':>7s} {'(M-A)/A':>8s} {'(R-A)/A':>8s} {'R-M MiB':>8s}")
    gaps = []
    for case in data["cases"]:
        if want and case["id"] not in want:
            continue
        lora, train = case_specs(case)
        t = trace_step(data["models"][case["model"]], lora, train, "9.0", return_events=True)
        free = replay_allocations(t["_events"], None)["default"]
        a, r = free["peak_allocated_bytes"], free["peak_reserved_bytes"]
        m = min_capacity(t["_events"], a, r)
        gaps.append((r - m) / a)
        print(f"{case['id']:40s} {a / GiB:7.3f} {r / GiB:7.3f} {m / GiB:7.3f} {100 * (m - a) / a:7.1f}% "
              f"{100 * (r - a) / a:7.1f}% {(r - m) / 2**20:8.0f}", flush=True)
    if gaps:
        print(f"release-and-retry saves at most {100 * max(gaps):.1f}% of peak allocated (mean {100 * sum(gaps) / len(gaps):.1f}%) "
              f"over {len(gaps)} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
