"""The memory ledger: peak ``torch.cuda.max_memory_allocated()`` of a LoRA/QLoRA training burst.

Predicts the protocol of loraplan/data/h100-protocol.md (transformers + peft + bitsandbytes,
plain loop: ``loss = model(ids, labels=ids).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)``). Every ledger line is a function whose docstring gives its
formula (bytes per element × shape) and where it comes from; sources are the library files
read for transformers 5.x, peft 0.21, bitsandbytes 0.50, torch 2.11+.

The peak is a *moment*, not a sum of everything: the live bytes are evaluated at each
candidate moment of a steady-state step (step >= 2, the optimizer state exists) and the
largest wins:

- ``forward``:        end of the forward, inside the loss (logits + fp32 copy + log-softmax);
- ``loss backward``:  the start of backward, at the head (log-softmax saved, its grad in and out);
- ``layer backward``: inside the first decoder layer's backward (its saved tensors, recomputed
  when checkpointing, plus the gradient transients and the dequantized weight);
- ``optimizer step``: LoRA weights + gradients + optimizer state + the step's temporaries.

Two halves: ``Structure`` holds what depends only on the model, the targets and the
quantization (weight bytes, sizes of the adapted Linears; cached), and the formulas take the
numbers (batch b, sequence s, rank r, dropout) as plain ints or as numpy arrays of equal
shape, so ``loraplan sweep`` evaluates the same physics over a whole grid at once.

Notation: T = b·s tokens, h hidden, I intermediate, n_h / n_kv heads, d head dim, V vocab,
L layers, r rank, a bytes of the residual stream (2 for a bf16/fp16 base; 4 for fp32 and for
a quantized base, because prepare_model_for_kbit_training makes embeddings and norms fp32).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..spec import Calibration, GpuSpec, LinearSpec, ModelSpec, TrainSpec
from .result import MemoryEstimate

MiB = 1 << 20

#: CUDA caching allocator rounds every block to a multiple of 512 bytes
#: (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512, round_size).
BLOCK = 512

FOUR_BIT = ("nf4", "fp4")
QUANTIZED = FOUR_BIT + ("int8",)

#: The moments of a step at which the peak can sit, in step order.
MOMENTS = ("forward", "int8 matmul", "loss backward", "layer backward", "optimizer step")


# ---------------------------------------------------------------------------------------------
# Scalar-or-array helpers: the formulas below run on ints or on numpy arrays alike
# ---------------------------------------------------------------------------------------------


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float))


def _ceil(x):
    if _is_scalar(x):
        return math.ceil(x)
    import numpy as np

    return np.ceil(x)


def _max(a, b):
    if _is_scalar(a) and _is_scalar(b):
        return a if a >= b else b
    import numpy as np

    return np.maximum(a, b)


def _where(cond, a, b):
    if _is_scalar(cond) or isinstance(cond, bool):
        return a if cond else b
    import numpy as np

    return np.where(cond, a, b)


def _blocks(nbytes):
    """Bytes as the allocator counts them: rounded up to 512-byte blocks (0 stays 0)."""
    n = _ceil(nbytes / BLOCK) * BLOCK
    return _where(nbytes > 0, _max(n, BLOCK), 0)


# ---------------------------------------------------------------------------------------------
# Structure: what depends only on the model, the targets and the quantization
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """Sizes of one (model, adapted Linears, quantization) combination, computed once."""

    model: ModelSpec
    quant: str
    double_quant: bool
    adapted: tuple[LinearSpec, ...]
    frozen_linear_weights: int
    unquantized_weights: int
    #: element counts per LoRA tensor per unit rank (lora_A: in, lora_B: out) -> how many tensors
    lora_sizes: Counter
    #: per stack: Σ over adapted Linears of one layer of in_features, and their number (layer average)
    lora_in_per_layer: dict[str, float]
    lora_count_per_layer: dict[str, float]
    head_adapted: bool
    biggest_linear_numel: int
    #: int8: per stack, Σ in_features over distinct inputs of one layer, and over outlier-prone inputs
    int8_inputs_per_layer: dict[str, float]
    int8_outlier_in_per_layer: dict[str, float]
    int8_all_in_per_layer: dict[str, float]
    outlier_p: float  # per-element probability that an MLP-out input exceeds 6.0 (random init)
    #: the first layer the input meets: Σ in_features of its adapted attention-input Linears
    first_layer_attn_in_adapted: int = 0
    first_layer_mlp_adapted: bool = False
    #: per stack: Σ over adapted MLP-out Linears (down, fc_out) of one layer of in_features
    mlp_out_adapted_in: dict = field(default_factory=dict)
    #: per stack: Σ over all adapted MLP Linears (gate, up, down, fc_in, fc_out) of in_features
    mlp_adapted_in: dict = field(default_factory=dict)
    #: distinct (stack, MLP-out role?, in, out) of the frozen layer Linears stored as ``quant``
    linear_shapes: tuple = ()
    #: the MLP-out Linear (down, fc_out) is stored quantized (T5's wo is not)
    mlp_out_quantized: bool = True
    device: str = "cuda"

    @property
    def stream_bytes(self) -> int:
        return stream_dtype_bytes(self.quant)

    @property
    def linear_quant(self) -> str:
        """How the frozen Linears are stored: the quantization asked for, unless the bnb quantizer
        does not convert this family's Linears (then fp32 after prepare_model_for_kbit_training)."""
        return effective_linear_quant(self.model, self.quant)


_STRUCTURE_CACHE: dict[tuple, tuple[ModelSpec, Structure]] = {}


def structure(model: ModelSpec, adapted: tuple[LinearSpec, ...], quant: str, double_quant: bool,
              device: str = "cuda") -> Structure:
    """The cached Structure of a model with these adapted Linears, this quantization and device."""
    key = (id(model), tuple(l.name for l in adapted), quant, bool(double_quant), device)
    hit = _STRUCTURE_CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    st = _build_structure(model, adapted, quant, bool(double_quant), device)
    if len(_STRUCTURE_CACHE) > 4096:
        _STRUCTURE_CACHE.clear()
    _STRUCTURE_CACHE[key] = (model, st)
    return st


