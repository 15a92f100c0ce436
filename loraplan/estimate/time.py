"""Step time of one LoRA/QLoRA training step: host (dispatch) time vs GPU time.

Model (shared/design/memory-physics.md §9 and "Step time"):

    gpu_s  = flops_mm / (peak_tflops · eff_mm) + flops_fp32 / (fp32_tflops · eff_fp32)
             + bytes / (bandwidth · eff_bw) + kernels · gpu_kernel_s
    host_s = (ops + module_calls) · host_op_s + lora_calls · host_lora_call_s
             + bnb4_calls · host_bnb4_call_s + int8_calls · host_int8_call_s + host_step_s
    step_s = max(host_s, gpu_s)            (the host runs ahead of the GPU and they overlap)
    step_s = host_s + gpu_s                (int8: MatMul8bitLt syncs on every call via argwhere)

Everything that depends only on the model, LoRA and training setup is counted once into a
:class:`StepWork` (FLOPs, bytes, ops, module calls, bitsandbytes calls); the GPU and the
calibration enter only in :func:`step_time`, a dot product. So one StepWork serves every GPU.

The coefficients (``time_*``) are read from the Calibration: fitted on the shared H100 step
times by ``benchmarks/fit_time_h100.py`` and written to ``catalog/calibrations/*.json``. The
code holds no hardware numbers; peak TFLOPs and bandwidth come from the GpuSpec.

Counting rules (per pass; a step has forward, backward and, with gradient checkpointing, a
recompute of each decoder layer's forward):

- Frozen Linear: forward 2·T·in·out FLOPs, input-grad 2·T·in·out, no weight grad (§9).
- LoRA (fp32 adapters, peft autocast_adapter_dtype=True): forward 2·T·r·(in+out), backward
  4·T·r·(in+out), at the fp32 rate (x is cast to lora_A's dtype; no autocast in the protocol).
- lm_head: 4·T·h·V; fp32 with a quantized base (prepare_model_for_kbit_training upcasts it).
- Attention (sdpa flash / mem-efficient, causal): forward 4·b·s²·n_h·d · ½ (causal blocks
  skipped), backward 2.5 × forward (FlashAttention-2 paper §3.1: backward recomputes the
  scores, 5 GEMMs vs 2). math / eager: full s² scores (no causal skipping) plus the s² score
  tensors' memory traffic.
- Dequantization is traffic, not FLOPs: nf4/fp4 read 0.5 B + absmax and write 2 B per weight
  each time a weight is used (forward, recompute, backward), then the matmul reads the 2 B.
  Double quantization adds one blockwise dequantization of the absmax (extra kernels).
- int8 (MatMul8bitLt): forward reads the int8 weight (1 B), quantizes the input; backward
  dequantizes the whole weight (1 B read, 2 B write) then a bf16 matmul.
- Optimizer: bytes of params + grads + states read and written once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from ..spec import Calibration, GpuSpec, LoraSpec, ModelSpec, TrainSpec
from ..targets import select_targets
from .result import TimeEstimate

# --------------------------------------------------------------------------------------------
# Scalar-or-array helpers: step_work / step_time take ints (one case) or numpy arrays of one
# shape for batch, seq, target_seq, rank and dropout (``loraplan sweep``: a whole grid at once).
# numpy is imported only when an array is given.
# --------------------------------------------------------------------------------------------


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float))


def _where(cond, a, b):
    if _is_scalar(cond):
        return a if cond else b
    import numpy as np

    return np.where(cond, a, b)


def _max(a, b):
    if _is_scalar(a) and _is_scalar(b):
        return max(a, b)
    import numpy as np

    return np.maximum(a, b)


def _min(a, b):
    if _is_scalar(a) and _is_scalar(b):
        return min(a, b)
    import numpy as np

    return np.minimum(a, b)


# --------------------------------------------------------------------------------------------
# Coefficient names (read with calibration.get(name, default)). The defaults are neutral
# placeholders used only when no calibration file provides a value; the catalog calibrations
# carry fitted values with provenance.
# --------------------------------------------------------------------------------------------
COEFFICIENTS: dict[str, tuple[float, str]] = {
    "time_eff_mm": (0.6, "achieved / dense peak for bf16/fp16 tensor-core matmuls"),
    "time_eff_fp32": (0.6, "achieved / peak for fp32 (non-tensor-core) matmuls: LoRA, fp32 lm_head"),
    "time_eff_bw": (0.7, "achieved / peak memory bandwidth for elementwise ops and weight streams"),
    "time_gpu_kernel_s": (3e-6, "minimum GPU time per kernel (launch gap + tail)"),
    "time_host_op_s": (1.5e-5, "host time per dispatched aten op or nn.Module call (forward or autograd node)"),
    "time_host_lora_call_s": (4e-4, "extra host time per peft LoRA module call (Python forward, adapter loop, casts)"),
    "time_host_bnb4_call_s": (2e-4, "extra host time per bitsandbytes 4-bit matmul call (Python, checks)"),
    "time_host_int8_call_s": (2e-4, "extra host time per bitsandbytes int8 matmul call"),
    "time_host_step_s": (5e-3, "fixed host time per step (loop, synchronize, optimizer bookkeeping)"),
}

#: ops (dispatched aten ops) per call of each piece, (forward, backward). Read from the
#: transformers/peft/bitsandbytes Python forward code; backward counts are autograd nodes
#: that launch work (views are free in backward).
OPS = {
    "rmsnorm": (8, 10),        # to(fp32), pow, mean, add eps, rsqrt, mul, to(dtype), mul weight
    "layernorm": (1, 1),       # native_layer_norm
    "linear": (2, 1),          # view/reshape + mm (bias in addmm); backward: grad-input mm
    "attn_rope": (23, 16),     # 3x view+transpose, cos/sin unsqueeze, 2x rotate_half (slice, slice,
                               # neg, cat) + mul, mul, add, sdpa, transpose, reshape
    "attn_norope": (9, 6),
    "mlp_gated": (2, 4),       # act(gate), mul up
    "mlp_plain": (1, 2),
    "residual": (2, 2),        # two residual adds; backward: grad accumulation at the branch
    "lora": (6, 8),            # cast x, dropout, A mm, B mm, mul scaling, add | mul, 2x2 mm, dropout, cast, add
    "bnb4": (4, 4),            # cast in, dequantize_4bit, mm, cast out (forward); dequantize, mm, casts (backward)
    "bnb4_double_quant": (2, 2),  # dequantize_blockwise(absmax) + add offset, each time a weight is dequantized
    "int8": (11, 5),           # cast, int8_vectorwise_quant, argwhere, int8 mm, mm_dequant, outlier mm, cast
    "model": (20, 6),          # embedding, rotary cos/sin, causal-mask helpers, final norm glue
    "loss": (8, 6),            # logits float(), shift/contiguous, view, log_softmax, nll_loss, mean
    "gc_layer": (6, 0),        # torch.utils.checkpoint bookkeeping per layer (non-reentrant, recompute)
}

#: optimizer ops per step: (fixed, per trainable tensor). torch foreach AdamW/SGD launch a few
#: multi-tensor kernels for all tensors; bitsandbytes 8-bit optimizers loop over parameters.
OPTIMIZER_OPS = {
    "adamw": (16, 0.1),
    "sgd": (4, 0.05),
    "adamw_8bit": (4, 3),
    "paged_adamw_8bit": (4, 4),
    "paged_adamw_32bit": (4, 4),
}

#: bytes read + written per trainable parameter by one optimizer step
#: adamw (foreach): read p, g, m, v; write p, m, v; sqrt temporary written and read (4 B x 2)
#: sgd: read p, g, write p; 8-bit: p, g fp32 + two uint8 states read and written + p write
OPTIMIZER_BYTES = {"adamw": 36, "sgd": 12, "adamw_8bit": 16, "paged_adamw_8bit": 16, "paged_adamw_32bit": 28}


@dataclass(frozen=True)
class StepWork:
    """What one training step does, independent of the GPU. All counts are per step.

    The numeric fields are numbers for one case, or numpy arrays when ``step_work`` was given
    arrays (those that do not depend on batch, sequence, rank or dropout stay numbers)."""

    tokens: Any            # int
    flops_mm: Any          # float: bf16/fp16 tensor-core matmul FLOPs (frozen linears, attention)
    flops_fp32: Any        # float: fp32 matmul FLOPs (LoRA adapters, fp32 lm_head)
    bytes_moved: Any       # float: memory traffic: weights, dequantization, elementwise, loss, optimizer
    kernels: Any           # float: GPU kernels launched
    ops: Any               # float: dispatched ops (host)
    module_calls: float    # nn.Module __call__ (host)
    lora_calls: float      # peft LoRA module calls (forward, recompute, backward)
    bnb4_calls: float      # bitsandbytes 4-bit matmul calls (forward, recompute, backward)
    int8_calls: float      # bitsandbytes int8 matmul calls
    mm_dtype: str          # dtype of the frozen matmuls: bf16 | fp16 | fp32
    syncs: bool            # host waits for the GPU inside the step (int8 argwhere)

    def features(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("mm_dtype", "syncs")}

    def take(self, index) -> "StepWork":
        """The work of a subset of an array-valued StepWork (``index``: numpy index or mask)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(getattr(self, f.name), "ndim", 0) > 0})


