"""Sweep throughput and end-to-end CLI wall time, next to `accelerate estimate-memory`.

    python benchmarks/sweep_speed.py [--reference-cases 2000] [--no-accelerate]

1. configs/second of the vectorized sweep on a mixed grid of >= 200,000 cases (4 models x
   3 quantizations x 5 ranks x 7 sequence lengths x 8 batch sizes x 2 dropouts x 2 target
   sets x 2 optimizers x checkpointing on/off x 4 GPUs), in-process: the evaluation alone
   (``evaluate_table``), and end to end (``expand_cases`` + ``evaluate_table`` +
   ``write_columns`` to CSV); the first (cold: catalog loading, structure building) and the
   best of three warm runs. Then ``loraplan sweep ... --out grid.csv`` as a fresh process.
2. the per-case reference path (``evaluate_each``: one ``estimate()`` per case) on cases
   spread over the same grid, for comparison.
3. wall time of `loraplan estimate` as a fresh process (imports included), whether torch was
   imported (it must not be), and the slowest imports (``python -X importtime``).
4. `accelerate estimate-memory` on the same model: it needs the Hugging Face Hub for the config
   (offline it fails); we run it with HF_HUB_OFFLINE=1 and report what happens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = {
    "model": "llama-2-7b,qwen2.5-0.5b,open-llama-3b-v2,mistral-7b",
    "quant": "nf4,bf16,int8",
    "rank": "8:128:x2",
    "seq": "128:8192:x2",
    "batch": "1:8:+1",
    "dropout": "0,0.05",
    "targets": ("q_proj,v_proj", "all-linear"),
    "optimizer": "adamw,paged_adamw_8bit",
    "gradient_checkpointing": "true,false",
    "gpu": "l4-24gb,a100-sxm-80gb,h100-sxm-80gb,rtx4090-24gb",
}


def _cli_args(grid: dict) -> list[str]:
    args = []
    for k, v in grid.items():
        opt = "--" + k.replace("_", "-")
        if k == "gradient_checkpointing":
            continue  # a flag pair on the command line: passed through a grid file instead
        for x in (v if isinstance(v, tuple) else (v,)):
            args += [opt, x]
    return args


def sweep_rate(out_dir: Path, repeats: int = 3) -> dict:
    """In-process throughput of the vectorized sweep (cold first run, then best warm run)."""
    from loraplan.sweep import evaluate_table, expand_cases, write_columns

    runs = []
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        table = expand_cases(GRID)
        t1 = time.perf_counter()
        cols = evaluate_table(table)
        t2 = time.perf_counter()
        write_columns(cols, out_dir / "grid.csv", "csv")
        t3 = time.perf_counter()
        runs.append({"expand": t1 - t0, "evaluate": t2 - t1, "write_csv": t3 - t2, "total": t3 - t0})
    n = len(table)
    errors = sum(1 for e in cols.data["error"].tolist() if e)
    warm = min(runs[1:], key=lambda r: r["total"])
    best_eval = min(r["evaluate"] for r in runs[1:])
    return {"cases": n, "errors": errors, "cold": runs[0], "warm": warm, "best_evaluate": best_eval,
            "csv_bytes": (out_dir / "grid.csv").stat().st_size}


def reference_rate(n: int) -> dict:
    """The per-case path (one estimate() per case) on n cases spread over the same grid."""
    from loraplan.sweep import evaluate_each, expand_cases

    cases = expand_cases(GRID).to_dicts()
    cases = cases[::max(1, len(cases) // n)][:n]
    list(evaluate_each(cases[:5]))
    t0 = time.perf_counter()
    rows = list(evaluate_each(cases))
    dt = time.perf_counter() - t0
    return {"cases": len(rows), "seconds": dt, "cases_per_s": len(rows) / dt}


def cli_wall(args: list[str], env: dict | None = None) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return time.perf_counter() - t0, (p.stdout + p.stderr).strip(), p.returncode


def import_profile(probe: str, top: int = 8) -> tuple[float, list[tuple[float, str]]]:
    """``python -X importtime``: total import time (s) and the slowest top-level imports (cumulative s)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True)
    rows = []
    for line in p.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        if len(name) - len(name.lstrip()) == 1:  # top level (nested imports are indented further)
            rows.append((int(parts[1]) / 1e6, name.strip()))
    return sum(t for t, _ in rows), sorted(rows, reverse=True)[:top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-cases", type=int, default=2000, help="cases for the per-case reference rate")
    ap.add_argument("--no-accelerate", action="store_true", help="skip the accelerate comparison")
    a = ap.parse_args(argv)
    out_dir = Path(tempfile.mkdtemp(prefix="loraplan-sweep-"))
    bindir = Path(sys.executable).parent
    loraplan = shutil.which("loraplan", path=str(bindir)) or "loraplan"

    print(f"CPU cores: {os.cpu_count()}, python {sys.version.split()[0]}")
    r = sweep_rate(out_dir)
    n = r["cases"]
    w, c = r["warm"], r["cold"]
    print(f"grid: {n:,} cases ({r['errors']:,} error rows: targets a model lacks), CSV {r['csv_bytes'] / 2**20:.1f} MiB")
    print(f"  evaluation alone (evaluate_table), best warm: {r['best_evaluate']:.3f} s = "
          f"{n / r['best_evaluate']:,.0f} configs/s")
    print(f"  end to end (expand + evaluate + write CSV), best warm: {w['total']:.3f} s = {n / w['total']:,.0f} configs/s "
          f"(expand {w['expand']:.3f} s, evaluate {w['evaluate']:.3f} s, write CSV {w['write_csv']:.3f} s)")
    print(f"  end to end, first run in the process (cold caches): {c['total']:.3f} s = {n / c['total']:,.0f} configs/s "
          f"(expand {c['expand']:.3f} s, evaluate {c['evaluate']:.3f} s, write CSV {c['write_csv']:.3f} s)")
    grid_file = out_dir / "gc.json"
    grid_file.write_text('{"gradient_checkpointing": [true, false]}')
    w_cli, out_cli, rc_cli = cli_wall([loraplan, "sweep", *_cli_args(GRID), "--grid", str(grid_file),
                                       "--out", str(out_dir / "cli.csv"), "--yes", "--quiet"])
    print(f"  loraplan sweep ... --out grid.csv (fresh process, imports included): {w_cli:.2f} s = "
          f"{n / w_cli:,.0f} configs/s, exit {rc_cli}{': ' + out_cli[-200:] if rc_cli else ''}")
    if a.reference_cases:
        ref = reference_rate(a.reference_cases)
        print(f"per-case reference path (evaluate_each, one estimate() per case): {ref['cases']} cases in "
              f"{ref['seconds']:.2f} s = {ref['cases_per_s']:,.0f} configs/s "
              f"(vectorized evaluation: {n / r['best_evaluate'] / ref['cases_per_s']:,.0f}x)")

    est = [loraplan, "estimate", "--model", "llama-2-7b", "--format", "json"]
    walls = sorted(cli_wall(est)[0] for _ in range(3))
    print(f"loraplan estimate (fresh process): median {walls[1]:.2f} s (min {walls[0]:.2f} s)")
    probe = ("import sys, loraplan.cli as c; c.main(['estimate','--model','llama-2-7b','--format','json']); "
             "print('torch imported:', 'torch' in sys.modules, '| numpy imported:', 'numpy' in sys.modules, "
             "file=sys.stderr)")
    _, out2, _ = cli_wall([sys.executable, "-c", probe])
    print("  " + out2.splitlines()[-1])
    total, slow = import_profile("import loraplan.cli, loraplan.commands.estimate, loraplan.estimate.api, "
                                 "loraplan.estimate.time")
    print(f"  imports (python -X importtime, top level, cumulative): {total:.3f} s; slowest: " +
          ", ".join(f"{name} {t * 1e3:.0f} ms" for t, name in slow[:6]))

    acc = shutil.which("accelerate", path=str(bindir))
    if a.no_accelerate:
        pass
    elif acc:
        w3, out3, rc3 = cli_wall([acc, "estimate-memory", "meta-llama/Llama-2-7b-hf", "--library_name", "transformers"])
        tail = out3.splitlines()[-1] if out3 else ""
        print(f"accelerate estimate-memory meta-llama/Llama-2-7b-hf (HF_HUB_OFFLINE=1): {w3:.2f} s, exit {rc3}: {tail[:200]}")
        # offline route: the same computation accelerate's estimate-memory does after its hub check
        # (init_empty_weights model from a local config.json + calculate_maximum_sizes), in a fresh process
        import json

        from loraplan.catalog import model_entries

        d = Path(tempfile.mkdtemp())
        cfg = dict(model_entries()["llama-2-7b"]["config"])
        cfg.setdefault("architectures", ["LlamaForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg))
        code = ("import time; t=time.perf_counter(); from accelerate import init_empty_weights; "
                "from accelerate.utils import calculate_maximum_sizes; from transformers import AutoConfig, AutoModelForCausalLM; "
                f"cfg=AutoConfig.from_pretrained({str(d)!r}); "
                "m=None\nwith init_empty_weights(): m=AutoModelForCausalLM.from_config(cfg)\n"
                "total, largest = calculate_maximum_sizes(m); "
                "print(f'bf16 load {total/2/2**30:.2f} GiB, training (Adam, x4) {total*2/2**30:.2f} GiB')")
        w4, out4, rc4 = cli_wall([sys.executable, "-c", code.replace("\\n", "\n")])
        print(f"accelerate offline (init_empty_weights + calculate_maximum_sizes, fresh process): {w4:.2f} s, "
              f"exit {rc4}: {out4.splitlines()[-1][:160] if out4 else ''}")
    else:
        print("accelerate: not installed")
    shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
