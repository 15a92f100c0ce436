"""Write loraplan/data/host-speeds.json: the host speed each published source's runs imply.

    python benchmarks/host_speeds.py [--check]

For every source of benchmarks/data/published-speed.json with a row marked ``pins_host_speed``
(its most host-bound row), the host speed at which loraplan's prediction with the shipped
calibration equals the published time (``published_speed.pinned_host_speed``): that source's CPU
and stack relative to the H100 reference host (1.0). ``estimate`` quotes their range when it
does not know the user's host (no --host-speed, no calibration file) and the step depends on it.
``--check`` recomputes and exits 1 when the file is stale (the shipped host costs or the
published cases changed since it was written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import published_speed as ps  # noqa: E402

from loraplan.estimate.host_costs import HOST_SPEEDS_PATH  # noqa: E402

#: relative tolerance of --check (the bisection converges far below it)
TOLERANCE = 0.01


def compute(data: dict | None = None) -> list[dict]:
    """One entry per pinning row: source, GPU, the row, its host speed (3 decimals) and the source's URL."""
    data = data or ps.load()
    out = []
    for c in data["cases"]:
        if not c.get("pins_host_speed"):
            continue
        src = data["sources"].get(c["source"], {})
        out.append({"source": c["source"], "gpu": c["gpu"], "pinned_by": c["id"], "hf_stack": bool(c["hf_stack"]),
                    "host_speed": round(ps.pinned_host_speed(c, data), 3), "url": src.get("url", "")})
    return out


def document(hosts: list[dict]) -> dict:
    return {
        "about": ("Host speeds (the CPU and stack's per-call host costs relative to the H100 reference host, "
                  "whose costs catalog/calibrations/default.json holds: 1.0) implied by published LoRA step "
                  "times: for each source, the speed at which loraplan's prediction of its most host-bound row "
                  "equals the published time. Read by loraplan/estimate/host_costs.py: estimate quotes their "
                  "range as the step time's host uncertainty when the user's host is unknown."),
        "written_by": "benchmarks/host_speeds.py (benchmarks/published_speed.py pinned_host_speed over "
                      "benchmarks/data/published-speed.json)",
        "date": dt.date.today().isoformat(),
        "reference_host_speed": 1.0,
        "hosts": hosts,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the shipped file differs from a recomputation")
    a = ap.parse_args(argv)
    hosts = compute()
    for h in hosts:
        print(f"{h['source']:28s} {h['gpu']:14s} pinned by {h['pinned_by']:32s} host speed {h['host_speed']:.3f}")
    if a.check:
        old = {h["pinned_by"]: h["host_speed"] for h in json.loads(HOST_SPEEDS_PATH.read_text())["hosts"]}
        new = {h["pinned_by"]: h["host_speed"] for h in hosts}
        stale = set(old) != set(new) or any(abs(new[k] / old[k] - 1) > TOLERANCE for k in new)
        print("stale: rerun benchmarks/host_speeds.py" if stale else "up to date")
        return 1 if stale else 0
    HOST_SPEEDS_PATH.write_text(json.dumps(document(hosts), indent=1) + "\n")
    print(f"wrote {HOST_SPEEDS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
