"""Per-rank ledgers of the meta trace of the real DDP / FSDP2 engines (loraplan/trace/distributed.py)
beside the one-GPU trace, for a tiny llama: the table the analytic per-GPU ledger is compared with.

    python benchmarks/trace_parallel_table.py [--model tiny-llama] [--quant bf16,nf4] [--seq 128]
    python benchmarks/trace_parallel_table.py --model llama-3.2-1b --layers 2 --quant fp32 \
        --trainer hf --mixed-precision bf16 --cases 6     # PEFT's FSDP recipe: fp32 shards, bf16 gathers

Each case traces ranks 0 and N-1 in this process (a fake process group each); prints
(case, rank, line, bytes) rows and each rank's peak allocated, then its peak reserved from the
stream-aware allocator replay (``reserved:<stream>``: each stream's own peak; the caching
allocator keeps the FSDP side streams' blocks apart) beside the analytic per-stream figure
(``estimate.stream_reserved``; ``analytic reserved`` is ``estimate``'s peak_reserved_bytes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraplan.catalog import load_calibration, load_gpu, load_model  # noqa: E402
from loraplan.estimate.api import estimate  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.trace.distributed import PARALLEL_CATEGORIES, traced_ranks  # noqa: E402
from loraplan.trace.run import trace_step  # noqa: E402

CASES = (("single", 1, {}), ("ddp", 2, {}), ("fsdp", 2, {}), ("fsdp", 4, {}),
         ("fsdp", 2, {"fsdp_sharding": "shard-grad-op"}), ("fsdp-offload", 2, {}),
         ("fsdp", 2, {"fsdp_version": 1}), ("fsdp", 4, {"fsdp_version": 1}), ("fsdp", 2, {"fsdp_version": 2}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--quant", default="bf16,nf4")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ranks", default="first-last", choices=("first-last", "first"),
                    help="trace ranks 0 and N-1, or rank 0 only")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a shorter full-width model)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--cases", default=None, help="comma-separated indices into CASES (default all)")
    ap.add_argument("--trainer", default=None, help="loop, hf or trl (default: the TrainSpec default)")
    ap.add_argument("--mixed-precision", default=None, help="no, bf16 or fp16 (default: the trainer's)")
    a = ap.parse_args(argv)
    spec = load_model(a.model)
    cfg = dict(spec.config)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
        spec = _with_layers(spec, a.layers)
    lora = LoraSpec(rank=a.lora_rank, targets=tuple(a.targets.split(",")))
    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    cases = CASES if a.cases is None else [CASES[int(i)] for i in a.cases.split(",")]
    print(f"{'case':40s} {'rank':>4s}  {'line':22s} {'bytes':>12s}")
    for quant in a.quant.split(","):
        for strategy, n, extra in cases:
            if quant in ("nf4", "fp4") and strategy.startswith("fsdp"):
                extra = {**extra, "quant_storage": "bf16"}  # FSDP-QLoRA's float storage
                if extra.get("fsdp_version") == 1:  # one dtype per flat parameter: no fp32 upcast
                    extra["prepare_kbit"] = False
            recipe = {k: v for k, v in (("trainer", a.trainer), ("mixed_precision", a.mixed_precision)) if v}
            train = TrainSpec(quant=quant, batch=a.batch, seq=a.seq, strategy=strategy, num_gpus=n, **extra, **recipe)
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
                rep = t["allocator"]["default"]
                names = (t.get("parallel") or {}).get("streams") or {0: "default"}
                for sid, v in sorted(rep["peak_reserved_by_stream"].items()):
                    print(f"{name:40s} {r:>4d}  {'reserved:' + names.get(sid, str(sid)):22s} {v:>12,d}")
                print(f"{name:40s} {r:>4d}  {'RESERVED (replay)':22s} {t['peak_reserved_bytes']:>12,d}")
            e = estimate(spec, lora, train, gpu, cal, with_time=False).memory
            for k, v in _analytic_streams(spec, lora, train, gpu, cal).items():
                print(f"{name:40s} {'an':>4s}  {'reserved:' + k:22s} {int(v):>12,d}")
            print(f"{name:40s} {'an':>4s}  {'PEAK allocated':22s} {e.peak_allocated_bytes:>12,d}")
            print(f"{name:40s} {'an':>4s}  {'RESERVED (analytic)':22s} {e.peak_reserved_bytes:>12,d}")
    return 0


def _with_layers(spec, layers: int):
    """The catalog model rebuilt from its config with ``layers`` decoder layers (hf.spec_from_config)."""
    from loraplan.hf import spec_from_config

    return spec_from_config({**spec.config, "num_hidden_layers": layers}, name=f"{spec.name}-{layers}l")


def _analytic_streams(spec, lora, train, gpu, cal) -> dict:
    """The analytic per-stream reserved of FSDP (``stream_reserved.reserved_by_stream``), read by
    wrapping it during one ``estimate``; {} for the other strategies."""
    from loraplan.estimate import stream_reserved as sr

    seen: dict = {}
    orig = sr.peak_reserved

    def spy(*args, **kwargs):
        seen.update(sr.reserved_by_stream(*args, **kwargs))
        return orig(*args, **kwargs)

    sr.peak_reserved = spy
    try:
        estimate(spec, lora, train, gpu, cal, with_time=False)
    finally:
        sr.peak_reserved = orig
    return seen


if __name__ == "__main__":
    sys.exit(main())
