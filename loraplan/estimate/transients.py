"""Transients and what outlives a step: logits and loss, the backward of a layer, the int8
matmul's context tensors and kernel transients, the input leaf, the cuBLAS workspaces.

Each ledger line is one function whose docstring gives its formula and source.
"""

from __future__ import annotations

import math

from .. import versions
from ..spec import Calibration, GpuSpec, ModelSpec
from ..storage import FOUR_BIT, QUANTIZED, dtype_bytes, linear_storage
from .activations import (Shape, _activation, _mask_bytes, _relative_bias, attention_dropout_p, hidden_dropout,
                          lora_input_saved_bytes, lora_output_bytes, mlp_saved,
                          eager_kv_heads, released_before_attention_backward)
from .arrays import ceil as _ceil, maximum as _max, where as _where
from .coefficients import coefficient
from .weights import Structure, _p_silu_product_exceeds, _stack_layers


def logits_bytes(st: Structure) -> int:
    """Bytes per logit as lm_head produces it (``Dtypes.lm_head``): the autocast dtype under
    mixed precision (linear is a lower-precision op), else its weight's dtype (fp32 after
    prepare_model_for_kbit_training, else the load dtype) -> 2 or 4. Bf16/fp16 logits then
    coexist with ForCausalLMLoss's fp32 copy (``loss_forward_transient``)."""
    return dtype_bytes(st.dt.lm_head)


def _frozen_cast_linears(st: Structure):
    """(per decoder layer, lm_head) element counts of the frozen, unquantized Linear weights whose
    dtype is not the autocast dtype: each call casts the weight to it (not cached: only leaves
    that require grad are, autocast_mode.cpp::cached_cast), and the matmul saves the copy for the
    input gradient."""
    d, m = st.dt, st.model
    if not d.autocast:
        return 0, 0
    layer, head = 0, 0
    for l in m.linears:
        if l.role == "lm_head":
            if d.unquantized != d.autocast:
                head += l.numel
            continue
        if linear_storage(m, d, l) in ("bf16", "fp16", "fp32") and linear_storage(m, d, l) != d.autocast:
            layer += l.numel
    return layer / max(m.num_layers + m.num_encoder_layers, 1), head


def autocast_copies(st: Structure, r, gradient_checkpointing: bool, moment: str, lm_head_called: bool = True):
    """Low-precision copies autocast makes and something keeps (c = autocast dtype bytes):

    - trainable fp32 adapters: the weight-cast cache (autocast_mode.cpp::cached_cast: fp32 leaves
      that require grad) keeps a c copy of every lora_A/lora_B until the outermost autocast
      exits, i.e. over the whole forward (the loss inside it); the Linears also save them for
      backward. ``r·(in+out)·c`` per adapted Linear.
    - frozen unquantized Linears (and lm_head) whose dtype differs from c (an fp16 base under bf16
      autocast, fp32 weights after prepare_model_for_kbit_training or an fp32 load): a c copy per
      call, saved for the input gradient (torch autograd: ``mm`` saves ``mat2`` when ``self``
      needs a grad); bitsandbytes' 4-bit/int8 weights are not cast (custom autograd Functions).
    Without checkpointing every layer's copies live from the forward to that layer's backward;
    with it only lm_head's (outside the checkpointed layers) and, at a layer's backward, the
    copies its recompute made. ``moment``: "forward", "loss backward" or "layer backward".
    ``lm_head_called=False``: the loss never calls lm_head (trl's fused chunked LM head casts its
    weight tile by tile itself: ``steps.fused_head_forward_bytes``), so lm_head has no copy.
    """
    d = st.dt
    if not d.autocast:
        return 0
    c = dtype_bytes(d.autocast)
    m = st.model
    L = max(m.num_layers + m.num_encoder_layers, 1)
    adapters = 0
    if d.adapter == "fp32":
        adapters = sum(count * r * size for size, count in st.lora_sizes.items()) * c
    per_layer, head = _frozen_cast_linears(st)
    if not lm_head_called:
        head = 0
    frozen_layers = per_layer * c * L
    # lm_head's copy is released when its backward has run: gone by any layer's backward
    if gradient_checkpointing:
        if moment == "forward":
            return adapters + head * c
        if moment == "loss backward":
            return head * c
        return (adapters + frozen_layers) / L
    if moment == "layer backward":
        return adapters + frozen_layers
    return adapters + frozen_layers + head * c


def logit_softcap_saved(st: Structure, x: Shape):
    """Final-logit softcapping (gemma2: ``logits = tanh(logits / cap) * cap``) keeps tanh's output
    for backward: c·T·V more, alive until the loss backward passes it."""
    if not st.model.config.get("final_logit_softcapping"):
        return 0
    return logits_bytes(st) * x.T * st.model.vocab_size


