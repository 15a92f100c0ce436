"""The memory ledger: peak ``torch.cuda.max_memory_allocated()`` of a LoRA/QLoRA training burst.

Predicts the protocol of shared/reference/protocol.md (transformers + peft + bitsandbytes,
plain loop: ``loss = model(ids, labels=ids).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)``). Every line below is a function whose docstring gives its
formula (bytes per element × shape) and where it comes from; sources are the library files
read for transformers 5.x, peft 0.21, bitsandbytes 0.50, torch 2.11+.

The peak is a *moment*, not a sum of everything: we evaluate the live bytes at each
candidate moment of a step and take the largest:

- ``forward``:        end of the forward, inside the loss (logits + fp32 copy + log-softmax);
- ``loss backward``:  the start of backward, at the head (log-softmax saved, its grad in and out);
- ``layer backward``: inside the first decoder layer's backward (its saved tensors, recomputed
  when checkpointing, plus the gradient transients and the dequantized weight);
- ``optimizer step``: LoRA weights + gradients + optimizer state + the step's temporaries.

Notation: T = b·s tokens, h hidden, I intermediate, n_h / n_kv heads, d head dim, V vocab,
L layers, r rank, a bytes of the residual stream (2 for a bf16/fp16 base; 4 for fp32 and for
a quantized base, because prepare_model_for_kbit_training makes embeddings and norms fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..spec import Calibration, GpuSpec, LinearSpec, LoraSpec, ModelSpec, TrainSpec
from .result import MemoryEstimate

MiB = 1 << 20

#: CUDA caching allocator rounds every block to a multiple of 512 bytes
#: (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512, round_size).
BLOCK = 512

FOUR_BIT = ("nf4", "fp4")
QUANTIZED = FOUR_BIT + ("int8",)


def _blocks(nbytes: float) -> int:
    """Bytes as the allocator counts them: rounded up to 512-byte blocks."""
    n = int(math.ceil(nbytes))
    return max(BLOCK, -(-n // BLOCK) * BLOCK) if n > 0 else 0


# ---------------------------------------------------------------------------------------------
# Setup-wide facts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Derived facts of one (model, lora, train) case that several ledger lines need."""

    model: ModelSpec
    lora: LoraSpec
    train: TrainSpec
    adapted: tuple[LinearSpec, ...]
    T: int  # tokens per micro-batch on the decoder side: b·s (b·target_seq for enc-dec)
    T_enc: int  # encoder tokens (0 for decoder-only)
    stream_bytes: int  # a
    attention: str  # flash | efficient | math | eager (what the kernel choice resolves to)

    @property
    def quantized(self) -> bool:
        return self.train.quant in QUANTIZED

    @property
    def trainable(self) -> int:
        r = self.lora.rank
        return sum(r * (l.in_features + l.out_features) for l in self.adapted)


def stream_dtype_bytes(train: TrainSpec) -> int:
    """a: bytes/element of the residual stream.

    bf16/fp16 base: 2. fp32 base: 4. Quantized base: 4, because prepare_model_for_kbit_training
    casts embeddings and norm weights to fp32 (peft/utils/other.py), the embedding output is fp32,
    and bnb Linear4bit/Linear8bitLt return their output in the input's dtype
    (bitsandbytes/nn/modules.py: ``out.to(inp_dtype)``), so the whole stream stays fp32.
    """
    if train.quant in QUANTIZED or train.quant == "fp32":
        return 4
    return 2


