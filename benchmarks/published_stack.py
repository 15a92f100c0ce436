"""Published training-stack cases (issue 11) next to loraplan's predictions.

    python benchmarks/published_stack.py [--data PATH] [--json]

For every case of benchmarks/data/published-stack.json (source, setup, what differs from
loraplan's protocol, and which settings were assumed where the source is silent) it builds the
specs through the Python API with the recipe fields (``loraplan.case.resolve_case``; a case may
start from an example recipe file, ``loraplan.recipes.load_recipe``) and prints the published
figure, the prediction and their ratio (predicted / published):

* ``peak_allocated_bytes``: the analytic peak allocated (torch.cuda.max_memory_allocated);
* ``max_seq``: the longest --seq whose device total fits a card of the published size, found the
  way ``loraplan plan`` finds it (``loraplan.plan.plan_job``, ``GpuPlan.max_seq_memory``).

A case whose setting loraplan cannot express yet says so in its row instead of a number.

Then the published *pairs* (issue 16): for the cases whose source also published NVML used or
reserved with the allocated peak (``MEMORY_PAIRS``: case id -> benchmarks/data/published-memory.json
record), it prints published allocated / NVML next to the predicted peak allocated, peak reserved
(the caching allocator's closed form) and device total, and the device total the pre-issue-16
priors gave (allocated x 1.10 + 0.75 GiB); the ratio NVML / allocated is compared too, which
removes the allocated peak's own error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data" / "published-stack.json"
GiB = float(1 << 30)
MEMORY = HERE / "data" / "published-memory.json"
#: published-stack case -> published-memory record with the same run's NVML (and allocated) figures
MEMORY_PAIRS = {
    "fms-acceleration-mistral-7b-bf16-lora-r16-bs4": "fms-accel-a100-none-Mistral-7B-v0.1-bs4-1gpu",
    "fms-acceleration-mistral-7b-bf16-lora-r16-bs8": "fms-accel-a100-none-Mistral-7B-v0.1-bs8-1gpu",
}
#: the device total before issue 16: reserved = allocated x (1 + 0.10), + a 0.75 GiB context prior
OLD_PRIORS = (0.10, 805306368)


def case_options(case: dict) -> dict:
    """The case's loraplan options: the example recipe's (when it names one), then its own on top
    (a None value drops the recipe's setting, so the option takes its default)."""
    opts: dict = {}
    if case.get("config"):
        from loraplan.recipes import load_recipe

        opts.update(load_recipe(ROOT / case["config"]).options)
    for k, v in case.get("case", {}).items():
        if v is None:
            opts.pop(k, None)
        else:
            opts[k] = v
    return opts


def gpu_for(case: dict):
    """The catalog GPU of the case, or one with the published memory size (like another catalog GPU)."""
    from loraplan.catalog import load_gpu

    g = case["gpu"]
    if "id" in g:
        return load_gpu(g["id"])
    like = load_gpu(g["like"])
    return replace(like, id=f"{g['memory_gib']}gib", name=f"{g['memory_gib']} GiB card like {like.name}",
                   memory_bytes=int(g["memory_gib"] * GiB))


def predict(case: dict) -> dict:
    """One row: published, predicted, ratio (or the reason there is no prediction)."""
    from loraplan.case import resolve_case
    from loraplan.catalog import load_calibration
    from loraplan.errors import LoraplanError

    pub = case["published"]
    row = {"id": case["id"], "metric": pub["metric"], "published": pub["value"], "predicted": None, "ratio": None,
           "note": ""}
    if not case.get("expressible", True):
        row["note"] = "not expressible yet: " + case.get("not_expressible", "")
        return row
    try:
        opts = case_options(case)
        gpu = gpu_for(case)
        opts.pop("gpu", None)
        model, lora, train = resolve_case(opts)
        cal = load_calibration(case["gpu"].get("id") or case["gpu"]["like"])
        if pub["metric"] == "peak_allocated_bytes":
            from loraplan.estimate.api import estimate

            row["predicted"] = int(estimate(model, lora, train, gpu, cal, with_time=False).memory.peak_allocated_bytes)
        elif pub["metric"] == "max_seq":
            from loraplan.plan import Job, plan_job

            plan = plan_job(model, lora, train, [gpu], Job(), calibrations={gpu.id: cal})
            row["predicted"] = int(plan.gpus[0].max_seq_memory or 0)
        else:
            row["note"] = f"unknown metric {pub['metric']}"
            return row
    except LoraplanError as e:
        row["note"] = f"loraplan refused it: {e}"
        return row
    row["ratio"] = row["predicted"] / pub["value"] if pub["value"] else None
    return row


def memory_pairs(cases: list[dict]) -> list[dict]:
    """Rows of published (allocated, NVML) next to predicted (allocated, reserved, device total)."""
    from loraplan.case import resolve_case
    from loraplan.catalog import load_calibration
    from loraplan.estimate.api import estimate

    records = {r["id"]: r for r in json.loads(MEMORY.read_text())}
    rows = []
    for case in cases:
        rid = MEMORY_PAIRS.get(case["id"])
        if rid is None:
            continue
        v = records[rid]["values"]
        opts = case_options(case)
        opts.pop("gpu", None)
        model, lora, train = resolve_case(opts)
        gpu = gpu_for(case)
        m = estimate(model, lora, train, gpu, load_calibration(gpu.id), with_time=False).memory
        old = int(m.peak_allocated_bytes * (1 + OLD_PRIORS[0])) + OLD_PRIORS[1] + sum(
            b for k, b in m.outside_allocator_bytes.items() if k != "cuda_context_and_libraries")
        rows.append({"id": case["id"], "record": rid, "published_allocated": v.get("max_allocated_bytes"),
                     "published_nvml": v.get("nvml_used_bytes"), "published_reserved": v.get("reserved_bytes"),
                     "allocated": m.peak_allocated_bytes, "reserved": m.peak_reserved_bytes,
                     "device_total": m.device_total_bytes, "device_total_old_priors": old})
    return rows


def print_memory_pairs(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\npublished allocated/NVML pairs ({MEMORY.name}); GiB, ratio = predicted / published")
    print(f"{'case':46s} {'alloc pub':>9s} {'pred':>7s} {'NVML pub':>9s} {'reserved':>8s} {'device':>7s} "
          f"{'ratio':>6s} {'old':>7s} {'ratio':>6s} {'NVML/alloc pub':>14s} {'pred':>6s} {'old':>6s}")
    for r in rows:
        pa, pn = r["published_allocated"], r["published_nvml"]
        print(f"{r['id']:46s} {pa / GiB:9.2f} {r['allocated'] / GiB:7.2f} {pn / GiB:9.2f} {r['reserved'] / GiB:8.2f} "
              f"{r['device_total'] / GiB:7.2f} {r['device_total'] / pn:6.3f} {r['device_total_old_priors'] / GiB:7.2f} "
              f"{r['device_total_old_priors'] / pn:6.3f} {pn / pa:14.3f} {r['device_total'] / r['allocated']:6.3f} "
              f"{r['device_total_old_priors'] / r['allocated']:6.3f}")


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    return f"{v / GiB:.2f} GiB" if metric == "peak_allocated_bytes" else f"{v:,} tok"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA), help="published cases (JSON)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    cases = json.loads(Path(args.data).read_text())["cases"]
    rows = [predict(c) for c in cases]
    pairs = memory_pairs(cases)
    if args.json:
        print(json.dumps({"cases": rows, "memory_pairs": pairs}, indent=1))
        return 0
    print(f"{'case':50s} {'published':>13s} {'loraplan':>13s} {'ratio':>6s}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"{r['id']:50s} {_fmt(r['metric'], r['published']):>13s} {_fmt(r['metric'], r['predicted']):>13s} "
              f"{ratio:>6s}" + (f"  {r['note']}" if r["note"] else ""))
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    if ratios:
        print(f"\n{len(ratios)} of {len(rows)} cases predicted; ratio predicted/published from {min(ratios):.2f} "
              f"to {max(ratios):.2f}. Settings each source leaves unstated are listed under 'assumed' in {DATA.name}.")
    print_memory_pairs(pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