def loss_forward_transient(st: Structure, x: Shape, form: str = "loss_pad"):
    """Live at the end of the forward inside the loss: the logits (c·T·V), their fp32 copy when
    c = 2 (ForCausalLMLoss: ``logits.float()``) and log_softmax's fp32 output (saved):
    10·T·V for bf16 logits, 8·T·V for fp32 (transformers loss/loss_utils.py; the default
    logits_to_keep=0 keeps every position). ``form`` (version rule ``causal_lm_loss_logits``)
    for older transformers: "loss_shift" (4.46-4.48 ForCausalLMLoss) adds the fp32 shifted
    ``logits[..., :-1, :].contiguous()`` copy (4·T·V); "model_upcast" (<= 4.45
    LlamaForCausalLM.forward: ``logits = logits.float()`` frees the c logits, then the shift
    copy): 12·T·V for either c. The shift covers T − batch rows; counted as T (an upper bound)."""
    TV = x.T * st.model.vocab_size
    c = logits_bytes(st)
    if not st.model.arch.loss_upcasts_logits and not st.dt.autocast:
        # T5ForConditionalGeneration: CrossEntropyLoss on the raw logits (under autocast cross_entropy
        # runs in fp32 -- log_softmax/nll_loss are fp32 ops -- so the logits get an fp32 copy as below)
        loss = 2 * c * TV
    else:
        upcast = 4 * TV if c == 2 else 0  # .float() of fp32 logits returns them (no copy)
        if form == "model_upcast":  # the c logits are released when `logits` is rebound to the fp32 copy
            loss = (4 * TV if c == 2 else c * TV) + 4 * TV + 4 * TV + logit_softcap_saved(st, x)
        else:
            shift = 4 * TV if form == "loss_shift" else 0
            loss = c * TV + upcast + shift + 4 * TV + logit_softcap_saved(st, x)
    if st.head_adapted:
        # LoRA on lm_head: the base logits, the LoRA branch's scaled fp32 output and their fp32
        # sum are alive together (peft Linear.forward: result + lora_B(lora_A(x)) * scaling)
        loss = _max(loss, c * TV + 8 * TV)
    return loss


def loss_backward_transient(st: Structure, x: Shape):
    """At the head of backward: log_softmax's saved fp32 output, the nll_loss gradient and
    log_softmax's input gradient, all fp32 [T, V]: 12·T·V (memory-physics.md §6). T5 computes
    CrossEntropyLoss on the logits as they are (modeling_t5.py): 3·c·T·V."""
    if not st.model.arch.loss_upcasts_logits and not st.dt.autocast:  # log_softmax, its grads in the logits dtype
        return 3 * logits_bytes(st) * x.T * st.model.vocab_size
    return 12 * x.T * st.model.vocab_size + logit_softcap_saved(st, x)


def dequantized_weight_transient(st: Structure) -> int:
    """The largest weight a quantized Linear dequantizes on every call (forward fallback and
    backward): nf4/fp4 -> out·in B in ``bnb_4bit_compute_dtype`` (bf16 in the protocol: 2 B;
    bitsandbytes backends/cuda/ops.py ``_dequant_linear_fallback``; autograd MatMul4Bit.backward).
    int8 backward: ``CB.to(dtype_A)`` -> out·in·a (MatMul8bitLt.backward)."""
    if st.linear_quant not in QUANTIZED:
        return 0
    return st.biggest_linear_numel * (dtype_bytes(st.dt.compute) if st.linear_quant in FOUR_BIT else st.stream_bytes)