def _build_structure(model: ModelSpec, adapted, quant: str, dq: bool, device: str = "cuda") -> Structure:
    sizes: Counter = Counter()
    lin_in: dict[str, float] = {}
    lin_n: dict[str, float] = {}
    mlp_out: dict[str, float] = {}
    mlp_all: dict[str, float] = {}
    for l in adapted:
        sizes[l.in_features] += 1
        sizes[l.out_features] += 1
        if l.role == "lm_head":
            continue
        layers = max(_stack_layers(model, l.stack), 1)
        lin_in[l.stack] = lin_in.get(l.stack, 0.0) + l.in_features / layers
        lin_n[l.stack] = lin_n.get(l.stack, 0.0) + 1.0 / layers
        if l.role in INT8_OUTLIER_ROLES:
            mlp_out[l.stack] = mlp_out.get(l.stack, 0.0) + l.in_features / layers
        if _input_group(l.role) in ("mlp_in", "down", "fc_out"):
            mlp_all[l.stack] = mlp_all.get(l.stack, 0.0) + l.in_features / layers
    groups: dict[str, dict[tuple, int]] = {}
    outl: dict[str, float] = {}
    all_in: dict[str, float] = {}
    for l in model.linears:
        if l.role == "lm_head" or l.layer is None or linear_storage(model, quant, l) != quant:
            continue  # int8 bookkeeping covers the Linears that really are int8
        layers = max(_stack_layers(model, l.stack), 1)
        groups.setdefault(l.stack, {})[(l.layer, _input_group(l.role))] = l.in_features
        all_in[l.stack] = all_in.get(l.stack, 0.0) + l.in_features / layers
        if l.role in INT8_OUTLIER_ROLES:
            outl[l.stack] = outl.get(l.stack, 0.0) + l.in_features / layers
    int8_inputs = {st: sum(g.values()) / max(_stack_layers(model, st), 1) for st, g in groups.items()}
    first_stack = "encoder" if model.is_encoder_decoder else "decoder"
    first_attn_in = sum(l.in_features for l in adapted
                        if l.stack == first_stack and l.layer == 0 and _input_group(l.role) == "attn_in")
    sigma = float(model.config.get("initializer_range", 0.02)) * math.sqrt(model.hidden_size)
    return Structure(
        model=model, quant=quant, double_quant=dq, adapted=tuple(adapted),
        frozen_linear_weights=frozen_linear_weights(model, quant, dq),
        unquantized_weights=unquantized_weights(model, quant),
        lora_sizes=sizes, lora_in_per_layer=lin_in, lora_count_per_layer=lin_n,
        head_adapted=any(l.role == "lm_head" for l in adapted),
        biggest_linear_numel=max((l.in_features * l.out_features for l in model.linears
                                  if l.role != "lm_head" and linear_storage(model, quant, l) == quant), default=0),
        mlp_out_quantized=any(l.role in INT8_OUTLIER_ROLES and linear_storage(model, quant, l) == quant
                              for l in model.linears),
        int8_inputs_per_layer=int8_inputs, int8_outlier_in_per_layer=outl, int8_all_in_per_layer=all_in,
        outlier_p=_p_silu_product_exceeds(sigma, 6.0) if effective_linear_quant(model, quant) == "int8" else 0.0,
        first_layer_attn_in_adapted=first_attn_in, mlp_out_adapted_in=mlp_out, mlp_adapted_in=mlp_all,
        first_layer_mlp_adapted=any(l.stack == first_stack and l.layer == 0 and _input_group(l.role) in ("mlp_in", "down", "fc_out")
                                    for l in adapted),
        linear_shapes=tuple(sorted({(l.stack, l.role in INT8_OUTLIER_ROLES, l.in_features, l.out_features)
                                    for l in model.linears if l.role != "lm_head" and l.layer is not None
                                    and linear_storage(model, quant, l) == quant})),
        device=device,
    )


def _mask_bytes(st: Structure, input_bytes: int) -> int:
    """Bytes per element a dropout keeps besides its output: CUDA's fused native_dropout a bool
    mask (1 B); on CPU ATen multiplies by a noise tensor of the input's dtype and keeps that
    (aten/src/ATen/native/Dropout.cpp: the fused kernel is acceptable on CUDA/XPU only)."""
    return 1 if st.device != "cpu" else input_bytes


def effective_linear_quant(model: ModelSpec, quant: str) -> str:
    """transformers' bitsandbytes integration replaces only modules whose type *is* nn.Linear
    (or Conv1D) (integrations/bitsandbytes.py::replace_with_bnb_linear: ``type(module) is
    nn.Linear``); subclasses such as FalconLinear stay in the load dtype, and
    prepare_model_for_kbit_training then casts them to fp32 like any other bf16 parameter."""
    if quant in QUANTIZED and not model.arch.bnb_converts_linears:
        return "fp32"
    return quant


def linear_storage(model: ModelSpec, quant: str, linear: LinearSpec) -> str:
    """How one frozen Linear is stored. Modules in the model's ``_keep_in_fp32_modules`` (T5's
    wo) are in the bnb quantizer's modules_to_not_convert, so a quantized base keeps them in the
    load dtype, then fp32 after prepare_model_for_kbit_training; an fp16 load upcasts them to
    fp32 (transformers modeling_utils: only for fp16, not bf16)."""
    if linear.leaf in model.arch.keep_fp32_leaves and quant in QUANTIZED + ("fp16",):
        return "fp32"
    return effective_linear_quant(model, quant)


def _stack_layers(model: ModelSpec, stack: str) -> int:
    return model.num_encoder_layers if stack == "encoder" else model.num_layers


def _input_group(role: str) -> str:
    """Linears that read the same tensor (their inputs are one storage)."""
    if role in ("q", "k", "v", "qkv"):
        return "attn_in"
    if role in ("gate", "up", "gate_up", "fc_in"):
        return "mlp_in"
    if role in ("cross_k", "cross_v"):
        return "encoder_out"
    return role


def stream_dtype_bytes(quant: str) -> int:
    """a: bytes/element of the residual stream.

    bf16/fp16 base: 2. fp32 base: 4. Quantized base: 4, because prepare_model_for_kbit_training
    casts embeddings and norm weights to fp32 (peft/utils/other.py), the embedding output is
    fp32, and bnb Linear4bit/Linear8bitLt return their output in the input's dtype
    (bitsandbytes/nn/modules.py: ``out.to(inp_dtype)``), so the whole stream stays fp32.
    """
    return 4 if quant in QUANTIZED or quant == "fp32" else 2