def choose_attention(model: ModelSpec, train: TrainSpec, stream_bytes: int, compute_capability: str | None) -> str:
    """The sdpa kernel CUDA picks (torch/csrc/.../sdp_utils.cpp priority: flash, efficient, math).

    - eager attention (gemma2 softcapping) never reaches sdpa;
    - a mask (sliding window shorter than the sequence, T5 position bias) rules out flash;
    - flash needs fp16/bf16, head dim <= 256 and sm80+;
    - mem-efficient takes fp32 too, but not grouped-query attention (enable_gqa) -> math.
    transformers passes no mask and ``is_causal=True`` for an unpadded batch
    (masking_utils: sdpa mask skipped), and ``enable_gqa=True`` when there is no mask
    (integrations/sdpa_attention.py::use_gqa_in_sdpa).
    """
    if train.attention != "auto":
        return train.attention
    if model.arch.attention == "eager":
        return "eager"
    masked = model.arch.position == "relative_bias" or (
        model.arch.sliding_window is not None and train.seq > model.arch.sliding_window)
    cc = float(compute_capability) if compute_capability else 8.0
    if not masked and stream_bytes == 2 and model.head_dim <= 256 and cc >= 8.0:
        return "flash"
    gqa = model.num_kv_heads != model.num_heads and not masked
    if gqa:
        return "math"
    return "efficient"


def make_setup(model: ModelSpec, lora: LoraSpec, train: TrainSpec, adapted: tuple[LinearSpec, ...],
               compute_capability: str | None = "9.0") -> Setup:
    a = stream_dtype_bytes(train)
    T = train.batch * (train.target_seq or train.seq) if model.is_encoder_decoder else train.batch * train.seq
    T_enc = train.batch * train.seq if model.is_encoder_decoder else 0
    return Setup(model, lora, train, adapted, T, T_enc, a, choose_attention(model, train, a, compute_capability))


# ---------------------------------------------------------------------------------------------
# Persistent memory: weights, LoRA, optimizer state
# ---------------------------------------------------------------------------------------------