def layer_backward_transients(st: Structure, x: Shape, kind: str = "flash", gradient_checkpointing: bool = True,
                              stack: str = "decoder", score: bool = True, bias_grad: bool = False):
    """Bytes above the top layer's saved tensors S at its largest point in backward (may be < 0
    in part: tensors already released), for the MLP, where layers peak.

    With D the input width of the MLP-out Linear (down/fc_out; D = I), a the stream bytes,
    l = the bytes its LoRA saves (5·T·D with dropout, released when its backward runs), the
    candidates are, on top of the residual-stream gradient a·T·h:
    - recompute (checkpointing only) through an adapted down projection: its input (a·T·D) held while
      4-bit dequantizes the weight (W_dq = out·in·2 B) beside a bf16 copy of the input (2·T·D),
      before the LoRA branch exists (−l); then the LoRA branch's fp32 cast of a bf16/fp16
      input (4·T·D), the base output (a·T·h) and lora_B's fp32 output with its scaled copy
      (8·T·h) beside the complete S;
    - backward through the down projection: the LoRA branch runs first (later autograd
      sequence number) and leaves its input gradient (dropout backward, fp32 4·T·D, cast to the
      stream dtype when a = 2); then the base: W_dq + its bf16 input gradient (2·T·D) for
      4-bit, a·T·D for bf16; then their sum (a·T·D);
    - the MLP product's backward (gated): the down-input gradient and the two it makes:
      3·a·T·I; plain MLP: 2·a·T·I; a sparse-MoE top layer: 3·w·(T·k)·I_e over the routed rows.
    ``stack="encoder"`` (encoder-decoder models): the top encoder layer, with ``x`` the encoder's
    shape (T = T_enc); its position bias is an input, not recomputed.
    ``bias_grad`` (reentrant checkpointing, ``stack="encoder"``): the top encoder block's position
    bias requires grad, so its attention backward makes the bias's gradient
    (``reentrant_bias_grad_stage``).
    Non-reentrant recompute stops early once the last saved tensor is made, so without LoRA on
    the down projection its forward is not recomputed. Saved tensors of nodes already run are
    released as backward goes (autograd release_variables). Sources: peft/tuners/lora/layer.py
    and bnb.py (branch order, casts), bitsandbytes autograd MatMul4Bit.backward, cuda
    ``_dequant_linear_fallback``; checked against the meta-device trace on small configs.
    """
    m, a, T = st.model, st.stream_bytes, x.T
    I = m.intermediate_size
    # the recipe's dtypes (equal to a, 4 and 2 in the protocol): ab the MLP's tensors
    # (Structure.block_bytes), A the adapters', cb bnb_4bit_compute_dtype's, o lora_B's output
    ab, A, cb = st.block_bytes, st.adapter_bytes, dtype_bytes(st.dt.compute)
    o = lora_output_bytes(st)
    k = 3 if m.arch.mlp == "gated" else 2
    deq = dequantized_weight_transient(st) if st.mlp_out_quantized else 0
    four_bit = st.linear_quant in FOUR_BIT and st.mlp_out_quantized
    D_ad = st.mlp_out_adapted_in.get(stack, 0.0)  # Σ adapted MLP-out inputs (≈ I or 0)
    adapted = 1 if D_ad else 0
    l_saved = lora_input_saved_bytes(st, x.dropout) * T * D_ad
    lora_grad_peak = adapted * (A + (ab if ab != A else 0)) * T * I
    lora_grad_held = adapted * ab * T * I
    base = (deq + cb * T * I) if four_bit else (deq + ab * T * I if deq else ab * T * I)
    product = k * ab * T * I
    if m.moe is not None and m.moe.layers and m.num_layers - 1 in m.moe.layers:
        # the top layer is a sparse-MoE block: its product backward runs over the S = T·k routed
        # rows at the expert width (grouped_mm_experts_forward: act_fn(gate) * up on [S, I_e]),
        # in the experts' dtype (storage.expert_storage)
        product = 3 * st.expert_bytes * T * m.moe.top_k * m.moe.expert_intermediate_size
    # a residual dropout's backward (T5, OPT) makes the MLP branch's gradient a tensor of its own
    # (a·T·h) beside the residual path's; the down projection's input-gradient matmul consumes it,
    # so it is alive during the down projection's backward nodes only: not at the product backward,
    # nor in the recompute, nor at the sum of the two input gradients, which autograd makes once the
    # base node (the last to read it) has run and dropped its inputs (torch autograd engine.cpp
    # evaluate_function: call_function consumes the node's input buffer before the outputs are
    # added into the next node's buffer)
    branch = a * T * m.hidden_size if hidden_dropout(m) else 0
    # T5's FFN dropout sits between the product and the down projection: its backward has run
    # (and released its saved mask, counted in S) when the product's backward runs
    inner_mask = (_mask_bytes(st, ab) * T * I) if (hidden_dropout(m) and m.arch.ffn_inner_dropout) else 0
    expert_grad = 0
    if m.moe is not None and m.moe.layers and st.adapted_experts:
        # LoRA on the fused experts (peft ParamWrapper): W + s·lhs@rhs requires grad, so
        # grouped_mm's backward makes the full gradient of the parametrized weight [E, out, in]
        # (w B), alive until the fold's baddbmm backward reduces it to the factors' gradients:
        # down's beside both saved weights, then gate_up's once down's is released (with the
        # input gradient of down, w·S·I_e, made in the same backward)
        moe, w = m.moe, st.expert_bytes
        numel = {e.role: e.num_experts * e.in_features * e.out_features
                 for e in st.adapted_experts if e.layer == max(moe.layers)}
        expert_grad = (w * max(numel.get("down", 0), numel.get("gate_up", 0) - numel.get("down", 0))
                       + w * T * moe.top_k * moe.expert_intermediate_size)
    candidates = [
        -l_saved + product - inner_mask,  # MLP product backward
        -l_saved + expert_grad,  # LoRA'd experts: the parametrized weight's gradient
        -l_saved + _max(lora_grad_peak, lora_grad_held + base) + branch,  # down backward, base branch
        -l_saved + adapted * (lora_grad_held + 2 * ab * T * I),  # down backward, the sum
    ]
    if hidden_dropout(m) and m.arch.ffn_inner_dropout and gradient_checkpointing:
        # T5's FFN dropout comes after the product: the recompute runs to it, making its output
        # beside its input (the product, T5DenseGatedActDense.forward's local until dropout
        # returns), while T5LayerFF.forward holds the norm output it passed in (a·T·h)
        candidates.append(-l_saved + 2 * ab * T * I + a * T * m.hidden_size)
    # the recomputed down projection's input (ab·T·I), a tensor of its own beside S -- unless the
    # activation's saved output is that very tensor (``down_input_saved``: OPT's ReLU)
    down_in = 0 if down_input_saved(m) else ab * T * I
    # only a checkpointed top layer reruns its forward inside its backward; without checkpointing
    # the forward's pass through the down projection happened before the loss, beside no gradient
    # (the forward moment, memory.moments)
    if adapted and gradient_checkpointing:
        candidates.append(-l_saved + down_in + ((cb * T * I + deq) if four_bit else 0))  # recompute: base
        # recompute: LoRA branch of the down projection: its fp32 cast of a half input (held by
        # peft's forward locals), the base output (a·T·h) and lora_B's fp32 output with its
        # scaled copy (2·4·T·h)
        candidates.append(down_in + (A * T * I if ab != A else 0) + (2 * o + ab) * T * m.hidden_size)
        if st.autocast_bytes and A != st.autocast_bytes:
            # under autocast, inside the recomputed lora_A: the A-dtype dropout output is alive
            # beside the c copy lora_A saves (its argument until lora_A returns)
            candidates.append(down_in + (A * T * I if ab != A else 0) + _where(x.dropout > 0, A * T * I, 0)
                              + ab * T * m.hidden_size)
    W_in = st.mlp_in_adapted_out.get(stack, 0)
    moe_top = m.moe is not None and m.moe.layers and m.num_layers - 1 in m.moe.layers
    h = m.hidden_size
    # the recompute's locals in the MLP (or MoE block): its input, the norm output (ab·T·h), and in a
    # sequential layer the residual held for ``residual + mlp_out`` (a·T·h), unless the MLP's norm
    # saves that very tensor (an RMSNorm on an fp32 stream or T5LayerNorm keep their input; a
    # LayerNorm does outside autocast: norm_saved)
    norm_keeps = a == 4 or (m.arch.norm == "rms" and m.arch.norm_keeps_input) or (
        m.arch.norm == "layer" and not st.autocast_bytes)
    local = ab * T * h + (0 if (m.arch.parallel_attn or norm_keeps) else a * T * h)
    if W_in and gradient_checkpointing and not moe_top:
        # recompute: LoRA branch of the widest adapted MLP-in Linear (W_in its out width: 2·I for a
        # fused gate_up, modeling_phi3.py::Phi3MLP.forward), at ``lora_B(lora_A(dropout(x))) *
        # scaling`` (peft lora/layer.py::Linear.forward): the base output (ab·T·W_in), lora_B's
        # output and its scaled copy (2·o·T·W_in), peft's cast of the MLP input to the adapter
        # dtype (A·T·h, a forward local; with p = 0 and no autocast it is lora_A's saved input, in
        # S), and the recompute's locals. None of the MLP's saved tensors nor the down projection's
        # LoRA inputs exist yet (the recompute makes them later). An adapted down projection
        # started its backward before the recompute (its LoRA branch has the later sequence
        # number; lora_B's backward is the first to unpack a saved tensor, torch/utils/checkpoint.py
        # non-reentrant unpack_hook): its scaled-branch gradient (MulBackward: o·T·h) and, when
        # peft's sum is wider than the stream, the base branch's gradient cast to the stream dtype
        # (a·T·h) wait for their nodes. Exact for a fused gate_up or fc_in (checked on meta: phi-4,
        # phi-3); for separate gate/up it omits what the gate branch made before up (a lower bound
        # there, where the down's candidates are larger)
        cast_x = 0 if ab == A else (A * T * h if st.autocast_bytes else _where(x.dropout > 0, A * T * h, 0))
        down_grads = adapted * (o + (a if o != a else 0)) * T * h
        candidates.append(-l_saved - adapted * o * T * x.r - mlp_saved(st, T) + (2 * o + ab) * T * W_in
                          + cast_x + local + down_grads)
    if moe_top and gradient_checkpointing:
        # recompute of the top MoE block, at its combine (integrations/moe.py::
        # grouped_mm_experts_forward: ``weighted_out = proj_out * sample_weights_g``, then
        # ``inv_perm[perm] = arange(S)`` before ``weighted_out[inv_perm]`` saves inv_perm, the block's
        # last saved tensor, where the recompute stops): beside the complete S, the dispatched
        # input ``hidden_states[perm // k]`` (ab·S·h, a local; saved, so in S, when the gate_up
        # experts carry LoRA), weighted_out (S·h in the promotion of the experts' and the routing
        # weights' dtypes: fp32 for mixtral's router), the arange (8·S) and the layer's locals.
        # Without a shared expert the combine's backward ran before the recompute: ``.view(T, k,
        # h).sum(1)``'s gradient expanded and copied to [S, h] waits for the index node that
        # unpacks inv_perm; qwen2_moe's shared-expert gate (``sigmoid(gate(x)) * shared``, the
        # later node) unpacks first, so there it does not exist yet (modeling_qwen2_moe.py
        # Qwen2MoeSparseMoeBlock.forward). Checked against the meta trace (olmoe, mixtral, qwen2_moe)
        moe = m.moe
        rows = T * moe.top_k
        wo = max(st.expert_bytes, a if moe.router_weights_in_stream_dtype else 4)
        dispatched = 0 if any(e.role == "gate_up" for e in st.adapted_experts) else ab * rows * h
        combine_grad = 0 if moe.shared_expert_intermediate_size else wo * rows * h
        candidates.append(dispatched + wo * rows * h + 8 * rows + local + combine_grad)
    best = candidates[0]
    for c in candidates[1:]:
        best = _max(best, c)
    extra = 0
    if _relative_bias(m) and stack == "decoder" and gradient_checkpointing:
        # T5 with checkpointing (modeling_t5.py T5Attention.forward): the cross-attention's zeros
        # bias [1, n_h, s_t, s_e] is made ``requires_grad`` and shared by every layer, so backward
        # accumulates its ``.grad`` (a leaf's, kept); and the first block, which computes the biases,
        # recomputes them: its self-attention bias replaces the forward's (an input of the blocks
        # above, released with them), its zeros bias is new while the L − 1 layer inputs above it
        # are released. The self-attention bias needs no gradient (relative_attention_bias is
        # frozen), nor does the zeros bias without checkpointing.
        # (The top encoder layer takes its bias as an input: none of these.)
        # By then the layers above have added their cross-attention k/v input gradients into the
        # encoder output's gradient (a·T_enc·h).
        cross = a * m.num_heads * x.tseq * x.seq
        first_block = cross + a * x.T_enc * m.hidden_size
        extra = extra + cross + _max(0, first_block - (m.num_layers - 1) * a * T * m.hidden_size)
    if bias_grad and stack == "encoder" and kind == "efficient":
        released = released_before_attention_backward(st, x, stack)
        extra = _max(extra, reentrant_bias_grad_stage(st, x) - released - best)
    if kind in ("math", "eager") and score:  # ``score=False``: the MLP stage alone
        # score-matrix attention backward, once the MLP, the norms after the attention and the
        # o_proj / MLP LoRA branches have run their backward and released what they saved
        # (``released_before_attention_backward``)
        released = released_before_attention_backward(st, x, stack)
        extra = _max(extra, score_backward_peak(st, kind, x) - released - best)
    return best + a * T * m.hidden_size + extra