def choose_attention(model: ModelSpec, train: TrainSpec, compute_capability: str | None) -> str:
    """The sdpa kernel CUDA picks (torch aten/.../transformers/cuda/sdp_utils.cpp: flash, then
    mem-efficient, then math).

    - eager attention (gemma2 logit softcapping) never reaches sdpa;
    - a mask (a sliding window shorter than the sequence, T5's position bias) rules out flash;
    - flash needs fp16/bf16, head dim <= 256 and sm80+, and supports grouped-query attention;
    - mem-efficient takes fp32 too, but not grouped-query attention
      (``check_batch_size_and_num_heads_dense<false>``) -> math.
    transformers passes no mask and ``is_causal=True`` for an unpadded batch, and
    ``enable_gqa=True`` when there is no mask (integrations/sdpa_attention.py::use_gqa_in_sdpa).
    """
    if train.attention != "auto":
        return train.attention
    if model.arch.attention == "eager":
        return "eager"
    if train.device == "cpu":  # loraplan profile --device cpu runs sdpa on the math backend
        return "math"
    masked = model.arch.position == "relative_bias" or model.arch.sdpa_mask or (
        model.arch.sliding_window is not None and train.seq > model.arch.sliding_window)
    cc = float(compute_capability) if compute_capability else 8.0
    if not masked and stream_dtype_bytes(train.quant) == 2 and model.head_dim <= 256 and cc >= 8.0:
        return "flash"
    if model.num_kv_heads != model.num_heads and not masked:
        return "math"
    return "efficient"


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def quantized_linear_bytes(linear: LinearSpec, quant: str, double_quant: bool) -> int:
    """Bytes of one frozen Linear weight (+ quantization state), as allocated.

    - nf4/fp4 (bitsandbytes Params4bit, blocksize 64): packed uint8 n/2 B; absmax fp32 per
      64-block, or with double quant uint8 absmax per block + fp32 nested absmax per 256 blocks
      + 256-entry fp32 code + fp32 offset (functional.py::quantize_4bit, quantize_blockwise);
      plus the 16-entry fp32 code table. n = in·out. Each tensor is its own 512-B-rounded block.
    - int8 (Int8Params, LLM.int8): CB int8 [out, in] + SCB fp32 [out] (nn/modules.py::Int8Params).
    - bf16/fp16/fp32: n × 2/2/4.
    The bias, if any, is not quantized: see ``unquantized_weights``.
    """
    n = linear.in_features * linear.out_features
    if quant in FOUR_BIT:
        blocks = -(-n // 64)
        b = _blocks(n / 2) + _blocks(16 * 4)
        if double_quant:
            b += _blocks(blocks) + _blocks(-(-blocks // 256) * 4) + _blocks(256 * 4) + _blocks(4)
        else:
            b += _blocks(blocks * 4)
        return int(b)
    if quant == "int8":
        return int(_blocks(n) + _blocks(linear.out_features * 4))
    return int(_blocks(n * (4 if quant == "fp32" else 2)))


def frozen_linear_weights(model: ModelSpec, quant: str, double_quant: bool) -> int:
    """Σ over every Linear except an unquantized lm_head of quantized_linear_bytes().

    transformers' bnb quantizer converts nn.Linear modules only and keeps the output embedding
    (lm_head) in the load dtype (quantizers/quantizer_bnb_*: modules_to_not_convert).
    """
    return sum(quantized_linear_bytes(l, linear_storage(model, quant, l), double_quant)
               for l in model.linears if l.role != "lm_head")


def unquantized_weights(model: ModelSpec, quant: str) -> int:
    """Embeddings, norms, position tables, biases and lm_head, in their final dtype.

    bf16/fp16 base: 2 B/param; fp32 base: 4 B. Quantized base: prepare_model_for_kbit_training
    casts every fp16/bf16 parameter that is not Params4bit/Int8Params to fp32
    (peft/utils/other.py): 4 B/param (Llama-2-7B: embed + lm_head 262M params -> 1.05 GB).
    A tied lm_head is the embedding and is counted once.
    """
    b = stream_dtype_bytes(quant)
    total = sum(_blocks(p.numel * b) for p in model.others)
    for l in model.linears:
        if l.role == "lm_head":
            if not model.tie_word_embeddings:
                total += _blocks(l.numel * b)
        elif l.bias:
            total += _blocks(l.out_features * b)
    return int(total)


# ---------------------------------------------------------------------------------------------
# LoRA weights, gradients, optimizer
# ---------------------------------------------------------------------------------------------


def lora_weights(st: Structure, r):
    """r·(in+out) fp32 params per adapted Linear: 4 B each (lora_A [r, in], lora_B [out, r]).

    Adapters are created in the base dtype, then get_peft_model(autocast_adapter_dtype=True)
    upcasts bf16/fp16 adapters to fp32 (peft/tuners/tuners_utils.py::cast_adapter_dtype).
    """
    return sum(count * _blocks(r * size * 4) for size, count in st.lora_sizes.items())


def lora_gradients(st: Structure, r):
    """One fp32 gradient per LoRA parameter (same shapes as the weights), alive from backward
    until ``zero_grad(set_to_none=True)``."""
    return lora_weights(st, r)


def optimizer_state(st: Structure, r, optimizer: str, paged_threshold: int = 100_000):
    """Optimizer state inside torch's allocator, created at the first ``step()``.

    - adamw (torch.optim.AdamW): exp_avg + exp_avg_sq fp32: 8 B/param (+ a CPU step counter).
    - sgd (momentum=0): no state.
    - adamw_8bit (bnb AdamW8bit): uint8 state1/state2 + fp32 absmax per 256-block: 2·(1 + 4/256)
      B/param; tensors with numel < 4096 get fp32 states, 8 B/param
      (bitsandbytes/optim/optimizer.py::Optimizer8bit.init_state, min_8bit_size=4096).
    - paged_adamw_8bit / paged_adamw_32bit: buffers of tensors with numel >= 1e5 come from
      cudaMallocManaged (functional.py::get_paged), outside torch's allocator: 0 here, reported
      by ``paged_optimizer_state``; smaller tensors as adamw_8bit / 32-bit states.
    """
    if optimizer == "sgd":
        return 0
    total = 0
    for size, count in st.lora_sizes.items():
        n = r * size
        fp32 = 2 * _blocks(4 * n)
        if optimizer in ("adamw", "paged_adamw_32bit"):
            per = fp32
        else:
            per = _where(n < 4096, fp32, 2 * (_blocks(n) + _blocks(_ceil(n / 256) * 4)))
        if optimizer.startswith("paged"):
            per = _where(n >= paged_threshold, 0, per)
        total = total + count * per
    return total


def paged_optimizer_state(st: Structure, r, optimizer: str, paged_threshold: int = 100_000):
    """Paged optimizer buffers (cudaMallocManaged): counted in NVML 'used' while resident, never
    in torch.cuda.max_memory_allocated (bitsandbytes/functional.py::get_paged)."""
    if not optimizer.startswith("paged"):
        return 0
    per = 8 if optimizer == "paged_adamw_32bit" else 2 * (1 + 4 / 256)
    total = 0
    for size, count in st.lora_sizes.items():
        n = r * size
        total = total + count * _where(n >= paged_threshold, n * per, 0)
    return total


def optimizer_step_temporaries(st: Structure, r, optimizer: str):
    """Transient bytes inside ``opt.step()``.

    torch AdamW on CUDA takes the foreach path, which makes ``exp_avg_sq_sqrt =
    torch._foreach_sqrt(exp_avg_sqs)``: one fp32 copy of every trainable tensor, 4 B/param
    (torch/optim/adam.py::_multi_tensor_adam). SGD (momentum 0) and the bitsandbytes optimizers
    (fused kernels, in place) allocate nothing per parameter.
    """
    if optimizer != "adamw":
        return 0
    return lora_weights(st, r)


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves for backward
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The numbers of a case: plain ints, or numpy arrays of one shape (a grid)."""

    b: Any
    seq: Any  # encoder / decoder-only sequence length
    tseq: Any  # decoder length (= seq for decoder-only)
    r: Any
    dropout: Any

    @property
    def T(self):
        return self.b * self.tseq

    @property
    def T_enc(self):
        return self.b * self.seq


def lora_activations_per_layer(st: Structure, x: Shape, stack: str, T):
    """Bytes peft's LoRA branch saves per layer, for each adapted Linear [out, in]:

    - dropout p > 0: the fp32 dropout output (4·T·in, lora_A's input) + the fused dropout's
      bool mask (1·T·in; CUDA native_dropout) -> 5·T·in (CPU: an fp32 noise tensor, 8·T·in);
    - p = 0 (nn.Identity): lora_A saves its input: the fp32 cast copy (4·T·in) of a bf16/fp16
      stream, one per module (peft Linear.forward: ``x = self._cast_input_dtype(x, lora_A.dtype)``),
      or the fp32 stream tensor itself (already alive: 0 extra);
    - lora_A's r-wide fp32 output, saved by lora_B: 4·T·r.
    Source: peft/tuners/lora/layer.py and bnb.py (forward); memory-physics.md §4.
    """
    in_sum = st.lora_in_per_layer.get(stack, 0.0)
    n = st.lora_count_per_layer.get(stack, 0.0)
    per_in = _where(x.dropout > 0, 4 + _mask_bytes(st, 4), 0 if st.stream_bytes == 4 else 4)
    return per_in * T * in_sum + n * 4 * T * x.r


def attention_saved_per_layer(st: Structure, kind: str, T, b, seq, kv_seq, cross: bool = False):
    """Bytes the attention block saves per layer (after its projections).

    - sdpa flash: q, k, v as given to the kernel (after RoPE: new tensors) and its output, with
      the head dim padded to a multiple of 8 (torch sdpa ``pad_last_dim<8>``), + the fp32
      logsumexp 4·b·n_h·s. GQA native: k, v keep n_kv heads.
    - sdpa mem-efficient: q, k, v, output + fp32 logsumexp padded to a multiple of 32 in s.
    - math (fp32 stream with grouped-query attention: torch documents GQA for flash and math
      only): scaled q, k and v repeated to n_h heads and the softmax output a·b·n_h·s².
    - eager (transformers eager_attention_forward): q, k and v repeated, the fp32 softmax (4 B)
      and its cast back to the stream dtype (a B); logit softcapping (gemma2) keeps tanh's output.
    Source: transformers integrations/sdpa_attention.py, models/llama/modeling_llama.py; torch
    aten/src/ATen/native/transformers/attention.cpp (outputs each kernel saves).
    """
    m, a = st.model, st.stream_bytes
    n_h, n_kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    # phi3 slices q, k, v out of its fused qkv_proj output as views: the saved v view keeps the
    # whole [T, (n_h + 2·n_kv)·d] output alive, q and k parts included. (gpt-neox and falcon
    # reshape and split per head; their traces show no such retention.)
    fused = a * T * (n_h + n_kv) * d if _has_fused_qkv(m) and kind in ("flash", "efficient") else 0
    return fused + _attention_core_saved(st, kind, T, b, seq, kv_seq, cross)


def _has_fused_qkv(model: ModelSpec) -> bool:
    return model.model_type == "phi3" and any(l.role == "qkv" for l in model.linears)


def _attention_core_saved(st: Structure, kind: str, T, b, seq, kv_seq, cross: bool = False):
    m, a = st.model, st.stream_bytes
    n_h, n_kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    if kind == "flash":
        dp = -(-d // 8) * 8
        return a * T * n_h * dp * 2 + 2 * a * b * kv_seq * n_kv * dp + 4 * b * n_h * seq
    if kind == "efficient":
        # T5: the relative position bias plus the mask goes in as an additive mask [1, n_h, s, kv]
        # in the stream dtype, made per self-attention call (last dim padded to 16) and saved for
        # backward; cross-attention reuses one zeros bias (see t5_shared_biases).
        bias = a * n_h * seq * (_ceil(kv_seq / 16) * 16) if _t5_style(m) and not cross else 0
        if m.arch.sdpa_mask:  # falcon: the causal mask, made additive per call [b, 1, s, kv]
            bias = a * b * seq * (_ceil(kv_seq / 16) * 16)
        return a * T * n_h * d * 2 + 2 * a * b * kv_seq * n_kv * d + 4 * b * n_h * (_ceil(seq / 32) * 32) + bias
    scores = b * n_h * seq * kv_seq
    qkv = a * T * n_h * d + 2 * a * b * kv_seq * n_h * d  # k, v repeated to n_h heads
    if kind == "math":
        # aten _scaled_dot_product_attention_math keeps its intermediates in fp32 for half inputs
        # (torch docs): q·√scale, (k·√scale)ᵀ and v (repeated for enable_gqa) and the softmax
        # output are saved in fp32; the scores before the softmax and the output are not.
        return 4 * (T * n_h * d + 2 * b * kv_seq * n_h * d) + 4 * scores
    # eager (transformers eager_attention_forward, repeat_kv): the fp32 softmax (4 B) and its
    # cast back to the stream dtype (a B, a no-op for an fp32 stream) are saved; logit
    # softcapping (gemma2) keeps tanh's output too (a B).
    softmax = 4 + (a if a != 4 else 0)
    softcap = a if m.config.get("attn_logit_softcapping") else 0
    return qkv + (softmax + softcap) * scores


def norm_saved(st: Structure, T):
    """One norm's saved bytes.

    RMSNorm (llama): the fp32 upcast of its input (4·T·h; for an fp32 stream the input itself,
    which the norm then keeps alive) + rsqrt (4·T). T5LayerNorm multiplies the *original*
    input by the fp32 rsqrt, so a half-precision input (a·T·h) is kept beside the fp32 copy that
    ``pow`` saves. LayerNorm (native_layer_norm): its input (a·T·h) + mean and rstd (2·4·T).
    Source: modeling_llama.py::LlamaRMSNorm, modeling_t5.py::T5LayerNorm; memory-physics.md §5.
    """
    h, a = st.model.hidden_size, st.stream_bytes
    if st.model.arch.norm == "rms":
        t5_input = a if (_t5_style(st.model) and a != 4) else 0
        return (4 + t5_input) * T * h + 4 * T
    return a * T * h + 8 * T


def _t5_style(model: ModelSpec) -> bool:
    """T5/mT5: T5LayerNorm, relative position bias, residual dropout, loss on raw logits."""
    return model.arch.position == "relative_bias"


def hidden_dropout(model: ModelSpec) -> float:
    """p of the model's own residual/FFN dropouts in training (not LoRA's, not attention's):
    T5 ``dropout_rate`` (0.1), OPT ``dropout`` (0.1), others ``hidden_dropout`` (0)."""
    cfg = model.config
    if _t5_style(model):
        return float(cfg.get("dropout_rate", 0.1) or 0)
    if model.model_type == "opt":
        return float(cfg.get("dropout", 0.1) or 0)
    return float(cfg.get("hidden_dropout", 0.0) or 0)


def model_dropout_masks_per_layer(st: Structure, T, stack: str):
    """Bool masks (1 B/elem) the model's own dropouts keep per layer (CUDA native_dropout):
    T5 every sub-layer output (2 in the encoder, 3 in the decoder, T·h each) and the FFN inner
    activation (T·I); OPT the attention and FFN outputs (2·T·h)."""
    m = st.model
    if not hidden_dropout(m):
        return 0
    k = _mask_bytes(st, st.stream_bytes)
    if _t5_style(m):
        sub = 2 if stack == "encoder" else 3
        return k * (sub * T * m.hidden_size + T * m.intermediate_size)
    if m.model_type == "opt":
        return k * 2 * T * m.hidden_size
    return 0


#: activations transformers implements in Python (not one fused kernel): NewGELUActivation
#: keeps x (for pow), tanh's output, 0.5·x and 1 + tanh (activations.py).
_UNFUSED_GELU = ("gelu_new", "gelu_fast", "gelu_pytorch")


def _activation(model: ModelSpec) -> str:
    cfg = model.config
    if _t5_style(model):
        ffp = cfg.get("feed_forward_proj", "relu")
        return cfg.get("dense_act_fn") or ("gelu_new" if ffp == "gated-gelu" else ffp.split("-")[-1])
    return str(cfg.get("hidden_act") or cfg.get("hidden_activation") or cfg.get("activation_function") or "silu")


def mlp_saved(st: Structure, T):
    """MLP saved bytes. Gated (act(gate) * up) with a fused activation (SiLU, GELU): the
    activation's input, its output and the up output: 3·a·T·I; with NewGELU (T5 v1.1, mT5:
    gelu_new in Python) x, tanh(·), 0.5·x, 1 + tanh and the product's two inputs: 6·a·T·I.
    Plain (act(fc_in) -> fc_out): the activation's input or output: a·T·I (5·a·T·I unfused).
    Frozen Linears save nothing for their own weights (autograd saves only what a needed
    gradient uses; the input gradient needs only the weight)."""
    unfused = _activation(st.model) in _UNFUSED_GELU
    if st.model.arch.mlp == "gated":
        k = 6 if unfused else 3
    else:
        k = 4 if unfused else 1
    return k * st.stream_bytes * T * st.model.intermediate_size


def layer_saved(st: Structure, kind: str, x: Shape, stack: str = "decoder"):
    """S_layer: the bytes one decoder (or encoder) layer saves for backward without checkpointing.

    For a bf16 Llama layer without LoRA:
    8·T·h + 4·T·d·(n_h + n_kv) + 6·T·I + 4·b·n_h·s + 8·T (memory-physics.md §5, exact on CPU).
    Encoder-decoder decoder layers add the cross-attention over the encoder output (and its norm).
    """
    m = st.model
    if stack == "encoder":
        T = x.T_enc
        att = attention_saved_per_layer(st, kind, T, x.b, x.seq, x.seq)
        norms = m.arch.norms_per_layer - 1
    else:
        T = x.T
        att = attention_saved_per_layer(st, kind, T, x.b, x.tseq, x.tseq)
        norms = m.arch.norms_per_layer
        if m.is_encoder_decoder:
            att = att + attention_saved_per_layer(st, kind, T, x.b, x.tseq, x.seq, cross=True)
    return (norms * norm_saved(st, T) + att + mlp_saved(st, T) + lora_activations_per_layer(st, x, stack, T)
            + model_dropout_masks_per_layer(st, T, stack) + head_norms_saved(st, T))


def head_norms_saved(st: Structure, T):
    """Per-head RMSNorms on q and k (qwen3 ``q_norm``/``k_norm``): like any RMSNorm they keep an
    fp32 copy of their input (4·T·n·d) and rsqrt (4·T·n), for n = n_h and n_kv heads."""
    m = st.model
    if "q_norm" not in m.arch.extra_norms:
        return 0
    heads = m.num_heads + m.num_kv_heads
    return 4 * T * heads * m.head_dim + 4 * T * heads


def checkpoint_inputs(st: Structure, x: Shape, kind: str = "flash"):
    """Non-reentrant checkpointing keeps each checkpointed layer's inputs: L·a·T·h
    (torch/utils/checkpoint.py: the inputs are saved by _NoopSaveInputs for the recompute),
    and the mask passed to every layer: eager attention gets an additive [b, 1, s, s] mask in
    the stream dtype (transformers masking_utils eager_mask), one tensor shared by all layers;
    T5 passes its position biases (modeling_t5.py compute_bias) the same way."""
    m = st.model
    mask = st.stream_bytes * x.b * x.tseq * x.tseq if kind == "eager" else 0
    mask = mask + t5_shared_biases(st, x, checkpointed=True)
    return st.stream_bytes * m.hidden_size * (m.num_layers * x.T + m.num_encoder_layers * x.T_enc) + mask


def t5_shared_biases(st: Structure, x: Shape, checkpointed: bool):
    """T5's biases computed once and handed to every layer (modeling_t5.py compute_bias): the
    cross-attention's zeros bias [1, n_h, s_t, s_e], kept by the graph, and — as checkpoint
    inputs — the encoder and decoder position biases [1, n_h, s, s]."""
    if not _t5_style(st.model):
        return 0
    n = st.stream_bytes * st.model.num_heads
    shared = n * x.tseq * x.seq
    if checkpointed:
        shared = shared + n * (x.seq * x.seq + x.tseq * x.tseq)
    return shared


def head_lora_activations(st: Structure, x: Shape):
    """LoRA on lm_head saves its dropout output and mask (5·T·h; 4·T·h without dropout) and 4·T·r."""
    if not st.head_adapted:
        return 0
    h = st.model.hidden_size
    return _where(x.dropout > 0, 5, 4) * x.T * h + 4 * x.T * x.r


def saved_activations(st: Structure, kind: str, x: Shape, gradient_checkpointing: bool):
    """Activations alive at the end of the forward (excluding the loss): every layer's saved
    tensors (or only the checkpointed inputs), the final norm, RoPE tables (cos, sin:
    2·a·s·d, position_ids have batch 1) and, for encoder-decoder models, the encoder output
    read by every cross-attention."""
    m = st.model
    if gradient_checkpointing:
        layers = checkpoint_inputs(st, x, kind)
    else:
        layers = m.num_layers * layer_saved(st, kind, x, "decoder")
        if m.is_encoder_decoder:
            layers = layers + m.num_encoder_layers * layer_saved(st, kind, x, "encoder")
        layers = layers - first_layer_not_saved(st, kind, x) + t5_shared_biases(st, x, checkpointed=False)
    final = norm_saved(st, x.T)
    if m.is_encoder_decoder:
        final = final + norm_saved(st, x.T_enc) + st.stream_bytes * x.T_enc * m.hidden_size
    rope = 2 * st.stream_bytes * x.tseq * m.head_dim if m.arch.position == "rope" else 0
    return layers + final + rope + head_lora_activations(st, x)


def first_layer_not_saved(st: Structure, kind: str, x: Shape):
    """What the first layer does *not* save when its input needs no gradient.

    Without gradient checkpointing nothing calls enable_input_require_grads (the protocol and
    prepare_model_for_kbit_training only do so with checkpointing), so the frozen embedding's
    output does not require grad and autograd saves nothing for ops on it: the first layer's
    input norm and the dropout masks of its adapted attention-input Linears (dropout needs no
    input gradient; lora_A still saves the dropout output for its weight gradient). When no
    attention input is adapted there, the attention block saves nothing either.
    """
    m = st.model
    first = "encoder" if m.is_encoder_decoder else "decoder"
    T = x.T_enc if first == "encoder" else x.T
    not_saved = norm_saved(st, T) + _where(x.dropout > 0, _mask_bytes(st, 4), 0) * T * st.first_layer_attn_in_adapted
    if not st.first_layer_attn_in_adapted:
        seq = x.seq if first == "encoder" else x.tseq
        not_saved = not_saved + attention_saved_per_layer(st, kind, T, x.b, seq, seq)
    if m.arch.parallel_attn and not st.first_layer_mlp_adapted:
        # parallel attention (falcon, gpt-neox): the MLP reads the layer input directly
        not_saved = not_saved + mlp_saved(st, T)
    return not_saved


# ---------------------------------------------------------------------------------------------
# Logits and loss, backward transients, int8, workspaces
# ---------------------------------------------------------------------------------------------


def logits_bytes(st: Structure) -> int:
    """Bytes per logit as lm_head produces it: its weight dtype (fp32 after prepare for a
    quantized base, else the load dtype) -> 4 or 2."""
    return stream_dtype_bytes(st.quant)


def logit_softcap_saved(st: Structure, x: Shape):
    """Final-logit softcapping (gemma2: ``logits = tanh(logits / cap) * cap``) keeps tanh's output
    for backward: c·T·V more, alive until the loss backward passes it."""
    if not st.model.config.get("final_logit_softcapping"):
        return 0
    return logits_bytes(st) * x.T * st.model.vocab_size


def loss_forward_transient(st: Structure, x: Shape):
    """Live at the end of the forward inside the loss: the logits (c·T·V), their fp32 copy when
    c = 2 (ForCausalLMLoss: ``logits.float()``) and log_softmax's fp32 output (saved):
    10·T·V for bf16 logits, 8·T·V for fp32 (transformers loss/loss_utils.py; the default
    logits_to_keep=0 keeps every position)."""
    TV = x.T * st.model.vocab_size
    c = logits_bytes(st)
    if _t5_style(st.model):  # T5ForConditionalGeneration: CrossEntropyLoss on the raw logits
        loss = 2 * c * TV
    else:
        loss = c * TV + (4 * TV if c == 2 else 0) + 4 * TV + logit_softcap_saved(st, x)
    if st.head_adapted:
        # LoRA on lm_head: the base logits, the LoRA branch's scaled fp32 output and their fp32
        # sum are alive together (peft Linear.forward: result + lora_B(lora_A(x)) * scaling)
        loss = _max(loss, c * TV + 8 * TV)
    return loss


def loss_backward_transient(st: Structure, x: Shape):
    """At the head of backward: log_softmax's saved fp32 output, the nll_loss gradient and
    log_softmax's input gradient, all fp32 [T, V]: 12·T·V (memory-physics.md §6). T5 computes
    CrossEntropyLoss on the logits as they are (modeling_t5.py): 3·c·T·V."""
    if _t5_style(st.model):  # no fp32 upcast: log_softmax, its grad in and out in the logits dtype
        return 3 * logits_bytes(st) * x.T * st.model.vocab_size
    return 12 * x.T * st.model.vocab_size + logit_softcap_saved(st, x)


def dequantized_weight_transient(st: Structure) -> int:
    """The largest weight a quantized Linear dequantizes on every call (forward fallback and
    backward): nf4/fp4 -> out·in·2 B in bf16 (bitsandbytes backends/cuda/ops.py
    ``_dequant_linear_fallback``; autograd MatMul4Bit.backward). int8 backward:
    ``CB.to(dtype_A)`` -> out·in·a (MatMul8bitLt.backward)."""
    if st.linear_quant not in QUANTIZED:
        return 0
    return st.biggest_linear_numel * (2 if st.linear_quant in FOUR_BIT else st.stream_bytes)


def layer_backward_transients(st: Structure, x: Shape, kind: str = "flash", gradient_checkpointing: bool = True):
    """Bytes above the top layer's saved tensors S at its largest point in backward (may be < 0
    in part: tensors already released), for the MLP, where layers peak.

    With D the input width of the MLP-out Linear (down/fc_out; D = I), a the stream bytes,
    l = the bytes its LoRA saves (5·T·D with dropout, released when its backward runs), the
    candidates are, on top of the residual-stream gradient a·T·h:
    - recompute / forward through an adapted down projection: its input (a·T·D) held while
      4-bit dequantizes the weight (W_dq = out·in·2 B) beside a bf16 copy of the input (2·T·D),
      before the LoRA branch exists (−l); then the LoRA branch's fp32 cast of a bf16/fp16
      input (4·T·D), the base output (a·T·h) and lora_B's fp32 output with its scaled copy
      (8·T·h) beside the complete S;
    - backward through the down projection: the LoRA branch runs first (later autograd
      sequence number) and leaves its input gradient (dropout backward, fp32 4·T·D, cast to the
      stream dtype when a = 2); then the base: W_dq + its bf16 input gradient (2·T·D) for
      4-bit, a·T·D for bf16; then their sum (a·T·D);
    - the MLP product's backward (gated): the down-input gradient and the two it makes:
      3·a·T·I; plain MLP: 2·a·T·I.
    Non-reentrant recompute stops early once the last saved tensor is made, so without LoRA on
    the down projection its forward is not recomputed. Saved tensors of nodes already run are
    released as backward goes (autograd release_variables). Sources: peft/tuners/lora/layer.py
    and bnb.py (branch order, casts), bitsandbytes autograd MatMul4Bit.backward, cuda
    ``_dequant_linear_fallback``; checked against the meta-device trace on small configs.
    """
    m, a, T = st.model, st.stream_bytes, x.T
    I = m.intermediate_size
    k = 3 if m.arch.mlp == "gated" else 2
    deq = dequantized_weight_transient(st) if st.mlp_out_quantized else 0
    four_bit = st.linear_quant in FOUR_BIT and st.mlp_out_quantized
    D_ad = st.mlp_out_adapted_in.get("decoder", 0.0)  # Σ adapted MLP-out inputs (≈ I or 0)
    adapted = 1 if D_ad else 0
    l_saved = _where(x.dropout > 0, 4 + _mask_bytes(st, 4), 0 if a == 4 else 4) * T * D_ad
    lora_grad_peak = adapted * (4 + (a if a != 4 else 0)) * T * I
    lora_grad_held = adapted * (a if a != 4 else 4) * T * I
    base = (deq + 2 * T * I) if four_bit else (deq + a * T * I if deq else a * T * I)
    candidates = [
        -l_saved + k * a * T * I,  # MLP product backward
        -l_saved + _max(lora_grad_peak, lora_grad_held + base),  # down backward, base branch
        -l_saved + adapted * (lora_grad_held + 2 * a * T * I),  # down backward, the sum
    ]
    if hidden_dropout(m) and _t5_style(m):
        # T5's FFN dropout comes after the product: the recompute runs to it, making its output
        candidates.append(-l_saved + a * T * I)
    if adapted:
        candidates.append(-l_saved + a * T * I + ((2 * T * I + deq) if four_bit else 0))  # recompute: base
        # recompute: LoRA branch of the down projection: its fp32 cast of a half input (held by
        # peft's forward locals), the base output (a·T·h) and lora_B's fp32 output with its
        # scaled copy (2·4·T·h)
        candidates.append(a * T * I + (4 * T * I if a != 4 else 0) + (8 + a) * T * m.hidden_size)
    best = candidates[0]
    for c in candidates[1:]:
        best = _max(best, c)
    extra = 0
    if hidden_dropout(m):
        # a residual dropout's backward makes the branch's gradient a tensor of its own, beside
        # the residual path's (T5, OPT): one more a·T·h
        extra = a * T * m.hidden_size
    if _t5_style(m):
        # T5 in backward: the gradient of the shared position bias [1, n_h, s, s]; with
        # checkpointing also the bias recomputed in the first block and the cross-attention's
        # recomputed zeros bias
        extra = extra + a * m.num_heads * x.tseq * x.tseq
        if gradient_checkpointing:
            extra = extra + a * m.num_heads * (x.tseq * x.tseq + x.tseq * x.seq)
    if kind in ("math", "eager"):
        # score-matrix attention backward, after the MLP's backward has released the MLP's saved
        # tensors: the softmax output's gradient and the scores' gradient, fp32 [b, n_h, s, s]
        # each, beside the saved softmax
        mlp_lora = _where(x.dropout > 0, 4 + _mask_bytes(st, 4), 0 if a == 4 else 4) * T * st.mlp_adapted_in.get("decoder", 0.0)
        extra = _max(extra, 2 * 4 * x.b * m.num_heads * x.tseq * x.tseq - mlp_saved(st, T) - mlp_lora - best)
    return best + a * T * m.hidden_size + extra


def default_int8_outlier_fraction(st: Structure, T):
    """Share of MLP-out input columns with an element above LLM.int8's threshold (6.0), for the
    random-initialised models of the protocol.

    The down-projection input silu(g)·u with g, u ~ N(0, σ²), σ = initializer_range·√h
    (RMS-normed input): p = P(|silu(g)·u| > 6) per element by numerical integration, and
    1 − (1 − p)^T per column (0.82 for Llama-2-7B at T = 512; a CPU simulation with real
    random weights gives the same). Other inputs (RMS-normed, attention outputs) stay far
    below 6. Trained models have far fewer outlier columns (LLM.int8 paper: a handful of
    hidden dimensions): pass --int8-outlier-fraction.
    """
    return 1.0 - (1.0 - st.outlier_p) ** T


#: roles whose input is the MLP product (where random-init int8 outliers sit)
INT8_OUTLIER_ROLES = ("down", "fc_out")


def random_init_outlier_fraction(model: ModelSpec, T) -> float:
    """``default_int8_outlier_fraction`` for a model without a Structure (used by the trace)."""
    sigma = float(model.config.get("initializer_range", 0.02)) * math.sqrt(model.hidden_size)
    return 1.0 - (1.0 - _p_silu_product_exceeds(sigma, 6.0)) ** T


def _p_silu_product_exceeds(sigma: float, thr: float, n: int = 800) -> float:
    """P(|silu(g)·u| > thr) for independent g, u ~ N(0, σ²) (midpoint rule over g)."""
    lo, hi = -10 * sigma, 10 * sigma
    dx = (hi - lo) / n
    tot = 0.0
    for i in range(n):
        g = lo + (i + 0.5) * dx
        act = abs(g / (1.0 + math.exp(-g)))
        if act == 0:
            continue
        pdf = math.exp(-0.5 * (g / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        tot += pdf * math.erfc(thr / (act * sigma * math.sqrt(2))) * dx
    return tot


def int8_retained_per_step(st: Structure, x: Shape, outlier_fraction=None, gradient_checkpointing: bool = True):
    """What LLM.int8 keeps for a whole step, checkpointing or not.

    MatMul8bitLt stores ``ctx.tensors = (CAt, subA, A)`` as plain ctx attributes, not
    save_for_backward (bitsandbytes autograd/_functions.py): non-reentrant checkpointing cannot
    drop them and backward does not free them; they live until the graph dies, i.e. until
    ``loss`` is rebound after the *next* forward. Per layer: each distinct input A of an int8
    Linear (views share storage: q/k/v read one, gate/up another): a·T·in, plus subA, the fp32
    outlier columns of each call, f·a·T·in (CAt is None when the weight is frozen).
    ``outlier_fraction`` None: the random-init default for MLP-out inputs, 0 elsewhere; a
    number: that share for every int8 Linear.
    ctx.tensors is only set when an input needs a gradient: without checkpointing the first
    layer's input does not (see first_layer_not_saved), so its attention-input Linears keep
    nothing, nor, in a parallel-attention layer with an unadapted MLP, its MLP Linears.
    """
    if st.linear_quant != "int8":
        return 0
    a, m = st.stream_bytes, st.model
    total = 0
    if not gradient_checkpointing:
        first = "encoder" if m.is_encoder_decoder else "decoder"
        T0 = x.T_enc if first == "encoder" else x.T
        idle = m.hidden_size  # the attention input (q/k/v or fused qkv)
        if m.arch.parallel_attn and not st.first_layer_mlp_adapted:
            f = default_int8_outlier_fraction(st, T0) if outlier_fraction is None and st.device != "cpu" else (
                outlier_fraction or 0)
            idle = idle + m.hidden_size * (0 if m.arch.norms_per_layer == 1 else 1) + m.intermediate_size * (1 + f)
        total = total - a * T0 * idle
    for stack, in_sum in st.int8_inputs_per_layer.items():
        T = x.T_enc if stack == "encoder" else x.T
        L = _stack_layers(m, stack)
        if st.device == "cpu":  # MatMul8bitFp keeps ctx.A only: no outlier columns
            sub = 0
        elif outlier_fraction is None:
            sub = default_int8_outlier_fraction(st, T) * st.int8_outlier_in_per_layer.get(stack, 0.0)
        else:
            sub = outlier_fraction * st.int8_all_in_per_layer.get(stack, 0.0)
        total = total + L * a * T * (in_sum + sub)
    return total


def input_leaf_and_grad(st: Structure, x: Shape, gradient_checkpointing: bool):
    """The embedding output as a leaf that requires grad, and its ``.grad``: 2·a·T·h.

    With checkpointing, enable_input_require_grads marks the embedding output
    ``requires_grad_(True)`` (transformers modeling_utils): it becomes a leaf, backward
    accumulates a gradient into its ``.grad``, and the AccumulateGrad node of the graph held by
    ``loss`` keeps both alive through the optimizer step and into the next forward, until
    ``loss`` is rebound. Without checkpointing nothing requires the input's grad: 0.
    """
    if not gradient_checkpointing:
        return 0
    m = st.model
    return 2 * st.stream_bytes * m.hidden_size * (x.T_enc if m.is_encoder_decoder else x.T)


def last_hidden_state(st: Structure, x: Shape):
    """The final norm's output (a·T·h): the forward's ``hidden_states`` local is still alive while
    the loss is computed inside ``*ForCausalLM.forward`` (it is not saved for backward)."""
    return st.stream_bytes * x.T * st.model.hidden_size


def int8_saved_anyway(st: Structure, kind: str, x: Shape, gradient_checkpointing: bool):
    """int8 Linear inputs that are also tensors autograd saves without checkpointing: the
    attention output read by o_proj (saved by the flash / mem-efficient kernel) and, for a
    plain ReLU MLP (OPT, T5 v1.0), the ReLU output read by fc_out (ReLU saves its result).
    They are one storage, counted once. With checkpointing nothing else keeps them."""
    if st.linear_quant != "int8" or gradient_checkpointing:
        return 0
    m, a = st.model, st.stream_bytes
    per_layer = 0
    if kind in ("flash", "efficient"):
        per_layer = a * x.T * m.num_heads * m.head_dim
    if m.arch.mlp == "plain" and _activation(m) == "relu":
        per_layer = per_layer + a * x.T * m.intermediate_size
    return m.num_layers * per_layer


def int8_matmul_transient(st: Structure, x: Shape, outlier_fraction=None):
    """Inside an int8 Linear's forward (bitsandbytes backends/default/ops.py
    ``int8_mixed_scaled_mm``): the int32 matmul result (4·T·out) and the outlier weight columns
    ``CB[:, cols]`` gathered (1 B) and dequantized to fp32 (4 B), cast to A's dtype when that
    is not fp32: out·n·(5 + a') with n = f·in outlier columns. The largest over the Linears."""
    if st.linear_quant != "int8":
        return 0
    a = st.stream_bytes
    if st.device == "cpu":  # MatMul8bitFp dequantizes the whole weight to A's dtype, then linear
        return max((n_in * n_out for _, _, n_in, n_out in st.linear_shapes), default=0) * a
    cast = 0 if a == 4 else a
    best = 0
    for stack, outlier_role, n_in, n_out in st.linear_shapes:
        T = x.T_enc if stack == "encoder" else x.T
        if outlier_fraction is not None:
            f = outlier_fraction
        else:
            f = default_int8_outlier_fraction(st, T) if outlier_role else 0.0
        best = _max(best, 4 * T * n_out + n_out * _ceil(f * n_in) * (5 + cast))
    return best


def cuda_workspaces(gpu: GpuSpec | None, cal: Calibration, device: str = "cuda") -> int:
    """cuBLAS/cuBLASLt workspaces, allocated through the caching allocator but invisible to a
    dispatch trace: one per handle, and training uses two (the forward thread's and autograd's
    backward thread's). torch/csrc/cuda/CublasHandlePool.cpp default CUBLAS_WORKSPACE_CONFIG:
    ':4096:8' (32 MiB) on sm90+, ':4096:2:16:8' (8.125 MiB) before. The H100 bf16 reference
    cases sit 64 MiB above a dispatch trace (trace-notes.md)."""
    if device == "cpu":
        return 0
    cc = float(gpu.compute_capability) if gpu and gpu.compute_capability else 9.0
    per = cal.get("cublas_workspace_bytes_sm90", 32 * MiB) if cc >= 9.0 else cal.get(
        "cublas_workspace_bytes_pre_sm90", 8.125 * MiB)
    return int(cal.get("cublas_handles", 2) * per)


# ---------------------------------------------------------------------------------------------
# The peak: candidate moments
# ---------------------------------------------------------------------------------------------


def moments(st: Structure, train: TrainSpec, kind: str, x: Shape, gpu: GpuSpec | None,
            cal: Calibration) -> dict[str, dict[str, Any]]:
    """Ledger (component -> bytes) at each candidate moment of a steady-state step."""
    m, opt = st.model, train.optimizer
    base = {
        "frozen_linear_weights": st.frozen_linear_weights,
        "unquantized_weights": st.unquantized_weights,
        "lora_weights": lora_weights(st, x.r),
        "optimizer_state": optimizer_state(st, x.r, opt),
        "cuda_workspaces": cuda_workspaces(gpu, cal, st.device),
        "allocator_overhead": int(cal.get("allocator_overhead_bytes", 0)),
    }
    acts = saved_activations(st, kind, x, train.gradient_checkpointing)
    int8_keep = int8_retained_per_step(st, x, train.int8_outlier_fraction, train.gradient_checkpointing)
    # this step's int8 inputs that autograd saves anyway (no double count); the previous step's
    # graph holds its own copies in full
    int8_now = int8_keep - int8_saved_anyway(st, kind, x, train.gradient_checkpointing)
    out: dict[str, dict[str, Any]] = {}
    # 1. forward, inside the loss. int8: the previous step's graph still holds its ctx tensors.
    leaf = input_leaf_and_grad(st, x, train.gradient_checkpointing)
    out["forward"] = dict(base, activations=acts + int8_now + last_hidden_state(st, x),
                          logits_loss=loss_forward_transient(st, x), int8_previous_step=int8_keep,
                          previous_step_input_grad=leaf)
    # 1b. int8: inside the last layer's int8 matmul of the forward (before the logits exist).
    if st.linear_quant == "int8":
        out["int8 matmul"] = dict(base, activations=acts + int8_now, int8_previous_step=int8_keep,
                                  previous_step_input_grad=leaf,
                                  kernel_transients=int8_matmul_transient(st, x, train.int8_outlier_fraction))
    # 2. loss backward, at the head.
    out["loss backward"] = dict(base, activations=acts + int8_keep, logits_loss=loss_backward_transient(st, x))
    # 3. the first (top) decoder layer's backward: the other layers' inputs (checkpointing) or
    #    saved tensors, this layer's saved tensors (recomputed), gradient transients.
    S = layer_saved(st, kind, x, "decoder")
    if train.gradient_checkpointing:
        below = checkpoint_inputs(st, x, kind)
    else:
        below = (m.num_layers - 1) * S
        if m.is_encoder_decoder:
            below = below + m.num_encoder_layers * layer_saved(st, kind, x, "encoder")
    out["layer backward"] = dict(base, activations=below + S + int8_keep,
                                 backward_transients=layer_backward_transients(st, x, kind,
                                                                               train.gradient_checkpointing),
                                 lora_gradients=lora_gradients(st, x.r) / max(m.num_layers, 1))
    # 4. the optimizer step.
    out["optimizer step"] = dict(base, lora_gradients=lora_gradients(st, x.r),
                                 optimizer_temporaries=optimizer_step_temporaries(st, x.r, opt),
                                 input_embedding_grad=leaf)
    return out


def peak_allocated(st: Structure, train: TrainSpec, kind: str, x: Shape, gpu: GpuSpec | None, cal: Calibration):
    """Peak allocated bytes (scalar or array) and the index into MOMENTS of the peak moment."""
    ms = moments(st, train, kind, x, gpu, cal)
    totals = [sum(ms[k].values()) if k in ms else 0 for k in MOMENTS]
    if all(_is_scalar(t) for t in totals):
        i = max(range(len(totals)), key=lambda j: totals[j])
        return totals[i], i
    import numpy as np

    stacked = np.stack([np.broadcast_to(np.asarray(t, dtype=float), np.shape(x.b)) for t in totals])
    return stacked.max(axis=0), stacked.argmax(axis=0)


@dataclass(frozen=True)
class Setup:
    """Everything the ledger needs for one case."""

    structure: Structure
    train: TrainSpec
    attention: str
    shape: Shape = field(repr=False)


def make_setup(model: ModelSpec, lora, train: TrainSpec, adapted: tuple[LinearSpec, ...],
               compute_capability: str | None = "9.0") -> Setup:
    st = structure(model, adapted, train.quant, train.double_quant, train.device)
    tseq = (train.target_seq if train.target_seq is not None else train.seq) if model.is_encoder_decoder else train.seq
    shape = Shape(b=train.batch, seq=train.seq, tseq=tseq, r=lora.rank, dropout=lora.dropout)
    return Setup(st, train, choose_attention(model, train, compute_capability), shape)


def device_totals(peak_allocated, paged, cal: Calibration):
    """(peak reserved, device total, CUDA context) from peak allocated: ints, or int64 arrays.

    reserved = allocated × (1 + reserved_over_allocated_ratio) (caching-allocator slack);
    device total (NVML used) = reserved + cuda_context_bytes + paged optimizer buffers, which
    live in managed memory outside torch's allocator. Both coefficients come from the
    calibration (priors until 'loraplan calibrate' fits them from profile records)."""
    context = int(cal.get("cuda_context_bytes", 768 * MiB))
    reserved = peak_allocated * (1 + cal.get("reserved_over_allocated_ratio", 0.10))
    reserved = int(reserved) if _is_scalar(reserved) else reserved.astype("int64")
    return reserved, reserved + context + paged, context


def estimate_memory(s: Setup, gpu: GpuSpec | None, cal: Calibration) -> MemoryEstimate:
    """Peak allocated = the largest moment; reserved and device totals from named coefficients."""
    st, x = s.structure, s.shape
    ms = moments(st, s.train, s.attention, x, gpu, cal)
    totals = {k: int(sum(v.values())) for k, v in ms.items()}
    peak_name = max(totals, key=lambda k: totals[k])
    components = {k: int(v) for k, v in ms[peak_name].items() if v}
    peak = sum(components.values())
    paged = int(paged_optimizer_state(st, x.r, s.train.optimizer))
    reserved, device, context = device_totals(peak, paged, cal)
    outside = {"cuda_context_and_libraries": context}
    if paged:
        outside["paged_optimizer_state"] = paged
    notes = []
    if st.linear_quant == "fp32" and s.train.quant in QUANTIZED:
        notes.append(f"{st.model.model_type}: transformers' bitsandbytes quantizer converts only exact nn.Linear "
                     f"modules; this family's Linears stay unquantized and are upcast to fp32 by "
                     f"prepare_model_for_kbit_training")
    if st.linear_quant == "int8" and s.train.int8_outlier_fraction is None:
        f = default_int8_outlier_fraction(st, x.T)
        notes.append(f"int8: assumes {f:.0%} of MLP-out input columns are outliers (random-init weights); "
                     f"trained models have far fewer: set --int8-outlier-fraction")
    if not _calibrated(cal, "reserved_over_allocated_ratio"):
        notes.append("reserved and device total use uncalibrated priors (allocator ratio, CUDA context); "
                     "peak allocated is the checked figure")
    return MemoryEstimate(
        components=components,
        peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved,
        device_total_bytes=device,
        peak_moment=peak_name,
        moments=totals,
        outside_allocator_bytes=outside,
        notes=tuple(notes),
    )


def _calibrated(cal: Calibration, name: str) -> bool:
    """True when a GPU calibration (not the default priors) supplies ``name``."""
    return any(name in (prov or {}) for key, prov in cal.provenance.items() if key != "default")
