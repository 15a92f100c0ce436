"""Why the peak is what it is, and what would lower it: ``explain()`` returns data, never text.

For one setup:

- **drivers**: the largest ledger lines at the peak moment, each with the setup's facts that
  make it that large (the residual stream's dtype, the attention kernel CUDA picks and why,
  the fp32 log-softmax at loss backward, LoRA dropout copies, int8's kept inputs, optimizer
  state at large ranks). Every number is read from the estimator's own functions
  (``loraplan.estimate.activations`` / ``transients`` / ``weights``) on the same setup.
- **levers**: single changes (gradient checkpointing, half the batch or sequence, another
  optimizer, quantization, attention kernel where valid, fewer targets, a smaller rank,
  dropout 0, and the recipe changes the trainer has: ``trainers.recipe_levers``, e.g. a chunked
  loss or bf16 autocast), each *re-estimated* with ``estimate()``; their saving is the difference of the
  two device totals, never a guess. Ranked by saving; each carries its fit verdict on the GPU.

Pure Python (no torch), like the estimator it reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .estimate.activations import (attention_saved_per_layer, checkpoint_inputs, layer_saved,
                                   lora_activations_per_layer, mlp_saved)
from .errors import LoraplanError
from .estimate.api import estimate
from .estimate.memory import make_setup
from .estimate.result import Estimate, ledger_labels
from .estimate.transients import default_int8_outlier_fraction, loss_backward_transient
from .spec import Calibration, GpuSpec, LoraSpec, ModelSpec, TrainSpec
from .storage import FOUR_BIT, QUANTIZED, Dtypes, effective_linear_quant, stream_dtype_bytes
from .targets import default_targets, resolve_targets, select_targets

#: a ledger line is explained when it holds at least this share of the peak (the largest always is)
DRIVER_MIN_SHARE = 0.05

_GiB = float(1 << 30)


@dataclass(frozen=True)
class Driver:
    """One large ledger line at the peak, and why it is that large (sentences from the setup)."""

    key: str
    label: str
    bytes: int
    share: float  # of peak allocated
    why: tuple[str, ...]


@dataclass(frozen=True)
class Lever:
    """One change, re-estimated: its device total, saving against the setup, and fit verdict."""

    change: str  # what changes, e.g. "gradient checkpointing on"
    option: str  # the CLI option(s) that make it
    peak_allocated_bytes: int
    device_total_bytes: int
    saving_bytes: int  # setup's device total - this one's (> 0)
    verdict: str | None  # Estimate.verdict on the GPU (None without one)
    margin_bytes: int | None
    step_s: float | None  # re-estimated step time (None without a GPU)
    note: str = ""


@dataclass(frozen=True)
class Explanation:
    estimate: Estimate
    facts: tuple[str, ...]  # the setup's facts that shape the ledger
    drivers: tuple[Driver, ...]
    levers: tuple[Lever, ...]
    rejected: tuple[str, ...] = field(default=())  # levers not offered, and why (invalid kernels, ...)

    @property
    def fitting_levers(self) -> tuple[Lever, ...]:
        return tuple(lv for lv in self.levers if lv.verdict in ("fits", "fits, within the uncertainty",
                                                                  "fits with paging"))

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "inputs": e.inputs, "gpu": e.gpu, "gpu_memory_bytes": e.gpu_memory_bytes,
            "peak_allocated_bytes": e.memory.peak_allocated_bytes, "peak_moment": e.memory.peak_moment,
            "moments": dict(e.memory.moments), "device_total_bytes": e.memory.device_total_bytes,
            "verdict": e.verdict, "margin_bytes": e.margin_bytes, "uncertainty_bytes": e.uncertainty_bytes,
            "headroom_bytes": e.headroom_bytes,
            "facts": list(self.facts),
            "drivers": [dict(asdict(d), why=list(d.why)) for d in self.drivers],
            "levers": [asdict(lv) for lv in self.levers],
            "rejected": list(self.rejected),
        }


# ---------------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    """Bytes as text, the unit chosen by size (explanations are read next to GiB tables)."""
    from .render import size

    return size(n)


def stream_fact(train: TrainSpec) -> str:
    """Why the residual stream has the dtype it has (``storage.Dtypes.stream``: the embeddings'
    dtype, promoted by autocast's block outputs)."""
    dt = Dtypes.of(train)
    s, size = dt.stream, {"fp32": 4, "bf16": 2, "fp16": 2}[dt.stream]
    if dt.prepare_kbit and dt.load != "fp32":
        why = (f"prepare_model_for_kbit_training upcasts the {dt.load} embeddings and norms to fp32"
               + (", and bitsandbytes Linears return their input's dtype" if train.quant in QUANTIZED else ""))
    elif dt.autocast and s != dt.unquantized:
        why = f"{dt.autocast} autocast blocks add into {dt.unquantized} embeddings (type promotion)"
    else:
        why = f"the embeddings are loaded in {dt.unquantized}"
    return f"the residual stream is {s} ({size} bytes per element): {why}"


def attention_reason(model: ModelSpec, train: TrainSpec, compute_capability: str | None) -> str:
    """Why ``choose_attention`` picks its kernel, from the same facts (activations.choose_attention)."""
    if train.attention != "auto":
        return f"attention runs on the {train.attention} kernel because --attention {train.attention} asks for it"
    from .trainers import resolve_recipe

    impl = resolve_recipe(train).attn_implementation
    if impl == "flash_attention_2":
        return "attention runs on flash-attn 2 (--attn-implementation flash_attention_2: its own kernel, GQA native)"
    if model.arch.attention == "eager" or impl == "eager":
        return ("attention is eager: " + ("--attn-implementation eager" if impl == "eager" else
                                          "this family's logit softcapping never reaches sdpa"))
    if train.device == "cpu":
        return "attention runs on sdpa's math kernel (the CPU path)"
    from .estimate.activations import choose_attention

    kind = choose_attention(model, train, compute_capability)
    why = valid_kernels(model, train, compute_capability)
    if kind == "flash":
        return "attention runs on the flash kernel (fp16/bf16 stream, head dim <= 256, sm80+, no mask)"
    reasons = []
    if train.padding != "max-length":
        from .estimate.sequences import batch_layout, explicit_mask

        if explicit_mask(batch_layout(train), model.model_type):
            reasons.append(f"--padding {train.padding} makes transformers pass an explicit "
                           f"{'padding' if train.padding == 'longest' else 'packed-sequence'} mask, which rules out flash")
    if "needs an fp16/bf16 stream" in why["flash"]:
        reasons.append(f"attention runs in {Dtypes.of(train).attention}" + (
            " after prepare_model_for_kbit_training" if train.quant in QUANTIZED else "") + " and flash needs fp16/bf16")
    said = {"", "needs an fp16/bf16 stream"} | ({"takes no mask"} if reasons else set())  # the padding line says it
    mask = ("a mask is passed (sliding window shorter than the sequence, a position bias, or an additive causal "
            "mask), which rules out flash")
    reasons += [mask if w == "takes no mask" else f"flash {w}" for w in why["flash"].split(", ") if w not in said]
    if kind == "math":
        return (f"attention runs on the math kernel because {'; '.join(reasons)}, and mem-efficient "
                f"{why['efficient']} in this torch" + (
                    f" ({model.num_heads} query / {model.num_kv_heads} key-value heads)"
                    if "grouped-query" in why["efficient"] else ""))
    return f"attention runs on the mem-efficient kernel because {'; '.join(reasons) or 'flash is not eligible'}"


def valid_kernels(model: ModelSpec, train: TrainSpec, compute_capability: str | None) -> dict[str, str]:
    """kernel -> "" when torch can run it for this setup, else why not: sdpa's kernels from
    ``estimate.activations.sdpa_kernel_refusals`` (the rules estimate and the trace use, torch
    sdp_utils.cpp), plus eager attention; a family whose attention is eager has only eager."""
    if model.arch.attention == "eager":
        return {"eager": ""}
    from .estimate.activations import sdpa_kernel_refusals

    return {**sdpa_kernel_refusals(model, train, compute_capability), "eager": ""}


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------


def _activation_why(setup, e: Estimate, cc) -> list[str]:
    st, x, train, kind = setup.structure, setup.shape, setup.train, setup.attention
    m = st.model
    moment = e.memory.peak_moment
    T = x.T
    out = []
    if train.gradient_checkpointing:
        ck = checkpoint_inputs(st, x, kind)
        out.append(f"gradient checkpointing keeps each layer's input: {m.num_layers} layers x "
                   f"{stream_dtype_bytes(Dtypes.of(train))} B x T={T:,} tokens x h={m.hidden_size} = {_gib(ck)}")
        if moment == "layer backward":
            out.append(f"at layer backward one layer is recomputed and saves {_gib(layer_saved(st, kind, x))}")
    else:
        S = layer_saved(st, kind, x)
        out.append(f"without gradient checkpointing every layer saves its tensors: {_gib(S)} per layer x "
                   f"{m.num_layers} layers")
    att = attention_saved_per_layer(st, kind, T, x.b, x.tseq, x.tseq, masked=x.masked, fa2_copies=x.fa2_copies)
    mlp = mlp_saved(st, T)
    lora = lora_activations_per_layer(st, x, "decoder", T)
    per = f"per layer: attention {_gib(att)}, MLP {_gib(mlp)}, LoRA inputs {_gib(lora)}"
    out.append(per)
    out.append(attention_reason(m, train, cc))
    if kind in ("math", "eager"):
        scores = 4 * x.b * m.num_heads * x.tseq * x.tseq
        out.append(f"{kind} attention keeps the fp32 softmax: 4 B x B·H·T² = 4 x {x.b} x {m.num_heads} x "
                   f"{x.tseq:,}² = {_gib(scores)} per layer")
    if x.dropout > 0 and st.lora_count_per_layer.get("decoder", 0):
        n = int(st.lora_count_per_layer.get("decoder", 0))
        out.append(f"LoRA dropout {x.dropout:g} keeps an fp32 copy of the input and a mask per adapted Linear "
                   f"({n} per layer): 5 B per input element")
    return out


#: what each per-GPU line of estimate.parallel holds (one line each; the module's docstring cites the sources)
_PARALLEL_WHY = {
    "gathered_params": "units all-gathered in full on top of this GPU's shard: FSDP's root (embeddings, lm_head) "
                       "from forward to the end of backward, the running decoder layer and its prefetched "
                       "neighbour; ZeRO-3's running layer plus its prefetch bucket",
    "all_gather_buffers": "FSDP2 all-gathers a unit into one flat buffer, then copies it out to the parameters",
    "reduce_scatter_buffers": "a layer's unsharded LoRA gradients on their way to reduce-scatter (FSDP), or "
                              "DeepSpeed's gradient bucket (reduce_bucket_size elements)",
    "ddp_buckets": "DDP's flat gradient buckets: a second copy of the trainable gradients "
                   "(gradient_as_bucket_view=False, the default)",
    "master_weights": "ZeRO keeps an fp32 copy of this rank's partition of the 16-bit adapters for the optimizer",
    "persistent_params": "ZeRO-3 keeps parameters below stage3_param_persistence_threshold whole on every rank "
                         "(LoRA matrices are small)",
    "quant_state": "4-bit absmax and code tables are attributes of each Params4bit, not parameters: FSDP and "
                   "ZeRO-3 cannot shard them, every GPU keeps them all",
}
_SHARDED = {"fsdp": ("frozen_linear_weights", "unquantized_weights", "expert_weights", "lora_weights", "lora_gradients",
                     "optimizer_state", "optimizer_temporaries"),
            "zero1": ("optimizer_state", "optimizer_temporaries"),
            "zero2": ("optimizer_state", "optimizer_temporaries", "lora_gradients"),
            "zero3": ("frozen_linear_weights", "unquantized_weights", "expert_weights", "lora_weights",
                      "lora_gradients", "optimizer_state", "optimizer_temporaries")}


def _parallel_why(key: str, train: TrainSpec) -> list[str]:
    """Several GPUs: what the engine does to ``key`` on one GPU (estimate.parallel)."""
    if train.strategy == "single":
        return []
    if key in _PARALLEL_WHY:
        return [_PARALLEL_WHY[key]]
    if key in _SHARDED.get(train.strategy.replace("-offload", ""), ()):
        return [f"sharded over {train.num_gpus} GPUs by {train.strategy}: this GPU holds 1/{train.num_gpus}"]
    if key == "activations" and train.strategy != "device-map":
        return [f"per GPU: each rank runs its own batch of {train.batch}; activations are never divided by the GPU count"]
    return []


def _why(key: str, setup, e: Estimate, model: ModelSpec, lora: LoraSpec, cc) -> list[str]:
    return _parallel_why(key, setup.loaded or setup.train) + _why_one_gpu(key, setup, e, model, lora, cc)


def _why_one_gpu(key: str, setup, e: Estimate, model: ModelSpec, lora: LoraSpec, cc) -> list[str]:
    st, x, train = setup.structure, setup.shape, setup.train
    comp = e.memory.components.get(key, 0)
    if key == "frozen_linear_weights":
        lq = effective_linear_quant(model, Dtypes.of(train))
        n = sum(li.numel for li in model.linears if li.stack != "head")
        per_gpu = " on this GPU" if train.strategy != "single" else ""
        base = f"{n / 1e9:.2f} B frozen Linear parameters stored as {lq}: {comp / max(n, 1):.2f} B per parameter{per_gpu}"
        if lq == "fp32" and train.quant in QUANTIZED:
            base += " (this family's Linears are not converted by bitsandbytes; they are upcast to fp32)"
        return [base]
    if key == "unquantized_weights":
        if Dtypes.of(train).unquantized == "fp32":
            return ["embeddings, norms and lm_head are fp32: prepare_model_for_kbit_training upcasts every "
                    "parameter a quantized base keeps unquantized" if train.quant in QUANTIZED else
                    "embeddings, norms and lm_head are fp32 (fp32 base)",
                    f"vocab {model.vocab_size:,} x hidden {model.hidden_size:,}"
                    + ("" if model.tie_word_embeddings else ", input and output embeddings separate")]
        return [f"embeddings, norms and lm_head in {train.quant}; vocab {model.vocab_size:,} x hidden "
                f"{model.hidden_size:,}"]
    if key == "activations":
        return _activation_why(setup, e, cc)
    if key == "logits_loss":
        if e.memory.peak_moment == "loss backward" and st.model.arch.loss_upcasts_logits:
            lb = loss_backward_transient(st, x)
            return [f"at loss backward the fp32 log-softmax and its gradients: 12 B x T·V = 12 x {x.T:,} x "
                    f"{model.vocab_size:,} = {_gib(lb)}"]
        return [f"the logits [T={x.T:,}, V={model.vocab_size:,}] and the loss's fp32 copies"]
    if key == "model_output":
        from .trainers import resolve_recipe

        until = "the next forward returns" if resolve_recipe(train).loop_outputs == "next-forward" else \
            "the micro-step ends"
        return [f"the loop binds the model's output (outputs = model(...)): its logits [T={x.T:,}, "
                f"V={model.vocab_size:,}] stay alive until {until}; `del outputs` after reading the loss "
                f"frees them (--loop-outputs dropped)"]
    if key in ("int8_previous_step", "kernel_transients"):
        f = train.int8_outlier_fraction
        f = default_int8_outlier_fraction(st, x.T) if f is None else f
        return ["LLM.int8 keeps each int8 Linear's input and its fp32 outlier columns for the whole step "
                f"(and the previous step's until its graph is freed); outlier fraction {f:.0%}"
                + (" (random-init default; set --int8-outlier-fraction)" if train.int8_outlier_fraction is None else "")]
    if key in ("optimizer_state", "optimizer_temporaries", "lora_gradients", "lora_weights"):
        p = e.params.trainable
        per = {"adamw": "AdamW: two fp32 moments, 8 B", "paged_adamw_32bit": "paged AdamW 32-bit: 8 B",
               "adamw_8bit": "8-bit AdamW: two 8-bit moments, ~2 B", "paged_adamw_8bit": "paged 8-bit AdamW: ~2 B",
               "sgd": "SGD: no state"}.get(train.optimizer, train.optimizer)
        return [f"{p:,} trainable LoRA parameters (r={lora.rank} on {e.params.adapted_modules} modules), fp32 "
                f"weights and gradients (4 B each); {per} per parameter"]
    if key == "backward_transients":
        return ["gradients flowing through the layer in backward, and the dequantized bf16 weight of the "
                "largest quantized Linear" if train.quant in QUANTIZED else
                "gradients flowing through the layer in backward"]
    if key == "cuda_workspaces":
        return ["one cuBLAS workspace per thread that runs matmuls (forward and autograd's thread)"]
    return []


def _drivers(setup, e: Estimate, model, lora, cc) -> tuple[Driver, ...]:
    comps = sorted(e.memory.components.items(), key=lambda kv: -kv[1])
    total = e.memory.peak_allocated_bytes or 1
    out = []
    labels = ledger_labels(e.memory.components, setup.train, model, e.memory.peak_moment)
    for i, (k, v) in enumerate(comps):
        if i and v / total < DRIVER_MIN_SHARE:
            break
        out.append(Driver(k, labels[k], int(v), v / total,
                          tuple(_why(k, setup, e, model, lora, cc))))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Levers
# ---------------------------------------------------------------------------------------------


def _candidates(model: ModelSpec, lora: LoraSpec, train: TrainSpec, cc) -> tuple[list, list[str]]:
    """(change, option, lora', train') for every single change worth re-estimating; and why some
    kernels are not offered."""
    c = []
    if not train.gradient_checkpointing:
        c.append(("gradient checkpointing on", "--gradient-checkpointing", lora,
                  replace(train, gradient_checkpointing=True)))
    if train.batch > 1:
        ga = train.gradient_accumulation * 2  # the same sequences per optimizer step (an odd batch: one fewer)
        c.append((f"half the micro-batch ({train.batch // 2}; accumulate gradients x{ga})",
                  f"--batch {train.batch // 2} --gradient-accumulation {ga}",
                  lora, replace(train, batch=train.batch // 2, gradient_accumulation=ga)))
    if train.seq > 1:
        c.append((f"half the sequence ({train.seq // 2} tokens)", f"--seq {train.seq // 2}", lora,
                  replace(train, seq=train.seq // 2)))
    for opt, what in (("adamw_8bit", "8-bit AdamW"), ("paged_adamw_8bit", "paged 8-bit AdamW"),
                      ("paged_adamw_32bit", "paged 32-bit AdamW")):
        if opt != train.optimizer:
            c.append((what, f"--optimizer {opt}", lora, replace(train, optimizer=opt)))
    quants = [("nf4", True, "4-bit base (nf4 + double quant)", "--quant nf4 --double-quant"),
              ("int8", False, "8-bit base (int8)", "--quant int8"),
              ("bf16", False, "bf16 base (no quantization)", "--quant bf16")]
    for q, dq, what, opt in quants:
        if q == train.quant and (q != "nf4" or train.double_quant):
            continue
        if q == "bf16" and train.quant in ("bf16", "fp16"):
            continue
        if q == "nf4" and train.quant == "fp4" and train.double_quant:
            continue
        c.append((what, opt, lora, replace(train, quant=q, double_quant=dq, int8_outlier_fraction=None)))
    rejected = []
    for kind, why_not in valid_kernels(model, train, cc).items():
        from .estimate.activations import choose_attention

        if kind == choose_attention(model, train, cc):
            continue
        if why_not:
            rejected.append(f"--attention {kind}: {kind} {why_not} here")
            continue
        c.append((f"{kind} attention kernel", f"--attention {kind}", lora, replace(train, attention=kind)))
    defaults = tuple(default_targets(model))
    wide = any(t.startswith("all-linear") for t in lora.targets or ()) or len(defaults) < len(lora.targets or ())
    if tuple(lora.targets or ()) != defaults and wide:
        c.append((f"fewer targets (PEFT's default: {','.join(defaults)})", f"--targets {','.join(defaults)}",
                  replace(lora, targets=defaults), train))
    elif lora.targets and len(lora.targets) > 1 and "all-linear" not in lora.targets:
        keep = lora.targets[: max(1, len(lora.targets) // 2)]
        c.append((f"fewer targets ({','.join(keep)})", f"--targets {','.join(keep)}", replace(lora, targets=keep), train))
    if lora.rank > 1:
        c.append((f"half the rank (r={lora.rank // 2})", f"--rank {lora.rank // 2}",
                  replace(lora, rank=lora.rank // 2, alpha=lora.alpha), train))
    if lora.dropout > 0:
        c.append(("LoRA dropout 0", "--dropout 0", replace(lora, dropout=0.0), train))
    from .trainers import recipe_levers

    # the recipe changes the trainer has (loss path, autocast, prepare_kbit, offload, FA2); each is
    # re-estimated below and offered only where the estimator says it saves memory
    c += [(what, opt, lora, t) for what, opt, t in recipe_levers(train)]
    return c, rejected


def explain(model: ModelSpec, lora: LoraSpec, train: TrainSpec, gpu: GpuSpec | None = None,
            calibration: Calibration | None = None) -> Explanation:
    """What dominates the peak of this setup and why; the levers that lower it, re-estimated."""
    from .catalog import load_calibration

    if lora.targets is None:
        lora = replace(lora, targets=tuple(resolve_targets(model, None)))
    cal = calibration or load_calibration(gpu.id if gpu else None)
    cc = gpu.compute_capability if gpu else "9.0"
    e = estimate(model, lora, train, gpu, cal)
    setup = make_setup(model, lora, train, select_targets(model, lora.targets), cc)
    # the estimate's warnings about this setup come first (e.g. MoE experts bitsandbytes leaves unquantized)
    from .trainers import recipe_summary

    facts = [n for n in e.memory.notes if n.startswith("WARNING")] + ["recipe: " + recipe_summary(e.inputs),
                                                                     stream_fact(train)]
    lq = effective_linear_quant(model, Dtypes.of(train))
    if train.quant in FOUR_BIT and lq == "fp32":
        facts.append(f"{model.model_type}: bitsandbytes does not convert this family's Linears; they stay "
                     f"unquantized and prepare_model_for_kbit_training upcasts them to fp32")
    moments = ", ".join(f"{k} {_gib(v)}" for k, v in e.memory.moments.items())
    facts.append(f"the peak is the largest moment of the step: {moments}")
    cands, rejected = _candidates(model, lora, train, cc)
    base = e.memory.device_total_bytes
    levers = []
    for change, option, lo, tr in cands:
        try:
            le = estimate(model, lo, tr, gpu, cal)
        except LoraplanError as exc:  # a change this model cannot take (e.g. targets): say so, offer nothing
            rejected.append(f"{option}: {exc}")
            continue
        saving = base - le.memory.device_total_bytes
        better_verdict = (gpu is not None and e.verdict != le.verdict
                          and _rank(le.verdict) < _rank(e.verdict))
        if saving <= 0 and not better_verdict:
            continue
        note = ""
        if tr.optimizer.startswith("paged") and le.memory.outside_allocator_bytes.get("paged_optimizer_state"):
            note = "state above 1e5 elements in managed memory, evictable"
        if tr.attention != train.attention and tr.attention != "auto":
            note = "valid for this setup; differs from what the protocol's sdpa picks"
        if tr.batch != train.batch:
            note = "same tokens per optimizer step with twice the gradient accumulation"
        levers.append(Lever(change, option, le.memory.peak_allocated_bytes, le.memory.device_total_bytes, saving,
                            le.verdict, le.margin_bytes, le.time.step_s if le.time else None, note))
    levers.sort(key=lambda lv: (-lv.saving_bytes, lv.change))
    return Explanation(e, tuple(facts), _drivers(setup, e, model, lora, cc), tuple(levers), tuple(rejected))


def _rank(verdict: str | None) -> int:
    from .estimate.result import VERDICTS

    return VERDICTS.index(verdict) if verdict in VERDICTS else len(VERDICTS)
