"""Step time of one LoRA/QLoRA training step: GPU time by kernel class, host time by call, and
the CUDA queue that overlaps them (issue 12; shared/design/memory-physics.md "Step time").

Kernel classes (the vocabulary the trace-side counts of ``trace/counts.py`` compare with):

==================  =======================================  ===================================================
class               StepWork counts                          GPU seconds (``gpu_seconds``)
==================  =======================================  ===================================================
gemm (half)         flops_mm − flops_attn, bytes_gemm        max(FLOPs / (peak(mm_dtype) · eff_mm),
                    (frozen Linears, lm_head, LoRA under               bytes_gemm / (bandwidth · eff_bw))
                    autocast, MoE experts; in an fp32 run
                    the fp32 peak and eff_fp32)
attention           flops_attn (the fused kernels the ledger  flops_attn / (peak(mm_dtype) · eff_attn)
                    resolved: sdpa flash / mem-efficient,
                    FA2; eager and sdpa's math kernel are
                    gemm + memory)
gemm (fp32)         flops_fp32 (fp32 LoRA without autocast,  flops_fp32 / (fp32 peak · eff_fp32)
                    fp32 lm_head, T5's wo, Falcon's Linears,
                    fp32 experts, math attention's bmms)
memory              bytes_moved − bytes_gemm (elementwise,   bytes / (bandwidth · eff_bw)
                    dequantization, casts, loss, optimizer,
                    math / eager attention's scores)
kernel              kernels (≈ ops)                          kernels · time_gpu_kernel_s
host copy           bytes_host (checkpoint offload's         bytes_host / host link line rate
                    copies on the compute stream)            (data/host-links.json)
host                ops + module_calls, lora_calls,          Σ count · per-call cost / time_host_speed
                    bnb4_calls, int8_calls, gc_hooks
==================  =======================================  ===================================================

eff_mm / eff_fp32 / eff_attn are sourced priors per GPU generation (data/kernel-efficiency.json,
``estimate.efficiency``: MAMF matmul measurements, the FlashAttention-2 paper), overridden only by
a calibration that sets them; eff_bw is a sourced streaming-bandwidth prior and the host costs are
fitted on the H100 reference (catalog/calibrations/default.json, benchmarks/fit_time_h100.py, with
what pinned each). The code holds no hardware numbers; peaks come from the GpuSpec.

Host and GPU overlap (``queue_time``): the step is a sequence of phases, per micro-step its
first forward pass (``StepWork.forward``) and the rest (backward with any recompute), then the
optimizer (``StepWork.optimizer``); the host enqueues kernels that the GPU runs in order, so a
phase where the host leads leaves the GPU idle and a phase where the GPU leads hides the host.
Syncs make the host wait for the GPU: the Trainer's ``grad_norm.item()`` before the optimizer,
SFTTrainer's metrics after each forward. The result lies between max(host, gpu) and host + gpu.
int8 (MatMul8bitLt's argwhere syncs on every call): host + gpu.

Everything that depends only on the model, LoRA and training setup is counted once into a
:class:`StepWork`; the GPU and the calibration enter only in :func:`step_time`. So one StepWork
serves every GPU.

Each term is one function (``frozen_linear_work``, ``lm_head_work``, ``lora_work``,
``layer_host_work``, ``layer_elementwise_work``, ``attention_work``, ``loss_work``,
``embedding_work``, ``optimizer_work``, ``kernel_count``) whose docstring gives its formula and
source; the bytes/ops per element each library's code moves are named constants below. The
terms return their increments in order and ``step_work`` adds them in one loop, so the
floating-point sums keep one order. Storage rules (what is quantized, fp32, the stream and
adapter dtypes) come from ``loraplan.storage``.

Counting rules (per pass; a step has forward, backward and, with gradient checkpointing, a
recompute of each decoder layer's forward):

- Frozen Linear: forward 2·T·in·out FLOPs, input-grad 2·T·in·out, no weight grad (§9); billed
  by how it is stored (``storage.linear_storage``): Falcon's Linears stay fp32 under
  bitsandbytes (no bnb calls), T5's ``wo`` is fp32 under nf4/fp4/int8/fp16.
- LoRA (fp32 adapters, peft autocast_adapter_dtype=True): forward 2·T·r·(in+out), backward
  4·T·r·(in+out), at the fp32 rate (x is cast to lora_A's dtype; no autocast in the protocol).
- lm_head: 4·T·h·V; fp32 with a quantized base (prepare_model_for_kbit_training upcasts it).
  trl's fused chunked LM head (``--loss chunked``) replaces lm_head and the loss: 6·N·h·V
  (``fused_head_work``: the projection is recomputed in backward).
- Attention (sdpa flash / mem-efficient, causal): forward 4·b·s²·n_h·d · ½ (causal blocks
  skipped), backward 2.5 × forward (FlashAttention-2 paper §3.1: backward recomputes the
  scores, 5 GEMMs vs 2). math / eager: full s² scores (no causal skipping) plus the s² score
  tensors' memory traffic.
- Sequence handling (``padding`` other than max-length; ``estimate.sequences``): every per-token
  term counts the expected batch's processed tokens (longest: b·E[max of b lengths];
  padding-free: b·E[length]); attention counts query-key pairs per row or, for varlen
  flash_attention_2, per document (``sequences.attention_span``), with no causal skipping under
  an explicit mask; tokens/s counts real (non-pad) tokens.
- Dequantization is traffic, not FLOPs: nf4/fp4 read 0.5 B + absmax and write 2 B per weight
  each time a weight is used (forward, recompute, backward), then the matmul reads the 2 B.
  Double quantization adds one blockwise dequantization of the absmax (extra kernels).
- int8 (MatMul8bitLt): forward reads the int8 weight (1 B), quantizes the input; backward
  dequantizes the whole weight (1 B read, 2 B write) then a bf16 matmul.
- Optimizer: bytes of params + grads + states read and written once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any, Mapping

from ..spec import Calibration, GpuSpec, LoraSpec, ModelSpec, TrainSpec
from ..storage import FOUR_BIT, Dtypes, dtype_bytes, linear_storage, lm_head_fp32
from ..targets import select_targets
from .arrays import is_scalar as _is_scalar, maximum as _max, minimum as _min, where as _where
from .steps import step_recipe
from .coefficients import coefficient, default_calibration
from .result import TimeEstimate

# --------------------------------------------------------------------------------------------
# Coefficient names. Their values live in catalog/calibrations/default.json (fitted on the H100
# reference by benchmarks/fit_time_h100.py, with provenance); a GPU's or a user's calibration
# file may override them. The code holds no value.
# --------------------------------------------------------------------------------------------
COEFFICIENTS: dict[str, str] = {
    "time_eff_mm": "achieved / dense peak for bf16/fp16 tensor-core matmuls",
    "time_eff_fp32": "achieved / peak for fp32 (non-tensor-core) matmuls: LoRA, fp32 lm_head",
    "time_eff_bw": "achieved / peak memory bandwidth for elementwise ops and weight streams",
    "time_gpu_kernel_s": "minimum GPU time per kernel (launch gap + tail)",
    "time_host_op_s": "host time per dispatched aten op or nn.Module call (forward or autograd node)",
    "time_host_lora_call_s": "extra host time per peft LoRA module call (Python forward, adapter loop, casts)",
    "time_host_bnb4_call_s": "extra host time per bitsandbytes 4-bit matmul call (Python, checks)",
    "time_host_int8_call_s": "extra host time per bitsandbytes int8 matmul call",
    "time_host_step_s": "fixed host time per step (loop, synchronize, optimizer bookkeeping)",
    "time_host_gc_hook_s": "host time per Python saved-tensor hook call of non-reentrant gradient checkpointing",
    "time_host_speed": "host speed relative to the reference host (the H100 reference's CPU): host costs are divided by it",
    "time_eff_attn": "achieved / dense peak for fused attention (FlashAttention-2 class) forward + backward",
}
#: efficiencies with sourced per-generation priors (data/kernel-efficiency.json, estimate.efficiency):
#: a calibration may set them (fitted on GPU-bound records of its GPU); default.json does not
EFFICIENCY_COEFFICIENTS = ("time_eff_mm", "time_eff_fp32", "time_eff_attn")

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



# --------------------------------------------------------------------------------------------
# Named constants of the counting rules (what the code of each library does per call)
# --------------------------------------------------------------------------------------------

#: FLOPs of a matmul per multiply-add
FLOPS_PER_MAC = 2.0
#: passes of a frozen Linear's forward work in its backward: the input-gradient GEMM only, no
#: weight gradient (memory-physics.md §9): forward 2, backward 2 FLOPs per weight per token
FROZEN_BACKWARD_PASSES = 1
#: LoRA backward FLOPs per parameter per token: input grad + weight grad GEMMs, 2 + 2 (§9)
LORA_BACKWARD_FLOPS = 4.0
#: bytes per weight element a 4-bit dequantization moves besides the packed weight: writes the
#: bf16 weight (2 B), then the matmul reads it (2 B) (bitsandbytes backends/cuda/ops.py
#: ``_dequant_linear_fallback``: dequantize_4bit, then torch.nn.functional.linear)
DEQUANT4_BF16_BYTES = 2 + 2
#: bytes per element of the bf16 copy bitsandbytes makes of a 4-bit Linear's input and output
#: (Linear4bit.forward casts x to ``compute_dtype`` and the output back)
BNB_COMPUTE_BYTES = 2
#: int8 backward dequantizes the whole weight: reads CB (1 B), writes it in the input dtype
#: (2 B), then the matmul reads it (2 B) (bitsandbytes autograd MatMul8bitLt.backward)
INT8_BACKWARD_WEIGHT_BYTES = 1 + 2 + 2
#: int8 per activation element besides the stream: the fp16 cast (2 B) and the int8 quantized
#: copy (1 B) (``int8_vectorwise_quant(A.to(fp16))``)
INT8_ACTIVATION_BYTES = 2 + 1
#: a dtype cast (``Tensor.to``) before an fp32 Linear that gets a half input
CAST_OPS = 1
#: LoRA per adapted-input element: dropout read + write + the 1-byte mask (4 + 4 + 1)
LORA_DROPOUT_BYTES = 9
#: LoRA per r-wide intermediate element: fp32 written and read (4 + 4)
LORA_MID_BYTES = 8
#: LoRA per output element: fp32 lora_B output (4), its scaled copy written and read (8), and
#: three stream-dtype tensors (the base output read, the sum written and read)
LORA_OUT_FP32_BYTES = 4 + 8
LORA_OUT_STREAM_TENSORS = 3
#: backward moves about twice the forward's elementwise traffic (the gradient of each input and
#: the saved tensors are read): a LoRA branch and a layer's elementwise ops bill forward passes + 2
BACKWARD_TRAFFIC_OVER_FORWARD = 2
#: a norm's traffic per element: RMSNorm (fp32 upcast, pow, mean, rsqrt, two muls, cast: 28 B
#: fixed + 4 reads/writes in the stream dtype); LayerNorm (one fused kernel: 8 B + 2 in the stream dtype)
RMSNORM_BYTES = (28, 4)
LAYERNORM_BYTES = (8, 2)
#: residual adds per layer (2), each reading two stream tensors and writing one (3)
RESIDUAL_TENSORS = 2 * 3
#: RoPE per q/k element: cos/sin reads, rotate_half (slices, neg, cat), muls and add: 16 B
ROPE_BYTES = 16
#: sdpa I/O per q, k, v and output element in bf16 (2 B) and the transposes around it (4 B per
#: output element)
SDPA_IO_BYTES = 2
SDPA_TRANSPOSE_BYTES = 4
#: MLP elementwise per intermediate element: gated (act(gate) read/write, the product's two
#: reads and write: 10 B); plain (activation read and write: 4 B)
MLP_GATED_BYTES = 10
MLP_PLAIN_BYTES = 4
#: attention FLOPs per layer forward: 4·b·s·s_kv·n_h·d (QKᵀ and PV, 2 FLOPs per MAC each)
ATTENTION_FLOPS = 4.0
#: causal flash / mem-efficient attention skip the masked blocks: about half the forward
CAUSAL_FRACTION = 0.5
#: flash backward over forward: 2.5 (FlashAttention-2 paper §3.1: backward recomputes the
#: scores, 5 GEMMs vs 2)
FLASH_BACKWARD_OVER_FORWARD = 2.5
#: eager / math attention backward over forward (no causal skipping, no recompute): 2
EAGER_BACKWARD_OVER_FORWARD = 2.0
#: eager attention: ops per layer forward (and backward) beyond sdpa's: matmul, scale, mask
#: add, softmax, matmul (transformers eager_attention_forward)
EAGER_EXTRA_OPS = 5
#: eager score traffic per element besides the two writes/reads in the attention dtype a (the
#: scores written, the probabilities read for PV): the fp32 softmax read and written (8):
#: 2·a + 8 per element per pass (12 B for bf16)
EAGER_SOFTMAX_BYTES = 8
#: sdpa's math kernel (torch ``aten._scaled_dot_product_attention_math``, CompositeImplicitAutograd:
#: its ops traced on the meta device under a TorchDispatchMode, torch 2.13) computes in fp32 (half
#: inputs are upcast unless ``allow_fp16_bf16_reduction_math_sdp``), bytes per score element
#: b·n_h·s·s_kv (4 B each), no causal skipping. Forward: bmm writes the scores (4), the causal
#: mask add reads and writes them (8), ``_safe_softmax`` (torch/_decomp/decompositions.py::
#: safe_softmax: softmax read + write 8, ``eq(-inf)`` read 4 + bool write 1, ``all`` reads the
#: bool 1, ``where`` reads the softmax and writes 8), the PV bmm reads the probabilities (4): 38.
#: Backward: the dV bmm reads P (4), the dP bmm writes dP (4), ``_softmax_backward_data`` reads dP
#: and P and writes dS (12), the dQ and dK bmms read dS (8): 28
MATH_SCORE_BYTES = (4 + 8 + 8 + 5 + 1 + 8 + 4, 4 + 4 + 12 + 8)
#: with attention dropout p > 0 (``at::dropout`` on the softmax output): forward reads P, writes
#: the dropped copy and its 1-byte mask (9); backward reads the gradient and the mask and writes (9)
MATH_DROPOUT_BYTES = (9, 9)
#: the math kernel's per-token traffic per head element, fp32: q and k scaled by √scale (read +
#: write 8 each) forward and their gradients scaled backward; with grouped-query heads
#: (``enable_gqa``) k and v are repeated to n_h heads (``repeat_interleave``: read n_kv, write
#: n_h) and their gradients summed back (read n_h, write n_kv): 4·(n_h + n_kv) per k and v
MATH_SCALE_BYTES = 2 * 8
#: kernels of the math kernel per layer beyond sdpa's one op (traced as above): forward mul(q),
#: ones, tril, where (the causal mask), mul(k), bmm, add, softmax, eq, all, zeros_like, where,
#: bmm: 13 - 1; backward bmm x2, softmax backward, bmm x2, mul x2: 7 - 1; grouped-query heads add
#: the two k/v copies forward and the two head sums backward
MATH_EXTRA_OPS = (12, 6)
MATH_GQA_OPS = (2, 2)
#: the attention kernels that materialise the s² scores (no fused kernel)
UNFUSED_ATTENTION = ("eager", "math")
#: module calls per layer forward: the layer, its norms (added separately), attention, MLP, activation
LAYER_MODULE_CALLS = 1 + 1 + 1 + 1
#: module calls of the model outside its layers: embedding, final norm, lm_head glue, loss
MODEL_MODULE_CALLS = 4
#: logits and loss traffic per logit (T·V): fp32 logits: the loss's log_softmax written and
#: read, nll and their gradients (32 B); bf16 logits add the ``logits.float()`` copy (40 B)
#: (transformers loss/loss_utils.py::ForCausalLMLoss)
#: A vocabulary row (>= 32k fp32 logits, 128 KiB+) does not fit a block's shared memory, so torch
#: runs the global-memory kernels (aten/src/ATen/native/cuda/SoftMax.cu ``cunn_SoftMaxForward``:
#: a max pass, a sum-of-exp pass and the epilogue pass each read the row, ``cunn_SoftMaxForwardSmem``
#: being the one that caches it; ``cunn_SoftMaxBackward`` reads the gradient for its sum, then the
#: gradient and the output): log_softmax forward reads the row 2 more times and its backward the
#: gradient once more than the counts above, 4 B each: + 12 B per logit
SOFTMAX_EXTRA_READ_BYTES = 3 * 4
LOSS_BYTES_FP32_LOGITS = 32 + SOFTMAX_EXTRA_READ_BYTES
LOSS_BYTES_HALF_LOGITS = 40 + SOFTMAX_EXTRA_READ_BYTES
#: non-reentrant gradient checkpointing (torch/utils/checkpoint.py ``_checkpoint_hook`` and
#: ``_recomputation_hook``) runs a Python hook per saved tensor three times: pack in the forward
#: (a ``_Holder``), pack in the recompute (stores the recomputed tensor in the holder), unpack in
#: the backward. Saved tensors per decoder layer forward, counted by running a llama / qwen2 layer
#: under ``torch.autograd.graph.saved_tensors_hooks`` (transformers 5.24, peft 0.21, bitsandbytes
#: 0.50; llama and qwen2 give the same counts): 15 with bf16/fp16/fp32 frozen Linears, 11 with
#: bitsandbytes ones (MatMul4Bit / MatMul8bitLt keep their tensors in ``ctx.tensors``, no hook:
#: bitsandbytes autograd/_functions.py), checked by tests/test_host_costs.py on the real layer;
#: and 5 more per peft LoRA Linear (dropout mask and input, lora_A input, lora_B input, scaling)
GC_HOOKS_PER_SAVED = 3
GC_SAVED_PER_LAYER = {"half": 15, "bnb": 11}
GC_SAVED_PER_LORA = 5
#: embedding gather per hidden element: the fp32 index/gradient scatter (4 B) + the output
EMBEDDING_BYTES = 4


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
    lora_calls: float      # peft LoRA Python forward calls (forward, recompute; backward is autograd's C++)
    bnb4_calls: float      # bitsandbytes 4-bit matmul calls (forward, recompute, backward)
    int8_calls: float      # bitsandbytes int8 matmul calls
    mm_dtype: str          # dtype of the frozen matmuls: bf16 | fp16 | fp32
    syncs: bool            # host waits for the GPU inside the step (int8 argwhere)
    flops_attn: Any = 0.0  # float: of flops_mm, fused attention kernels (sdpa flash / mem-efficient, FA2)
    bytes_gemm: Any = 0.0  # float: of bytes_moved, weight bytes the half-precision GEMMs read (roofline)
    micro_steps: int = 1   # forward + backward passes per optimizer step (gradient accumulation)
    sync_after_forward: bool = False    # the trainer reads a value after each forward (trl's metrics .item())
    sync_before_optimizer: bool = False  # the trainer reads the gradient norm (Trainer's grad_norm.item())
    forward: "StepWork | None" = None    # the counts of the first forward pass of the micro-steps
    optimizer: "StepWork | None" = None  # the counts of the optimizer step (and the gradient norm)
    gc_hooks: Any = 0.0    # float: gradient checkpointing's Python saved-tensor hook calls (host)
    bytes_host: Any = 0.0  # float: bytes copied over the host link on the compute stream (checkpoint offload)

    def features(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_FEATURES}

    def take(self, index) -> "StepWork":
        """The work of a subset of an array-valued StepWork (``index``: numpy index or mask)."""
        out = {f.name: getattr(self, f.name)[index] for f in fields(self)
               if getattr(getattr(self, f.name), "ndim", 0) > 0}
        for part in ("forward", "optimizer"):
            if getattr(self, part) is not None:
                out[part] = getattr(self, part).take(index)
        return replace(self, **out)


#: StepWork fields that are not counts
_NOT_FEATURES = ("mm_dtype", "syncs", "micro_steps", "sync_after_forward", "sync_before_optimizer",
                 "forward", "optimizer")


_GROUP_CACHE: dict = {}


def _linear_groups(model: ModelSpec, targets: tuple[str, ...], quant) -> dict[tuple, int]:
    """Linears grouped by (stack, is lm_head, in, out, adapted, storage) -> count; cached per
    model + targets + quantization. ``storage``: how the frozen Linear is stored
    (``storage.linear_storage``; None for lm_head, billed by ``lm_head_work``).

    Cached on the model object's identity (ModelSpec holds a dict, so it is not hashable); the
    cache keeps a reference to the model so the identity stays valid.
    """
    key = (id(model), targets, quant)
    hit = _GROUP_CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    adapted = {l.name for l in select_targets(model, targets)}
    groups: dict[tuple, int] = {}
    for l in model.linears:
        head = l.role == "lm_head"
        k = (l.stack, head, l.in_features, l.out_features, l.name in adapted,
             None if head else linear_storage(model, quant, l))
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


# --------------------------------------------------------------------------------------------
# One function per term. Each returns its increments as (StepWork field, amount) pairs, in the
# order the single loop of ``step_work`` adds them: the floating-point sums stay in one order.
# --------------------------------------------------------------------------------------------


def four_bit_weight_bytes(double_quant: bool) -> float:
    """Bytes per weight a 4-bit dequantization reads: packed 0.5 B + absmax fp32 per 64-block
    (4/64), or with double quant uint8 absmax per block + fp32 nested absmax per 256 blocks
    (1/64 + 4/16384) (bitsandbytes functional.py::quantize_4bit; memory-physics.md §1)."""
    return 0.5 + (1 / 64 + 4 / 16384 if double_quant else 4 / 64)


def frozen_linear_work(storage: str, count: int, T, fin: int, fout: int, npass_f: int, a_stream: int,
                       mm_dtype: str, double_quant: bool, autocast: str | None = None,
                       compute: str = "bf16") -> list[tuple[str, Any]]:
    """A group of ``count`` frozen [fout, fin] Linears stored as ``storage``, over a step.

    FLOPs: 2·T·in·out per pass, passes = forward (+ recompute) + backward's input-gradient GEMM
    (no weight gradient; memory-physics.md §9).
    - nf4/fp4 (bitsandbytes Linear4bit): per pass the dequantization reads the packed weight
      (``four_bit_weight_bytes``) and writes bf16, the matmul reads it; the input and output
      are cast between the stream dtype and bf16. One bnb call per pass; ops ``OPS["bnb4"]``
      (+ ``OPS["bnb4_double_quant"]`` with double quant: dequantize_blockwise of the absmax).
    - int8 (Linear8bitLt): per forward-type pass the int8 weight (1 B); backward dequantizes
      the whole weight (``INT8_BACKWARD_WEIGHT_BYTES``); activations cast to fp16 and int8.
    - bf16/fp16/fp32 in the run's matmul dtype: the weight read once per pass.
    - fp32 in a bf16/fp16/quantized run (``storage.linear_storage``: FalconLinear, which the bnb
      quantizer does not convert, upcast by prepare_model_for_kbit_training; T5's ``wo`` in
      ``_keep_in_fp32_modules``): an fp32 matmul (fp32 rate, 4 B/weight per pass); a half
      input is cast to the weight's dtype first (modeling_t5.py::T5DenseGatedActDense:
      ``hidden_states.to(self.wo.weight.dtype)``): one more op and T·in·(a + 4) B per pass.
    - under autocast (``autocast``: its dtype c) an unquantized weight of another dtype is cast
      to c on every call (linear is a lower-precision op; the cast is not cached for frozen
      weights, autocast_mode.cpp::cached_cast): read s + write c bytes per weight per pass and
      one cast op, and the matmul runs at c's rate (``mm_dtype`` is c then).
    - 4-bit with ``bnb_4bit_compute_dtype`` other than bf16: the dequantized weight and the
      input/output copies scale with its size (``compute``).
    Sources: bitsandbytes nn/modules.py, autograd/_functions.py, backends/cuda/ops.py.
    """
    w = fin * fout
    npass = npass_f + FROZEN_BACKWARD_PASSES
    if storage in FOUR_BIT:
        cb = dtype_bytes(compute)
        out = [("flops_mm", count * (FLOPS_PER_MAC * T * w * npass)),
               ("bytes_moved", count * (npass * w * (four_bit_weight_bytes(double_quant)
                                                     + DEQUANT4_BF16_BYTES * cb / BNB_COMPUTE_BYTES))),
               ("bytes_moved", count * (npass * T * (fin + fout) * (a_stream + cb))),
               ("bytes_gemm", count * (npass * w * cb)),
               ("bnb4_calls", count * (npass)),
               ("ops", count * (npass_f * OPS["bnb4"][0] + OPS["bnb4"][1]))]
        if double_quant:
            out.append(("ops", count * (npass_f * OPS["bnb4_double_quant"][0] + OPS["bnb4_double_quant"][1])))
        return out
    if storage == "int8":
        return [("flops_mm", count * (FLOPS_PER_MAC * T * w * npass)),
                ("bytes_moved", count * (npass_f * w * 1 + w * INT8_BACKWARD_WEIGHT_BYTES)),
                ("bytes_moved", count * (npass * T * (fin + fout) * (a_stream + INT8_ACTIVATION_BYTES))),
                ("int8_calls", count * (npass)),
                ("ops", count * (npass_f * OPS["int8"][0] + OPS["int8"][1]))]
    if autocast is not None and storage != autocast:
        c = dtype_bytes(autocast)
        return [("flops_mm", count * (FLOPS_PER_MAC * T * w * npass)),
                ("bytes_moved", count * (npass * w * (dtype_bytes(storage) + 2 * c))),
                ("bytes_gemm", count * (npass * w * c)),
                ("ops", count * (npass_f * (OPS["linear"][0] + CAST_OPS) + OPS["linear"][1]))]
    if storage == "fp32" and mm_dtype != "fp32":
        out = [("flops_fp32", count * (FLOPS_PER_MAC * T * w * npass)),
               ("bytes_moved", count * (npass * w * dtype_bytes("fp32"))),
               ("ops", count * (npass_f * OPS["linear"][0] + OPS["linear"][1]))]
        if a_stream != dtype_bytes("fp32"):
            out += [("bytes_moved", count * (npass * T * fin * (a_stream + dtype_bytes("fp32")))),
                    ("ops", count * (npass_f * CAST_OPS))]
        return out
    return [("flops_mm", count * (FLOPS_PER_MAC * T * w * npass)),
            ("bytes_moved", count * (npass * w * dtype_bytes(mm_dtype))),
            ("bytes_gemm", count * (npass * w * dtype_bytes(mm_dtype))),
            ("ops", count * (npass_f * OPS["linear"][0] + OPS["linear"][1]))]


def lm_head_work(quant, count: int, T, fin: int, fout: int, a_mm: int) -> list[tuple[str, Any]]:
    """lm_head: 4·T·h·V FLOPs (forward + input gradient, once: never checkpointed), its weight
    read twice. fp32 after prepare_model_for_kbit_training for a quantized base and in an fp32
    run (``storage.lm_head_fp32``): fp32 rate, 4 B/weight; else the matmul dtype. Under autocast
    (``quant`` a ``storage.Dtypes`` with ``autocast``) it runs at the autocast dtype's rate, and
    a weight of another dtype is cast on each of the two calls (read s, write and read c)."""
    w = fin * fout
    dt = quant if isinstance(quant, Dtypes) else Dtypes.protocol(quant)
    if dt.autocast:
        c, s_ = dtype_bytes(dt.autocast), dtype_bytes(dt.unquantized)
        cast = dt.unquantized != dt.autocast
        return [("flops_mm", count * (2 * FLOPS_PER_MAC * T * w)),
                ("bytes_moved", count * (2 * c * w + (2 * w * (s_ + c) if cast else 0))),
                ("bytes_gemm", count * (2 * c * w)),
                ("ops", count * (sum(OPS["linear"]) + (2 * CAST_OPS if cast else 0)))]
    if lm_head_fp32(dt):
        out = [("flops_fp32", count * (2 * FLOPS_PER_MAC * T * w)),
               ("bytes_moved", count * (2 * dtype_bytes("fp32") * w))]
    else:
        out = [("flops_mm", count * (2 * FLOPS_PER_MAC * T * w)),
               ("bytes_moved", count * (2 * a_mm * w)),
               ("bytes_gemm", count * (2 * a_mm * w))]
    return out + [("ops", count * (sum(OPS["linear"])))]


def lora_work(count: int, T, fin: int, fout: int, r, dropout, npass_f: int, a_stream: int,
              adapter: str = "fp32", autocast: str | None = None) -> list[tuple[str, Any]]:
    """peft LoRA on a group of ``count`` adapted Linears (fp32 adapters in the protocol:
    autocast_adapter_dtype, ``storage.LORA_ADAPTER_DTYPE``; x cast to lora_A's dtype).

    FLOPs: forward 2·T·r·(in+out) per forward-type pass, backward 4·T·r·(in+out); at the fp32
    rate for fp32 adapters without autocast, else at the half rate (autocast casts both operands
    of lora_A/lora_B to its dtype; bf16/fp16 adapters run in theirs).
    Traffic per forward: the input cast to fp32, dropout (read, write, 1 B mask), the r-wide
    intermediates, the fp32 output, its scaled copy and the add; backward about twice that;
    the fp32 adapter weights read once per pass. Host: ``OPS["lora"]`` (no dropout ops when
    p = 0: nn.Identity), 4 module calls per forward (base_layer, lora_A, lora_B, dropout), one
    peft call per forward-type pass (forward, recompute): peft's Python (adapter loop, casts,
    dropout lookup) runs only in ``Linear.forward``; its backward is the autograd nodes of those
    ops (C++, counted in ``OPS["lora"][1]``), unlike bitsandbytes' MatMul4Bit, a Python
    ``autograd.Function`` whose backward runs Python (``bnb4_calls`` count backward).
    Source: peft/tuners/lora/layer.py::Linear.forward, bnb.py.
    """
    npass = npass_f + FROZEN_BACKWARD_PASSES
    p = r * (fin + fout)
    elem_f = T * (fin * (a_stream + 4 + _where(dropout > 0, LORA_DROPOUT_BYTES, 0))
                  + LORA_MID_BYTES * r + fout * (LORA_OUT_FP32_BYTES + LORA_OUT_STREAM_TENSORS * a_stream))
    lo_f, lo_b = OPS["lora"]
    return [("trainable", count * (p)),
            ("n_lora_tensors", count * (2)),
            ("flops_fp32" if adapter == "fp32" and autocast is None else "flops_mm",
             count * ((FLOPS_PER_MAC * npass_f + LORA_BACKWARD_FLOPS) * T * p)),
            ("bytes_moved", count * (elem_f * (npass_f + BACKWARD_TRAFFIC_OVER_FORWARD))),
            ("bytes_moved", count * (2 * dtype_bytes(adapter) * p * npass)),
            ("ops", count * (npass_f * lo_f + lo_b - _where(dropout > 0, 0, 2 * npass_f))),
            ("module_calls", count * (npass_f * 4)),
            ("lora_calls", count * (npass_f))]


def layer_host_work(arch, n_layers: int, fw: int, gc: bool, kind="flash", gqa: bool = False) -> list[tuple[str, Any]]:
    """Per-layer ops of norms, attention, MLP and residuals (``OPS``; eager attention
    ``EAGER_EXTRA_OPS`` more each way, sdpa's math kernel ``MATH_EXTRA_OPS`` (+ ``MATH_GQA_OPS``
    with grouped-query heads)), checkpointing's bookkeeping, and module calls per layer forward
    (the layer, its norms, attention, MLP, activation). ``kind``: the attention kernel
    (``activations.choose_attention``), a string or a numpy array of them."""
    norms = arch.norms_per_layer + len(arch.extra_norms)
    norm_kind = "rmsnorm" if arch.norm == "rms" else "layernorm"
    attn_kind = "attn_rope" if arch.position == "rope" else "attn_norope"
    mlp_kind = "mlp_gated" if arch.mlp == "gated" else "mlp_plain"
    layer_f = norms * OPS[norm_kind][0] + OPS[attn_kind][0] + OPS[mlp_kind][0] + OPS["residual"][0]
    layer_b = norms * OPS[norm_kind][1] + OPS[attn_kind][1] + OPS[mlp_kind][1] + OPS["residual"][1]
    math_f = MATH_EXTRA_OPS[0] + (MATH_GQA_OPS[0] if gqa else 0)
    math_b = MATH_EXTRA_OPS[1] + (MATH_GQA_OPS[1] if gqa else 0)
    layer_f = layer_f + _where(_is_kind(kind, "eager"), EAGER_EXTRA_OPS, _where(_is_kind(kind, "math"), math_f, 0))
    layer_b = layer_b + _where(_is_kind(kind, "eager"), EAGER_EXTRA_OPS, _where(_is_kind(kind, "math"), math_b, 0))
    return [("ops", n_layers * (fw * layer_f + layer_b + (OPS["gc_layer"][0] if gc else 0))),
            ("module_calls", n_layers * fw * (norms + LAYER_MODULE_CALLS))]


def _is_kind(kind, names):
    """``kind`` (an attention kernel name, or a numpy array of them) is one of ``names``: a bool,
    or a bool array."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if isinstance(kind, str):
        return kind in names
    import numpy as np

    return np.isin(kind, names)