def reentrant_bias_grad_stage(st: Structure, x: Shape):
    """Bytes above the top encoder layer's saved tensors at its memory-efficient attention backward
    when its position bias requires grad (T5/mT5 under reentrant checkpointing), with ``x`` the
    encoder's shape (tseq = s_e, T = b·s_e); 0 for a one-layer encoder or no relative bias.

    Why it requires grad: T5Block returns the position bias it was given (modeling_t5.py
    T5Block.forward / T5Stack.forward pass the first block's bias to the blocks above), and every
    output of reentrant checkpointing's CheckpointFunction requires grad once an input does (the
    hidden states), so the blocks above the first get a bias that requires grad and the recompute
    keeps that flag (torch/utils/checkpoint.py CheckpointFunction.backward: detach_variable). The
    sdpa call (integrations/sdpa_attention.py create_position_bias_mask: the bias itself as the
    additive mask without a padding mask) expands the mask to [b, n_h, s, s] and pads its last dim
    to a multiple of 16 (aten attention.cpp preprocess_mask / pad_bias); the efficient backward
    then allocates the bias gradient at that padded, batch-wide size (aten
    ``_efficient_attention_backward``; torch/_meta_registrations.py
    meta__efficient_attention_backward: ``new_sizes[-1] = lastDimAligned``): a·b·n_h·s·⌈s⌉₁₆,
    beside the q, k, v gradients (3·a·T·n_h·d) and, while the node runs, the output's gradient
    (a·T·n_h·d). For b > 1 the expand's backward then sums it to [1, n_h, s, s] (a·n_h·s²), once
    the efficient node has released what it saved (the bias's contiguous copy, a·n_h·s², q, k, v):
    no higher. Checked against the meta trace (t5 small, b 1 and 2, s_e 2048). Without reentrant checkpointing the bias comes from
    the frozen relative_attention_bias and needs no gradient."""
    m = st.model
    if not _relative_bias(m) or m.num_encoder_layers < 2:
        return 0
    a, s = st.attention_bytes, x.tseq
    heads = a * x.T * m.num_heads * m.head_dim
    grad_bias = a * x.b * m.num_heads * s * (_ceil(s / 16) * 16)
    return grad_bias + 4 * heads


