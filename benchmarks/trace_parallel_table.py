"""Per-rank ledgers of the meta trace of the real DDP / FSDP2 engines (loraplan/trace/distributed.py)
beside the one-GPU trace, for a tiny llama: the table the analytic per-GPU ledger is compared with.

    python benchmarks/trace_parallel_table.py [--model tiny-llama] [--quant bf16,nf4] [--seq 128]

Each case traces ranks 0 and N-1 in this process (a fake process group each); prints
(case, rank, line, bytes) rows and each rank's peak.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraplan.catalog import load_model  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.trace.distributed import PARALLEL_CATEGORIES, traced_ranks  # noqa: E402
from loraplan.trace.run import trace_step  # noqa: E402

CASES = (("single", 1, {}), ("ddp", 2, {}), ("fsdp", 2, {}), ("fsdp", 4, {}),
         ("fsdp", 2, {"fsdp_sharding": "shard-grad-op"}), ("fsdp-offload", 2, {}),
         ("fsdp", 2, {"fsdp_version": 1}), ("fsdp", 4, {"fsdp_version": 1}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--quant", default="bf16,nf4")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ranks", default="first-last", choices=("first-last", "first"),
                    help="trace ranks 0 and N-1, or rank 0 only")
    a = ap.parse_args(argv)
    cfg = dict(load_model(a.model).config)
    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    print(f"{'case':40s} {'rank':>4s}  {'line':22s} {'bytes':>12s}")
    for quant in a.quant.split(","):
        for strategy, n, extra in CASES:
            if quant in ("nf4", "fp4") and strategy.startswith("fsdp"):
                extra = {**extra, "quant_storage": "bf16"}  # FSDP-QLoRA's float storage
                if extra.get("fsdp_version") == 1:  # one dtype per flat parameter: no fp32 upcast
                    extra["prepare_kbit"] = False
            train = TrainSpec(quant=quant, batch=a.batch, seq=a.seq, strategy=strategy, num_gpus=n, **extra)
            name = f"{quant} {strategy} N={n}" + "".join(f" {k}={v}" for k, v in extra.items())
            for r in (traced_ranks(train) if a.ranks == "first-last" else [0]):
                t = trace_step(cfg, lora, train, rank=r)
                for line in PARALLEL_CATEGORIES:
                    v = t["components"].get(line)
                    if v:
                        print(f"{name:40s} {r:>4d}  {line:22s} {v:>12,d}")
                host = (t.get("parallel") or {}).get("host_components") or {}
                for k, v in host.items():
                    print(f"{name:40s} {r:>4d}  {'host:' + k:22s} {v:>12,d}")
                print(f"{name:40s} {r:>4d}  {'PEAK (' + t['peak_phase'] + ')':22s} {t['peak_allocated_bytes']:>12,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
