"""Analytic ledger vs meta-device trace over a grid: the trace is the estimator's teacher.

For every model family of the catalog (shrunk to a small config so each trace takes about a
second, or at full size with --full), quantization, LoRA targets, checkpointing and optimizer,
prints the analytic and the traced peak allocated, the signed error and where each puts the peak.
Summary: error distribution per family and quantization, and per family and ledger line (the
analytic lines grouped into the trace's categories, ``TRACE_LINES``).

    python benchmarks/analytic_vs_trace.py [--quick] [--full] [--families llama,t5]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

from loraplan.catalog import load_calibration, load_gpu, model_entries
from loraplan.estimate.api import estimate
from loraplan.hf import spec_from_config
from loraplan.spec import LoraSpec, TrainSpec
from loraplan.targets import default_targets

#: one catalog model per family
FAMILIES = {
    "llama": "llama-3.2-1b", "mistral": "mistral-7b", "qwen2": "qwen2.5-0.5b", "qwen3": "qwen3-0.6b",
    "gemma2": "gemma-2-2b", "phi3": "phi-3-mini-4k", "gpt_neox": "pythia-1b", "opt": "opt-6.7b",
    "falcon": "falcon-7b", "t5": "flan-t5-base", "mt5": "mt0-large",
    "gemma": "gemma-2b", "gemma3_text": "gemma-3-270m", "olmo2": "olmo-2-0425-1b", "granite": "granite-3.2-8b-instruct",
    "smollm3": "smollm3-like", "mistral_hd": "mistral-nemo-base-2407", "phi4": "phi-4",
    # granite 3.0/3.1 ship attention_dropout 0.1: with nf4's fp32 stream and GQA the math sdpa
    # kernel runs the dropout (the trace replays it with CUDA's native_dropout:
    # emulation.math_sdpa_fused_dropout)
    "granite_attn_dropout": "granite-3.1-2b-instruct",
}

#: sparse-MoE families (fused 3-D experts), one catalog model each. Checked in bf16 only: under a
#: bitsandbytes base the experts stay unquantized and are upcast to fp32, and torch's grouped_mm
#: (transformers' default experts kernel) rejects fp32 ("Expected inputs of BF16 type"), so that
#: step fails -- on meta as on CUDA; the estimate says so loudly. "all-linear" is refused on these
#: families (PEFT rewrites it into router + expert LoRA, see loraplan.targets); the attention set
#: stands in for it.
MOE_FAMILIES = {"mixtral": "mixtral-8x7b", "qwen3_moe": "qwen3-30b-a3b", "qwen2_moe": "qwen1.5-moe-a2.7b",
                "olmoe": "olmoe-1b-7b-0924"}
MOE_TARGETS = {"all-linear": "q_proj,k_proj,v_proj,o_proj", "all-linear,lm_head": "q_proj,k_proj,v_proj,o_proj,lm_head"}

#: checked by the benchmark (``--families``) but not gated at 2% by tests/test_analytic_vs_trace.py,
#: with the reason (none now: phi4 was, until the ledger modelled a fused gate_up_proj's LoRA
#: recompute, transients.layer_backward_transients)
UNGATED: dict[str, str] = {}

#: families without a catalog entry: a config with the family's defaults (SmolLM3Config: 36
#: layers, hidden 2048, 16 heads, 4 kv heads, vocab 128256, tied; every 4th layer without RoPE)
INLINE = {
    "smollm3-like": {"model_type": "smollm3", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008,
                     "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4,
                     "no_rope_layer_interval": 4, "tie_word_embeddings": True, "pad_token_id": 128004,
                     "bos_token_id": 128000, "eos_token_id": 128001},
}


#: the analytic ledger lines inside each of the trace's coarser categories (trace.run._categorize;
#: the correspondence loraplan.estimate.result.LEDGER's comment states): ``weights`` = the frozen
#: Linear, unquantized and expert weights; ``optimizer_state`` includes the step's temporaries;
#: ``activations`` is every forward / backward tensor that is not logits or loss (the analytic
#: saved activations, backward transients, autocast copies, kept int8 inputs, the input leaf and
#: its grad); ``other`` = the inputs, cuBLAS workspaces and the in-kernel transient at the peak
#: (the analytic workspaces, int8 kernel transients and calibrated allocator overhead)
TRACE_LINES = {
    "weights": ("frozen_linear_weights", "unquantized_weights", "expert_weights"),
    "lora_weights": ("lora_weights",),
    "lora_gradients": ("lora_gradients",),
    "optimizer_state": ("optimizer_state", "optimizer_temporaries"),
    "activations": ("activations", "backward_transients", "autocast_copies", "int8_previous_step",
                    "previous_step_input_grad", "input_embedding_grad"),
    "logits_loss": ("logits_loss", "model_output"),
    "other": ("cuda_workspaces", "kernel_transients", "allocator_overhead"),
}


def line_errors(analytic_components: dict, trace_components: dict) -> dict[str, tuple[int, int]]:
    """Per trace category: (analytic bytes, trace bytes), each view at its own peak. Analytic
    lines no category names go to ``unmapped`` (reported, never dropped), so both columns sum to
    the two peaks."""
    mapped = {k for keys in TRACE_LINES.values() for k in keys}
    out = {cat: (sum(int(analytic_components.get(k, 0)) for k in keys), int(trace_components.get(cat, 0)))
           for cat, keys in TRACE_LINES.items()}
    extra = sum(int(v) for k, v in analytic_components.items() if k not in mapped)
    extra_t = sum(int(v) for k, v in trace_components.items() if k not in TRACE_LINES)
    if extra or extra_t:
        out["unmapped"] = (extra, extra_t)
    return out


def family_config(fam: str) -> dict:
    """The config a family is checked on: its catalog entry's, or an INLINE one."""
    name = FAMILIES.get(fam) or MOE_FAMILIES.get(fam) or UNGATED[fam]
    return dict(INLINE[name]) if name in INLINE else dict(model_entries()[name]["config"])