def down_input_saved(model: ModelSpec) -> bool:
    """Whether the MLP-out Linear's input is a tensor the MLP already saves: a plain MLP whose
    activation is ReLU, which saves its result (torch ``threshold_backward`` reads the output;
    derivatives.yaml ``relu: result``), feeding fc_out directly -- OPT (modeling_opt.py::
    OPTDecoderLayer.forward: ``fc2(activation_fn(fc1(h)))``). Not when the model's FFN dropout
    sits between them (T5 v1.0 ``wo(dropout(relu(wi(h))))``, ``ArchSpec.ffn_inner_dropout``)."""
    return (model.arch.mlp == "plain" and _activation(model) == "relu"
            and not (hidden_dropout(model) and model.arch.ffn_inner_dropout))


def score_backward_peak(st: Structure, kind: str, x: Shape):
    """Bytes above the layer's saved tensors at the largest point of a score-matrix attention's
    backward (math sdpa, eager), per score element e = b·n_h·s², stage by stage in backward order
    (p: the probabilities' bytes, 4 for math, which computes in fp32, a for eager):

    1. the product with v: the probabilities' gradient (p) and v's gradient at n_h heads (k and
       v were repeated: ``repeat_kv`` / math's GQA repeat; alive until the repeat's backward,
       after the core), beside its input, the output's gradient (a·T·n_h·d): p·e + both; the
       node then releases what it saved, v as repeated (p·b·n_h·s·d, as large as v's gradient);
    2. attention dropout (p > 0, ``attention_dropout_saved``): releases the dropped
       probabilities (p, saved by the product), makes the softmax output's gradient: p·e;
    3. eager on a half stream: the cast's backward makes an fp32 gradient (4), releasing the
       cast copy when the product saved it (no dropout) and the dropout's mask (1);
    4. the softmax backward: the fp32 scores' gradient (4) beside its input gradient (4) and the
       saved fp32 softmax, with the cast copy (c = a on a half eager stream without dropout) or
       the dropped probabilities and the mask (p + 1) released: (8 − c)·e or (7 − p)·e.
    The largest: max(p·e + v grad + out grad, (8 − c)·e) without dropout, (7 − p)·e for the
    second with it; when eager saved v as a one-kv-head view (``eager_kv_heads``) the product
    releases less than v's n_h-head gradient, which the later stages then carry. Source: torch
    aten/src/ATen/native/transformers/attention.cpp ``_scaled_dot_product_attention_math``,
    transformers eager_attention_forward, torch's autograd engine (a node's saved tensors are
    released once it has run); checked against the meta-device trace (granite 3.1 with attention
    dropout 0.1, gemma3, llama under nf4; one-kv-head padding-free rows of the sequence grid)."""
    m = st.model
    e = x.b * m.num_heads * x.tseq * x.tseq
    p = 4 if kind == "math" else st.attention_bytes
    grad_v = p * x.b * m.num_heads * x.tseq * m.head_dim
    grad_out = st.attention_bytes * x.T * m.num_heads * m.head_dim
    if attention_dropout_p(m) > 0:
        late = 7 - p
    else:
        late = 8 - (st.stream_bytes if (kind == "eager" and st.stream_bytes != 4) else 0)
    # v's gradient (n_h heads) outlives the product's node, which released v as saved: as large
    # unless eager saved v as a view at one kv head (``eager_kv_heads``: MQA over one row)
    unreleased = grad_v - p * x.b * eager_kv_heads(m, x.b) * x.tseq * m.head_dim if kind == "eager" else 0
    return _max(p * e + grad_v + grad_out, late * e + unreleased)



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