_GROUP_CACHE: dict = {}


def _linear_groups(model: ModelSpec, targets: tuple[str, ...]) -> dict[tuple, int]:
    """Linears grouped by (stack, is lm_head, in, out, adapted) -> count; cached per model + targets.

    Cached on the model object's identity (ModelSpec holds a dict, so it is not hashable); the
    cache keeps a reference to the model so the identity stays valid.
    """
    key = (id(model), targets)
    hit = _GROUP_CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    adapted = {l.name for l in select_targets(model, targets)}
    groups: dict[tuple, int] = {}
    for l in model.linears:
        k = (l.stack, l.role == "lm_head", l.in_features, l.out_features, l.name in adapted)
        groups[k] = groups.get(k, 0) + 1
    if len(_GROUP_CACHE) > 4096:
        _GROUP_CACHE.clear()
    _GROUP_CACHE[key] = (model, groups)
    return groups


def _passes(gc: bool) -> int:
    """Forward passes through the decoder layers: forward (+ recompute under checkpointing)."""
    return 2 if gc else 1


def _decoder_seq(model: ModelSpec, train: TrainSpec):
    """Decoder length: target_seq (or seq when unset / 0) for encoder-decoder models, else seq."""
    s, ts = train.seq, train.target_seq
    if not model.is_encoder_decoder or ts is None:
        return s
    return _where(ts != 0, ts, s) if not _is_scalar(ts) else (ts or s)


