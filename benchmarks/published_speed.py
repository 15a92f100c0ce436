"""Published step times (issue 12) next to loraplan's predictions.

    python benchmarks/published_speed.py [--data PATH] [--only ID[,ID...]] [--host-speed X]

For every case of benchmarks/data/published-speed.json (source URL, quote, stack, what differs
from loraplan's protocol) it builds the specs through the Python API (``loraplan.case.resolve_case``;
a model named under "models" is a config written out for ``hf.spec_from_config``), predicts the
step time with the shipped calibration (``estimate.time.estimate_step_time``) and prints the
published seconds per micro-step, the prediction and their ratio (predicted / published), then the
geometric mean of the ratios per source (stack) and GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "published-speed.json"


def load(path: Path = DATA) -> dict:
    return json.loads(Path(path).read_text())


#: host costs: ``shipped`` (the GPU's calibration: default.json's H100 fit) or ``priors`` (the measured /
#: sourced priors of data/host-costs.json, host speed 1.0 = the CPU they were measured on)
HOST_COSTS = "shipped"


def predict(case: dict, data: dict, host_speed: float = 1.0) -> dict:
    """Predicted seconds per micro-step of one published case (the optimizer step amortized over
    the gradient-accumulation steps as the source measured it: loraplan's step time / accumulation).
    ``HOST_COSTS`` says which host costs (``--host-costs``)."""
    from loraplan.case import resolve_case
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.time import coefficients, resolve_attention, step_time, step_work

    opts = dict(case["case"])
    if opts["model"] in data.get("models", {}):
        opts["model"] = str(_config_file(opts["model"], data["models"][opts["model"]]["config"]))
    m, lora, train = resolve_case(opts)
    gpu = load_gpu(case["gpu"])
    coef = dict(coefficients(load_calibration(gpu.id)), time_host_speed=host_speed)
    if HOST_COSTS == "priors":
        from loraplan.estimate.host_costs import host_priors

        coef.update(host_priors())
    # the attention kernel for this GPU, as estimate() resolves it (memory and time price one kernel)
    work = step_work(m, lora, train, resolve_attention(m, train, gpu.compute_capability))
    t = step_time(work, gpu, coef)
    k = work.micro_steps
    return {"predicted_s": t.step_s / k, "bound": t.bound, "host_s": t.components["host_s"] / k,
            "gpu_s": t.components["gpu_s"] / k}


def _config_file(name: str, config: dict) -> Path:
    """``config`` written as <tmp>/loraplan-published-speed/<name>/config.json (loaded like any path)."""
    import tempfile

    d = Path(tempfile.gettempdir()) / "loraplan-published-speed" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d / "config.json"


def pinned_host_speed(case: dict, data: dict) -> float:
    """The host speed at which ``case``'s prediction equals its published time (bisection on a log
    scale; the step time falls monotonically with host speed): the source's host and stack
    relative to the H100 reference host."""
    lo, hi = 0.05, 50.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if predict(case, data, mid)["predicted_s"] > case["published_s"]:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def rows(data: dict, only: set[str] | None = None, host_speed: float = 1.0) -> list[dict]:
    """One row per case: the prediction at ``host_speed`` (``ratio``) and at its source's pinned
    host speed (``ratio_pinned``; None where the source pins none)."""
    speeds = {c["source"]: pinned_host_speed(c, data) for c in data["cases"] if c.get("pins_host_speed")}
    out = []
    for c in data["cases"]:
        if only and c["id"] not in only:
            continue
        p = predict(c, data, host_speed)
        row = {**c, **p, "ratio": p["predicted_s"] / c["published_s"], "host_speed": speeds.get(c["source"]),
               "ratio_pinned": None}
        if row["host_speed"] is not None:
            row["ratio_pinned"] = predict(c, data, row["host_speed"])["predicted_s"] / c["published_s"]
        out.append(row)
    return out


def geomeans(rs: list[dict], key: str = "ratio") -> dict[tuple[str, str], tuple[float, int]]:
    """Geometric mean of ``key`` per (source, GPU); rows that pin the host speed are left out of
    the pinned means (their ratio is 1 by construction)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rs:
        if r.get(key) is None or (key == "ratio_pinned" and r.get("pins_host_speed")):
            continue
        groups.setdefault((r["source"], r["gpu"]), []).append(r[key])
    return {k: (math.exp(sum(math.log(v) for v in vs) / len(vs)), len(vs)) for k, vs in groups.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--only", default=None, help="comma-separated case ids")
    ap.add_argument("--host-speed", type=float, default=1.0)
    ap.add_argument("--host-costs", choices=("shipped", "priors"), default="shipped",
                    help="the calibration's host costs, or data/host-costs.json's measured priors")
    a = ap.parse_args(argv)
    global HOST_COSTS
    HOST_COSTS = a.host_costs
    data = load(Path(a.data))
    rs = rows(data, set(a.only.split(",")) if a.only else None, a.host_speed)
    print(f"{'case':32s} {'gpu':14s} {'HF':3s} {'published':>9s} {'predicted':>9s} {'ratio':>6s}  "
          f"{'host s':>6s} {'gpu s':>6s} {'bound':8s} {'pinned':>7s}")
    for r in rs:
        pinned = ("(pins)" if r.get("pins_host_speed") else
                  f"{r['ratio_pinned']:.2f}" if r["ratio_pinned"] is not None else "-")
        print(f"{r['id']:32s} {r['gpu']:14s} {'yes' if r['hf_stack'] else 'no':3s} {r['published_s']:9.4f} "
              f"{r['predicted_s']:9.4f} {r['ratio']:6.2f}  {r['host_s']:6.3f} {r['gpu_s']:6.3f} {r['bound']:8s} {pinned:>7s}")
    print()
    speeds = {r["source"]: r["host_speed"] for r in rs if r["host_speed"] is not None}
    for src, v in speeds.items():
        ref = "the H100 reference host" if HOST_COSTS == "shipped" else "the priors' host (data/host-costs.json)"
        print(f"host speed pinned by {src}'s most host-bound row: {v:.2f} x {ref}")
    for (src, gpu), (g, n) in sorted(geomeans(rs).items()):
        print(f"geometric mean predicted/published  {src:24s} {gpu:14s} host speed {a.host_speed:.2f}: {g:5.2f}  (n={n})")
    for (src, gpu), (g, n) in sorted(geomeans(rs, "ratio_pinned").items()):
        print(f"geometric mean predicted/published  {src:24s} {gpu:14s} pinned host speed: {g:5.2f}  (n={n}, "
              f"the pinning row left out)")
    hf = [r for r in rs if r["hf_stack"] and not r.get("pins_host_speed")]
    if hf:
        inside = sum(abs(r["ratio"] - 1) <= 0.25 for r in hf)
        pinned = [r for r in hf if r["ratio_pinned"] is not None]
        inside_p = sum(abs(r["ratio_pinned"] - 1) <= 0.25 for r in pinned)
        print(f"HF-stack rows within +/-25%: {inside} of {len(hf)} at host speed {a.host_speed:.2f}; "
              f"{inside_p} of {len(pinned)} with the source's pinned host speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