def random_init_outlier_fraction(model: ModelSpec, T) -> float:
    """``default_int8_outlier_fraction`` for a model without a Structure (used by the trace)."""
    sigma = float(model.config.get("initializer_range", 0.02)) * math.sqrt(model.hidden_size)
    return 1.0 - (1.0 - _p_silu_product_exceeds(sigma, 6.0)) ** T


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
    With checkpointing, a layer without an input norm (olmo2) gives q/k/v the checkpointed
    layer input itself: counted there, not again here.
    ctx.tensors is only set when an input needs a gradient: without checkpointing the first
    layer's input does not (see first_layer_not_saved), so its attention-input Linears keep
    nothing, nor, in a parallel-attention layer with an unadapted MLP, its MLP Linears; in an
    encoder-decoder model that holds for the decoder's first layer too (its input is the frozen
    decoder embedding's output). The decoder's cross-attention k/v read the encoder output, one
    storage of T_enc tokens for every decoder layer (modeling_t5.py T5Stack.forward): a·T_enc·h
    once, and each call's own subA (T_enc rows).
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
        if m.is_encoder_decoder and st.int8_inputs_per_layer.get("decoder"):
            total = total - a * x.T * m.hidden_size  # the decoder's first self-attention input
    if st.int8_encoder_out_in:
        if st.device == "cpu":
            sub = 0
        else:
            f = 0 if outlier_fraction is None else outlier_fraction  # MLP-out roles only by default
            sub = f * st.int8_all_in_per_layer.get("cross", 0.0) * m.num_layers
        total = total + a * x.T_enc * (st.int8_encoder_out_in + sub)
    for stack in st.int8_inputs_per_layer:
        T, cols = _int8_layer_columns(st, x, stack, outlier_fraction, gradient_checkpointing)
        total = total + _stack_layers(m, stack) * a * T * cols
    return total