def step_work(model: ModelSpec, lora: LoraSpec, train: TrainSpec) -> StepWork:
    """Count FLOPs, bytes, ops and calls of one step (see the module docstring for the rules).

    ``train.batch``, ``train.seq``, ``train.target_seq``, ``lora.rank`` and ``lora.dropout`` may
    be numpy arrays of one shape: the counts are then arrays too, element for element equal to
    the counts of each case on its own."""
    quant = train.quant
    b, s = train.batch, train.seq
    s_dec = _decoder_seq(model, train)
    T_dec, T_enc = b * s_dec, b * s
    quantized = quant in ("nf4", "fp4", "int8")
    mm_dtype = quant if quant in ("bf16", "fp16", "fp32") else "bf16"
    a_mm = 4 if mm_dtype == "fp32" else 2
    # prepare_model_for_kbit_training makes embeddings/norms fp32: the residual stream is fp32
    a_stream = 4 if (quantized or quant == "fp32") else 2
    gc = bool(train.gradient_checkpointing)
    fw = _passes(gc)  # decoder forward passes

    groups = _linear_groups(model, lora.targets)
    r = lora.rank
    flops_mm = flops_fp32 = 0.0
    bytes_moved = 0.0
    ops = module_calls = 0.0
    bnb4 = int8 = lora_calls = 0.0
    n_lora_tensors = 0
    trainable = 0

    q_bytes = {"nf4": 0.5 + (1 / 64 + 4 / 16384 if train.double_quant else 4 / 64),
               "fp4": 0.5 + (1 / 64 + 4 / 16384 if train.double_quant else 4 / 64)}

    for (stack, head, fin, fout, is_adapted), count in groups.items():
        T = T_enc if stack == "encoder" else T_dec
        w = fin * fout
        npass_f = 1 if head else fw          # forward-type passes (forward + recompute)
        npass = npass_f + 1                  # + backward
        module_calls += count * (npass_f)
        if head:
            # lm_head stays in the load dtype; fp32 after prepare_model_for_kbit_training
            if quantized or quant == "fp32":
                flops_fp32 += count * (4.0 * T * w)
                bytes_moved += count * (2 * 4 * w)
            else:
                flops_mm += count * (4.0 * T * w)
                bytes_moved += count * (2 * a_mm * w)
            ops += count * (sum(OPS["linear"]))
        elif quant in ("nf4", "fp4"):
            flops_mm += count * (2.0 * T * w * npass)
            # dequantize: read packed + absmax, write bf16; matmul reads bf16
            bytes_moved += count * (npass * w * (q_bytes[quant] + 2 + 2))
            # bnb casts the (fp32) stream to bf16 and the output back
            bytes_moved += count * (npass * T * (fin + fout) * (a_stream + 2))
            bnb4 += count * (npass)
            ops += count * (npass_f * OPS["bnb4"][0] + OPS["bnb4"][1])
            if train.double_quant:
                ops += count * (npass_f * OPS["bnb4_double_quant"][0] + OPS["bnb4_double_quant"][1])
        elif quant == "int8":
            flops_mm += count * (2.0 * T * w * npass)
            bytes_moved += count * (npass_f * w * 1 + w * (1 + 2 + 2))
            bytes_moved += count * (npass * T * (fin + fout) * (a_stream + 2 + 1))
            int8 += count * (npass)
            ops += count * (npass_f * OPS["int8"][0] + OPS["int8"][1])
        else:
            flops_mm += count * (2.0 * T * w * npass)
            bytes_moved += count * (npass * w * a_mm)
            ops += count * (npass_f * OPS["linear"][0] + OPS["linear"][1])
        if is_adapted:
            p = r * (fin + fout)
            trainable += count * (p)
            n_lora_tensors += count * (2)
            flops_fp32 += count * ((2.0 * npass_f + 4.0) * T * p)
            # cast to fp32, dropout (read, write, 1 B mask), r-wide mids, fp32 output, scale, add
            elem_f = T * (fin * (a_stream + 4 + _where(lora.dropout > 0, 9, 0))
                          + 8 * r + fout * (4 + 8 + 3 * a_stream))
            bytes_moved += count * (elem_f * (npass_f + 2))  # backward moves about twice the forward's
            bytes_moved += count * (2 * 4 * p * npass)  # adapter weights read (fp32)
            lo_f, lo_b = OPS["lora"]
            ops += count * (npass_f * lo_f + lo_b - _where(lora.dropout > 0, 0, 2 * npass_f))
            module_calls += count * (npass_f * 4)  # base_layer, lora_A, lora_B, dropout (or Identity)
            lora_calls += count * (npass)

    # decoder (and encoder) layers: norms, attention, MLP elementwise, residuals
    stacks = [(model.num_layers, T_dec, s_dec)]
    if model.is_encoder_decoder and model.num_encoder_layers:
        stacks.append((model.num_encoder_layers, T_enc, s))
    h, I = model.hidden_size, model.intermediate_size
    n_h, n_kv, d = model.num_heads, model.num_kv_heads, model.head_dim
    arch = model.arch
    norms = arch.norms_per_layer + len(arch.extra_norms)
    norm_kind = "rmsnorm" if arch.norm == "rms" else "layernorm"
    attn_kind = "attn_rope" if arch.position == "rope" else "attn_norope"
    mlp_kind = "mlp_gated" if arch.mlp == "gated" else "mlp_plain"
    attention = train.attention
    eager = arch.attention == "eager" or attention in ("eager", "math")
    for n_layers, T, seq in stacks:
        if n_layers == 0:
            continue
        layer_f = norms * OPS[norm_kind][0] + OPS[attn_kind][0] + OPS[mlp_kind][0] + OPS["residual"][0]
        layer_b = norms * OPS[norm_kind][1] + OPS[attn_kind][1] + OPS[mlp_kind][1] + OPS["residual"][1]
        if eager:
            layer_f += 5  # matmul, scale, mask add, softmax, matmul (+ dropout off)
            layer_b += 5
        ops += n_layers * (fw * layer_f + layer_b + (OPS["gc_layer"][0] if gc else 0))
        # module calls per layer forward: layer, norms, attention, mlp, act (+ rotary)
        module_calls += n_layers * fw * (1 + norms + 1 + 1 + 1)
        # elementwise traffic per layer forward (bytes per element of the tensors touched)
        norm_b = (28 + 4 * a_stream) if arch.norm == "rms" else (8 + 2 * a_stream)
        elem = T * h * (norms * norm_b + 2 * 3 * a_stream)
        if arch.position == "rope":
            elem += T * (n_h + n_kv) * d * 16
        elem += T * (2 * n_h + 2 * n_kv) * d * 2 + T * n_h * d * 4  # sdpa I/O + transposes
        elem += T * I * (10 if arch.mlp == "gated" else 4)
        bytes_moved += n_layers * elem * (fw + 2)
        # attention FLOPs per layer: forward 4·b·s²·n_h·d (QK^T and PV), causal halves it
        s_eff = _min(seq, arch.sliding_window) if arch.sliding_window else seq
        fwd = 4.0 * (T // seq) * seq * s_eff * n_h * d
        if eager:
            flops_mm += n_layers * fwd * (fw + 2.0)
            # scores: written bf16, softmax fp32 read/write, read for PV; backward ~2x
            bytes_moved += n_layers * (T // seq) * n_h * seq * s_eff * (2 + 8 + 2) * (fw + 2)
        else:
            flops_mm += n_layers * fwd * 0.5 * (fw + 2.5)

    # embedding, final norm, logits and loss (HF ForCausalLM: logits.float() then cross_entropy)
    V = model.vocab_size
    ops += OPS["model"][0] + OPS["model"][1] + OPS["loss"][0] + OPS["loss"][1]
    module_calls += 4
    logits_fp32 = quantized or quant == "fp32"
    bytes_moved += T_dec * V * (32 if logits_fp32 else 40)
    bytes_moved += T_dec * h * (4 + a_stream)  # embedding gather

    # optimizer step
    opt = train.optimizer
    fixed, per = OPTIMIZER_OPS.get(opt, OPTIMIZER_OPS["adamw"])
    ops += fixed + per * n_lora_tensors
    bytes_moved += trainable * OPTIMIZER_BYTES.get(opt, 36)

    # kernels: every op that is not a pure view launches at least one kernel; views are about
    # a sixth of the forward ops of a layer (transposes/reshapes), so kernels ≈ ops here
    kernels = ops

    return StepWork(
        tokens=T_dec, flops_mm=flops_mm, flops_fp32=flops_fp32, bytes_moved=bytes_moved,
        kernels=kernels, ops=ops, module_calls=module_calls, lora_calls=lora_calls, bnb4_calls=bnb4, int8_calls=int8,
        mm_dtype=mm_dtype, syncs=int8 > 0,
    )


def _peak_mm_tflops(gpu: GpuSpec, dtype: str) -> float:
    return {"bf16": gpu.bf16_tflops, "fp16": gpu.fp16_tflops, "fp32": gpu.fp32_tflops}[dtype]


def coefficients(calibration: Calibration | None) -> dict[str, float]:
    """The time coefficients in effect: calibration values, else the neutral defaults."""
    if calibration is None:
        return {k: v for k, (v, _) in COEFFICIENTS.items()}
    return {k: calibration.get(k, v) for k, (v, _) in COEFFICIENTS.items()}


def step_time(work: StepWork, gpu: GpuSpec, coef: Mapping[str, float]) -> TimeEstimate:
    """Seconds per step on ``gpu`` for counted ``work``; components itemise the terms.

    An array-valued ``work`` gives array-valued seconds, tokens/s and ``bound`` (strings)."""
    compute_s = (work.flops_mm / (_peak_mm_tflops(gpu, work.mm_dtype) * 1e12 * coef["time_eff_mm"])
                 + work.flops_fp32 / (gpu.fp32_tflops * 1e12 * coef["time_eff_fp32"]))
    memory_s = work.bytes_moved / (gpu.bandwidth_gb_s * 1e9 * coef["time_eff_bw"])
    kernel_s = work.kernels * coef["time_gpu_kernel_s"]
    gpu_s = compute_s + memory_s + kernel_s
    host_ops_s = (work.ops + work.module_calls) * coef["time_host_op_s"]
    host_lora_s = work.lora_calls * coef["time_host_lora_call_s"]
    host_bnb_s = work.bnb4_calls * coef["time_host_bnb4_call_s"] + work.int8_calls * coef["time_host_int8_call_s"]
    host_s = host_ops_s + host_lora_s + host_bnb_s + coef["time_host_step_s"]
    if work.syncs:
        step = host_s + gpu_s
        bound = "host+gpu (int8 syncs)"
    else:
        step = _max(host_s, gpu_s)
        bound = _where(host_s >= gpu_s, "host", _where(compute_s >= memory_s + kernel_s, "compute", "memory"))
    comps = {
        "gpu_compute_s": compute_s, "gpu_memory_s": memory_s, "gpu_kernel_s": kernel_s, "gpu_s": gpu_s,
        "host_ops_s": host_ops_s, "host_lora_s": host_lora_s, "host_bnb_s": host_bnb_s, "host_step_s": coef["time_host_step_s"],
        "host_s": host_s,
    }
    if _is_scalar(step):
        tokens_per_s = work.tokens / step if step > 0 else 0.0
    else:
        import numpy as np

        with np.errstate(divide="ignore", invalid="ignore"):
            tokens_per_s = np.where(step > 0, work.tokens / step, 0.0)
        bound = np.broadcast_to(np.asarray(bound), np.shape(step))
    return TimeEstimate(step_s=step, tokens_per_s=tokens_per_s, components=comps, bound=bound)


def estimate_step_time(model: ModelSpec, lora: LoraSpec, train: TrainSpec, gpu: GpuSpec,
                       calibration: Calibration | None = None) -> TimeEstimate:
    """Predicted wall time of one training step (forward + backward + optimizer step)."""
    return step_time(step_work(model, lora, train), gpu, coefficients(calibration))