def gc_hook_work(n_layers: int, lora_per_layer, bnb_frozen: bool):
    """Gradient checkpointing's Python saved-tensor hooks (non-reentrant, the transformers default
    ``use_reentrant=False``; torch/utils/checkpoint.py ``_checkpoint_without_reentrant_generator``):
    ``GC_HOOKS_PER_SAVED`` calls per saved tensor, saved tensors per layer ``GC_SAVED_PER_LAYER``
    (by frozen-Linear kind) + ``GC_SAVED_PER_LORA`` per adapted Linear. (increments, forward part):
    the forward runs the first of the three hooks, the backward the recompute's pack and the unpack."""
    saved = n_layers * (GC_SAVED_PER_LAYER["bnb" if bnb_frozen else "half"] + GC_SAVED_PER_LORA * lora_per_layer)
    return [("gc_hooks", GC_HOOKS_PER_SAVED * saved)], [("gc_hooks", saved)]


def _adapted_layer_linears(model: ModelSpec, targets: tuple[str, ...], quant) -> int:
    """Adapted Linears inside the layer stacks (not lm_head): the LoRA modules checkpointing wraps."""
    return sum(count for (_, head, _, _, adapted, _), count in _linear_groups(model, targets, quant).items()
               if adapted and not head)


def layer_elementwise_work(model: ModelSpec, n_layers: int, T, fw: int, a_stream: int) -> list[tuple[str, Any]]:
    """Elementwise traffic of the norms, residual adds, RoPE, sdpa I/O and the MLP activation
    per layer forward (bytes per element of the tensors touched: the constants above), ×
    (forward passes + ``BACKWARD_TRAFFIC_OVER_FORWARD``)."""
    arch = model.arch
    h, I = model.hidden_size, model.intermediate_size
    n_h, n_kv, d = model.num_heads, model.num_kv_heads, model.head_dim
    norms = arch.norms_per_layer + len(arch.extra_norms)
    norm_b = ((RMSNORM_BYTES[0] + RMSNORM_BYTES[1] * a_stream) if arch.norm == "rms"
              else (LAYERNORM_BYTES[0] + LAYERNORM_BYTES[1] * a_stream))
    elem = T * h * (norms * norm_b + RESIDUAL_TENSORS * a_stream)
    if arch.position == "rope":
        elem += T * (n_h + n_kv) * d * ROPE_BYTES
    elem += T * (2 * n_h + 2 * n_kv) * d * SDPA_IO_BYTES + T * n_h * d * SDPA_TRANSPOSE_BYTES
    elem += T * I * (MLP_GATED_BYTES if arch.mlp == "gated" else MLP_PLAIN_BYTES)
    return [("bytes_moved", n_layers * elem * (fw + BACKWARD_TRAFFIC_OVER_FORWARD))]