def _int8_layer_columns(st: Structure, x: Shape, stack: str, outlier_fraction=None, gradient_checkpointing=True):
    """(T, in + f·in): the tokens of ``stack`` (T_enc for the encoder) and one of its layers'
    distinct int8 input columns plus their outlier copies (cross-attention k/v apart), so one
    layer keeps a·T·(in + f·in). With checkpointing a decoder layer without an input norm (olmo2)
    gives q/k/v the checkpointed layer input itself: counted there, not here."""
    m = st.model
    T = x.T_enc if stack == "encoder" else x.T
    in_sum = st.int8_inputs_per_layer.get(stack, 0.0)
    if gradient_checkpointing and stack == "decoder" and not m.is_encoder_decoder and _no_input_norm(m):
        in_sum = in_sum - m.hidden_size
    return T, in_sum + _int8_outlier_in(st, T, stack, outlier_fraction)


def _int8_outlier_in(st: Structure, T, stack: str, outlier_fraction=None):
    """Per layer of ``stack``: the input columns whose fp32 outlier copies (subA) MatMul8bitLt
    keeps, f·in summed over its int8 Linears (``int8_retained_per_step``). 0 on CPU
    (MatMul8bitFp keeps ctx.A only)."""
    if st.device == "cpu":
        return 0
    if outlier_fraction is None:
        return default_int8_outlier_fraction(st, T) * st.int8_outlier_in_per_layer.get(stack, 0.0)
    return outlier_fraction * st.int8_all_in_per_layer.get(stack, 0.0)


def int8_retained_per_layer(st: Structure, x: Shape, stack: str, outlier_fraction=None):
    """One checkpointed layer's MatMul8bitLt ctx tensors (``int8_retained_per_step`` for a single
    layer of ``stack``, "encoder" or "decoder", checkpointing on): a·T·(in + f·in) over its
    distinct int8 inputs (T = T_enc for the encoder). A decoder layer's cross-attention k/v read
    the encoder output, already alive (reentrant recompute detaches it: one storage,
    torch/utils/checkpoint.py::detach_variable), so only their subA is new: f·a·T_enc·in.
    Reentrant checkpointing recreates exactly these in the layer's recompute and frees them with
    its inner graph (CheckpointFunction.backward), see ``steps.int8_inside_layer_backward``."""
    if st.linear_quant != "int8":
        return 0
    a, total = st.stream_bytes, 0
    if stack in st.int8_inputs_per_layer:
        T, cols = _int8_layer_columns(st, x, stack, outlier_fraction)
        total = a * T * cols
    if stack == "decoder" and st.int8_encoder_out_in and st.device != "cpu" and outlier_fraction is not None:
        # MLP-out roles only by default: none of the cross k/v (as int8_retained_per_step)
        total = total + a * x.T_enc * outlier_fraction * st.int8_all_in_per_layer.get("cross", 0.0)
    return total


def int8_saved_anyway_per_layer(st: Structure, kind: str, x: Shape, stack: str):
    """One layer's int8 Linear inputs that its (recomputed) autograd graph saves anyway, one
    storage with ctx.A: the attention output read by o (saved by the flash / mem-efficient
    kernel; a decoder layer of an encoder-decoder model has two, self and cross) and, for a plain
    ReLU MLP (OPT, T5 v1.0), the ReLU output read by fc_out / wo (ReLU saves its result).
    ``int8_saved_anyway``'s terms for one layer of ``stack`` (T = T_enc for the encoder)."""
    if st.linear_quant != "int8":
        return 0
    m, a = st.model, st.stream_bytes
    T = x.T_enc if stack == "encoder" else x.T
    out = 0
    if kind in ("flash", "efficient", "fa2"):
        out = a * T * m.num_heads * m.head_dim * (2 if stack == "decoder" and m.is_encoder_decoder else 1)
    if m.arch.mlp == "plain" and _activation(m) == "relu" and st.mlp_out_quantized:
        out = out + a * T * m.intermediate_size
    return out


def _no_input_norm(model: ModelSpec) -> bool:
    """The layer's norms all run after its attention (``ArchSpec.norms_after_attention``: olmo2)."""
    n_after = model.arch.norms_after_attention
    return n_after is not None and n_after >= model.arch.norms_per_layer