_SIZE_KEYS = {"hidden_size": 256, "d_model": 256, "word_embed_proj_dim": 256}
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers")


def small_config(cfg: dict, layers: int = 2, vocab: int = 2048) -> dict:
    """A shrunk copy of a config: same family and shape rules, hidden 256, 4 heads, 2 layers."""
    c = dict(cfg)
    heads = c.get("num_attention_heads") or c.get("num_heads") or 4
    kv = c.get("num_key_value_heads") or c.get("num_kv_heads") or heads
    for k, v in _SIZE_KEYS.items():
        if k in c:
            c[k] = v
    inter_ratio = None
    for k in ("intermediate_size", "d_ff", "ffn_dim"):
        if c.get(k):
            base = cfg.get("hidden_size") or cfg.get("d_model")
            inter_ratio = c[k] / base
            c[k] = int(round(256 * inter_ratio / 32)) * 32
    for k in _LAYER_KEYS:
        if k in c and c[k]:
            c[k] = layers
    for k in ("num_attention_heads", "num_heads"):
        if k in c:
            c[k] = 4
    if "num_key_value_heads" in c and c["num_key_value_heads"]:
        c["num_key_value_heads"] = max(1, 4 * kv // heads)
    if "num_kv_heads" in c and c["num_kv_heads"]:
        c["num_kv_heads"] = max(1, 4 * kv // heads)
    if "head_dim" in c and c["head_dim"]:
        c["head_dim"] = 64
    if "d_kv" in c:
        c["d_kv"] = 64
    if isinstance(c.get("layer_types"), list):  # per-layer attention kinds (gemma3): keep the last
        c["layer_types"] = c["layer_types"][-layers:]  # ones, which end on a global layer
    if c.get("sliding_window"):
        c["sliding_window"] = 256  # reached at the grid's seq >= 256 (transformers masks from seq >= window)
    c["vocab_size"] = vocab
    for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if isinstance(c.get(k), int) and c[k] >= vocab:
            c[k] = 0
    return c


def grid(quick: bool):
    quants = ["bf16", "nf4"] if quick else ["bf16", "nf4", "fp4", "int8"]
    targets = ["default", "all-linear"] if quick else ["default", "all-linear", "all-linear,lm_head"]
    gcs = [True, False]
    opts = ["adamw"] if quick else ["adamw", "sgd", "adamw_8bit"]
    # (batch, seq, rank, decoder length for encoder-decoder models: None = seq)
    shapes = [(2, 256, 8, None), (2, 512, 8, 128)] if quick else [
        (2, 256, 8, None), (1, 1024, 64, None), (4, 128, 256, None), (2, 1024, 8, 256), (2, 128, 8, 512)]
    return list(itertools.product(quants, targets, gcs, opts, shapes))


def run(families, quick=False, full=False, steps=2):
    from loraplan.trace.run import trace_step

    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    rows = []
    for fam in families:
        base = family_config(fam)
        cfg = base if full else small_config(base)
        model = spec_from_config(cfg, f"{fam}{'' if full else '-small'}")
        for quant, tgt, gc, opt, (b, s, r, ts) in grid(quick):
            if ts is not None and not model.is_encoder_decoder:
                continue  # unequal lengths are an encoder-decoder axis
            if fam in MOE_FAMILIES:
                if quant != "bf16":
                    continue
                tgt = MOE_TARGETS.get(tgt, tgt)
            targets = default_targets(model) if tgt == "default" else tuple(tgt.split(","))
            lora = LoraSpec(rank=r, alpha=2 * r, dropout=0.05, targets=targets)
            train = TrainSpec(quant=quant, optimizer=opt, batch=b, seq=s, gradient_checkpointing=gc,
                              target_seq=(ts or s) if model.is_encoder_decoder else None)
            e = estimate(model, lora, train, gpu, cal, with_time=False)
            t0 = time.perf_counter()
            try:
                tr = trace_step(cfg, lora, train, gpu.compute_capability, steps=steps)
            except Exception as ex:  # noqa: BLE001 - a benchmark reports, it does not stop
                print(f"{fam:8s} {quant:5s} {tgt:18s} gc={int(gc)} {opt:10s} b{b} s{s} r{r}: trace failed: "
                      f"{str(ex)[:120]}", flush=True)
                continue
            a, p = e.memory.peak_allocated_bytes, tr["peak_allocated_bytes"]
            err = 100.0 * (a - p) / p
            rows.append(dict(family=fam, quant=quant, targets=tgt, gc=gc, opt=opt, b=b, s=s, r=r, ts=ts, err=err,
                             analytic=a, trace=p, moment=e.memory.peak_moment, trace_phase=tr["peak_phase"],
                             lines=line_errors(e.memory.components, tr["components"])))
            print(f"{fam:8s} {quant:5s} {tgt:18s} gc={int(gc)} {opt:10s} b{b} s{s:<5d}{'' if ts is None else f'->{ts}'} r{r:<4d} analytic "
                  f"{a / 2**20:9.2f} MiB  trace {p / 2**20:9.2f} MiB  {err:+7.2f}%  {e.memory.peak_moment:15s} "
                  f"trace:{tr['peak_phase']:9s} {time.perf_counter() - t0:5.1f}s", flush=True)
    return rows


#: the sequence-handling grid (``--sequences``): padding modes x attention implementations x
#: quantization x checkpointing, b2 (padding-free: one row of b·L), seq 512, lengths (100, 300, 700)
SEQUENCE_GRID = [
    dict(padding=p, lengths=(100, 300, 700) if p != "max-length" else None, attn_implementation=a)
    for p in ("max-length", "longest", "packing", "padding-free") for a in ("sdpa", "eager", "flash_attention_2")
]


def run_sequences(families, steps=2):
    """Analytic vs trace over ``SEQUENCE_GRID`` for each family (small configs, default targets and
    all-linear, bf16 and nf4, checkpointing on and off). Encoder-decoder families are refused
    (padding modes are decoder-only) and falcon's FA2 cannot be traced: reported, not counted."""
    from loraplan.trace.run import trace_step

    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    rows = []
    for fam in families:
        cfg = small_config(family_config(fam))
        model = spec_from_config(cfg, f"{fam}-small")
        if model.is_encoder_decoder:
            continue
        for seqkw, quant, tgt, gc in itertools.product(SEQUENCE_GRID, ("bf16", "nf4"), ("default", "all-linear"),
                                                       (True, False)):
            targets = default_targets(model) if tgt == "default" else (tgt,)
            lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=targets)
            train = TrainSpec(quant=quant, batch=2, seq=512, gradient_checkpointing=gc, **seqkw)
            label = f"{fam:10s} {seqkw['padding']:12s} {seqkw['attn_implementation']:17s} {quant:5s} {tgt:10s} gc={int(gc)}"
            try:
                e = estimate(model, lora, train, gpu, cal, with_time=False)
                tr = trace_step(cfg, lora, train, gpu.compute_capability, steps=steps)
            except Exception as ex:  # noqa: BLE001 - a benchmark reports, it does not stop
                print(f"{label}: {type(ex).__name__}: {str(ex)[:120]}", flush=True)
                continue
            a, p = e.memory.peak_allocated_bytes, tr["peak_allocated_bytes"]
            err = 100.0 * (a - p) / p
            rows.append(dict(family=fam, quant=quant, targets=tgt, gc=gc, err=err, analytic=a, trace=p,
                             lines=line_errors(e.memory.components, tr["components"]), **seqkw))
            print(f"{label} analytic {a / 2**20:8.2f} MiB trace {p / 2**20:8.2f} MiB {err:+7.2f}% "
                  f"{e.memory.peak_moment} {e.inputs['attention_kernel']}", flush=True)
    return rows


#: training-stack dtype recipes (issue 11) that together set every dtype field: mixed precision
#: (bf16, fp16 + GradScaler), load / compute / adapter dtype, prepare_model_for_kbit_training off,
#: and trl's defaults; ``--recipes`` runs each on every family, targets default and all-linear,
#: checkpointing on and off (tests/test_recipe_dtypes.py gates a few dozen of them at 2%).
#: Measured 2026-11-30 (small configs, b2 s256 r8): 731/748 within 2%, mean |err| 0.42%; the rest
#: are T5/mT5 only: an fp16 load under bf16 autocast or a bf16 load under fp16 autocast reads
#: +2.2..+3.9% above the trace (conservative: T5LayerNorm casts its output back to the weight's
#: dtype while the two half dtypes promote the residual stream to fp32, which the ledger does not
#: follow per sub-layer; re-run after the issue-14 T5 fixes, t5 only: 34/40 within 2%, these
#: two recipes +1.6..+4.5%, the trace identical for both orders; again after the T5 wide-grid
#: fixes, 2026-12-01: 35/40, these two recipes +1.0..+4.4%, nothing else above 2%), and trl / bf16
#: autocast with checkpointing -2.0..-2.1% (the top
#: decoder layer's NewGELU backward under autocast). (opt's trl rows, -2.2% in that run, were
#: fixed after it: LayerNorm blocks of a bnb base run in fp32 under autocast.)
RECIPES = [
    dict(quant="bf16", mixed_precision="bf16"),
    dict(quant="nf4", mixed_precision="bf16"),
    dict(quant="fp16", mixed_precision="bf16"),
    dict(quant="nf4", prepare_kbit=False),
    dict(quant="bf16", mixed_precision="fp16"),
    dict(quant="nf4", adapter_dtype="bf16"),
    dict(quant="fp32", mixed_precision="bf16"),
    dict(quant="nf4", compute_dtype="fp32"),
    dict(quant="nf4", trainer="trl"),
    dict(quant="bf16", adapter_dtype="bf16"),
    dict(quant="nf4", mixed_precision="fp16", load_dtype="fp16", compute_dtype="fp16"),
    # a loop that binds the model output (--loop-outputs): logits alive through backward / into the next forward
    dict(quant="bf16", loop_outputs="micro-step"),
    dict(quant="nf4", loop_outputs="next-forward", gradient_accumulation=2),
]


def run_recipes(families, steps=2):
    """Analytic vs trace for every ``RECIPES`` entry on the small config of each family."""
    from loraplan.trace.run import trace_step

    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    rows = []
    for fam in families:
        if fam in MOE_FAMILIES:
            continue  # bf16-only families (see MOE_FAMILIES)
        cfg = small_config(family_config(fam))
        model = spec_from_config(cfg, f"{fam}-small")
        for rec in RECIPES:
            for tgt in ("default", "all-linear"):
                for gc in (True, False):
                    targets = default_targets(model) if tgt == "default" else (tgt,)
                    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=targets)
                    train = TrainSpec(batch=2, seq=256, gradient_checkpointing=gc,
                                      target_seq=256 if model.is_encoder_decoder else None, **rec)
                    label = ",".join(f"{k}={v}" for k, v in rec.items())
                    try:
                        tr = trace_step(cfg, lora, train, gpu.compute_capability, steps=steps)
                    except Exception as ex:  # noqa: BLE001 - a benchmark reports, it does not stop
                        print(f"{fam:8s} {label:60s} {tgt:10s} gc={int(gc)}: trace failed: {str(ex)[:120]}", flush=True)
                        continue
                    e = estimate(model, lora, train, gpu, cal, with_time=False)
                    a, p = e.memory.peak_allocated_bytes, tr["peak_allocated_bytes"]
                    err = 100.0 * (a - p) / p
                    rows.append(dict(family=fam, quant=label, targets=tgt, gc=gc, err=err, analytic=a, trace=p,
                                     lines=line_errors(e.memory.components, tr["components"])))
                    print(f"{fam:8s} {label:60s} {tgt:10s} gc={int(gc)} analytic {a / 2**20:8.2f} MiB  "
                          f"trace {p / 2**20:8.2f} MiB  {err:+6.2f}%", flush=True)
    return rows


