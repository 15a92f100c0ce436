"""Analytic step work (estimate/time.py) vs the work counted in the real step (trace/counts.py).

For each family's small config (benchmarks/analytic_vs_trace.py), quantization and
checkpointing, runs the meta trace with ``count_work=True`` and prints, per work class, the
matmul FLOPs of both views and their ratio, and the kernel launches of the whole step against
the analytic ``StepWork.kernels``; plus the bitsandbytes Python calls against ``bnb4_calls``.

    python benchmarks/work_counts.py [--families llama,t5] [--quants bf16,nf4] [--seq 128]

The analytic per-class split calls time.py's own term functions (frozen_linear_work, lora_work,
lm_head_work, attention_work, ...) in ``step_work``'s order and checks that their sum is
``step_work``'s (``analytic_classes``), so the split is the model's, not a copy of its formulas.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analytic_vs_trace import FAMILIES, MOE_FAMILIES, MOE_TARGETS, family_config, small_config  # noqa: E402

from loraplan.hf import spec_from_config  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.targets import default_targets  # noqa: E402

#: the classes whose FLOPs both views count
FLOP_CLASSES = ("frozen_linear", "lora", "lm_head", "attention")


def analytic_classes(model, lora: LoraSpec, train: TrainSpec) -> dict[str, dict[str, float]]:
    """time.py's counts split by work class: {class: {"flops", "ops"}} (flops = flops_mm +
    flops_fp32), from the same term functions ``step_work`` adds; decoder-only max-length
    padding, accumulation 1. Asserts the classes sum to ``step_work``'s totals."""
    from loraplan.estimate import time as tm
    from loraplan.estimate.steps import step_recipe
    from loraplan.storage import Dtypes, dtype_bytes

    dt = Dtypes.of(train)
    b, s = train.batch, train.seq
    s_dec = tm._decoder_seq(model, train)
    T_dec, T_enc = b * s_dec, b * s
    a_mm, a_stream = dtype_bytes(dt.frozen_matmul), dtype_bytes(dt.stream)
    gc = bool(train.gradient_checkpointing)
    fw = tm._passes(gc)
    out: dict[str, dict[str, float]] = {}

    def add(cls, increments):
        c = out.setdefault(cls, {"flops": 0.0, "ops": 0.0})
        for name, amount in increments:
            if name in ("flops_mm", "flops_fp32"):
                c["flops"] += amount
            elif name == "ops":
                c["ops"] += amount

    trainable = n_tensors = 0
    for (stack, head, fin, fout, adapted, storage), count in tm._linear_groups(model, lora.targets, dt).items():
        T = T_enc if stack == "encoder" else T_dec
        npass_f = 1 if head else fw
        if head:
            add("lm_head", tm.lm_head_work(dt, count, T, fin, fout, a_mm))
        else:
            add("frozen_linear", tm.frozen_linear_work(storage, count, T, fin, fout, npass_f, a_stream, dt.frozen_matmul,
                                                       train.double_quant, dt.autocast, dt.compute))
        if adapted:
            inc = tm.lora_work(count, T, fin, fout, lora.rank, lora.dropout, npass_f, a_stream, dt.adapter, dt.autocast)
            add("lora", inc)
            trainable += dict(inc)["trainable"]
            n_tensors += dict(inc)["n_lora_tensors"]
    stacks = [(model.num_layers, T_dec, s_dec)]
    if model.is_encoder_decoder and model.num_encoder_layers:
        stacks.append((model.num_encoder_layers, T_enc, s))
    kind = tm.resolve_attention(model, train)  # the ledger's kernel, as step_work resolves it
    gqa = model.num_kv_heads != model.num_heads
    for n_layers, T, seq in stacks:
        if n_layers:
            add("elementwise", tm.layer_host_work(model.arch, n_layers, fw, gc, kind, gqa))
            add("attention", tm.attention_work(model, n_layers, T, seq, fw, kind, dt.attention))
            if model.moe is not None and n_layers == model.num_layers:  # the experts' grouped GEMMs + router
                add("frozen_linear", tm.expert_work(model, dt, T, fw, a_stream))
    add("loss", tm.loss_work(model, dt, T_dec))
    add("embedding", tm.embedding_work(model, T_dec, a_stream))
    add("optimizer", tm.optimizer_work(train.optimizer, n_tensors, trainable))
    add("optimizer", tm.grad_norm_work(step_recipe(train), trainable))
    sw = tm.step_work(model, lora, train)
    total = sum(c["flops"] for c in out.values())
    assert abs(total - (sw.flops_mm + sw.flops_fp32)) <= 1e-6 * total, (total, sw)
    assert abs(sum(c["ops"] for c in out.values()) - sw.ops) <= 1e-6 * sw.ops, (out, sw)
    return out