def input_leaf_and_grad(st: Structure, x: Shape, gradient_checkpointing: bool):
    """The embedding output as a leaf that requires grad, and its ``.grad``: 2·a·T·h.

    With checkpointing, enable_input_require_grads marks the embedding output
    ``requires_grad_(True)`` (transformers modeling_utils): it becomes a leaf, backward
    accumulates a gradient into its ``.grad``, and the AccumulateGrad node of the graph held by
    ``loss`` keeps both alive through the optimizer step and into the next forward, until
    ``loss`` is rebound. Without checkpointing nothing requires the input's grad: 0.
    Encoder-decoder models (T5): the encoder's and the decoder's embedding outputs are both
    leaves (one shared embedding module, so the hook fires for both stacks), 2·a·(T_enc + T)·h,
    and the cross-attention's zeros position bias, made ``requires_grad`` under checkpointing
    (modeling_t5.py T5Attention.forward), with its ``.grad``: 2·a·n_h·s_t·s_e.
    """
    if not gradient_checkpointing:
        return 0
    m, a = st.model, st.stream_bytes
    if m.is_encoder_decoder:
        bias = 2 * a * m.num_heads * x.tseq * x.seq if m.arch.position == "relative_bias" else 0
        return 2 * a * m.hidden_size * (x.T_enc + x.T) + bias
    return 2 * a * m.hidden_size * x.T


def final_hidden_dtype(st: Structure) -> str:
    """The dtype of the final norm's output (the LM head's input): fp32 for a LayerNorm under
    CUDA autocast (layer_norm is on its fp32 list: it runs on an fp32 copy and returns fp32;
    aten/src/ATen/autocast_mode.h ``AT_FORALL_FP32``; CPU autocast does not list it), else the
    stream's (RMSNorm returns ``weight * hidden.to(input_dtype)``)."""
    if st.dt.autocast and st.model.arch.norm != "rms" and st.device != "cpu":
        return "fp32"
    return st.dt.stream


def last_hidden_state(st: Structure, x: Shape):
    """The final norm's output (``final_hidden_dtype``, T·h elements): the forward's
    ``hidden_states`` local is still alive while the loss is computed inside
    ``*ForCausalLM.forward`` (it is not saved for backward)."""
    return dtype_bytes(final_hidden_dtype(st)) * x.T * st.model.hidden_size


def int8_saved_anyway(st: Structure, kind: str, x: Shape, gradient_checkpointing: bool):
    """int8 Linear inputs that are also tensors autograd saves without checkpointing: the
    attention output read by o_proj (saved by the flash / mem-efficient kernel) and, for a
    plain ReLU MLP (OPT, T5 v1.0), the ReLU output read by fc_out (ReLU saves its result).
    They are one storage, counted once. With checkpointing nothing else keeps them."""
    if st.linear_quant != "int8" or gradient_checkpointing:
        return 0
    m, a = st.model, st.stream_bytes
    per_layer = enc_layer = 0
    if kind in ("flash", "efficient", "fa2"):
        per_layer = a * x.T * m.num_heads * m.head_dim
        if m.is_encoder_decoder:
            # the decoder's cross-attention output (read by its int8 o) and each encoder layer's
            # attention output are saved by the kernel too (modeling_t5.py T5Attention.forward)
            per_layer = 2 * per_layer
            enc_layer = a * x.T_enc * m.num_heads * m.head_dim
    if m.arch.mlp == "plain" and _activation(m) == "relu" and st.mlp_out_quantized:
        per_layer = per_layer + a * x.T * m.intermediate_size
    return m.num_layers * per_layer + m.num_encoder_layers * enc_layer


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


def cuda_workspaces(gpu: GpuSpec | None, cal: Calibration, device: str = "cuda", stack=None) -> int:
    """cuBLAS/cuBLASLt workspaces, allocated through the caching allocator but invisible to a
    dispatch trace: one per handle, and training uses two (the forward thread's and autograd's
    backward thread's). torch/csrc/cuda/CublasHandlePool.cpp default CUBLAS_WORKSPACE_CONFIG:
    ':4096:8' (32 MiB) on sm90+, ':4096:2:16:8' (8.125 MiB) before. The H100 bf16 reference
    cases sit 64 MiB above a dispatch trace (trace-notes.md). The sizes and the handle count
    are the calibration's ``cublas_*`` coefficients (calibrations/default.json).
    Version rules (data/version-rules.json): ``cublas_workspace_in_allocator`` (False from the
    torch release where TORCH_CUBLAS_WORKSPACE_CACHE became opt-in: then 0) and
    ``cublas_workspace_32mib_min_cc``.
    """
    if device == "cpu" or not versions.rule("cublas_workspace_in_allocator", stack):
        return 0
    cc = float(gpu.compute_capability) if gpu and gpu.compute_capability else 9.0
    big = cc >= float(versions.rule("cublas_workspace_32mib_min_cc", stack))
    per = coefficient(cal, "cublas_workspace_bytes_sm90" if big else "cublas_workspace_bytes_pre_sm90")
    return int(coefficient(cal, "cublas_handles") * per)
