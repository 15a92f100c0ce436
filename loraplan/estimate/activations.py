"""Activations: what autograd saves for backward, per layer and for the whole forward, and the
attention kernel CUDA picks (it decides what attention saves).

Notation: T = b·s tokens, h hidden, I intermediate, n_h / n_kv heads, d head dim, V vocab,
L layers, r rank, a bytes of the residual stream (``loraplan.storage.stream_dtype_bytes``).
The formulas take ints or numpy arrays of one shape (``estimate.arrays``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import versions
from ..errors import InputError
from ..spec import ModelSpec, TrainSpec
from ..storage import Dtypes
from .arrays import ceil as _ceil, where as _where
from .sdpa import explicit_kernel_refusal, first_kernel, sdpa_refusals
from .sequences import batch_layout, explicit_mask
from .weights import Structure

def choose_attention(model: ModelSpec, train: TrainSpec, compute_capability: str | None, sliding: bool = True) -> str:
    """The sdpa kernel CUDA picks (torch aten/.../transformers/cuda/sdp_utils.cpp: flash, then
    mem-efficient, then math).

    - eager attention (gemma2 logit softcapping) never reaches sdpa;
    - a mask (a sliding window shorter than the sequence, T5's position bias) rules out flash;
    - flash needs fp16/bf16, head dim <= 256 and sm80+, and supports grouped-query attention;
    - mem-efficient takes fp32 too (bf16 only on sm80+, a half head dim a multiple of 8), but
      not grouped-query attention (``check_batch_size_and_num_heads_dense<false>``) -> math.
    The rules are ``sdpa.sdpa_refusals`` (shared with the trace's emulation and explain).
    Which kernel takes GQA and fp32 depends on the torch version: rules ``sdpa_flash_gqa`` and
    ``sdpa_efficient_gqa`` of loraplan/data/version-rules.json, for ``train.stack``.
    transformers passes no mask and ``is_causal=True`` for an unpadded batch, and
    ``enable_gqa=True`` when there is no mask (integrations/sdpa_attention.py::use_gqa_in_sdpa).
    A padded batch (``padding`` longest with padding in it) or packed rows (packing, padding-free)
    get an explicit bool mask from transformers (``sequences.explicit_mask``: not OPT's packed
    rows), which rules out flash as a sliding window does. ``attn_implementation`` eager -> "eager",
    flash_attention_2 -> "fa2" (flash-attn's own kernel, never sdpa).
    ``sliding=False``: the kernel of a global (full-attention) layer of a model whose sliding
    window covers only some layers (gemma3 ``layer_types``): its window never builds a mask.
    """
    if train.attention != "auto":
        return train.attention
    impl = train.attn_implementation
    if impl == "flash_attention_2":
        return "fa2"
    if model.arch.attention == "eager" or impl == "eager":
        return "eager"
    if train.device == "cpu":  # loraplan profile --device cpu runs sdpa on the math backend
        return "math"
    return first_kernel(sdpa_kernel_refusals(model, train, compute_capability, sliding))


def sdpa_kernel_refusals(model: ModelSpec, train: TrainSpec, compute_capability: str | None,
                         sliding: bool = True) -> dict[str, str]:
    """kernel (flash, efficient, math) -> "" when CUDA sdpa can run it for this setup, else why not
    (``sdpa.sdpa_refusals`` on the setup's facts: the attention dtype ``Dtypes.attention``, the
    head dim, an explicit mask, grouped-query heads reaching sdpa; see :func:`choose_attention`).
    No compute capability: sm80 is assumed (the analytic default GPU class)."""
    layout = batch_layout(train)
    masked = bool(model.arch.position == "relative_bias" or model.arch.sdpa_mask
                  or (sliding and sliding_window_reached(model, layout.row_len))
                  or explicit_mask(layout, model.model_type))
    # grouped-query heads reach sdpa only without a mask and with a torch that has enable_gqa;
    # otherwise transformers repeats k, v to n_h heads (repeat_kv) and any kernel takes them
    gqa = bool(model.num_kv_heads != model.num_heads and not masked and versions.rule("sdpa_flash_gqa", train.stack))
    return sdpa_refusals(Dtypes.of(train).attention, model.head_dim, model.head_dim, masked,
                         compute_capability or "8.0", gqa, train.stack)


def check_attention_kernel(model: ModelSpec, train: TrainSpec, compute_capability: str | None) -> None:
    """InputError (one line: the kernel, why torch cannot run it here, the fix) for an explicit
    ``--attention flash|efficient|math`` that this setup cannot run: torch's
    ``sdpa_kernel([backend])`` raises "No available kernel" there (sdp_utils.cpp). Not checked: the
    CPU profile path (``device`` cpu: its math backend is modelled) and families whose attention
    loraplan models as eager (``arch.attention``: gemma2's softcapping)."""
    kind = train.attention
    if kind not in ("flash", "efficient", "math") or train.device == "cpu":
        return
    if model.arch.attention == "eager":  # the family's own attention (gemma2 softcapping): not sdpa's rules
        return
    why = explicit_kernel_refusal(kind, sdpa_kernel_refusals(model, train, compute_capability))
    if why:
        raise InputError(why)


def sliding_window_reached(model: ModelSpec, seq):
    """transformers builds an explicit mask once the key length reaches the window:
    masking_utils.py::_ignore_causal_mask_sdpa returns False when
    ``local_attention_size is not None and kv_length >= local_attention_size`` (so at
    seq == sliding_window too). With a mask, sdpa_attention.py::use_gqa_in_sdpa is False on CUDA:
    k and v are repeated to n_h heads (repeat_kv) and CUDA's sdpa takes the memory-efficient kernel."""
    w = model.arch.sliding_window
    if w is None:
        return False if not hasattr(seq, "shape") else seq < 0
    return seq >= w


@dataclass(frozen=True)
class Shape:
    """The numbers of a case: plain ints, or numpy arrays of one shape (a grid)."""

    b: Any
    seq: Any  # encoder / decoder-only sequence length
    tseq: Any  # decoder length (= seq for decoder-only)
    r: Any
    dropout: Any
    #: the batch has an explicit attention mask (padded or packed rows, ``sequences.BatchLayout``)
    masked: bool = False
    #: rows of the RoPE cos/sin tables: 1, or the batch's rows when position ids are passed (packed)
    rope_rows: Any = 1
    #: flash_attention_2 gathers or flattens q, k, v into new tensors (a padded batch's
    #: ``_upad_input``, one packed row's ``_prepare_from_posids``)
    fa2_copies: bool = False
    #: the kernel of the global (full-attention) layers when the sliding window covers only some
    #: layers (``ArchSpec.sliding_layers``, gemma3): None = every layer runs the case's kernel
    global_attention: str | None = None

    @property
    def T(self):
        return self.b * self.tseq

    @property
    def T_enc(self):
        return self.b * self.seq



def _mask_bytes(st: Structure, input_bytes: int) -> int:
    """Bytes per element a dropout keeps besides its output: CUDA's fused native_dropout a bool
    mask (1 B); on CPU ATen multiplies by a noise tensor of the input's dtype and keeps that
    (aten/src/ATen/native/Dropout.cpp: the fused kernel is acceptable on CUDA/XPU only)."""
    return 1 if st.device != "cpu" else input_bytes



def lora_input_saved_bytes(st: Structure, dropout):
    """Bytes per input element an adapted Linear's LoRA branch keeps for backward (lora_A's
    input, saved for its weight gradient). peft casts x to lora_A's dtype A
    (``x = self._cast_input_dtype(x, lora_A.weight.dtype)``), then ``lora_A(dropout(x))``;
    under autocast (dtype c) lora_A's ``linear`` casts its input to c above autograd, so it saves
    that c copy and the A-dtype dropout output dies (native_dropout keeps only its mask):

    - no autocast, dropout p > 0: the dropout output (A B; fp32 4 B in the protocol) + what the
      dropout keeps besides it (``_mask_bytes``: CUDA's bool mask 1 B);
    - no autocast, p = 0 (nn.Identity): the A-dtype cast copy of the stream (A B), or nothing when
      the stream already is A (lora_A saves the stream tensor itself, already alive);
    - autocast, p > 0: the c copy (c B) + the mask; p = 0: the c copy, or nothing when the
      stream, A and c are one dtype.
    Source: peft/tuners/lora/layer.py::Linear.forward; torch aten/src/ATen/autocast_mode.cpp
    (cached_cast above autograd); memory-physics.md §4.
    """
    A = st.adapter_bytes
    c = st.autocast_bytes
    if not c:
        return _where(dropout > 0, A + _mask_bytes(st, A), 0 if st.dt.stream == st.dt.adapter else A)
    same = st.dt.stream == st.dt.adapter == st.dt.autocast
    return _where(dropout > 0, c + _mask_bytes(st, A), 0 if same else c)


def lora_output_bytes(st: Structure) -> int:
    """Bytes per element of lora_A's r-wide output (saved by lora_B): the adapter dtype, or the
    autocast dtype under mixed precision (linear is a lower-precision op)."""
    return st.autocast_bytes or st.adapter_bytes


def lora_activations_per_layer(st: Structure, x: Shape, stack: str, T):
    """Bytes peft's LoRA branch saves per layer, for each adapted Linear [out, in]:

    - dropout p > 0: the fp32 dropout output (4·T·in, lora_A's input) + the fused dropout's
      bool mask (1·T·in; CUDA native_dropout) -> 5·T·in (CPU: an fp32 noise tensor, 8·T·in);
    - p = 0 (nn.Identity): lora_A saves its input: the fp32 cast copy (4·T·in) of a bf16/fp16
      stream, one per module (peft Linear.forward: ``x = self._cast_input_dtype(x, lora_A.dtype)``),
      or the fp32 stream tensor itself (already alive: 0 extra);
    - lora_A's r-wide fp32 output, saved by lora_B: 4·T·r.
    A decoder layer's cross-attention k/v (T5 ``EncDecAttention.k/v``) read the encoder output,
    so their branch holds T_enc = b·s_enc tokens, not T (modeling_t5.py T5Attention.forward:
    ``self.k(current_states)`` with ``current_states = key_value_states``).
    Source: peft/tuners/lora/layer.py and bnb.py (forward); memory-physics.md §4.
    """
    per_token = lora_input_saved_bytes(st, x.dropout)
    in_sum = st.lora_in_per_layer.get(stack, 0.0)
    n = st.lora_count_per_layer.get(stack, 0.0)
    o = lora_output_bytes(st)
    out = per_token * T * in_sum + n * o * T * x.r
    if stack == "decoder" and "cross" in st.lora_in_per_layer:
        out = out + (per_token * st.lora_in_per_layer["cross"] + st.lora_count_per_layer["cross"] * o * x.r) * x.T_enc
    return out


def attention_saved_per_layer(st: Structure, kind: str, T, b, seq, kv_seq, cross: bool = False, masked: bool = False,
                              fa2_copies: bool = False, window: bool = True):
    """Bytes the attention block saves per layer (after its projections).

    - sdpa flash: q, k, v as given to the kernel (after RoPE: new tensors) and its output, with
      the head dim padded to a multiple of 8 (torch sdpa ``pad_last_dim<8>``), + the fp32
      logsumexp 4·b·n_h·s. GQA native: k, v keep n_kv heads.
    - sdpa mem-efficient: q, k, v, output + fp32 logsumexp padded to a multiple of 32 in s.
    - math (fp32 stream with grouped-query attention: torch documents GQA for flash and math
      only): scaled q, k and v repeated to n_h heads and the softmax output a·b·n_h·s².
    - eager (transformers eager_attention_forward): q, k and v repeated, the fp32 softmax (4 B)
      and its cast back to the stream dtype (a B); logit softcapping (gemma2) keeps tanh's output.
    - fa2 (flash-attn 2, ``_fa2_saved``).
    ``masked``: the batch's explicit mask (``Shape.masked``), handled as a reached sliding window.
    ``window=False``: a global layer of a partly sliding model (no window mask, see ``layer_saved``).
    Source: transformers integrations/sdpa_attention.py, models/llama/modeling_llama.py; torch
    aten/src/ATen/native/transformers/attention.cpp (outputs each kernel saves).
    """
    m, a = st.model, st.block_bytes
    n_h, n_kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    # phi3 slices q, k, v out of its fused qkv_proj output as views: the saved v view keeps the
    # whole [T, (n_h + 2·n_kv)·d] output alive, q and k parts included. (gpt-neox and falcon
    # reshape and split per head; their traces show no such retention.)
    # FA2 on an fp32 stream casts q, k, v to bf16 copies first (``_fa2_saved``), and its varlen
    # paths gather / flatten them into new tensors (``fa2_copies``): no view kept. Under autocast
    # with a qkv output of another dtype (a 4-bit base returns the fp32 stream's dtype) sdpa saves
    # its cast copies instead of the views: no retention.
    fused_kept = ((kind in ("flash", "efficient") and a == st.attention_bytes)
                  or (kind == "fa2" and a != 4 and not fa2_copies))
    fused = a * T * (n_h + n_kv) * d if _has_fused_qkv(m) and fused_kept else 0
    return (fused + _attention_core_saved(st, kind, T, b, seq, kv_seq, cross, masked, window)
            + attention_dropout_saved(st, kind, b, seq, kv_seq))


def eager_kv_heads(model: ModelSpec, b):
    """Heads of the k and v eager attention's matmuls save: n_h (repeat_kv's copy), or n_kv = 1
    for a single kv head (MQA) over one row (padding-free).

    modeling_llama.py::repeat_kv expands [b, n_kv, s, d] to [b, n_kv, n_rep, s, d] (stride 0)
    and reshapes to [b, n_h, s, d]: a copy unless n_kv == 1 (a size-1 dim merges with the
    stride-0 one: a view). torch's matmul (aten/src/ATen/native/LinearAlgebra.cpp::_matmul_impl)
    then reshapes each 4-D operand to [b·n_h, s, d] for bmm, which saves what it is given: for
    the stride-0 view that reshape is again a view only when b == 1, else a copy at n_h heads."""
    n_kv = model.num_kv_heads
    if n_kv != 1:
        return model.num_heads
    return _where(b == 1, 1, model.num_heads)


def attention_dropout_saved(st: Structure, kind: str, b, seq, kv_seq):
    """Attention-probability dropout in training (config ``attention_dropout`` p > 0, granite 3.x:
    0.1): with the math kernel or eager attention the dropped probabilities are a new tensor,
    saved for the product with v, plus what the dropout keeps besides it (``_mask_bytes``: CUDA's
    native_dropout bool mask, 1 B), per score element b·n_h·s·kv:

    - math (torch ``_scaled_dot_product_attention_math``: ``at::dropout`` on the fp32 softmax): 4 + 1 B;
    - eager (transformers ``eager_attention_forward``: ``F.dropout`` on the stream-dtype probabilities): a + 1 B.
    flash and mem-efficient draw the mask inside the kernel from a saved seed/offset (no per-element
    tensor). Source: modeling_granite.py::GraniteAttention.forward (``dropout=0.0 if not
    self.training else self.attention_dropout``), torch aten/src/ATen/native/transformers/attention.cpp.
    """
    if attention_dropout_p(st.model) <= 0 or kind not in ("math", "eager"):
        return 0
    kept = 4 if kind == "math" else st.stream_bytes
    return (kept + _mask_bytes(st, kept)) * b * st.model.num_heads * seq * kv_seq


def attention_dropout_p(model: ModelSpec) -> float:
    """p of the attention-probability dropout in training: the config's ``attention_dropout``."""
    return float(model.config.get("attention_dropout") or 0)


def _has_fused_qkv(model: ModelSpec) -> bool:
    return model.arch.fused_qkv_views and any(l.role == "qkv" for l in model.linears)


def _fa2_saved(st: Structure, T, b, seq, kv_seq):
    """What flash-attn 2's ``FlashAttnFunc`` / ``FlashAttnVarlenFunc`` saves per layer
    (flash_attn/flash_attn_interface.py: ``ctx.save_for_backward(q, k, v, out_padded, softmax_lse,
    rng_state)``): q, k, v and the output with the head dim padded to a multiple of 8, k and v at
    n_kv heads (GQA is native), in the fp16/bf16 the kernel takes: an fp32 stream (a quantized
    base after prepare_model_for_kbit_training) is cast to the model's dtype first
    (modeling_flash_attention_utils.py::fa_peft_integration_check with get_target_dtype: 2 B
    copies, the fp32 originals are not kept); + the fp32 logsumexp, [b, n_h, s] or, varlen,
    [n_h, total tokens]: 4·n_h·T either way; rng_state 16 B (below the 512 B block, not counted).
    Padded batches (``_upad_input``), packed rows (``_prepare_from_posids``) and plain rows save
    the same counts for the worst batch (every row real)."""
    m, a = st.model, st.attention_bytes  # autocast's dtype under mixed precision
    n_h, n_kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    dp = -(-d // 8) * 8
    q = 2 if a == 4 else a
    return q * T * n_h * dp * 2 + 2 * q * b * kv_seq * n_kv * dp + 4 * b * n_h * seq


def _attention_core_saved(st: Structure, kind: str, T, b, seq, kv_seq, cross: bool = False, masked: bool = False,
                          window: bool = True):
    # sdpa's inputs and outputs: autocast's dtype under mixed precision (scaled_dot_product_attention
    # is a lower-precision op); eager attention's matmuls too
    m, a = st.model, st.attention_bytes
    n_h, n_kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    if kind == "fa2":
        return _fa2_saved(st, T, b, seq, kv_seq)
    if kind == "flash":
        dp = -(-d // 8) * 8
        return a * T * n_h * dp * 2 + 2 * a * b * kv_seq * n_kv * dp + 4 * b * n_h * seq
    if kind == "efficient":
        # T5: the relative position bias plus the mask goes in as an additive mask [1, n_h, s, kv]
        # in the stream dtype, made per self-attention call (last dim padded to 16) and saved for
        # backward; cross-attention reuses one zeros bias (see t5_shared_biases). torch's
        # preprocess_mask expands it to [b, n_h, s, kv] first (a view) and, when kv is not a
        # multiple of 16, pad_bias materialises the expanded view: all b rows
        # (aten/src/ATen/native/transformers/attention.cpp preprocess_mask, pad_bias;
        # emulation._mem_eff_mask)
        bias = (a * _where(kv_seq % 16 == 0, 1, b) * n_h * seq * (_ceil(kv_seq / 16) * 16)
                if _relative_bias(m) and not cross else 0)
        if m.arch.sdpa_mask:  # falcon: the causal mask, made additive per call [b, 1, s, kv]
            # (all n_h heads when the pad to 16 materialises the expanded mask, see below)
            bias = a * b * _where(kv_seq % 16 == 0, 1, n_h) * seq * (_ceil(kv_seq / 16) * 16)
        kv_heads = n_kv
        if (m.arch.sliding_window is not None and window) or masked:
            # a reached sliding window or the mask of a padded / packed batch: transformers' bool
            # mask, made additive per call by torch (convert_boolean_attn_mask, [b, 1, s, kv] in
            # the query dtype, padded to 16) and saved; k, v repeated to n_h heads by repeat_kv
            # (no enable_gqa with a mask). torch's preprocess_mask expands the mask to
            # [b, n_h, s, kv] (a view) and pads kv to a multiple of 16: when kv is not one already,
            # the pad materialises all n_h heads (aten/.../transformers/attention.cpp pad_bias;
            # emulation._mem_eff_mask)
            reached = True if masked else sliding_window_reached(m, kv_seq)
            heads = _where(kv_seq % 16 == 0, 1, n_h)
            bias = bias + _where(reached, a * b * heads * seq * (_ceil(kv_seq / 16) * 16), 0)
            # repeat_kv of a single kv head (MQA) is a view (the expanded head dim merges with
            # stride 0): nothing new is saved
            kv_heads = _where(reached, n_h, n_kv) if n_kv > 1 else n_kv
        return a * T * n_h * d * 2 + 2 * a * b * kv_seq * kv_heads * d + 4 * b * n_h * (_ceil(seq / 32) * 32) + bias
    scores = b * n_h * seq * kv_seq
    qkv = a * T * n_h * d + 2 * a * b * kv_seq * n_h * d  # k, v repeated to n_h heads
    if kind == "eager":
        qkv = a * T * n_h * d + 2 * a * b * kv_seq * eager_kv_heads(m, b) * d
    if kind == "math":
        # aten _scaled_dot_product_attention_math keeps its intermediates in fp32 for half inputs
        # (torch docs): q·√scale, (k·√scale)ᵀ and v (repeated for enable_gqa) and the softmax
        # output are saved in fp32; the scores before the softmax and the output are not.
        return 4 * (T * n_h * d + 2 * b * kv_seq * n_h * d) + 4 * scores
    # eager (transformers eager_attention_forward, repeat_kv): the fp32 softmax (4 B) and its
    # cast back to the stream dtype (a B, a no-op for an fp32 stream) are saved; logit
    # softcapping (gemma2) keeps tanh's output too (a B). With attention dropout the product with
    # v saves the dropout's output instead of the cast (``attention_dropout_saved``) and
    # native_dropout keeps only its mask: nothing keeps the cast.
    softmax = 4 + (a if a != 4 and attention_dropout_p(m) <= 0 else 0)
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
        t5_input = a if (st.model.arch.norm_keeps_input and a != 4) else 0
        return (4 + t5_input) * T * h + 4 * T
    if st.autocast_bytes:  # layer_norm is an fp32 autocast op: it saves the fp32 copy of its input
        a = 4
    return a * T * h + 8 * T


def _relative_bias(model: ModelSpec) -> bool:
    """T5/mT5 relative position bias: computed once per stack (modeling_t5.py compute_bias),
    handed to every layer and added to the attention scores as an additive mask."""
    return model.arch.position == "relative_bias"


def hidden_dropout(model: ModelSpec) -> float:
    """p of the model's own residual/FFN dropouts in training (not LoRA's, not attention's):
    the config value named by ``arch.hidden_dropout_key`` (T5 ``dropout_rate``, default 0.1;
    OPT ``dropout``, 0.1; others ``hidden_dropout``, 0)."""
    arch = model.arch
    return float(model.config.get(arch.hidden_dropout_key, arch.hidden_dropout_default) or 0)


def model_dropout_masks_per_layer(st: Structure, T, stack: str):
    """Bool masks (1 B/elem) the model's own dropouts keep per layer (CUDA native_dropout):
    T5 every sub-layer output (2 in the encoder, 3 in the decoder, T·h each) and the FFN inner
    activation (T·I); OPT the attention and FFN outputs (2·T·h)."""
    m = st.model
    if not hidden_dropout(m) or not m.arch.sublayer_dropout:
        return 0
    k = _mask_bytes(st, st.stream_bytes)
    sub = 3 if (stack == "decoder" and m.is_encoder_decoder) else 2  # + cross-attention
    if m.arch.ffn_inner_dropout:
        return k * (sub * T * m.hidden_size + T * m.intermediate_size)
    return k * sub * T * m.hidden_size


#: activations transformers implements in Python (not one fused kernel): NewGELUActivation
#: keeps x (for pow), tanh's output, 0.5·x and 1 + tanh (activations.py).
_UNFUSED_GELU = ("gelu_new", "gelu_fast", "gelu_pytorch")


def _activation(model: ModelSpec) -> str:
    cfg = model.config
    if model.arch.activation_from == "feed_forward_proj":
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
    ab = st.block_bytes
    if unfused and st.autocast_bytes:
        # under autocast NewGELU's ``torch.pow(x, 3.0)`` is an fp32 op: x is cast to fp32 (the copy
        # pow saves) and everything it feeds promotes to fp32: tanh's output, 1 + tanh and the GELU
        # output are fp32 (4 B); 0.5·x stays in x's dtype (transformers activations.py::NewGELUActivation)
        per = (3 * 4 + ab) + ((4 + ab) if st.model.arch.mlp == "gated" else 0)  # gated: the product's inputs
        return per * T * st.model.intermediate_size
    if st.model.arch.mlp == "gated":
        k = 6 if unfused else 3
    else:
        k = 4 if unfused else 1
    return k * ab * T * st.model.intermediate_size


def moe_block_saved(st: Structure, T):
    """Bytes one sparse-MoE block saves for backward (transformers 5 default experts
    implementation "grouped_mm": modeling_utils.get_correct_experts_implementation; the forward is
    integrations/moe.py::grouped_mm_experts_forward). S = T·k token-expert pairs, I_e the expert
    width, w bytes of the stored experts (storage.expert_storage: bf16 2, fp32 4 under a
    bitsandbytes base), a the stream dtype:

    - router (MixtralTopKRouter / Qwen*TopKRouter): fp32 softmax output 4·T·E, top-k indices
      8·T·k and the renormalised top-k weights 4·T·k;
    - dispatch: ``hidden_states[perm // k]`` and ``sample_weights[perm]`` keep their int64
      indices (8·S each); the combine ``weighted_out[inv_perm]`` keeps inv_perm (8·S);
    - experts: ``gate_up`` grouped_mm output [S, 2·I_e] (SiLU keeps its gate view, so the whole
      output) + the SiLU output [S, I_e]: 3·w·S·I_e, as a dense gated MLP over S rows; the down
      output [S, h] and the routing weights [S] kept by ``proj_out * sample_weights``: w·S·h +
      r·S (r = 4 for mixtral's fp32 router weights, else a). Token counts per expert do not
      enter: grouped_mm processes the S sorted rows in one call, so routing imbalance changes
      time, not these bytes (expected tokens per expert T·k/E);
    - LoRA on fused experts (PEFT ParamWrapper) makes the frozen grouped_mm operands need grads:
      the inputs it reads are kept (w·S·h for gate_up, w·S·I_e for down) and the parametrized
      weight W + ΔW [E, out, in] (w B) is saved by grouped_mm for the input gradient;
    - a shared expert (qwen2_moe): a gated MLP 3·a·T·I_s + its sigmoid gate a·T + the gated
      output a·T·h.
    The auxiliary load-balancing loss runs only with ``output_router_logits`` (default False in
    every family here) and is not modelled.
    """
    m, moe = st.model, st.model.moe
    a, w = st.stream_bytes, st.expert_bytes
    k, E, I_e, h = moe.top_k, moe.num_experts, moe.expert_intermediate_size, m.hidden_size
    S = T * k
    r = a if moe.router_weights_in_stream_dtype else 4
    router = 4 * T * E + 8 * T * k + 4 * T * k
    dispatch = 3 * 8 * S
    experts = 3 * w * S * I_e + w * S * h + r * S
    roles = {e.role for e in st.adapted_experts}
    lora = 0
    if roles:
        per_layer = [e for e in st.adapted_experts if e.layer == moe.layers[0]]
        lora = sum(w * e.numel for e in per_layer)
        lora = lora + (w * S * h if "gate_up" in roles else 0) + (w * S * I_e if "down" in roles else 0)
    shared = 0
    if moe.shared_expert_intermediate_size:
        shared = 3 * a * T * moe.shared_expert_intermediate_size + a * T + a * T * h
    return router + dispatch + experts + lora + shared


def _mlp_saved_per_layer(st: Structure, T):
    """The MLP's saved bytes averaged over the layers: the dense MLP, or for a sparse-MoE model
    ``moe_block_saved`` in its MoE layers and the dense MLP elsewhere (qwen mlp_only_layers)."""
    moe = st.model.moe
    if moe is None:
        return mlp_saved(st, T)
    L = max(st.model.num_layers, 1)
    n = len(moe.layers)
    return (n * moe_block_saved(st, T) + (L - n) * mlp_saved(st, T)) / L


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
        att = attention_saved_per_layer(st, kind, T, x.b, x.tseq, x.tseq, masked=x.masked, fa2_copies=x.fa2_copies)
        n_sl = m.arch.sliding_layers
        if x.global_attention is not None and n_sl is not None and n_sl < m.num_layers:
            # gemma3 ``layer_types``: the sliding layers get the window's mask (and the kernel it
            # leaves), the global ones transformers' causal mask, None for an unpadded batch
            # (masking_utils.py create_causal_mask vs create_sliding_window_causal_mask), so the
            # kernel of a layer without a mask: the average over the layers
            glob = attention_saved_per_layer(st, x.global_attention, T, x.b, x.tseq, x.tseq, masked=x.masked,
                                             fa2_copies=x.fa2_copies, window=False)
            att = (n_sl * att + (m.num_layers - n_sl) * glob) / m.num_layers
        norms = m.arch.norms_per_layer
        if m.is_encoder_decoder:
            att = att + attention_saved_per_layer(st, kind, T, x.b, x.tseq, x.seq, cross=True)
    return (norms * norm_saved(st, T) - shared_norm_input(st, T) + att + _mlp_saved_per_layer(st, T)
            + lora_activations_per_layer(st, x, stack, T)
            + model_dropout_masks_per_layer(st, T, stack) + head_norms_saved(st, T))


def shared_norm_input(st: Structure, T):
    """Parallel attention with two LayerNorms on one input (gpt-neox ``input_layernorm`` and
    ``post_attention_layernorm``, falcon ``ln_attn`` and ``ln_mlp``): both save the same layer
    input, one storage: (norms − 1)·a·T·h counted once too often by ``norms · norm_saved``
    (modeling_gpt_neox.py GPTNeoXLayer.forward with use_parallel_residual)."""
    m = st.model
    if not m.arch.parallel_attn or m.arch.norm != "layer" or m.arch.norms_per_layer < 2:
        return 0
    return (m.arch.norms_per_layer - 1) * st.stream_bytes * T * m.hidden_size


def released_before_attention_backward(st: Structure, x: Shape, stack: str = "decoder"):
    """What the top layer saved for the ops that run after its attention core, all released
    (autograd release_variables) by the time the core's backward starts: the MLP's saved tensors
    (``_mlp_saved_per_layer``: a sparse-MoE block's in an MoE model), the norms after the attention
    (``ArchSpec.norms_after_attention``: llama's post_attention_layernorm; gemma2/3's
    post_attention, pre_ and post_feedforward norms; olmo2's two output norms; a parallel layer's
    second norm shares the layer input with the first, so only its statistics go), the model's
    own sub-layer dropout masks (OPT), and the LoRA branches of the adapted o_proj and MLP
    Linears (each its saved input ``lora_input_saved_bytes`` and its r-wide lora_A output).
    Backward runs a layer's nodes in reverse creation order (torch autograd: a higher sequence
    number first), so the MLP, the post-attention norms and o_proj come before the core.
    Encoder-decoder decoder layers (a cross-attention after the self-attention): the MLP only."""
    m, T = st.model, (x.T_enc if stack == "encoder" else x.T)
    mlp = _mlp_saved_per_layer(st, T)
    lora_in = st.mlp_adapted_in.get(stack, 0.0)
    L = max(m.num_layers if stack == "decoder" else m.num_encoder_layers, 1)
    n_mlp = sum(1 for l in st.adapted if l.stack == stack and l.role in _MLP_ROLES) / L
    if m.is_encoder_decoder:
        return mlp + lora_input_saved_bytes(st, x.dropout) * T * lora_in
    o_in = sum(l.in_features for l in st.adapted if l.stack == stack and l.role == "o") / L
    n_o = sum(1 for l in st.adapted if l.stack == stack and l.role == "o") / L
    n_after = m.arch.norms_after_attention
    if n_after is None:
        n_after = m.arch.norms_per_layer - 1
    norms = n_after * norm_saved(st, T) - (shared_norm_input(st, T) if n_after else 0)
    lora = lora_input_saved_bytes(st, x.dropout) * T * (lora_in + o_in) + (n_mlp + n_o) * lora_output_bytes(st) * T * x.r
    return mlp + norms + model_dropout_masks_per_layer(st, T, stack) + lora


#: the LoRA-adaptable Linears of an MLP (``LinearSpec.role``)
_MLP_ROLES = ("gate", "up", "gate_up", "down", "fc_in", "fc_out")


def head_norms_saved(st: Structure, T):
    """RMSNorms on q and k: like any RMSNorm they keep an fp32 copy of their input (4·T·n·d,
    for n = n_h and n_kv heads) and one fp32 rsqrt per normalised row:

    - per head (``qk_norm_scope`` "head": qwen3, gemma3 ``q_norm(view(..., d))``): 4·T·n per norm;
    - over the whole projection ("projection": olmo2, olmoe ``q_norm(q_proj(x))`` with weight [n_h·d]):
      4·T per norm, one row per token.
    Source: modeling_qwen3.py::Qwen3Attention.forward, modeling_gemma3.py::Gemma3Attention.forward,
    modeling_olmo2.py::Olmo2Attention.forward and modeling_olmoe.py::OlmoeAttention.forward (the llama RMSNorm)."""
    m = st.model
    heads = m.num_heads + m.num_kv_heads
    if "q_norm" not in m.arch.extra_norms:
        return 0
    rows = 2 if m.arch.qk_norm_scope == "projection" else heads
    return 4 * T * heads * m.head_dim + 4 * T * rows


def checkpoint_inputs(st: Structure, x: Shape, kind: str = "flash"):
    """Non-reentrant checkpointing keeps each checkpointed layer's inputs: L·a·T·h
    (torch/utils/checkpoint.py: the inputs are saved by _NoopSaveInputs for the recompute),
    and the mask passed to every layer: eager attention gets an additive [b, 1, s, s] mask in
    the stream dtype (transformers masking_utils eager_mask), one tensor shared by all layers
    (two when sliding and full layers mix: ``eager_masks``);
    T5 passes its position biases (modeling_t5.py compute_bias) the same way. When the first
    layer's input is not the embedding output (``ArchSpec.embedding_leaf_apart``), the embedding
    output, a leaf that requires grad (enable_input_require_grads), is kept too: a·T·h."""
    m = st.model
    mask = st.stream_bytes * x.b * x.tseq * x.tseq * eager_masks(m) if kind == "eager" else 0
    mask = mask + t5_shared_biases(st, x, checkpointed=True) + sliding_window_mask(st, kind, x)
    leaf = x.T if m.arch.embedding_leaf_apart else 0  # its AccumulateGrad node keeps the leaf
    return st.stream_bytes * m.hidden_size * (m.num_layers * x.T + m.num_encoder_layers * x.T_enc + leaf) + mask


def eager_masks(model: ModelSpec) -> int:
    """How many additive eager masks the layers hold: 2 when sliding-window and full-attention
    layers mix (gemma2, gemma3 ``layer_types``: the model builds ``causal_mask_mapping`` with a
    causal and a sliding-window mask, each layer takes its type's; modeling_gemma2.py
    Gemma2Model.forward), else 1."""
    n_sl = model.arch.sliding_layers
    return 2 if model.arch.sliding_window and n_sl is not None and 0 < n_sl < model.num_layers else 1


def sliding_window_mask(st: Structure, kind: str, x: Shape):
    """The bool [b, 1, s, s] sliding-window causal mask transformers builds once per forward when
    the sequence reaches the window (masking_utils.py sdpa_mask), handed to every layer: b·s²
    bytes, kept as a checkpoint input with checkpointing (without, only the additive copies each
    layer's sdpa saves outlive the forward). Eager attention's additive
    mask is counted in ``checkpoint_inputs``."""
    if kind in ("eager", "fa2"):
        return 0
    if x.masked:  # a padded or packed batch: the same bool mask (masking_utils.py sdpa_mask)
        return x.b * x.tseq * x.tseq
    if st.model.arch.sliding_window is None:
        return 0
    return _where(sliding_window_reached(st.model, x.tseq), x.b * x.tseq * x.tseq, 0)


def t5_shared_biases(st: Structure, x: Shape, checkpointed: bool):
    """T5's biases computed once and handed to every layer (modeling_t5.py compute_bias): the
    cross-attention's zeros bias [1, n_h, s_t, s_e], kept by the graph, and — as checkpoint
    inputs — the encoder and decoder position biases [1, n_h, s, s]."""
    if not _relative_bias(st.model):
        return 0
    n = st.stream_bytes * st.model.num_heads
    shared = n * x.tseq * x.seq
    if checkpointed:
        shared = shared + n * (x.seq * x.seq + x.tseq * x.tseq)
    return shared


def encoder_backward_activations(st: Structure, kind: str, x: Shape, gradient_checkpointing: bool):
    """What is alive inside the top encoder layer's backward (encoder-decoder models), besides the
    backward transients: the decoder's saved tensors are released by then.

    - that layer's saved tensors (recomputed with checkpointing) S_enc;
    - below it: with checkpointing the encoder layers' inputs (L_enc·a·T_enc·h) and the encoder
      position bias [1, n_h, s_e, s_e]; the embedding outputs that enable_input_require_grads
      made leaves (a·(T_enc + T)·h) and the cross-attention's zeros bias, a leaf that requires
      grad under checkpointing (modeling_t5.py T5Attention.forward), with its ``.grad``:
      2·a·n_h·s_t·s_e; the decoder input leaf's ``.grad`` (a·T·h) and the encoder's entry
      dropout mask (T_enc·h). Without checkpointing the other encoder layers' saved tensors
      (the first layer's as in ``first_layer_not_saved``).
    The encoder output's gradient (summed over the decoder's cross-attentions) is gone by then:
    the encoder's final dropout and T5LayerNorm backward each make a new tensor and release
    their input gradient, so only the residual gradient into the top layer is alive (a·T_enc·h,
    counted in ``transients.layer_backward_transients``) (modeling_t5.py T5Stack.forward).
    """
    m, a, h = st.model, st.stream_bytes, st.model.hidden_size
    S = layer_saved(st, kind, x, "encoder")
    if gradient_checkpointing:
        below = (a * h * (m.num_encoder_layers * x.T_enc + x.T_enc + x.T)
                 + (a * m.num_heads * x.seq * x.seq if _relative_bias(m) else 0)
                 + (2 * a * m.num_heads * x.tseq * x.seq if _relative_bias(m) else 0))
        if m.arch.norm_keeps_input:
            # T5LayerNorm keeps the layer input: the checkpointed input itself (a half input is
            # kept beside the fp32 copy; an fp32 input's ``.to(float32)`` returns it, so the norm's
            # 4·T·h of ``norm_saved`` is that input too)
            below = below - a * x.T_enc * h
        # the decoder's input leaf has its ``.grad`` by now (a·T·h), and the encoder's entry
        # dropout (T5Stack ``self.dropout(inputs_embeds)``, on a leaf that requires grad) keeps its mask
        below = below + a * x.T * h
        if hidden_dropout(m):
            below = below + _mask_bytes(st, a) * x.T_enc * h
    else:
        below = (m.num_encoder_layers - 1) * S - first_layer_not_saved(st, kind, x)
    return below + S


def encoder_layers_above_bottom(st: Structure, kind: str, x: Shape, gradient_checkpointing: bool):
    """What ``encoder_backward_activations`` counts for the encoder layers above the first one,
    released by the time the first (bottom) encoder layer runs its backward: their checkpointed
    inputs ((L_enc − 1)·a·T_enc·h) or, without checkpointing, their saved tensors ((L_enc − 1)·S_enc)."""
    m = st.model
    n = max(m.num_encoder_layers - 1, 0)
    if gradient_checkpointing:
        return n * st.stream_bytes * x.T_enc * m.hidden_size
    return n * layer_saved(st, kind, x, "encoder")


def encoder_kept_in_decoder_backward(st: Structure, x: Shape, gradient_checkpointing: bool):
    """Encoder-decoder models: what the encoder keeps while the decoder's layers run backward,
    beyond its layers' (checkpointed inputs or saved tensors): its final norm's saved tensors,
    its output (read by every cross-attention k/v), the final dropout's mask and, with
    checkpointing, the two embedding outputs that enable_input_require_grads made leaves (T5
    drops them out before the first layer, so they are not the first layer's input: a·(T_enc + T)·h)
    with the entry dropouts' masks (they act on leaves that require grad).
    Source: modeling_t5.py T5Stack.forward (``self.dropout(inputs_embeds)``, ``final_layer_norm``,
    ``self.dropout``). 0 for decoder-only models."""
    m = st.model
    if not m.is_encoder_decoder:
        return 0
    a, h = st.stream_bytes, m.hidden_size
    kept = norm_saved(st, x.T_enc) + a * x.T_enc * h
    mask = _mask_bytes(st, a) if hidden_dropout(m) else 0
    kept = kept + mask * x.T_enc * h
    if gradient_checkpointing:
        kept = kept + (a + mask) * (x.T_enc + x.T) * h
    return kept


def position_bucket_temporaries(q, k, bidirectional: bool):
    """Bytes alive at the peak of T5's relative-position bucketing for a [q, k] bias
    (modeling_t5.py T5Attention.compute_bias, ``_relative_position_bucket``): int64 [q, k]
    tensors, at ``torch.min(relative_position_if_large, full_like(...))``: compute_bias's
    ``relative_position`` (a local while the bucketing runs), the absolute (encoder,
    bidirectional) or ``-min(·, 0)`` (decoder) position, ``relative_position_if_large`` before and
    after the min and the ``full_like`` operand (8 B each), the bool ``is_small`` (1 B), and in
    the bidirectional case ``relative_buckets`` made from ``(relative_position > 0)`` (8 B):
    49·q·k bytes bidirectional, 41·q·k causal. Released before the embedding lookup."""
    return (49 if bidirectional else 41) * q * k


def position_bias_activations(st: Structure, x: Shape, gradient_checkpointing: bool):
    """T5/mT5: activations alive while the encoder's first block computes its position bias
    (``position_bucket_temporaries`` on top), the largest of:

    - in the forward: the embedding output (a leaf with checkpointing), the entry dropout's
      output (and its mask when the input requires grad), and what the block made before the
      bias: its first norm (``norm_saved``; T5LayerNorm keeps its input, the block input, and
      holds its output a·T·h while the attention runs), q, k, v (3·a·T·n_h·d) and their LoRA
      branches (T5Attention.forward computes q, k, v before ``compute_bias``);
    - with checkpointing, the same block's recompute at the very end of backward: besides the
      above, the decoder's input leaf and its ``.grad`` (a·T·h each), the cross-attention's zeros
      bias and its ``.grad`` (2·a·n_h·s_t·s_e) and the residual gradient into the block (a·T_enc·h);
      the other encoder layers' inputs and the forward's bias were released with their backward.
    0 for models without a relative position bias."""
    m = st.model
    if not _relative_bias(m) or not m.is_encoder_decoder:
        return 0
    a, h, T = st.stream_bytes, m.hidden_size, x.T_enc
    mask = _mask_bytes(st, a) if hidden_dropout(m) else 0
    qkv = 3 * a * T * m.num_heads * m.head_dim
    lora = lora_input_saved_bytes(st, x.dropout) * T * st.first_layer_attn_in_adapted
    norm = norm_saved(st, T) - (a * T * h if m.arch.norm_keeps_input or a == 4 else 0) + a * T * h
    block = a * T * h + norm + qkv + lora  # the block input (entry dropout output) and its first part
    temps = position_bucket_temporaries(x.seq, x.seq, bidirectional=True)
    if not gradient_checkpointing:
        return block + temps
    recompute = (block + (a + mask) * T * h  # the leaf and the entry dropout mask
                 + 2 * a * x.T * h + 2 * a * m.num_heads * x.tseq * x.seq + a * T * h)
    return recompute + temps


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
        layers = (layers - first_layer_not_saved(st, kind, x) - first_decoder_layer_not_saved(st, kind, x)
                  + t5_shared_biases(st, x, checkpointed=False))
    final = norm_saved(st, x.T)
    if m.is_encoder_decoder:
        final = final + norm_saved(st, x.T_enc) + st.stream_bytes * x.T_enc * m.hidden_size
    rope = rope_tables(st, x)
    return layers + final + rope + head_lora_activations(st, x)


def rope_tables(st: Structure, x: Shape):
    """The RoPE cos/sin tables, computed once per forward and handed to every layer (saved by
    each layer's rotary products, and inputs of each checkpointed layer): 2·a·rows·s·d
    (position_ids of batch 1 unless passed per row, ``Shape.rope_rows``); 0 without RoPE."""
    m = st.model
    return 2 * st.stream_bytes * x.rope_rows * x.tseq * m.head_dim if m.arch.position == "rope" else 0


def recompute_shares_input(st: Structure, x: Shape):
    """Bytes of a checkpointed layer's recomputed saved tensors that are its checkpointed input
    itself, already counted among the checkpoint inputs: the input norm saves its input when it
    needs no copy of it -- an RMSNorm's ``hidden_states.to(torch.float32)`` of an fp32 stream (a
    quantized base) returns the tensor itself (modeling_llama.py::LlamaRMSNorm, gemma's
    ``x.float()``), and LayerNorm (native_layer_norm) saves its input as given, or under autocast
    its fp32 cast, the tensor itself for an fp32 stream. a·T·h then, else 0 (a new fp32 copy);
    0 for layers without an input norm (olmo2) and encoder-decoder models (T5's own norm rule)."""
    m = st.model
    n_after = m.arch.norms_after_attention
    if m.is_encoder_decoder or (n_after is not None and n_after >= m.arch.norms_per_layer):
        return 0
    a = st.stream_bytes
    if m.arch.norm == "rms":
        shared = a == 4
    else:
        shared = not st.autocast_bytes or a == 4
    return a * x.T * m.hidden_size if shared else 0


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
    if kind == "eager" and st.first_layer_attn_in_adapted and "qkv" not in st.first_layer_attn_roles:
        # eager attention (eager_attention_forward: matmul(q, kᵀ), softmax in fp32, cast back,
        # matmul(p, v)) on the grad-free input: autograd saves a product's input only for the
        # other input's gradient (torch derivatives.yaml mm/bmm), so q only when k is adapted,
        # k only when q is, v only when the scores need a gradient (q or k adapted), the cast
        # probabilities only when v is; softmax keeps its fp32 output when the scores need one
        roles, a = st.first_layer_attn_roles, st.attention_bytes
        q, k, v = "q" in roles, "k" in roles, "v" in roles
        kv = a * T * eager_kv_heads(m, x.b) * m.head_dim
        e = x.b * m.num_heads * x.tseq * x.tseq
        not_saved = not_saved + (0 if k else a * T * m.num_heads * m.head_dim) + (0 if q else kv)
        if not (q or k):
            not_saved = not_saved + kv + (4 * e if a != 4 else 0)
        if not v and a != 4 and attention_dropout_p(m) <= 0:
            not_saved = not_saved + a * e
    if not st.first_layer_attn_in_adapted:
        seq = x.seq if first == "encoder" else x.tseq
        not_saved = not_saved + attention_saved_per_layer(st, kind, T, x.b, seq, seq, masked=x.masked,
                                                          fa2_copies=x.fa2_copies)
    if m.arch.parallel_attn and not st.first_layer_mlp_adapted:
        # parallel attention (falcon, gpt-neox): the MLP reads the layer input directly
        not_saved = not_saved + mlp_saved(st, T)
    return not_saved


def first_decoder_layer_not_saved(st: Structure, kind: str, x: Shape):
    """Encoder-decoder models: what the decoder's first layer does not save without
    checkpointing, as ``first_layer_not_saved`` for the encoder's: its input is the frozen
    decoder embedding's output (modeling_t5.py T5Stack.forward: ``self.dropout(inputs_embeds)``),
    which needs no gradient, so its self-attention norm saves nothing, its adapted q/k/v keep no
    dropout mask, and with none adapted its self-attention saves nothing (the cross-attention
    and the FFN read tensors that do need a gradient). 0 for decoder-only models."""
    m = st.model
    if not m.is_encoder_decoder:
        return 0
    not_saved = norm_saved(st, x.T) + _where(x.dropout > 0, _mask_bytes(st, 4), 0) * x.T * \
        st.first_decoder_layer_attn_in_adapted
    if not st.first_decoder_layer_attn_in_adapted:
        not_saved = not_saved + attention_saved_per_layer(st, kind, x.T, x.b, x.tseq, x.tseq)
    return not_saved