def attention_work(model: ModelSpec, n_layers: int, T, seq, fw: int, kind="flash",
                   attn_dtype: str = "bf16") -> list[tuple[str, Any]]:
    """Attention per layer, forward 4·b·s·s_kv·n_h·d FLOPs (s_kv = min(s, sliding window)), by the
    kernel ``kind`` the memory model resolved (``activations.choose_attention``; a string or a
    numpy array of them), ``attn_dtype`` the dtype sdpa gets (``storage.Dtypes.attention``):
    ``unfused_attention_work`` for eager / math, else fused (sdpa flash / mem-efficient, FA2, causal):
    × ``CAUSAL_FRACTION``, backward ``FLASH_BACKWARD_OVER_FORWARD`` × forward."""
    arch = model.arch
    n_h, d = model.num_heads, model.head_dim
    s_eff = _min(seq, arch.sliding_window) if arch.sliding_window else seq
    # float from the first factor: b·s·s_kv·n_h overflows int64 at extreme batch x sequence (sweep arrays)
    scores = 1.0 * (T // seq) * seq * s_eff * n_h
    flops = n_layers * ATTENTION_FLOPS * scores * d * CAUSAL_FRACTION * (fw + FLASH_BACKWARD_OVER_FORWARD)
    fused = [("flops_mm", flops), ("flops_attn", flops)]
    return _by_kind(kind, fused, lambda k: unfused_attention_work(model, n_layers, T, scores, fw, k, attn_dtype))


def unfused_attention_work(model: ModelSpec, n_layers: int, T, scores, fw: int, kind: str,
                           attn_dtype: str) -> list[tuple[str, Any]]:
    """Attention that materialises the ``scores`` = b·n_h·s·s_kv score matrix per layer (no
    causal skipping): forward 4·scores·d FLOPs per pass, backward ``EAGER_BACKWARD_OVER_FORWARD``×
    (4 bmm vs 2), and the score tensors' traffic.

    - eager (transformers eager_attention_forward): matmuls in the attention dtype (fp32 for an
      fp32 stream: the fp32 rate), 2·a + ``EAGER_SOFTMAX_BYTES`` per score element per pass
      (backward ``BACKWARD_TRAFFIC_OVER_FORWARD`` passes).
    - math (sdpa's ``_scaled_dot_product_attention_math``, what ``--attention auto`` resolves to
      for an fp32 stream with grouped-query heads): fp32 bmms (the fp32 rate) and
      ``MATH_SCORE_BYTES`` per score element (forward per pass, backward once; + ``MATH_DROPOUT_BYTES``
      with the config's attention dropout), plus ``MATH_SCALE_BYTES`` per q/k head element and,
      with grouped-query heads, the k/v repeat and its gradient sum.
    Source: torch aten _scaled_dot_product_attention_math (traced, see ``MATH_SCORE_BYTES``),
    transformers integrations/sdpa_attention.py, models/llama/modeling_llama.py."""
    from .activations import attention_dropout_p

    d = model.head_dim
    flops = n_layers * ATTENTION_FLOPS * scores * d * (fw + EAGER_BACKWARD_OVER_FORWARD)
    if kind == "eager":
        a = dtype_bytes(attn_dtype)
        return [("flops_fp32" if a == 4 else "flops_mm", flops),
                ("bytes_moved", n_layers * scores * (2 * a + EAGER_SOFTMAX_BYTES) * (fw + BACKWARD_TRAFFIC_OVER_FORWARD))]
    n_h, n_kv = model.num_heads, model.num_kv_heads
    drop = attention_dropout_p(model) > 0
    per_f = MATH_SCORE_BYTES[0] + (MATH_DROPOUT_BYTES[0] if drop else 0)
    per_b = MATH_SCORE_BYTES[1] + (MATH_DROPOUT_BYTES[1] if drop else 0)
    heads = T * d * (n_h * MATH_SCALE_BYTES + (2 * 4 * (n_h + n_kv) if n_kv != n_h else 0))
    return [("flops_fp32", flops),
            ("bytes_moved", n_layers * (scores * (per_f * fw + per_b) + heads * (fw + 1)))]


def _by_kind(kind, fused, unfused):
    """Increments of a fused attention kernel (``fused``) or of ``unfused(kind)`` for eager / math;
    for an array ``kind``, element by element (each count is ``where(kind == k, ...)``)."""
    if isinstance(kind, str):
        return unfused(kind) if kind in UNFUSED_ATTENTION else fused
    import numpy as np

    present = [k for k in UNFUSED_ATTENTION if np.any(kind == k)]
    if not present:
        return fused
    parts = {None: dict()}
    for name, amount in fused:
        parts[None][name] = parts[None].get(name, 0.0) + amount
    for k in present:
        parts[k] = {}
        for name, amount in unfused(k):
            parts[k][name] = parts[k].get(name, 0.0) + amount
    names = list(dict.fromkeys(n for p in parts.values() for n in p))
    out = []
    for name in names:
        v = parts[None].get(name, 0.0)
        for k in present:
            v = _where(kind == k, parts[k].get(name, 0.0), v)
        out.append((name, v))
    return out


#: a sparse-MoE block's dispatched ops per layer (forward, backward), read from transformers 5.24
#: integrations/moe.py::grouped_mm_experts_forward and the routers (MixtralTopKRouter,
#: Qwen*TopKRouter): router linear, softmax, topk, the top-k renormalisation (sum, div) and cast;
#: reshape x2, sort, floor-divide, two index gathers, histc, cumsum, two grouped_mm, chunk, act,
#: mul, the routing-weight mul, inverse-permutation index, view and sum: 24 forward; backward:
#: the two grouped_mm input gradients, the act/mul gradients, two index backward (zeros +
#: index_put), the gather scatter, the router's softmax/linear input gradient: 14
MOE_OPS = (24, 14)
#: module calls per MoE layer forward: the block, its router (gate) and its experts module
MOE_MODULE_CALLS = 3
#: router traffic per token per expert: the fp32 logits written and read by softmax, its output
#: written and read by topk (4 B each way)
MOE_ROUTER_BYTES = 4 * 4
#: dispatch traffic per token-expert pair: the int64 permutation, the gathered row's index and
#: the inverse permutation (8 B each), plus the gathered input and the weighted output rows
#: (h elements each, written and read: 4 stream-dtype passes)
MOE_INDEX_BYTES = 3 * 8
MOE_ROW_PASSES = 4


def expert_work(model: ModelSpec, quant, T, fw: int, a_stream: int) -> list[tuple[str, Any]]:
    """The fused experts of sparse-MoE layers (``model.experts``, ``model.moe``): S = T·k token-
    expert pairs per layer run two grouped GEMMs (transformers 5.24 integrations/moe.py::
    grouped_mm_experts_forward): 2·S·in·out FLOPs per expert parameter per pass, passes = forward
    (+ recompute) + the input gradient (frozen experts, no weight gradient), at the rate of the
    experts' storage dtype (``storage.expert_storage``: bf16, or fp32 under a bitsandbytes base
    upcast by prepare_model_for_kbit_training; the autocast dtype under autocast); the kernel reads
    the weights of the experts it serves (all E once T·k >= E): min(1, S/E)·numel bytes per pass.
    The router GEMM: 2·T·h·E per MoE layer per pass (its weight read once a pass).
    Elementwise: the gated activation over S·I_e (``MLP_GATED_BYTES``), the dispatch indices and
    rows (``MOE_INDEX_BYTES``, ``MOE_ROW_PASSES``), the router's T·E softmax (``MOE_ROUTER_BYTES``),
    × (forward passes + ``BACKWARD_TRAFFIC_OVER_FORWARD``). Ops ``MOE_OPS``, ``MOE_MODULE_CALLS``."""
    from ..storage import expert_storage

    moe = model.moe
    if moe is None or not model.experts:
        return []
    dt = quant if isinstance(quant, Dtypes) else Dtypes.protocol(quant)
    store = expert_storage(dt)
    compute = dt.autocast or store
    w = dtype_bytes(store)
    S = T * moe.top_k
    npass = fw + FROZEN_BACKWARD_PASSES
    flops = sum(FLOPS_PER_MAC * S * e.in_features * e.out_features for e in model.experts) * npass
    active = _min(1.0, S / moe.num_experts)
    weights = sum(e.numel for e in model.experts) * w * active * npass
    n = len(moe.layers)
    # the router GEMM per MoE layer (``mlp.gate``, a parameter, not an nn.Linear: ``F.linear(x,
    # self.weight)`` in MixtralTopKRouter / Qwen2MoeTopKRouter / OlmoeTopKRouter): 2·T·h·E per pass,
    # frozen (forward, recompute, input gradient), in its weight's dtype (the unquantized one,
    # fp32 after prepare_model_for_kbit_training) or the autocast dtype
    router_dtype = dt.autocast or dt.unquantized
    router_flops = FLOPS_PER_MAC * T * model.hidden_size * moe.num_experts * n * npass
    router_bytes = model.hidden_size * moe.num_experts * n * dtype_bytes(router_dtype) * npass
    elem = (S * moe.expert_intermediate_size * MLP_GATED_BYTES + S * MOE_INDEX_BYTES
            + S * model.hidden_size * a_stream * MOE_ROW_PASSES + T * moe.num_experts * MOE_ROUTER_BYTES)
    return [("flops_fp32" if compute == "fp32" else "flops_mm", flops),
            ("flops_fp32" if router_dtype == "fp32" else "flops_mm", router_flops),
            ("bytes_moved", weights + router_bytes), ("bytes_gemm", weights + router_bytes),
            ("bytes_moved", n * elem * (fw + BACKWARD_TRAFFIC_OVER_FORWARD)),
            ("ops", n * (fw * MOE_OPS[0] + MOE_OPS[1])),
            ("module_calls", n * fw * MOE_MODULE_CALLS)]


def sequence_tokens(model: ModelSpec, train: TrainSpec, kind: str | None = None):
    """(tokens processed, real tokens, ``sequences.AttentionSpan``) per step for a padding mode
    other than max-length: the expected batch (``sequences.expected_tokens``; longest processes
    b·E[max length], padding-free b·E[length]), and the attention kernel ``kind`` the ledger
    picked for it (``resolve_attention`` when None). tokens/s counts real (non-pad) tokens."""
    from ..trainers import resolve_recipe
    from .sequences import NO_PACKED_MASK, attention_span, expected_tokens

    recipe = resolve_recipe(train)
    processed, real = expected_tokens(recipe)
    kind = kind if kind is not None else resolve_attention(model, train)
    span = attention_span(recipe, kind, model.model_type not in NO_PACKED_MASK)
    return processed, real, span


#: the compute capability the attention kernel is resolved for when no GPU is given (as
#: ``estimate.memory.make_setup`` without a GPU)
DEFAULT_COMPUTE_CAPABILITY = "9.0"


def resolve_attention(model: ModelSpec, train: TrainSpec, compute_capability: str | None = None):
    """The attention kernel of ``train`` on a GPU of ``compute_capability``: the memory model's
    resolution (``activations.choose_attention`` of the resolved recipe; ``Setup.attention``), so
    the time and the ledger price one kernel. Array-valued ``train.seq`` (a grid): a numpy array
    of kernel names, resolved per distinct sequence length (the sweep's rule)."""
    from ..trainers import resolve_recipe
    from .activations import choose_attention

    cc = compute_capability or DEFAULT_COMPUTE_CAPABILITY
    recipe = resolve_recipe(train)
    if _is_scalar(train.seq) and _is_scalar(train.batch):
        return choose_attention(model, recipe, cc)
    import numpy as np

    seq = np.asarray(train.seq)
    b0 = int(np.asarray(train.batch).flat[0])
    seqs, inv = np.unique(seq, return_inverse=True)
    kinds = np.asarray([choose_attention(model, replace(recipe, seq=int(v), batch=b0), cc) for v in seqs.tolist()],
                       dtype=object)
    return np.broadcast_to(kinds[inv].reshape(seq.shape), np.broadcast(seq, np.asarray(train.batch)).shape)


def sequence_attention_work(model: ModelSpec, n_layers: int, span, fw: int, kind="flash",
                            attn_dtype: str = "bf16", T=0) -> list[tuple[str, Any]]:
    """``attention_work`` over an ``AttentionSpan``: forward 4·pairs·n_h·d FLOPs, × ``CAUSAL_FRACTION``
    when the kernel skips the masked triangle (is_causal; FA2 per row or document), backward
    ``FLASH_BACKWARD_OVER_FORWARD`` ×; eager / math (or an explicit mask: no skipping) as in
    ``unfused_attention_work`` with pairs in place of b·s·s_kv."""
    n_h, d = model.num_heads, model.head_dim
    frac = CAUSAL_FRACTION if span.causal else 1.0
    flops = n_layers * ATTENTION_FLOPS * span.pairs * n_h * d * frac * (fw + FLASH_BACKWARD_OVER_FORWARD)
    fused = [("flops_mm", flops), ("flops_attn", flops)]
    return _by_kind(kind, fused, lambda k: unfused_attention_work(model, n_layers, T, span.pairs * n_h, fw, k, attn_dtype))


def loss_work(model: ModelSpec, quant, T) -> list[tuple[str, Any]]:
    """Logits and loss: ``OPS["loss"]`` and T·V × ``LOSS_BYTES_*`` (fp32 logits when lm_head
    runs in fp32, ``storage.Dtypes.lm_head``: an fp32 weight without autocast; HF ForCausalLM:
    logits.float() then cross_entropy)."""
    dt = quant if isinstance(quant, Dtypes) else Dtypes.protocol(quant)
    per = LOSS_BYTES_FP32_LOGITS if dt.lm_head == "fp32" else LOSS_BYTES_HALF_LOGITS
    return [("ops", OPS["loss"][0] + OPS["loss"][1]), ("bytes_moved", T * model.vocab_size * per)]


#: trl's fused chunked LM head (--loss chunked), ops per step outside its tile loops, (forward,
#: backward), read from trl 1.16 trainer/utils.py::add_fused_lm_head and kernels/chunked_logprob.py
#: (CUDA path, SFTTrainer's outputs): forward ``labels != -100``, ``hidden[mask]`` and
#: ``labels[mask]`` (nonzero + index each), 7 accumulator fills, log_z (log, add), logprobs (sub),
#: entropy (div, sub), is_top1 (ge, gt, and), per output new_zeros + masked_scatter (clone,
#: scatter) x3, the loss (sum, neg, div): 32; backward: the loss's div/neg nodes, masked_select,
#: the grad_hidden zeros and its cast, index backward (zeros, nonzero, index_put), slice backward
#: (zeros, copy): 11
FUSED_HEAD_OPS = (32, 11)
#: per [4096, 32768] tile: forward torch.mm + _forward_kernel; backward torch.mm + _backward_kernel
#: + _addmm_fp32 (grad_hidden)
FUSED_HEAD_TILE_OPS = (2, 3)


def fused_head_work(model: ModelSpec, quant, T, b) -> list[tuple[str, Any]]:
    """trl's fused chunked LM head instead of lm_head + the loss (N = T − b scored tokens, k =
    ceil(V / 32768) vocabulary tiles, n = ceil(N / 4096) token chunks; trl/kernels/
    chunked_logprob.py::ChunkedLogProbFunction): three GEMMs of 2·N·h·V FLOPs (the forward
    projection, its recompute in backward, the hidden-state gradient; lm_head is frozen: no
    weight gradient) at the compute dtype's rate (the autocast dtype, else the stream's: fp32
    runs at the fp32 rate); traffic: each GEMM reads the weight once per token chunk (3·n·c·h·V)
    and the hidden chunk once per tile (3·k·c·N·h), a weight of another dtype is cast per tile
    and chunk in forward and backward (2·n·h·V·(s + c)), the logits tile is written and read in
    forward (2c per logit) and written, rewritten in place and read in backward (4c), and the fp32
    grad_hidden is read and written per tile (8·k·N·h). Ops: ``FUSED_HEAD_OPS`` and
    ``FUSED_HEAD_TILE_OPS`` per tile and chunk (+1 per weight cast)."""
    from ..trainers import fused_lm_head

    dt = quant if isinstance(quant, Dtypes) else Dtypes.protocol(quant)
    fh = fused_lm_head()
    h, V = model.hidden_size, model.vocab_size
    N = T - b
    k = -(-V // fh["vocab_chunk"])
    n = -(-N // fh["token_chunk"])
    compute = dt.autocast or dt.stream
    c, s_ = dtype_bytes(compute), dtype_bytes(dt.unquantized)
    cast = dt.unquantized != compute
    flops = 3 * FLOPS_PER_MAC * N * h * V
    moved = (3 * n * c * h * V + 3 * k * c * N * h + (2 * n * h * V * (s_ + c) if cast else 0)
             + 6 * c * N * V + 8 * k * N * h)
    tiles = n * k
    ops = sum(FUSED_HEAD_OPS) + tiles * (sum(FUSED_HEAD_TILE_OPS) + (2 * CAST_OPS if cast else 0))
    return [("flops_fp32" if compute == "fp32" else "flops_mm", flops), ("bytes_moved", moved), ("ops", ops)]


def embedding_work(model: ModelSpec, T, a_stream: int) -> list[tuple[str, Any]]:
    """Embedding, rotary tables, mask helpers and final-norm glue: ``OPS["model"]``,
    ``MODEL_MODULE_CALLS``, and the embedding gather's traffic T·h·(4 + a)."""
    return [("ops", OPS["model"][0] + OPS["model"][1]), ("module_calls", MODEL_MODULE_CALLS),
            ("bytes_moved", T * model.hidden_size * (EMBEDDING_BYTES + a_stream))]


def optimizer_work(optimizer: str, n_lora_tensors, trainable) -> list[tuple[str, Any]]:
    """One optimizer step: ``OPTIMIZER_OPS`` (fixed + per trainable tensor) and
    ``OPTIMIZER_BYTES`` per trainable parameter."""
    fixed, per = OPTIMIZER_OPS.get(optimizer, OPTIMIZER_OPS["adamw"])
    return [("ops", fixed + per * n_lora_tensors),
            ("bytes_moved", trainable * OPTIMIZER_BYTES.get(optimizer, 36))]


#: torch.autograd.graph.save_on_cpu(pin_memory=True) per packed tensor: forward ``torch.empty(...,
#: pin_memory=True)`` + ``copy_`` (2 ops), backward ``tensor.to(device)`` (1 op)
OFFLOAD_OPS = (2, 1)


def checkpoint_offload_work(model: ModelSpec, train: TrainSpec, T, a_stream: int):
    """``--checkpoint-offload`` (transformers modeling_utils.py::_activation_checkpointing_enable
    (offload=True) runs each checkpoint under ``torch.autograd.graph.save_on_cpu(pin_memory=True)``;
    torch/autograd/graph.py::save_on_cpu): every checkpointed layer's input (a·T·h, what the ledger
    moves to pinned host memory: ``steps.offload_host_bytes``) is copied device→host in forward
    (``packed.copy_(tensor, non_blocking=True)``) and host→device in backward
    (``tensor.to(device, non_blocking=True)``). Both copies are enqueued on the current (compute)
    stream, so the host does not wait but the next kernels do: they are GPU-stream time over the
    host link (``bytes_host``, ``gpu_seconds``), in the phase that issues them. Each pack and unpack
    is a Python saved-tensor hook call (``gc_hooks``) and ``OFFLOAD_OPS`` ops.
    (increments, forward part); nothing without offload."""
    from .steps import checkpointed_layer_count

    rc = step_recipe(train)
    if not rc.offload:
        return [], []
    n = checkpointed_layer_count(model, rc)
    moved = n * a_stream * model.hidden_size * T
    return ([("bytes_host", 2 * moved), ("gc_hooks", 2 * n), ("ops", n * sum(OFFLOAD_OPS))],
            [("bytes_host", moved), ("gc_hooks", n), ("ops", n * OFFLOAD_OPS[0])])


#: the StepWork counts a micro-step repeats (all but the optimizer's)
MICRO_STEP_COUNTS = ("flops_mm", "flops_fp32", "bytes_moved", "ops", "module_calls", "bnb4_calls", "int8_calls",
                     "lora_calls", "flops_attn", "bytes_gemm", "gc_hooks", "bytes_host")
#: clip_grad_norm_ ops per step: _foreach_norm, stack, vector_norm, add eps, div, clamp, _foreach_mul_
GRAD_NORM_OPS = 7
#: bytes read + written per fp32 gradient element: the norm reads it (4), _foreach_mul_ reads and writes it (8)
GRAD_NORM_BYTES = 12


def grad_norm_work(rc, trainable) -> list[tuple[str, Any]]:
    """torch/nn/utils/clip_grad.py::clip_grad_norm_ once per optimizer step when the recipe
    computes the norm (``steps.StepRecipe.computes_grad_norm``): ``GRAD_NORM_OPS`` kernels and
    ``GRAD_NORM_BYTES`` per trainable (fp32-gradient) parameter; nothing otherwise."""
    if not rc.computes_grad_norm:
        return []
    return [("ops", GRAD_NORM_OPS), ("bytes_moved", trainable * GRAD_NORM_BYTES)]


def kernel_count(ops):
    """GPU kernels launched: every op that is not a pure view launches at least one kernel;
    views are about a sixth of the forward ops of a layer (transposes/reshapes) and some ops
    launch two, so kernels ≈ ops."""
    return ops


def step_work(model: ModelSpec, lora: LoraSpec, train: TrainSpec, attention=None) -> StepWork:
    """Count FLOPs, bytes, ops and calls of one step: the terms above, added in one order.

    ``attention``: the attention kernel the memory model resolved (``Setup.attention``,
    ``estimate()``'s ``inputs["attention_kernel"]``; a numpy array of names for a grid), so the
    time prices the kernel the ledger holds; None: ``resolve_attention`` at
    ``DEFAULT_COMPUTE_CAPABILITY`` (the GPU-less setup's).

    ``train.batch``, ``train.seq``, ``train.target_seq``, ``lora.rank`` and ``lora.dropout`` may
    be numpy arrays of one shape: the counts are then arrays too, element for element equal to
    the counts of each case on its own."""
    dt = Dtypes.of(train)  # the resolved recipe's dtypes (storage.Dtypes)
    quant = dt
    b, s = train.batch, train.seq
    s_dec = _decoder_seq(model, train)
    T_dec, T_enc = b * s_dec, b * s
    tokens, span = T_dec, None
    kind = attention if attention is not None else resolve_attention(model, train)
    if train.padding != "max-length":  # decoder-only (sequences: the expected batch)
        T_dec, tokens, span = sequence_tokens(model, train, kind)
    mm_dtype = dt.frozen_matmul
    a_mm = dtype_bytes(mm_dtype)
    a_stream = dtype_bytes(dt.stream)
    gc = bool(train.gradient_checkpointing)
    fw = _passes(gc)  # decoder forward passes

    fused_head = step_recipe(train).loss == "chunked"  # trl's fused chunked LM head
    acc = dict.fromkeys(_COUNTS, 0.0)
    acc.update(n_lora_tensors=0, trainable=0)
    fwd = dict.fromkeys(_COUNTS, 0.0)  # the first forward pass (forward phase of a micro-step)
    opt = dict.fromkeys(_COUNTS, 0.0)  # the optimizer phase

    def add(increments, forward=None, into=acc):
        """Add a term's increments; ``forward``: the part of them the forward phase does (a list
        of increments, or a fraction of these)."""
        for name, amount in increments:
            into[name] += amount
        if forward is None:
            return
        for name, amount in (forward if isinstance(forward, list) else increments):
            if name in fwd:
                fwd[name] += amount if isinstance(forward, list) else amount * forward

    for (stack, head, fin, fout, is_adapted, storage), count in _linear_groups(model, lora.targets, quant).items():
        T = T_enc if stack == "encoder" else T_dec
        npass_f = 1 if head else fw          # forward-type passes (forward + recompute)
        add([("module_calls", count * (npass_f))], [("module_calls", count)])
        if head:
            if not fused_head:  # the fused head never calls lm_head: fused_head_work below
                add(lm_head_work(quant, count, T, fin, fout, a_mm), HEAD_FORWARD_SHARE)
        else:
            add(*_with_one_pass(lambda p: frozen_linear_work(storage, count, T, fin, fout, p, a_stream, mm_dtype,
                                                             train.double_quant, dt.autocast, dt.compute), npass_f))
        if is_adapted:
            add(*_with_one_pass(lambda p: lora_work(count, T, fin, fout, lora.rank, lora.dropout, p, a_stream,
                                                    dt.adapter, dt.autocast), npass_f))

    # decoder (and encoder) layers: norms, attention, MLP elementwise, residuals
    stacks = [(model.num_layers, T_dec, s_dec)]
    if model.is_encoder_decoder and model.num_encoder_layers:
        stacks.append((model.num_encoder_layers, T_enc, s))
    gqa = model.num_kv_heads != model.num_heads
    lora_per_layer = _adapted_layer_linears(model, lora.targets, quant) / max(1, sum(n for n, _, _ in stacks))
    bnb_frozen = quant.quant in FOUR_BIT or quant.quant == "int8"
    for n_layers, T, seq in stacks:
        if n_layers == 0:
            continue
        add(*_with_one_pass(lambda p: layer_host_work(model.arch, n_layers, p, gc, kind, gqa), fw))
        if gc:
            add(*gc_hook_work(n_layers, lora_per_layer, bnb_frozen))
        add(*_with_one_pass(lambda p: layer_elementwise_work(model, n_layers, T, p, a_stream), fw))
        if model.moe is not None and n_layers == model.num_layers:
            add(*_with_one_pass(lambda p: expert_work(model, quant, T, p, a_stream), fw))
        if span is None:
            add(*_with_one_pass(lambda p: attention_work(model, n_layers, T, seq, p, kind, dt.attention), fw))
        else:
            add(*_with_one_pass(lambda p: sequence_attention_work(model, n_layers, span, p, kind, dt.attention, T), fw))

    add(*checkpoint_offload_work(model, train, T_dec, a_stream))
    add(fused_head_work(model, quant, T_dec, b) if fused_head else loss_work(model, quant, T_dec), HEAD_FORWARD_SHARE)
    add(embedding_work(model, T_dec, a_stream), HEAD_FORWARD_SHARE)
    # accumulation (steps.py): k micro-steps of forward + backward per optimizer step
    rc = step_recipe(train)
    for name in MICRO_STEP_COUNTS:
        acc[name] = acc[name] * rc.accumulation
        fwd[name] = fwd[name] * rc.accumulation
    for part in (optimizer_work(train.optimizer, acc["n_lora_tensors"], acc["trainable"]),
                 grad_norm_work(rc, acc["trainable"])):
        add(part)
        add(part, into=opt)

    trainer = getattr(train, "trainer", None) or "loop"

    def work(c: dict, **extra) -> StepWork:
        return StepWork(
            tokens=tokens * rc.accumulation, flops_mm=c["flops_mm"], flops_fp32=c["flops_fp32"],
            bytes_moved=c["bytes_moved"], kernels=kernel_count(c["ops"]), ops=c["ops"],
            module_calls=c["module_calls"], lora_calls=c["lora_calls"], bnb4_calls=c["bnb4_calls"],
            int8_calls=c["int8_calls"], mm_dtype=mm_dtype, syncs=acc["int8_calls"] > 0,
            flops_attn=c["flops_attn"], bytes_gemm=c["bytes_gemm"], micro_steps=rc.accumulation,
            gc_hooks=c["gc_hooks"], bytes_host=c["bytes_host"], **extra)

    return work(acc, forward=work(fwd), optimizer=work(opt),
                sync_after_forward=trainer == "trl",
                sync_before_optimizer=trainer in SYNCING_TRAINERS and bool(rc.computes_grad_norm))


#: the counts a StepWork carries (and its forward / optimizer parts)
_COUNTS = ("flops_mm", "flops_fp32", "flops_attn", "bytes_moved", "bytes_gemm", "ops", "module_calls",
           "bnb4_calls", "int8_calls", "lora_calls", "gc_hooks", "bytes_host")
#: lm_head, the loss and the embedding: the forward phase's share of their work. lm_head runs one
#: GEMM forward and one (the input gradient) backward; the loss and the gather are about as heavy
#: forward (log_softmax, gather) as backward (their gradients); trl's fused head computes one of
#: its three GEMMs in forward (counted with the same 1/2: a bound, see fused_head_work)
HEAD_FORWARD_SHARE = 0.5
#: trainers that read the gradient norm on the host each optimizer step (transformers
#: trainer.py::_inner_training_loop: ``grad_norm = _grad_norm.item()`` after clip_grad_norm_); trl's
#: SFTTrainer inherits it and also reads its metrics after each forward (``.item()`` of the
#: entropy / accuracy quotients in compute_loss)
SYNCING_TRAINERS = ("hf", "trl")


def _with_one_pass(term, npass_f):
    """(increments of ``term`` at ``npass_f`` forward-type passes, increments of one forward pass).

    Every per-pass term is linear in its pass count (forward + recompute passes, plus a backward
    part that does not depend on it), so one forward pass is term(1) - term(0)."""
    one, zero = {}, {}
    for name, amount in term(1):
        one[name] = one.get(name, 0) + amount
    for name, amount in term(0):
        zero[name] = zero.get(name, 0) + amount
    return term(npass_f), [(name, amount - zero.get(name, 0)) for name, amount in one.items()]


def _peak_mm_tflops(gpu: GpuSpec, dtype: str) -> float:
    """Dense peak of a matmul in ``dtype``. A GPU without bf16 tensor cores (sm70 V100, sm75 T4:
    the catalog gives ``bf16_tflops`` = its fp32 rate) runs bf16 matmuls at that rate: torch
    emulates them; a run on it should use fp16 (``trainers.gpu_refusal`` says so)."""
    return {"bf16": gpu.bf16_tflops, "fp16": gpu.fp16_tflops, "fp32": gpu.fp32_tflops}[dtype]


def coefficients(calibration: Calibration | None) -> dict[str, float]:
    """The time coefficients in effect: the calibration's, or the built-in priors
    (calibrations/default.json) when none is given. The kernel efficiencies
    (``EFFICIENCY_COEFFICIENTS``) are included only where the calibration sets them; otherwise
    ``step_time`` takes the GPU generation's sourced priors (``estimate.efficiency``)."""
    cal = calibration if calibration is not None else default_calibration()
    out = {k: coefficient(cal, k) for k in COEFFICIENTS if k not in EFFICIENCY_COEFFICIENTS}
    out.update({k: float(cal.coefficients[k]) for k in EFFICIENCY_COEFFICIENTS if k in cal.coefficients})
    return out


def gpu_seconds(work: StepWork, gpu: GpuSpec, coef: Mapping[str, float]) -> dict[str, Any]:
    """GPU time of ``work`` by kernel class (a roofline per class):

    - half-precision GEMMs: max(FLOPs / (peak · time_eff_mm), weight bytes / (bandwidth ·
      time_eff_bw)) (``flops_mm`` less attention; the matmul dtype's peak; in an fp32 run the
      fp32 peak and time_eff_fp32);
    - fused attention: ``flops_attn`` / (peak · time_eff_attn);
    - fp32 GEMMs: ``flops_fp32`` / (fp32 peak · time_eff_fp32);
    - the rest of the traffic (elementwise, dequantization, casts, loss, optimizer):
      (bytes_moved − bytes_gemm) / (bandwidth · time_eff_bw);
    - kernels × time_gpu_kernel_s (launch gap and tail of each kernel);
    - with checkpoint offload, ``bytes_host`` / the host link's line rate (``gpu_host_copy_s``: the
      copies run in stream order, ``checkpoint_offload_work``).
    Efficiencies: the calibration's when it sets them, else the generation's priors."""
    from .efficiency import efficiencies

    eff = efficiencies(gpu)
    eff.update({k: coef[k] for k in EFFICIENCY_COEFFICIENTS if k in coef})
    bw = gpu.bandwidth_gb_s * 1e9 * coef["time_eff_bw"]
    fp32 = work.mm_dtype == "fp32"
    mm_rate = _peak_mm_tflops(gpu, work.mm_dtype) * 1e12 * eff["time_eff_fp32" if fp32 else "time_eff_mm"]
    gemm_s = _max((work.flops_mm - work.flops_attn) / mm_rate, work.bytes_gemm / bw)
    attn_s = work.flops_attn / (_peak_mm_tflops(gpu, work.mm_dtype) * 1e12 * eff["time_eff_attn"])
    fp32_s = work.flops_fp32 / (gpu.fp32_tflops * 1e12 * eff["time_eff_fp32"])
    memory_s = (work.bytes_moved - work.bytes_gemm) / bw
    kernel_s = work.kernels * coef["time_gpu_kernel_s"]
    out = {"gpu_gemm_s": gemm_s, "gpu_attention_s": attn_s, "gpu_fp32_s": fp32_s, "gpu_memory_s": memory_s,
           "gpu_kernel_s": kernel_s, "gpu_s": gemm_s + attn_s + fp32_s + memory_s + kernel_s}
    if not (_is_scalar(work.bytes_host) and work.bytes_host == 0):
        # host-link copies on the compute stream (checkpoint offload): at the link's line rate, a
        # lower bound on their time (data/host-links.json); 0 for a GPU whose link the catalog lacks
        link = host_link_bytes_per_s(gpu)
        out["gpu_host_copy_s"] = work.bytes_host / link if link else 0.0 * work.bytes_host
        out["gpu_s"] = out["gpu_s"] + out["gpu_host_copy_s"]
    return out


def host_link_bytes_per_s(gpu: GpuSpec) -> float | None:
    """The line rate of ``gpu``'s host link per direction (``GpuSpec.host_link`` in
    loraplan/data/host-links.json, with sources); None when the catalog names none."""
    return _link_bytes_per_s(gpu.host_link) if gpu.host_link else None


@lru_cache(maxsize=None)
def _link_bytes_per_s(link_id: str) -> float | None:
    from .reserved import load_host_links

    link = load_host_links()["links"].get(link_id)
    return float(link["bytes_per_s"]) if link else None


def host_seconds(work: StepWork, coef: Mapping[str, float]) -> dict[str, Any]:
    """Host time of ``work``: dispatched ops and module calls × time_host_op_s (with gradient
    checkpointing's saved-tensor hook calls × time_host_gc_hook_s), peft LoRA calls,
    bitsandbytes calls × their per-call costs, all ÷ time_host_speed (1.0: the reference host)."""
    speed = coef.get("time_host_speed", 1.0)
    ops_s = (work.ops + work.module_calls) * coef["time_host_op_s"] / speed
    ops_s = ops_s + work.gc_hooks * coef.get("time_host_gc_hook_s", 0.0) / speed
    lora_s = work.lora_calls * coef["time_host_lora_call_s"] / speed
    bnb_s = (work.bnb4_calls * coef["time_host_bnb4_call_s"] + work.int8_calls * coef["time_host_int8_call_s"]) / speed
    return {"host_ops_s": ops_s, "host_lora_s": lora_s, "host_bnb_s": bnb_s, "host_s": ops_s + lora_s + bnb_s}


def queue_time(phases) -> Any:
    """Wall time of phases run through one CUDA stream: ``phases`` is a list of (host_s, gpu_s,
    sync_after). The host enqueues kernels asynchronously and the GPU runs them in order
    (torch docs, "CUDA semantics: asynchronous execution"); within a phase both sides progress
    evenly. The GPU finishes phase j at F_j = max(max(F_{j-1}, H_{j-1}) + g_j, H_j), with H the
    host's cumulative time; a sync (``.item()``) makes the host wait: H_j = max(H_j, F_j). The step
    ends when both are done: max(F_n, H_n). So the step is at least max(Σh, Σg) and at most
    Σh + Σg, and a phase where the host leads cannot hide a later phase's GPU work."""
    F = H = 0.0
    for h, g, sync in phases:
        F = _max(_max(F, H) + g, H + h)
        H = H + h
        if sync:
            H = _max(H, F)
    return _max(F, H)


def step_time(work: StepWork, gpu: GpuSpec, coef: Mapping[str, float]) -> TimeEstimate:
    """Seconds per step on ``gpu`` for counted ``work``; components itemise the terms.

    Phases: per micro-step its first forward pass (``work.forward``) and the rest (backward with
    any recompute), then the optimizer step (``work.optimizer``, plus ``time_host_step_s``),
    combined by ``queue_time`` with the trainer's syncs (``sync_after_forward``,
    ``sync_before_optimizer``). int8 (MatMul8bitLt's argwhere syncs on every call): host + GPU.
    An array-valued ``work`` gives array-valued seconds, tokens/s and ``bound`` (strings)."""
    g_all, h_all = gpu_seconds(work, gpu, coef), host_seconds(work, coef)
    gpu_s, host_s = g_all["gpu_s"], h_all["host_s"] + coef["time_host_step_s"]
    if work.syncs:
        step = host_s + gpu_s
        bound = "host+gpu (int8 syncs)"
    elif work.forward is None or work.optimizer is None:
        step = _max(host_s, gpu_s)
        bound = _where(host_s >= gpu_s, "host", "gpu")
    else:
        k = work.micro_steps
        g_f, h_f = gpu_seconds(work.forward, gpu, coef)["gpu_s"], host_seconds(work.forward, coef)["host_s"]
        g_o, h_o = gpu_seconds(work.optimizer, gpu, coef)["gpu_s"], host_seconds(work.optimizer, coef)["host_s"]
        g_b, h_b = gpu_s - g_f - g_o, h_all["host_s"] - h_f - h_o
        phases = []
        for i in range(k):
            phases.append((h_f / k, g_f / k, work.sync_after_forward))
            phases.append((h_b / k, g_b / k, work.sync_before_optimizer and i == k - 1))
        phases.append((h_o + coef["time_host_step_s"], g_o, False))
        # >= max(host, gpu) in exact arithmetic; the max removes the rounding of the backward
        # phase's subtraction (total - forward - optimizer)
        step = _max(queue_time(phases), _max(host_s, gpu_s))
        compute_s = g_all["gpu_gemm_s"] + g_all["gpu_attention_s"] + g_all["gpu_fp32_s"]
        bound = _where(host_s >= gpu_s, "host", _where(compute_s >= g_all["gpu_memory_s"] + g_all["gpu_kernel_s"],
                                                       "compute", "memory"))
    comps = {**g_all, **h_all, "host_step_s": coef["time_host_step_s"], "host_s": host_s,
             "overlap_lost_s": step - _max(host_s, gpu_s)}
    if _is_scalar(step):
        tokens_per_s = work.tokens / step if step > 0 else 0.0
    else:
        import numpy as np

        with np.errstate(divide="ignore", invalid="ignore"):
            tokens_per_s = np.where(step > 0, work.tokens / step, 0.0)
        bound = np.broadcast_to(np.asarray(bound), np.shape(step))
    return TimeEstimate(step_s=step, tokens_per_s=tokens_per_s, components=comps, bound=bound)


def estimate_step_time(model: ModelSpec, lora: LoraSpec, train: TrainSpec, gpu: GpuSpec,
                       calibration: Calibration | None = None, attention=None) -> TimeEstimate:
    """Predicted wall time of one optimizer step: the recipe's k micro-steps of forward + backward, then
    the gradient norm (when computed) and the optimizer step; ``tokens_per_s`` counts all k micro-batches.
    ``attention``: the kernel the memory model resolved (``Setup.attention``); None: resolved for
    ``gpu``'s compute capability (``resolve_attention``, the same rule)."""
    kind = attention if attention is not None else resolve_attention(model, train, gpu.compute_capability)
    return step_time(step_work(model, lora, train, kind), gpu, coefficients(calibration))