def summarize(rows):
    print("\nerror distribution (analytic - trace) / trace, by family and quantization:")
    keys = sorted({(r["family"], r["quant"]) for r in rows})
    for fam, q in keys:
        errs = [r["err"] for r in rows if r["family"] == fam and r["quant"] == q]
        print(f"  {fam:8s} {q:5s} n={len(errs):3d}  mean |err| {statistics.mean(abs(e) for e in errs):6.2f}%  "
              f"min {min(errs):+7.2f}%  max {max(errs):+7.2f}%")
    summarize_lines(rows)
    errs = [abs(r["err"]) for r in rows]
    if errs:
        print(f"all: n={len(errs)}  mean |err| {statistics.mean(errs):.2f}%  within 2%: "
              f"{sum(e <= 2 for e in errs)}/{len(errs)}")


def summarize_lines(rows):
    """Per family and trace category (``TRACE_LINES``): the signed line error (analytic − trace) in %
    of the trace's peak -- the lines' errors sum to the row's error -- mean / min / max over the
    family's rows, and the line's mean share of the trace's peak. Each view is itemised at its own
    peak, so where the two put the peak at different moments the lines show that shift, not an
    error of one term."""
    rows = [r for r in rows if r.get("lines")]
    if not rows:
        return
    print("\nper ledger line, by family: (analytic - trace) / trace peak, and the line's share of the trace peak "
          "(each view at its own peak):")
    for fam in sorted({r["family"] for r in rows}):
        fr = [r for r in rows if r["family"] == fam]
        cats = [c for c in (*TRACE_LINES, "unmapped") if any(c in r["lines"] and any(r["lines"][c]) for r in fr)]
        for c in cats:
            errs = [100.0 * (r["lines"].get(c, (0, 0))[0] - r["lines"].get(c, (0, 0))[1]) / r["trace"] for r in fr]
            share = statistics.mean(100.0 * r["lines"].get(c, (0, 0))[1] / r["trace"] for r in fr)
            print(f"  {fam:8s} {c:16s} n={len(fr):3d}  mean {statistics.mean(errs):+7.2f}%  min {min(errs):+7.2f}%  "
                  f"max {max(errs):+7.2f}%  share {share:5.1f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true", help="full-size configs (slow)")
    ap.add_argument("--families", default=",".join([*FAMILIES, *MOE_FAMILIES]))
    ap.add_argument("--sequences", action="store_true",
                    help="the padding x attn_implementation grid (SEQUENCE_GRID) instead of the default grid")
    ap.add_argument("--recipes", action="store_true", help="the training-stack dtype recipes (RECIPES) instead")
    args = ap.parse_args(argv)
    if args.sequences:
        rows = run_sequences(args.families.split(","))
    elif args.recipes:
        rows = run_recipes(args.families.split(","))
    else:
        rows = run(args.families.split(","), quick=args.quick, full=args.full)
    summarize(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