def case(family: str, quant: str = "bf16", gc: bool = True, seq: int = 128, batch: int = 2,
         targets: str = "default") -> tuple:
    """(model spec, LoraSpec, TrainSpec, config) of one family's small config."""
    cfg = small_config(family_config(family))
    model = spec_from_config(cfg, f"{family}-small")
    tg = default_targets(model) if targets == "default" else tuple(MOE_TARGETS.get(targets, targets).split(","))
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=tg)
    train = TrainSpec(quant=quant, batch=batch, seq=seq, gradient_checkpointing=gc,
                      target_seq=seq if model.is_encoder_decoder else None)
    return model, lora, train, cfg


def compare(family: str, quant: str = "bf16", gc: bool = True, seq: int = 128) -> dict:
    """One case: {"analytic": classes, "traced": work summary, "step_work": StepWork}."""
    from loraplan.estimate.time import step_work
    from loraplan.trace.run import trace_step

    model, lora, train, cfg = case(family, quant, gc, seq)
    work = trace_step(cfg, lora, train, "9.0", count_work=True)["work"]
    return {"analytic": analytic_classes(model, lora, train), "traced": work, "step_work": step_work(model, lora, train)}


def ratio(a: float, t: float) -> float | None:
    return a / t if t else (1.0 if not a else None)


def row(family: str, quant: str, gc: bool, r: dict) -> str:
    tr = r["traced"]["classes"]
    cells = []
    for cls in FLOP_CLASSES:
        a = r["analytic"].get(cls, {}).get("flops", 0.0)
        t = tr.get(cls, {}).get("matmul_flops", 0)
        q = ratio(a, t)
        cells.append("   -  " if q is None else f"{q:6.3f}")
    sw = r["step_work"]
    launches = r["traced"]["total"]["launches"]
    calls = r["traced"]["python_calls"]
    bnb = calls.get("bnb.MatMul4Bit.forward", 0) + calls.get("bnb.MatMul4Bit.backward", 0)
    tot = r["traced"]["total"]
    moved = tot["bytes_read"] + tot["bytes_written"]
    return (f"{family:12s} {quant:5s} gc={int(gc)} " + " ".join(cells)
            + f"  kernels {sw.kernels:7.0f}/{launches:5d} = {sw.kernels / launches:5.2f}"
            + f"  bytes {sw.bytes_moved / moved:5.2f}"
            + (f"  bnb4 {sw.bnb4_calls:4.0f}/{bnb:3d}" if sw.bnb4_calls or bnb else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join([*FAMILIES, *MOE_FAMILIES]))
    ap.add_argument("--quants", default="bf16,nf4")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--launches", action="store_true", help="also print analytic ops / traced launches per class")
    args = ap.parse_args()
    print("analytic / traced matmul FLOPs per class; kernels: analytic StepWork.kernels / traced launches; "
          "bytes: analytic bytes_moved / traced unfused bytes (sum of op inputs and outputs: an upper bound)")
    print(f"{'family':12s} {'quant':5s} {'':4s} " + " ".join(f"{c[:6]:>6s}" for c in FLOP_CLASSES))
    for fam in args.families.split(","):
        for quant in args.quants.split(","):
            if fam in MOE_FAMILIES and quant != "bf16":
                continue
            for gc in (False, True):
                try:
                    r = compare(fam, quant, gc, args.seq)
                except Exception as e:  # noqa: BLE001 - one line per failing case
                    print(f"{fam:12s} {quant:5s} gc={int(gc)} failed: {type(e).__name__}: {str(e)[:120]}")
                    continue
                print(row(fam, quant, gc, r), flush=True)
                if args.launches:
                    tr = r["traced"]["classes"]
                    print("    launches per class (analytic ops / traced): " + ", ".join(
                        f"{c} {r['analytic'].get(c, {}).get('ops', 0):.0f}/{tr.get(c, {}).get('launches', 0)}"
                        for c in ("frozen_linear", "lora", "lm_head", "attention", "elementwise", "loss", "embedding",
                                  "optimizer", "other")))


if __name__ == "__main__":
    main()
