"""Prove that a refactor changed no number: every analytic output over a fixed grid, bit for bit.

    python benchmarks/refactor_equality.py --write benchmarks/data/equality-before.json.gz
    python benchmarks/refactor_equality.py --check benchmarks/data/equality-before.json.gz

The grid: one catalog model per family (11 families) × every quantization × every optimizer ×
checkpointing on/off × four (rank, batch, seq, dropout, targets, attention, int8
outlier fraction) points, on GPUs of three
generations (sm90, sm80, sm75) — 2,640 setups. For each setup it records the whole
``estimate(...).to_dict()`` (inputs, parameter counts, peak allocated/reserved/device total,
every ledger component, every moment, notes, step time and its components) and the sweep row
``loraplan sweep`` writes for the same case (the vectorized path). Floats go through JSON's
``repr`` round trip, so "equal" means bit-identical.

``--check`` exits 1 and lists the first differences when anything differs. Deliberate physics
changes since the file was written are listed in ``INTENDED`` (which setups, which fields, why);
``--check`` tolerates exactly those (``--strict`` does not). When numbers change again on
purpose, add an entry with the reason, in the same commit.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import sys
import warnings
from pathlib import Path

#: one catalog model per family with a shape rule
FAMILIES = {
    "llama": "llama-2-7b", "mistral": "mistral-7b", "qwen2": "qwen2.5-0.5b", "qwen3": "qwen3-0.6b",
    "gemma2": "gemma-2-2b", "phi3": "phi-3-mini-4k", "gpt_neox": "pythia-1b", "opt": "opt-6.7b",
    "falcon": "falcon-7b", "t5": "flan-t5-base", "mt5": "mt0-large",
}
QUANTS = ("bf16", "fp16", "fp32", "nf4", "fp4", "int8")
OPTIMIZERS = ("adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
#: (rank, batch, seq, target_seq, dropout, targets, attention, int8 outlier fraction)
POINTS = ((8, 1, 512, None, 0.05, None, "auto", None),
          (64, 4, 1024, 256, 0.0, "all-linear", "auto", None),
          (16, 2, 256, 512, 0.1, "all-linear,lm_head", "auto", 0.1),
          (256, 1, 2048, None, 0.05, None, "math", None))
GPUS = ("h100-sxm-80gb", "a100-sxm-80gb", "t4-16gb")


#: the memory figures of an estimate and its sweep row
_MEMORY_FIELDS = (r"\.(estimate\.(headroom_bytes|memory\.[\w .]+)|sweep_row\.(peak_allocated_bytes|peak_reserved_bytes|"
                  r"device_total_bytes|headroom_bytes|peak_moment))$")

#: the time figures of an estimate and its sweep row, and the time coefficients it echoes
TIME_FIELDS = (r"\.(estimate\.time\.(step_s|tokens_per_s|bound|components\.\w+)|sweep_row\.(step_s|tokens_per_s|bound)|"
               r"estimate\.calibration\.coefficients\.time_\w+)$")

#: deliberate changes since equality-before.json.gz: (why, models, quants, field-path regex[,
#: verdict]); models / quants None: any; a verdict: only setups that now get that fit verdict
INTENDED = (
    ("the time model bills each frozen Linear by its storage (loraplan.storage): Falcon's FalconLinear "
     "is not converted by bitsandbytes and runs fp32 matmuls; T5's wo (_keep_in_fp32_modules) is fp32",
     ("falcon-7b", "flan-t5-base", "mt0-large"), ("nf4", "fp4", "int8", "fp16"),
     r"\.(estimate\.time\.(step_s|tokens_per_s|bound|components\.\w+)|sweep_row\.(step_s|tokens_per_s|bound))$"),
    ("issue 14, T5 with unequal lengths: the decoder's cross-attention k/v LoRA branches read the encoder "
     "output (T_enc tokens, not T; modeling_t5.py T5Attention.forward), and a new moment, the top encoder "
     "layer's backward, sets the peak when the encoder is the longer stack (checked against the trace)",
     ("flan-t5-base", "mt0-large"), QUANTS, _MEMORY_FIELDS),
    ("issue 14, the T5 checkpointing residual: the top encoder layer's backward holds the residual gradient, "
     "not the encoder output's (final dropout and norm backward release it); T5LayerNorm's fp32 input is the "
     "checkpointed input; the self-attention bias needs no gradient (frozen relative_attention_bias), only the "
     "cross zeros bias under checkpointing; the encoder's final norm/output and T5's embedding leaves stay "
     "alive through the decoder backward; the top decoder layer's own LoRA gradients; and a new moment, "
     "'position bias': the int64 bucketing temporaries of compute_bias (49·s_e²) in the first encoder block "
     "(its recompute at the end of backward under checkpointing). Checked against the trace",
     ("flan-t5-base", "mt0-large"), QUANTS, _MEMORY_FIELDS),
    ("issue 14, gpt-neox: v is a view of the fused query_key_value output, so sdpa's saved v keeps all of it "
     "(modeling_gpt_neox.py chunk of a view); the two parallel LayerNorms save one input, counted once",
     ("pythia-1b",), QUANTS, _MEMORY_FIELDS),
    ("issue 14, sliding window: transformers builds the mask once seq >= window (masking_utils.py "
     "_ignore_causal_mask_sdpa), not only above it; with it each layer's sdpa saves an additive mask and "
     "k, v repeated to n_h heads (phi-3-mini's window is 2047: the seq-2048 points)",
     ("phi-3-mini-4k", "mistral-7b"), QUANTS, _MEMORY_FIELDS),
    ("issue 14, residual dropout (OPT, T5): the MLP branch's gradient made by the residual dropout's backward "
     "is consumed by the down projection's input-gradient matmul, so it is not alive at the MLP product's "
     "backward (transients.layer_backward_transients); OPT's 'layer backward' moment only, never its peak",
     ("opt-6.7b",), QUANTS, r"^\.estimate\.memory\.moments\.layer backward$"),
    ("a 'fits with paging' verdict carries the per-step paging time over the GPU's host link: a note and "
     "detail['paging'] (estimate.api._with_paging_cost)",
     None, None, r"^\.estimate\.(detail|memory\.notes)$", "fits with paging"),
    ("issue 16, the allocator-aware device total: peak reserved is the caching allocator's closed form "
     "(estimate/allocator_slack.py: the built model's segments replayed through the allocator rules + the "
     "step's segments, phi and phi_layer fitted on trace replays, data/reserved-slack.json) instead of "
     "allocated x 1.10; "
     "the CUDA context comes from published figures per module-loading mode (data/cuda-context.json) instead "
     "of a 0.75 GiB prior; the fit verdict's band uses their spreads (the closed form's: its largest "
     "under-prediction of the replays, one-sided); the plan fits 'fits with paging'. Peak "
     "allocated, every ledger line and every moment are unchanged",
     None, None, r"^\.(estimate\.(headroom_bytes|fits|verdict|margin_bytes|uncertainty_bytes|detail(\.[\w.]+)?|"
                 r"memory\.(peak_reserved_bytes|device_total_bytes|notes(\[\d+\])?|"
                 r"outside_allocator_bytes\.cuda_context_and_libraries))|"
                 r"sweep_row\.(peak_reserved_bytes|device_total_bytes|headroom_bytes|fits))$"),
    ("issue 12, the step-time model: GEMM / attention efficiencies are sourced priors per GPU generation "
     "(data/kernel-efficiency.json) priced by a roofline per kernel class, host and GPU combined by the "
     "CUDA-queue model over forward / backward / optimizer phases (estimate/time.py queue_time), host costs "
     "refitted on the H100 reference (benchmarks/fit_time_h100.py); time_eff_mm / time_eff_fp32 left "
     "calibrations/default.json (priors by generation now). Memory figures do not move",
     None, None, TIME_FIELDS),
    ("issue 14, phi-3 / phi-4: a fused gate_up_proj with LoRA sets the checkpointed top layer's peak in its "
     "recompute, at lora_B's scaled [T, 2I] output beside the base output (peft lora/layer.py Linear.forward; "
     "modeling_phi3.py Phi3MLP), with the down projection's first backward gradients and the layer's "
     "residual and MLP input alive (transients.layer_backward_transients; checked against the trace)",
     ("phi-3-mini-4k", "phi-3-medium-4k", "phi-4"), QUANTS, _MEMORY_FIELDS),
    ("issue 14, MoE step time: time.expert_work bills the router's GEMM (mlp.gate, a parameter run by "
     "F.linear: 2·T·h·E per MoE layer per pass), the remainder tests/test_work_counts.py found against the "
     "traced FLOPs (now exact for mixtral, qwen2_moe, qwen3_moe, olmoe)",
     ("mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b-0924"), QUANTS, TIME_FIELDS),
    ("issue 14, the layer-backward moment (checked against the trace, small configs at seq 1024): a "
     "score-matrix attention's (math sdpa, eager) backward runs after the MLP, the norms after the attention "
     "and the o_proj / MLP LoRA branches have released what they saved, and its stages are counted "
     "(attention dropout's, v released); an fp32-stream (or LayerNorm) input norm's recompute keeps the "
     "checkpointed input itself; the RoPE tables are alive; gemma2 holds a causal and a sliding eager mask; "
     "OPT's (and granite's) embedding leaf is kept apart from the first layer's input",
     ("llama-2-7b", "mistral-7b", "qwen2.5-0.5b", "qwen3-0.6b", "gemma-2-2b", "phi-3-mini-4k", "pythia-1b",
      "opt-6.7b", "falcon-7b"), QUANTS, _MEMORY_FIELDS),
    ("issue 14, T5/mT5 wide grid (int8, rank 256, unequal lengths): the decoder's int8 cross-attention k/v "
     "read the encoder output, one storage of T_enc tokens for every decoder layer (modeling_t5.py "
     "T5Stack.forward), and the kernel saves the cross- and encoder attention outputs anyway; without "
     "checkpointing the decoder's first layer input (the frozen embedding's output) needs no gradient, so "
     "that layer's norm, its q/k/v dropout masks and int8 ctx input are not kept; with checkpointing both "
     "stacks' embedding outputs and the cross zeros bias are grad-requiring leaves the graph keeps with "
     "their .grad; the top decoder layer peaks at its FFN backward (FFN and lm_head adapters' grads made, "
     "not the attention's); the encoder moment is the top or the bottom encoder layer's backward, "
     "whichever is larger (checked against the trace)",
     ("flan-t5-base", "mt0-large"), QUANTS, _MEMORY_FIELDS),
    ("issue 14, int8: the optimizer step (and a clipping norm) runs while the loop's loss still holds the "
     "step's graph, so MatMul8bitLt's ctx tensors (inputs, subA; bitsandbytes autograd/_functions.py) are "
     "alive then too (checked against the trace: llama int8 rank 256 to the byte); a non-peak moment in "
     "this grid for the decoder-only families",
     None, ("int8",), r"^\.estimate\.memory\.moments\.(optimizer step|grad norm)$"),
    ("issue 14, the layer-backward and loss-backward moments (checked against the trace: opt int8 without "
     "checkpointing, opt bf16 and gemma nf4 all-linear): int8 inputs autograd saves anyway (ReLU output, "
     "attention output) are one storage at every moment, not only the forward; the top layer's LoRA gradients "
     "arrive stage by stage (MLP-out first, then MLP-in and o_proj before the attention core, q/k/v last), so "
     "the moment is the largest of the MLP stage, a score-matrix core's stage and the layer's end instead of "
     "every gradient beside the MLP's peak; the down projection's recompute candidates only under "
     "checkpointing; OPT's ReLU output is the down projection's input; the residual dropout's gradient is gone "
     "at the sum of the down projection's input gradients",
     None, None, _MEMORY_FIELDS),
    ("issue 14, eager attention (gemma2's own eager path) without checkpointing: the first layer's q·kᵀ "
     "keeps q only for k's gradient (k_proj not adapted and the embedding output needs no grad: q is not "
     "saved); a single kv head over one row keeps k and v as views (repeat_kv, matmul reshape), and the "
     "score backward then carries v's n_h-head gradient (checked against the trace: llama, gemma3, granite, "
     "gemma2 within 0.02%)",
     ("gemma-2-2b",), None, _MEMORY_FIELDS),
    ("issue 12 review (1), the time prices the attention kernel the ledger resolved (Setup.attention): "
     "--attention auto resolving to sdpa's math kernel (fp32 stream with grouped-query heads, or below sm80) "
     "was priced as a fused kernel; the math kernel's bmms run at the fp32 rate and its score tensors are "
     "traffic (38 B per score element forward, 28 B backward, traced from aten _scaled_dot_product_attention_math), "
     "plus its q/k scaling, GQA repeat and ops; eager attention in an fp32 stream runs its matmuls at the fp32 rate",
     None, None, TIME_FIELDS),
    ("issue 12 review (3a), 'fits with paging' adds the paging seconds (reserved.paging_cost) to the step: "
     "bitsandbytes' paged optimizer prefetches and syncs per parameter on the compute stream",
     None, None, TIME_FIELDS, "fits with paging"),
    ("sdpa kernels from one rule set (estimate/sdpa.py, torch sdp_utils.cpp can_use_mem_efficient_attention): "
     "mem-efficient takes bf16 on sm80+ only (less_than_sm80_mem_efficient_dtypes = {Half, Float}), so a bf16 "
     "stream on the T4 (sm75) runs the math kernel, as the trace's emulation now does too",
     None, ("bf16",), _MEMORY_FIELDS + "|" + TIME_FIELDS + r"|\.estimate\.inputs\.attention_kernel$|"
     r"\.estimate\.(verdict|fit_\w+|max_\w+)$"),
)


#: keys added to the outputs since equality-before.json.gz (JSON stays backward compatible: keys
#: are only added): (why, field-path regex). Only "missing before" is tolerated for them; a key
#: that existed before and changed is still a difference.
ADDED = (
    ("the fit verdict against the model's uncertainty (Estimate.verdict, margin_bytes, "
     "uncertainty_bytes) and the uncertainty coefficients it reads from calibrations/default.json",
     r"^\.estimate\.(verdict|margin_bytes|uncertainty_bytes|calibration\.coefficients\."
     r"(peak_allocated_uncertainty_ratio|reserved_over_allocated_uncertainty|cuda_context_uncertainty_bytes))$"),
    ("issue 14, library versions are inputs: every estimate names the stack it assumes (inputs.stack: the "
     "installed versions, or --stack); no number moves with the installed versions",
     r"^\.estimate\.inputs\.stack$"),
    ("issue 11, the training stack is an input: every estimate names the recipe it assumes (trainer, "
     "mixed precision, dtypes, accumulation, clipping, checkpointing variant, attention, padding, loss), "
     "resolved from the trainer's defaults; under --trainer loop no number moves",
     r"^\.estimate\.inputs\.(trainer|mixed_precision|load_dtype|prepare_kbit|compute_dtype|adapter_dtype|"
     r"gradient_accumulation|max_grad_norm|reentrant|attn_implementation|padding|lengths|loss|"
     r"checkpoint_every_n_layers|checkpoint_offload)$"),
    ("issue 11, the recipe fields are sweep axes: every sweep row names the resolved recipe it was estimated "
     "with (the same values as the estimate's inputs)",
     r"^\.sweep_row\.(trainer|mixed_precision|load_dtype|prepare_kbit|compute_dtype|adapter_dtype|"
     r"gradient_accumulation|max_grad_norm|reentrant|attn_implementation|padding|lengths|loss|"
     r"checkpoint_every_n_layers|checkpoint_offload)$"),
    ("issue 13, the multi-GPU layout is an input: every estimate names its strategy and GPU count "
     "(single on one GPU: the one-GPU step, no number moves)",
     r"^\.estimate\.inputs\.(strategy|num_gpus|nodes|fsdp_sharding|fsdp_version|use_orig_params|quant_storage|"
     r"ram_efficient_loading|fsdp_backward_prefetch|deepspeed_buckets)$"),
    ("issue 13, the multi-GPU layout fields are sweep axes: every sweep row names its strategy and GPU count "
     "(single on one GPU: the one-GPU step, no number moves)",
     r"^\.sweep_row\.(strategy|num_gpus|nodes|fsdp_sharding|fsdp_version|use_orig_params|quant_storage|"
     r"ram_efficient_loading|fsdp_backward_prefetch|deepspeed_buckets)$"),
    ("issue 13, the per-GPU ledger and host RAM: memory.per_gpu (rank -> ledger; one GPU: {0: the components}) "
     "and memory.host_bytes / host_components (the load-time copy of the model, checkpoint offload); the "
     "top-level numbers are the worst rank's, on one GPU unchanged",
     r"^\.estimate\.memory\.(per_gpu|host_bytes|host_components)$"),
    ("issue 12 (host speeds, 9f0ebf6): the time's notes and its step range over the host speeds seen",
     r"^\.estimate\.time\.(notes|step_s_host_range)$"),
    ("issue 12 review: paging_s (the paging time added to a 'fits with paging' step), gpu_host_copy_s "
     "(checkpoint offload's host-link copies), and on GPUs without bf16 tensor cores the step with fp16 "
     "in place of emulated bf16 (step_s_fp16, fp16_option)",
     r"^\.estimate\.time\.(step_s_fp16|fp16_option|components\.(paging_s|gpu_host_copy_s))$"),
    ("issue 13 (Answer.AI's loop): how long a plain loop keeps the model output is an input "
     "(--loop-outputs; the default 'dropped' is the protocol's loop, no number moves)",
     r"^\.(estimate\.inputs|sweep_row)\.loop_outputs$"),
    ("issue 13 (accelerate's FSDP2 units): accelerate is a stack library (version rule accelerate_fsdp2_units); "
     "every estimate names its version beside the others'",
     r"^\.estimate\.inputs\.stack\.accelerate$"),
)


def is_added(path: str) -> bool:
    """True for a diff path that reports a key listed in ADDED as new ("missing before")."""
    import re

    field, _, what = path.partition(": ")
    m = re.match(r"\[\d+\](.*)", field)
    return what == "missing before" and bool(m) and any(re.search(rx, m.group(1)) for _, rx in ADDED)


def unintended(diffs: list[tuple[str, float]], setups: list[dict]) -> list[tuple[str, float]]:
    """The differences that no INTENDED entry explains (keys listed in ADDED may be new)."""
    import re

    diffs = [(p, r) for p, r in diffs if not is_added(p)]

    def explains(entry, setup, field) -> bool:
        _, models, quants, rx, *verdict = entry
        case = setup["case"]
        return ((models is None or case.get("model") in models) and (quants is None or case.get("quant") in quants)
                and (not verdict or setup["estimate"].get("verdict") == verdict[0]) and bool(re.search(rx, field)))

    out = []
    for path, rel in diffs:
        m = re.match(r"\[(\d+)\](.*)", path.split(":")[0])
        if not m or not any(explains(e, setups[int(m.group(1))], m.group(2)) for e in INTENDED):
            out.append((path, rel))
    return out


def cases() -> list[dict]:
    out = []
    for i, (model, quant, opt, gc, pt) in enumerate(itertools.product(
            FAMILIES.values(), QUANTS, OPTIMIZERS, (True, False), POINTS)):
        rank, batch, seq, tseq, dropout, targets, attention, frac = pt
        out.append({"model": model, "quant": quant, "double_quant": quant == "nf4", "rank": rank,
                    "alpha": None, "dropout": dropout, "targets": targets, "optimizer": opt,
                    "batch": batch, "seq": seq, "target_seq": tseq, "gradient_checkpointing": gc,
                    "attention": attention, "int8_outlier_fraction": frac, "gpu": GPUS[i % len(GPUS)]})
    return out


def _clean(v):
    """JSON-safe: numpy scalars to Python, NaN to the string 'nan' (JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def outputs() -> list[dict]:
    from loraplan.case import resolve_case
    from loraplan.catalog import load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.sweep import evaluate

    cs = cases()
    rows = list(evaluate(cs))
    out = []
    for case, row in zip(cs, rows):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, lora, train = resolve_case(case)
        e = estimate(model, lora, train, load_gpu(case["gpu"]))
        out.append({"case": case, "estimate": _clean(e.to_dict()), "sweep_row": _clean(row)})
    return out


def diff(a, b, path: str = "", rtol: float = 0.0) -> list[tuple[str, float]]:
    """(path, relative difference) where two JSON values differ; types must match, and floats
    differ when |a - b| > rtol·|a| (rtol 0: bit-identical). Non-float differences are inf."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append((f"{path}.{k}: {'missing before' if k not in a else 'missing after'}", math.inf))
            else:
                out += diff(a[k], b[k], f"{path}.{k}", rtol)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(f"{path}: length {len(a)} != {len(b)}", math.inf)]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]", rtol)]
    if isinstance(a, float) and isinstance(b, float) and a != b:
        rel = abs(a - b) / abs(a) if a else math.inf
        return [(f"{path}: {a!r} -> {b!r}", rel)] if rel > rtol else []
    if type(a) is not type(b) or a != b:
        return [(f"{path}: {a!r} -> {b!r}", math.inf)]
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="FILE", help="write the outputs (gzip JSON)")
    g.add_argument("--check", metavar="FILE", help="compare with a file written by --write")
    ap.add_argument("--float-rtol", type=float, default=0.0,
                    help="tolerated relative difference of floats (default 0: bit-identical)")
    ap.add_argument("--strict", action="store_true", help="do not tolerate the INTENDED changes")
    args = ap.parse_args(argv)
    now = outputs()
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(args.write, "wt") as f:
            json.dump(now, f, sort_keys=True)
        print(f"wrote {len(now)} setups to {args.write}")
        return 0
    with gzip.open(args.check, "rt") as f:
        before = json.load(f)
    # round-trip today's outputs through JSON too, so both sides have the same types
    now = json.loads(json.dumps(now, sort_keys=True))
    comps = sum(len(r["estimate"]["memory"]["components"]) for r in now)
    print(f"{len(now)} setups, {comps} ledger components, {len(now)} sweep rows compared")
    exact = diff(before, now)
    if not exact:
        print("identical: every peak, component, moment, note, step time and sweep row is bit-identical")
        return 0
    worst = max(rel for _, rel in exact)
    print(f"{len(exact)} values not bit-identical (largest relative difference {worst:.3g}); first 20:")
    print("\n".join(f"  {p}" for p, _ in exact[:20]))
    beyond = diff(before, now, rtol=args.float_rtol)
    if not args.strict:
        added = sum(1 for p, _ in beyond if is_added(p))
        explained = len(beyond) - added
        beyond = unintended(beyond, now)
        explained -= len(beyond)
        if added:
            print(f"{added} of them are new keys listed in ADDED (no existing value changed by them)")
        if explained:
            print(f"{explained} of them are the intended changes listed in INTENDED:")
            for why, models, quants, *_ in INTENDED:
                print(f"  - {', '.join(models or ['any model'])} × {', '.join(quants or ['any quant'])}: {why}")
    if beyond:
        print(f"DIFFERENT: {len(beyond)} values beyond --float-rtol {args.float_rtol:g}")
        return 1
    print(f"no unintended difference (floats within --float-rtol {args.float_rtol:g}; integers, strings and "
          f"booleans exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