def quantized_linear_bytes(linear: LinearSpec, quant: str, double_quant: bool) -> int:
    """Bytes of one frozen Linear weight (+ quantization state), as allocated.

    - nf4/fp4 (bitsandbytes Params4bit, blocksize 64): packed uint8 n/2 B; absmax fp32 per
      64-block, or with double quant uint8 absmax per block + fp32 nested absmax per 256 blocks
      + 256-entry fp32 code + fp32 offset (functional.py::quantize_4bit, quantize_blockwise);
      plus the 16-entry fp32 code table. n = in·out. Each tensor is a separate 512-B-rounded block.
    - int8 (Int8Params, LLM.int8): CB int8 [out, in] + SCB fp32 [out] (nn/modules.py::Int8Params).
    - bf16/fp16/fp32: n × 2/2/4.
    The bias, if any, is not quantized: see ``unquantized_bytes``.
    """
    n = linear.in_features * linear.out_features
    if quant in FOUR_BIT:
        blocks = -(-n // 64)
        b = _blocks(n / 2) + _blocks(16 * 4)  # packed weight + code table
        if double_quant:
            b += _blocks(blocks) + _blocks(-(-blocks // 256) * 4) + _blocks(256 * 4) + _blocks(4)
        else:
            b += _blocks(blocks * 4)
        return b
    if quant == "int8":
        return _blocks(n) + _blocks(linear.out_features * 4)
    return _blocks(n * (4 if quant == "fp32" else 2))


def frozen_linear_weights(s: Setup) -> int:
    """Σ over every Linear except an unquantized lm_head of quantized_linear_bytes().

    transformers' bnb quantizer converts nn.Linear modules only and keeps the output embedding
    (lm_head) in the load dtype (quantizers/quantizer_bnb_*: modules_to_not_convert).
    """
    m, t = s.model, s.train
    total = 0
    for l in m.linears:
        if l.role == "lm_head":
            continue
        total += quantized_linear_bytes(l, t.quant, t.double_quant)
    return total


def unquantized_weights(s: Setup) -> int:
    """Embeddings, norms, position tables, biases and lm_head, in their final dtype.

    bf16/fp16 base: 2 B/param; fp32 base: 4 B. Quantized base: prepare_model_for_kbit_training
    casts every fp16/bf16 parameter that is not Params4bit/Int8 to fp32 (peft/utils/other.py):
    4 B/param (Llama-2-7B: embed + lm_head 262M params -> 1.05 GB). A tied lm_head is the
    embedding and is counted once.
    """
    m, t = s.model, s.train
    b = 4 if t.quant in QUANTIZED or t.quant == "fp32" else 2
    total = sum(_blocks(p.numel * b) for p in m.others)
    for l in m.linears:
        if l.role == "lm_head":
            if not m.tie_word_embeddings:
                total += _blocks(l.numel * b)
        elif l.bias:
            total += _blocks(l.out_features * b)
    return total


def lora_weights(s: Setup) -> int:
    """r·(in+out) fp32 params per adapted Linear: 4 B each.

    Adapters are created in the base dtype, then get_peft_model(autocast_adapter_dtype=True)
    upcasts bf16/fp16 adapters to fp32 (peft/tuners/tuners_utils.py::cast_adapter_dtype).
    """
    r = s.lora.rank
    return sum(_blocks(r * l.in_features * 4) + _blocks(r * l.out_features * 4) for l in s.adapted)


def lora_gradients(s: Setup) -> int:
    """One fp32 gradient per LoRA parameter (same shapes as the weights), alive from backward
    until ``zero_grad(set_to_none=True)``."""
    return lora_weights(s)


def _lora_tensors(s: Setup) -> list[int]:
    """Element counts of every LoRA parameter tensor (lora_A [r,in], lora_B [out,r])."""
    r = s.lora.rank
    out = []
    for l in s.adapted:
        out += [r * l.in_features, r * l.out_features]
    return out


def optimizer_state(s: Setup, paged_threshold: int = 100_000) -> int:
    """Optimizer state inside torch's allocator, created at the first ``step()``.

    - adamw (torch.optim.AdamW): exp_avg + exp_avg_sq fp32: 8 B/param (+ a CPU step counter).
    - sgd (momentum=0): no state.
    - adamw_8bit (bnb AdamW8bit): uint8 state1/state2 + fp32 absmax per 256-block (qmap tables
      shared): 2·(1 + 4/256) B/param; tensors with numel < 4096 get fp32 states, 8 B/param
      (bitsandbytes/optim/optimizer.py::Optimizer8bit.init_state, min_8bit_size=4096).
    - paged_adamw_8bit / paged_adamw_32bit: buffers of tensors with numel >= 1e5 come from
      cudaMallocManaged (get_paged), outside torch's allocator: 0 here, reported in
      ``paged_optimizer_state``; smaller tensors as adamw_8bit / 32-bit states.
    """
    opt = s.train.optimizer
    if opt == "sgd":
        return 0
    total = 0
    for n in _lora_tensors(s):
        if opt.startswith("paged") and n >= paged_threshold:
            continue
        if opt == "adamw" or opt == "paged_adamw_32bit" or n < 4096:
            total += 2 * _blocks(4 * n)
        else:
            total += 2 * (_blocks(n) + _blocks(-(-n // 256) * 4))
    return total


def paged_optimizer_state(s: Setup, paged_threshold: int = 100_000) -> int:
    """Paged optimizer buffers (cudaMallocManaged): counted in NVML 'used' while resident,
    never in torch.cuda.max_memory_allocated (bitsandbytes/functional.py::get_paged)."""
    opt = s.train.optimizer
    if not opt.startswith("paged"):
        return 0
    per = 8 if opt == "paged_adamw_32bit" else 2 * (1 + 4 / 256)
    return int(sum(n * per for n in _lora_tensors(s) if n >= paged_threshold and not (opt != "paged_adamw_32bit" and n < 4096)))


def optimizer_step_temporaries(s: Setup) -> int:
    """Transient bytes inside ``opt.step()``.

    torch AdamW on CUDA uses the foreach path, which makes ``exp_avg_sq_sqrt =
    torch._foreach_sqrt(exp_avg_sqs)``: one fp32 copy of every trainable tensor, 4 B/param
    (torch/optim/adamw.py -> adam.py::_multi_tensor_adam). SGD (momentum 0, foreach) and the
    bitsandbytes optimizers (fused kernels, in-place) allocate nothing per parameter.
    """
    if s.train.optimizer == "adamw":
        return sum(_blocks(4 * n) for n in _lora_tensors(s))
    return 0


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves for backward
# ---------------------------------------------------------------------------------------------


def _layer_linears(s: Setup, stack: str) -> list[LinearSpec]:
    """Linears of one representative layer of a stack (layers of a stack are identical)."""
    m = s.model
    first = next((l.layer for l in m.linears if l.stack == stack and l.layer is not None), None)
    return [l for l in m.linears if l.stack == stack and l.layer == first]


def _adapted_in_layer(s: Setup, stack: str) -> list[LinearSpec]:
    """Adapted Linears of one layer, counted as an average over the stack's layers (PEFT targets
    may pick only some layers: 'layers.0.self_attn.q_proj')."""
    n_layers = _stack_layers(s, stack)
    adapted = [l for l in s.adapted if l.stack == stack]
    # Represent by role counts averaged over layers.
    by_role: dict[str, list[LinearSpec]] = {}
    for l in adapted:
        by_role.setdefault(l.role, []).append(l)
    rep = []
    for role, ls in by_role.items():
        share = len(ls) / max(n_layers, 1)
        rep.append((ls[0], share))
    return rep  # type: ignore[return-value]


def _stack_layers(s: Setup, stack: str) -> int:
    return s.model.num_encoder_layers if stack == "encoder" else s.model.num_layers


def lora_activations_per_layer(s: Setup, stack: str, T: int) -> float:
    """Bytes peft's LoRA branch saves per layer, for each adapted Linear [out, in]:

    - dropout p > 0: the fp32 dropout output (4·T·in, lora_A's input) + the fused dropout's
      bool mask (1·T·in; CUDA native_dropout) -> 5·T·in;
    - p = 0 (nn.Identity): lora_A saves its input: the fp32 cast copy (4·T·in) of a bf16/fp16
      stream, one per module (peft Linear.forward: ``x = self._cast_input_dtype(x, lora_A.dtype)``),
      or the fp32 stream tensor itself (already alive: 0 extra);
    - lora_A's r-wide fp32 output, saved by lora_B: 4·T·r.
    Source: peft/tuners/lora/layer.py and bnb.py (forward); memory-physics.md §4.
    """
    r = s.lora.rank
    total = 0.0
    for l, share in _adapted_in_layer(s, stack):
        if s.lora.dropout > 0:
            per = 5 * T * l.in_features
        else:
            per = 4 * T * l.in_features if s.stream_bytes != 4 else 0
        total += share * (per + 4 * T * r)
    return total


def attention_saved_per_layer(s: Setup, T: int, b: int, seq: int, kv_seq: int | None = None) -> float:
    """Bytes the attention block saves per layer (after its projections).

    - sdpa flash / mem-efficient: q and k after RoPE (a·T·n_h·d, a·T·n_kv·d: the rotation
      makes new tensors), v (a·T·n_kv·d), the output (a·T·n_h·d) and the fp32 logsumexp
      (4·b·n_h·s; mem-efficient pads s to a multiple of 32). Flash pads head dims to a
      multiple of 8 (torch sdpa ``pad_last_dim``), the padded q, k, v are what it saves.
    - math (fp32 stream with grouped-query attention): k, v repeated to n_h heads, the fp32
      attention probabilities b·n_h·s² (saved by the second matmul) and the softmax output.
    - eager: scores softmax in fp32 (4·b·n_h·s²), cast to the stream dtype (a·b·n_h·s²),
      both saved, with q, k, v.
    Source: transformers integrations/sdpa_attention.py, models/llama/modeling_llama.py;
    torch aten/src/ATen/native/transformers (flash/efficient forward outputs).
    """
    m, a = s.model, s.stream_bytes
    kv_seq = kv_seq or seq
    n_h, n_kv = m.num_heads, m.num_kv_heads
    d = m.head_dim
    kind = s.attention
    if kind == "flash":
        dp = -(-d // 8) * 8  # CUDA pads the head dim to a multiple of 8 before the kernel
        return a * T * n_h * dp * 2 + 2 * a * b * kv_seq * n_kv * dp + 4 * b * n_h * seq
    if kind == "efficient":
        q = a * T * n_h * d
        kv = 2 * a * b * kv_seq * n_kv * d
        out = a * T * n_h * d
        lse = 4 * b * n_h * (-(-seq // 32) * 32)
        return q + kv + out + lse
    # math / eager: full score matrices
    scores = b * n_h * seq * kv_seq
    q = a * T * n_h * d
    kv = 2 * a * b * kv_seq * n_h * d  # repeated to n_h heads
    if kind == "math":
        return q + kv + 4 * scores + a * scores + a * T * n_h * d
    return q + kv + 4 * scores + a * scores + a * T * n_h * d


def norm_saved(s: Setup, T: int) -> float:
    """One norm's saved bytes.

    RMSNorm (llama): fp32 upcast of its input (4·T·h; for an fp32 stream the input itself,
    which is then kept alive by the norm) + rsqrt (4·T). LayerNorm (native_layer_norm): its
    input (a·T·h) + mean and rstd (2·4·T). Source: modeling_llama.py::LlamaRMSNorm; aten
    native_layer_norm; memory-physics.md §5.
    """
    h = s.model.hidden_size
    if s.model.arch.norm == "rms":
        return 4 * T * h + 4 * T
    return s.stream_bytes * T * h + 8 * T


def mlp_saved(s: Setup, T: int) -> float:
    """MLP saved bytes: gated (SiLU/GELU(gate) * up): the activation's input, its output and
    the up output: 3·a·T·I. Plain (act(fc_in) -> fc_out): the activation's input or output:
    a·T·I. Frozen Linears save nothing for their own weights (autograd only saves what a
    needed gradient uses; the input gradient needs only the weight)."""
    I = s.model.intermediate_size
    k = 3 if s.model.arch.mlp == "gated" else 1
    return k * s.stream_bytes * T * I


def layer_saved(s: Setup, stack: str = "decoder") -> float:
    """S_layer: all bytes one decoder (or encoder) layer saves for backward without checkpointing.

    For a bf16 Llama layer without LoRA this is
    8·T·h + 4·T·d·(n_h + n_kv) + 6·T·I + 4·b·n_h·s + 8·T (memory-physics.md §5, exact on CPU).
    """
    t, m = s.train, s.model
    if stack == "encoder":
        T, seq, b = s.T_enc, t.seq, t.batch
        att = attention_saved_per_layer(s, T, b, seq)
    else:
        T, b = s.T, t.batch
        seq = t.target_seq or t.seq if m.is_encoder_decoder else t.seq
        att = attention_saved_per_layer(s, T, b, seq)
        if m.is_encoder_decoder:  # cross-attention over the encoder output
            att += attention_saved_per_layer(s, T, b, seq, kv_seq=t.seq)
    norms = m.arch.norms_per_layer + (1 if (m.is_encoder_decoder and stack == "decoder") else 0)
    return norms * norm_saved(s, T) + att + mlp_saved(s, T) + lora_activations_per_layer(s, stack, T)


def checkpoint_inputs(s: Setup) -> float:
    """Non-reentrant checkpointing keeps each checkpointed layer's input: L·a·T·h
    (torch/utils/checkpoint.py: the inputs are saved by _NoopSaveInputs for recompute)."""
    m = s.model
    dec = m.num_layers * s.stream_bytes * s.T * m.hidden_size
    enc = m.num_encoder_layers * s.stream_bytes * s.T_enc * m.hidden_size
    return dec + enc


def saved_activations(s: Setup) -> float:
    """Activations alive at the end of the forward (excluding the loss): every layer's saved
    tensors (or only the checkpointed inputs), the final norm, RoPE tables and, for
    encoder-decoder models, the encoder output read by every cross-attention."""
    m, t = s.model, s.train
    if t.gradient_checkpointing:
        layers = checkpoint_inputs(s)
    else:
        layers = m.num_layers * layer_saved(s, "decoder")
        if m.is_encoder_decoder:
            layers += m.num_encoder_layers * layer_saved(s, "encoder")
    final = norm_saved(s, s.T)
    if m.is_encoder_decoder:
        final += norm_saved(s, s.T_enc) + s.stream_bytes * s.T_enc * m.hidden_size
    rope = 2 * s.stream_bytes * t.batch * (t.target_seq or t.seq) * m.head_dim if m.arch.position == "rope" else 0
    return layers + final + rope + head_lora_activations(s)


def head_lora_activations(s: Setup) -> float:
    """LoRA on lm_head saves its dropout output and mask (5·T·h) and 4·T·r."""
    head = [l for l in s.adapted if l.role == "lm_head"]
    if not head:
        return 0.0
    h = s.model.hidden_size
    return (5 * s.T * h if s.lora.dropout > 0 else 4 * s.T * h) + 4 * s.T * s.lora.rank


def logits_bytes(s: Setup) -> int:
    """Bytes per logit as lm_head produces it: its weight dtype (fp32 after prepare for a
    quantized base, else the load dtype) -> 4 or 2."""
    return 4 if (s.train.quant in QUANTIZED or s.train.quant == "fp32") else 2


def loss_forward_transient(s: Setup) -> float:
    """Live at the end of the forward inside the loss: logits (c·T·V), their fp32 copy when
    c = 2 (ForCausalLMLoss: ``logits.float()``), and log_softmax's fp32 output (saved):
    10·T·V for bf16 logits, 8·T·V for fp32. (transformers loss/loss_utils.py; default
    logits_to_keep=0 keeps every position.)"""
    TV = s.T * s.model.vocab_size
    c = logits_bytes(s)
    return c * TV + (4 * TV if c == 2 else 0) + 4 * TV


def loss_backward_transient(s: Setup) -> float:
    """At the head of backward: log_softmax's saved fp32 output, the nll_loss gradient and
    log_softmax's input gradient, all fp32 [T, V]: 12·T·V (memory-physics.md §6)."""
    return 12 * s.T * s.model.vocab_size


def layer_backward_transients(s: Setup, dequant_bytes: float) -> float:
    """Gradients alive inside the first layer's backward, at the MLP (its largest point).

    Two moments, whichever is larger, plus the residual-stream gradient (a·T·h):
    - the MLP product's backward (gated): the gradient of the down input (a·T·I) and the
      two it makes, for the activation output and the up output (2·a·T·I): 3·a·T·I;
      plain MLP: the down-input gradient and the activation's input gradient, 2·a·T·I;
    - the quantized down projection's backward: its dequantized weight (``dequant_bytes``)
      beside the input gradient it produces in the compute dtype (2·T·I for 4-bit, whose
      Linear4bit computes in bf16; a·T·I for int8).
    The saved tensors of the nodes already run are released as backward goes
    (autograd release_variables), which is why the two moments do not add.
    """
    m, a, T = s.model, s.stream_bytes, s.T
    I = m.intermediate_size
    k = 3 if m.arch.mlp == "gated" else 2
    grad_in = (2 if s.train.quant in FOUR_BIT else a) * T * I
    return max(k * a * T * I, dequant_bytes + grad_in if dequant_bytes else 0) + a * T * m.hidden_size


def dequantized_weight_transient(s: Setup) -> float:
    """The largest weight a quantized Linear dequantizes on every call (forward fallback and
    backward): nf4/fp4 -> out·in·2 B in bf16 (bitsandbytes backends/cuda/ops.py
    ``_dequant_linear_fallback``; autograd MatMul4Bit.backward). int8 backward:
    ``CB.to(dtype_A)`` -> out·in·a (MatMul8bitLt.backward)."""
    q = s.train.quant
    if q not in QUANTIZED:
        return 0.0
    biggest = max((l.in_features * l.out_features for l in s.model.linears if l.role != "lm_head"), default=0)
    return biggest * (2 if q in FOUR_BIT else s.stream_bytes)


def int8_outlier_fraction(s: Setup, linear: LinearSpec) -> float:
    """Share of a Linear's input columns with an element above LLM.int8's threshold (6.0).

    User value if given. Default, for the random-initialised models of the protocol: the
    down-projection input silu(g)·u with g, u ~ N(0, σ²), σ = initializer_range·√h (RMS-normed
    input): p = P(|silu(g)·u| > 6) per element by numerical integration and 1 − (1 − p)^T per
    column (0.82 for Llama-2-7B at T = 512; a CPU simulation with real random weights gives the
    same). Other inputs (RMS-normed, attention outputs) stay far below 6: 0. Trained models
    have far fewer outlier columns (LLM.int8 paper: a handful of hidden dimensions).
    """
    if s.train.int8_outlier_fraction is not None:
        return s.train.int8_outlier_fraction
    if linear.role not in ("down", "fc_out"):
        return 0.0
    sigma = float(s.model.config.get("initializer_range", 0.02)) * math.sqrt(s.model.hidden_size)
    p = _p_silu_product_exceeds(sigma, 6.0)
    return 1.0 - (1.0 - p) ** s.T


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


def int8_retained_per_step(s: Setup) -> float:
    """What LLM.int8 keeps for a whole step, checkpointing or not.

    MatMul8bitLt stores ``ctx.tensors = (CAt, subA, A)`` as plain ctx attributes, not
    save_for_backward (bitsandbytes autograd/_functions.py): non-reentrant checkpointing cannot
    drop them, and backward does not free them; they live until the graph dies, i.e. until
    ``loss`` is rebound after the *next* forward. Per layer: each distinct input A of an int8
    Linear (views share storage: q/k/v share one, gate/up another): a·T·in, plus subA, the
    fp32 outlier columns of each call: f·a·T·in (CAt is None when the weight is frozen).
    """
    if s.train.quant != "int8":
        return 0.0
    a = s.stream_bytes
    total = 0.0
    groups: dict[tuple, int] = {}
    for l in s.model.linears:
        if l.role == "lm_head":
            continue
        T = s.T_enc if l.stack == "encoder" else s.T
        key = (l.stack, l.layer, _input_group(l.role))
        groups[key] = a * T * l.in_features
        total += int8_outlier_fraction(s, l) * a * T * l.in_features
    return total + sum(groups.values())


def _input_group(role: str) -> str:
    """Linears that read the same tensor (their inputs are one storage)."""
    if role in ("q", "k", "v", "qkv"):
        return "attn_in"
    if role in ("gate", "up", "gate_up", "fc_in"):
        return "mlp_in"
    if role in ("cross_k", "cross_v"):
        return "encoder_out"
    return role


def cuda_workspaces(s: Setup, gpu: GpuSpec | None, cal: Calibration) -> int:
    """cuBLAS/cuBLASLt workspaces, allocated through the caching allocator but invisible to a
    dispatch trace: one per handle, and training uses two (the forward thread's and autograd's
    backward thread's). torch/csrc/cuda/CublasHandlePool.cpp default CUBLAS_WORKSPACE_CONFIG:
    ':4096:8' (32 MiB) on sm90+, ':4096:2:16:8' (8.125 MiB) before. The H100 bf16 reference
    cases sit 64 MiB above a dispatch trace (trace-notes.md)."""
    cc = float(gpu.compute_capability) if gpu and gpu.compute_capability else 9.0
    per = cal.get("cublas_workspace_bytes_sm90", 32 * MiB) if cc >= 9.0 else cal.get(
        "cublas_workspace_bytes_pre_sm90", 8.125 * MiB)
    return int(cal.get("cublas_handles", 2) * per)


# ---------------------------------------------------------------------------------------------
# The peak: candidate moments
# ---------------------------------------------------------------------------------------------


def moments(s: Setup, gpu: GpuSpec | None, cal: Calibration) -> dict[str, dict[str, int]]:
    """Ledger (component -> bytes) at each candidate moment of steady-state steps (step >= 2,
    when the optimizer state exists)."""
    t, m = s.train, s.model
    base = {
        "frozen_linear_weights": frozen_linear_weights(s),
        "unquantized_weights": unquantized_weights(s),
        "lora_weights": lora_weights(s),
        "optimizer_state": optimizer_state(s),
        "cuda_workspaces": cuda_workspaces(s, gpu, cal),
        "allocator_overhead": int(cal.get("allocator_overhead_bytes", 0)),
    }
    acts = saved_activations(s)
    int8_keep = int8_retained_per_step(s)
    out: dict[str, dict[str, int]] = {}

    # 1. forward, inside the loss. int8: the previous step's graph still holds its ctx tensors.
    fwd = dict(base, activations=int(acts + int8_keep), logits_loss=int(loss_forward_transient(s)))
    if int8_keep:
        fwd["int8_previous_step"] = int(int8_keep)
    out["forward"] = fwd

    # 2. loss backward at the head.
    out["loss backward"] = dict(base, activations=int(acts + int8_keep),
                                logits_loss=int(loss_backward_transient(s)))

    # 3. first (top) decoder layer's backward: the other layers' inputs (checkpointing) or
    #    saved tensors, this layer's saved tensors (recomputed), gradient transients.
    S = layer_saved(s, "decoder")
    L = m.num_layers
    if t.gradient_checkpointing:
        below = checkpoint_inputs(s)
    else:
        below = (L - 1) * S + (m.num_encoder_layers * layer_saved(s, "encoder") if m.is_encoder_decoder else 0)
    top_grads = lora_gradients(s) / max(L, 1)
    out["layer backward"] = dict(
        base,
        activations=int(below + S + int8_keep),
        backward_transients=int(layer_backward_transients(s, dequantized_weight_transient(s))),
        lora_gradients=int(top_grads),
    )

    # 4. optimizer step.
    out["optimizer step"] = dict(base, lora_gradients=lora_gradients(s),
                                 optimizer_temporaries=optimizer_step_temporaries(s))
    return out


def estimate_memory(s: Setup, gpu: GpuSpec | None, cal: Calibration) -> MemoryEstimate:
    """Peak allocated = the largest moment; reserved and device totals from named coefficients."""
    ms = moments(s, gpu, cal)
    totals = {k: sum(v.values()) for k, v in ms.items()}
    peak_name = max(totals, key=totals.get)
    components = {k: int(v) for k, v in ms[peak_name].items() if v}
    peak = sum(components.values())
    reserved = int(peak * (1 + cal.get("reserved_over_allocated_ratio", 0.05)))
    paged = paged_optimizer_state(s)
    context = int(cal.get("cuda_context_bytes", 500 * MiB))
    outside = {"cuda_context_and_libraries": context}
    if paged:
        outside["paged_optimizer_state"] = paged
    notes = []
    if s.train.quant == "int8":
        notes.append("int8: assumes the random-init outlier share unless --int8-outlier-fraction is given")
    return MemoryEstimate(
        components=components,
        peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved,
        device_total_bytes=reserved + sum(outside.values()),
        peak_moment=peak_name,
        moments=totals,
        outside_allocator_bytes=outside,
        notes=tuple(notes),
    )
