"""Sweep throughput and end-to-end CLI wall time, next to `accelerate estimate-memory`.

    python benchmarks/sweep_speed.py [--cases 2000]

1. configs/second of loraplan.sweep.evaluate on a mixed grid (models x quant x rank x seq x
   batch x GPUs), in-process (imports excluded), and the split memory estimate vs step time.
2. wall time of `loraplan estimate` as a fresh process (imports included), and whether torch
   was imported (it must not be).
3. `accelerate estimate-memory` on the same model: it needs the Hugging Face Hub for the config
   (offline it fails); we run it with HF_HUB_OFFLINE=1 and report what happens.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def sweep_rate(n_max: int) -> dict:
    from loraplan.sweep import evaluate

    grid = itertools.product(["llama-2-7b", "qwen2.5-0.5b", "open-llama-3b-v2"], ["nf4", "bf16"], ["8", "64"],
                             ["256", "512", "1024", "2048", "4096"], ["1", "2", "4", "8"],
                             ["l4-24gb", "a100-sxm-80gb", "h100-sxm-80gb"])
    cases = [dict(model=m, quant=q, rank=r, seq=s, batch=b, gpu=g, targets="q_proj,v_proj")
             for m, q, r, s, b, g in grid][:n_max]
    list(evaluate(cases[:5]))  # warm the catalog caches
    t0 = time.perf_counter()
    rows = list(evaluate(cases))
    dt = time.perf_counter() - t0
    # the step-time part alone (counted work reused per GPU)
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.commands.options import resolve_case
    from loraplan.estimate.time import coefficients, step_time, step_work

    specs = [resolve_case(c) for c in cases[:300]]
    gpu = load_gpu("h100-sxm-80gb")
    coef = coefficients(load_calibration(gpu.id))
    t1 = time.perf_counter()
    for m, l, t in specs:
        step_time(step_work(m, l, t), gpu, coef)
    dt_time = (time.perf_counter() - t1) / len(specs)
    return {"cases": len(rows), "seconds": dt, "cases_per_s": len(rows) / dt, "time_model_us": dt_time * 1e6}


def cli_wall(args: list[str]) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0, (p.stdout + p.stderr).strip(), p.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    a = ap.parse_args(argv)
    r = sweep_rate(a.cases)
    print(f"sweep: {r['cases']} cases in {r['seconds']:.2f} s = {r['cases_per_s']:,.0f} cases/s "
          f"(step-time model alone: {r['time_model_us']:.1f} us/case)")
    bindir = Path(sys.executable).parent
    loraplan = shutil.which("loraplan", path=str(bindir)) or "loraplan"
    w, out, rc = cli_wall([loraplan, "estimate", "--model", "llama-2-7b", "--format", "json"])
    print(f"loraplan estimate (fresh process): {w:.2f} s, exit {rc}")
    probe = ("import sys, loraplan.cli as c; c.main(['estimate','--model','llama-2-7b','--format','json']); "
             "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)")
    w2, out2, _ = cli_wall([sys.executable, "-c", probe])
    print(out2.splitlines()[-1])
    acc = shutil.which("accelerate", path=str(bindir))
    if acc:
        w3, out3, rc3 = cli_wall([acc, "estimate-memory", "meta-llama/Llama-2-7b-hf", "--library_name", "transformers"])
        tail = out3.splitlines()[-1] if out3 else ""
        print(f"accelerate estimate-memory meta-llama/Llama-2-7b-hf (HF_HUB_OFFLINE=1): {w3:.2f} s, exit {rc3}: {tail[:200]}")
        # offline route: the same computation accelerate's estimate-memory does after its hub check
        # (init_empty_weights model from a local config.json + calculate_maximum_sizes), in a fresh process
        import json
        import tempfile

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
